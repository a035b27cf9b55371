"""The layout's rules that a reader relies on, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULES = {p.stem for p in (ROOT / "tests").rglob("*.py")}
STAGES = ["app/ingest", "app/selection.py", "app/inference.py", "app/diagnosis.py",
          "app/pipeline.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources(*where: str) -> list[Path]:
    paths: list[Path] = []
    for w in where:
        p = ROOT / w
        paths.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    return paths


def test_scripts_and_benchmarks_import_nothing_from_tests() -> None:
    """They must run from `scripts/serve.sh`'s environment, without the test extras."""
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            n for n in _imports(p) if n.split(".")[0] in TEST_MODULES | {"tests"}
        )
        for p in _sources("scripts", "benchmarks")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    for p in _sources("scripts", "benchmarks"):
        assert '"tests"' not in p.read_text(), p  # no sys.path tricks either


def test_no_stage_module_reads_the_settings() -> None:
    """Each stage takes its own small frozen config, built once at start-up."""
    offenders = [
        str(p.relative_to(ROOT)) for p in _sources(*STAGES) if "app.settings" in _imports(p)
    ]
    assert offenders == []


def test_the_service_never_imports_the_offline_code() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in _sources("app")
        if any(n == "models" or n.startswith("models.") for n in _imports(p))
    ]
    assert offenders == []
