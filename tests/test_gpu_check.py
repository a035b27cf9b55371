"""scripts/gpu_check.sh: without a GPU it is checked by its dry run, which validates the
plan (options, requirements, data, the benchmark's flags), prints it and runs nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shared_data import DATA, needs_data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(*args: str, data: Path = DATA) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COVIDCT_SHARED_DATA": str(data)}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )


@needs_data
def test_the_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    r = gpu_check("--dry-run", "--venv", str(venv), "--batch-sizes", "8,16", "--repeats", "2")
    assert r.returncode == 0, r.stderr
    plan = r.stdout
    assert "nvidia-smi -L" in plan
    assert f"-m venv {venv}" in plan
    assert "pip install -r requirements/gpu.txt" in plan
    assert "bench_pipeline.py --gpu-check --batch-sizes 8,16 --repeats 2" in plan
    assert "the plan checks out" in plan
    assert not venv.exists()  # nothing created


@needs_data
def test_no_install_leaves_pip_out_of_the_plan() -> None:
    r = gpu_check("--dry-run", "--no-install")
    assert r.returncode == 0, r.stderr
    assert "pip install" not in r.stdout
    assert "--batch-sizes 8,16,32 --repeats 3" in r.stdout  # the defaults


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-sizes", "8,0"], "comma-separated list"),
        (["--batch-sizes", "512"], "over the service's limit"),
        (["--repeats", "x"], "--repeats must be"),
        (["--bogus"], "unknown option"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(args: list[str], message: str) -> None:
    r = gpu_check("--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr
    assert "plan" not in r.stdout


def test_without_the_data_the_check_says_where_it_looked(tmp_path: Path) -> None:
    r = gpu_check("--dry-run", data=tmp_path)
    assert r.returncode == 2
    assert f"P002 not found under {tmp_path}/covid-ct-md" in r.stderr
