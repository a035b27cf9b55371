"""The documentation: README.md as a front page, docs/*.md findable, linked and current.

- every relative link (and #anchor) in README.md and docs/*.md points at a file and a
  heading that exist;
- docs/index.md lists every page in docs/;
- the settings table in docs/settings.md is the one scripts/settings_doc.py generates from
  app/settings.py (so every setting is documented, with its real default);
- every problem type the service can answer is in docs/api.md's table, every metric it
  exports in docs/operations.md's;
- the README keeps the UNTRAINED warning, the two commands and the measured coverage.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return LINK.findall(text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def test_slug_follows_github() -> None:
    assert slug("POST /patients/diagnose") == "post-patientsdiagnose"
    assert slug("Health, metrics, docs") == "health-metrics-docs"
    assert slug("Training, evaluating and importing models (`models/`)") == (
        "training-evaluating-and-importing-models-models"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no such heading")
    assert broken == []


def test_index_lists_every_page() -> None:
    listed = {Path(t.partition("#")[0]).name for t in links(DOCS / "index.md")}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - listed == set(), "add these pages to docs/index.md"


def test_readme_links_the_index() -> None:
    assert "docs/index.md" in links(ROOT / "README.md")


def test_settings_table_is_current() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_setting_is_in_the_table() -> None:
    """Independent of the generator: each field's variable appears in a table row."""
    from app.settings import Settings

    prefix = str(Settings.model_config.get("env_prefix", ""))
    text = (DOCS / "settings.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", text, re.M))
    assert {(prefix + name).upper() for name in Settings.model_fields} <= rows


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) < 10_000, "keep the reference in docs/"
    assert "UNTRAINED" in text
    assert "scripts/serve.sh" in text and "scripts/test.sh" in text
    assert "/patients/diagnose" in text
    coverage = re.search(r"Line coverage of `app/` in the full suite: \*\*(\d+) %\*\*", text)
    assert coverage is not None, "report the measured coverage figure"
    assert int(coverage.group(1)) >= 90


def problem_types() -> dict[str, int]:
    """Every problem type the service answers with: the error classes and the HTTP ones."""
    import app.errors
    import app.problems

    def subclasses(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    base = app.errors.CovidCTError  # its own type is "internal", 500
    types = {c.type_: c.status for c in (base, *subclasses(base))}
    types.update({t: s for s, t in app.problems._HTTP_TYPES.items()})
    return types


def test_every_problem_type_is_documented() -> None:
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    rows = {
        name: int(status)
        for names, statuses in re.findall(
            r"^\| (`[a-z-]+`(?:, `[a-z-]+`)*) \| ([\d, ]+) \|", text, re.M
        )
        for name, status in zip(
            re.findall(r"`([a-z-]+)`", names), re.findall(r"\d+", statuses), strict=True
        )
    }
    expected = problem_types()
    assert len(expected) >= 20
    assert {t: rows.get(t) for t in expected} == expected


def test_every_metric_is_documented() -> None:
    import prometheus_client

    import app.metrics

    defined = {
        m._name + ("_total" if isinstance(m, prometheus_client.Counter) else "")
        for m in vars(app.metrics).values()
        if isinstance(m, prometheus_client.metrics.MetricWrapperBase)
    }
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `(covidct_[a-z0-9_]+)[{`]", text, re.M))
    assert len(defined) >= 15
    assert defined - rows == set(), "add these to the metrics table of docs/operations.md"
