"""A long fuzz run of POST /patients/diagnose, in process through the real ASGI app.

Mutates real zips, DICOM and TIFF files from ../shared/data with a seeded RNG (the
mutators in tests/hostile.py: bit flips, truncation, insertion, deletion, interesting
integers, zip header/central-directory fields, DICOM element values and raw tags, TIFF
IFD fields) and posts each as an upload. Every answer must be a 200 diagnosis or a 4xx
problem+json; a 5xx, an exception or an unhealthy service after the run fails it.

Prints counts by status and problem type, the slowest inputs and the time taken; exits 1
on any failure. Inputs that failed are written to --failures DIR for replay.

Usage: .venv/bin/python tests/tools/fuzz.py [--count 10000] [--seed 1] [--model-dir DIR]
       [--max-seconds S] [--failures DIR]
"""

from __future__ import annotations

import argparse
import collections
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fastapi.testclient import TestClient  # noqa: E402

from app.ingest import configure_libraries  # noqa: E402
from app.main import create_app  # noqa: E402
from hostile import check_answer, mutated_uploads, p002_slice, post, seed_corpus, series_corpus  # noqa: E402
from shared_data import P002, zip_files  # noqa: E402
from support import make_settings, wait_ready  # noqa: E402


def ensure_model(model_dir: Path) -> Path:
    if not (model_dir / "saved_model.pb").exists():
        print(f"building the default (untrained) SavedModel at {model_dir} ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "models", "build-default", "--out", str(model_dir)],
            cwd=ROOT,
            check=True,
        )
    return model_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "var" / "models" / "default")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop early")
    parser.add_argument("--failures", type=Path, default=Path("fuzz-failures"))
    args = parser.parse_args()
    if not P002.is_dir():
        print(f"real CT fixtures not found at {P002}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.ERROR)  # the service's skip notes would flood the output
    configure_libraries()  # before this process's own pydicom reads (the corpus); the app's too
    settings = make_settings(ensure_model(args.model_dir), max_batch_size=4)
    counts: collections.Counter[str] = collections.Counter()
    by_mutator: collections.Counter[str] = collections.Counter()
    slowest: list[tuple[float, int, str]] = []
    failures = 0
    t0 = time.perf_counter()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_ready(client)
        valid = zip_files([("P002/IM0060.dcm", p002_slice(60))])
        uploads = mutated_uploads(args.seed, seed_corpus(), series_corpus())
        for i in range(args.count):
            if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
                print(f"stopping after {args.max_seconds} s", flush=True)
                break
            try:
                label, archive = next(uploads)
            except Exception as e:  # a bug of the mutators: report what ran so far
                print(f"input generator failed at {i}: {e!r}", flush=True)
                failures += 1
                break
            start = time.perf_counter()
            try:
                response = post(client, archive, patient_id=f"FUZZ-{i}")
                outcome = check_answer(response)
            except Exception as e:  # a 5xx, a malformed answer or a crash of the client
                failures += 1
                outcome = f"FAILED {type(e).__name__}"
                args.failures.mkdir(parents=True, exist_ok=True)
                (args.failures / f"{args.seed}-{i}.zip").write_bytes(archive)
                print(f"input {i} ({label}): {e!r}"[:400], flush=True)
            elapsed = time.perf_counter() - start
            counts[outcome] += 1
            by_mutator[f"{label} -> {'200' if outcome == '200' else outcome.split()[0]}"] += 1
            slowest = sorted([*slowest, (elapsed, i, label)], reverse=True)[:5]
            if (i + 1) % 500 == 0:
                rate = (i + 1) / (time.perf_counter() - t0)
                print(f"{i + 1} inputs, {failures} failures, {rate:.1f}/s", flush=True)
        n = sum(counts.values())
        healthy = client.get("/health").status_code == 200
        still_valid = post(client, valid).status_code == 200
    seconds = time.perf_counter() - t0
    print(f"\n{n} inputs in {seconds:.0f} s ({n / seconds:.1f}/s), seed {args.seed}")
    for outcome, c in counts.most_common():
        print(f"  {c:6d}  {outcome}")
    print("by mutator:")
    for key, c in sorted(by_mutator.items()):
        print(f"  {c:6d}  {key}")
    print("slowest:", ", ".join(f"#{i} {label} {s:.2f}s" for s, i, label in slowest))
    print(f"server errors or crashes: {failures}; healthy after: {healthy and still_valid}")
    return 0 if failures == 0 and healthy and still_valid else 1


if __name__ == "__main__":
    sys.exit(main())
