"""Benchmark: the SavedModel's explain pass (Grad-CAM) against its forward pass, in one run.

On real P002 slices (open lung), through the two signatures of one loaded SavedModel, as the
service calls them (oneDNN's frozen-weights cache on, as `load_engine` sets it): for each
batch size, the two passes alternate (so that load from other processes hits both alike)
and the median seconds per slice of each, and their ratio, are printed. Then the memory:
the process's peak RSS after the forward passes, and again after the explain passes (the
peak only grows, so the difference is what explaining adds on top), at the largest batch.
Also the time to draw one overlay (app/overlay.py: blend and PNG).

The model is the pipeline benchmark's (benchmarks/bench_pipeline.py: the paper's network,
seeded, BN statistics calibrated, head std 0.05; built into var/bench/model on first use).
Its weights are random: speed and memory do not depend on them.

Usage: .venv/bin/python benchmarks/bench_explain.py [--batch-sizes 1,8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from app.inference import FROZEN_WEIGHTS_ENV  # noqa: E402  (TensorFlow is imported lazily)

DATA = Path(os.environ.get("COVIDCT_SHARED_DATA", ROOT.parent / "shared" / "data"))
P002 = DATA / "covid-ct-md" / "P002"
SLICES = range(60, 76)  # 16 open-lung slices


def log(msg: str) -> None:
    print(msg, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def p002_slices() -> np.ndarray:
    import io
    import zipfile

    from app.ingest import IngestLimits, configure_libraries, ingest_zip

    configure_libraries()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in SLICES:
            zf.write(P002 / f"IM{i:04d}.dcm", f"P002/IM{i:04d}.dcm")
    (series,) = ingest_zip(buf.getvalue(), IngestLimits()).series
    return series.pixels.astype(np.float32)[..., None]


def timed(fn: Any, x: Any) -> float:
    t0 = time.perf_counter()
    out = fn(slices=x)
    for value in out.values():
        value.numpy()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    os.environ.setdefault(FROZEN_WEIGHTS_ENV, "1")  # as the service runs
    import tensorflow as tf
    from bench_pipeline import BENCH_MODEL, bench_model_is_current, export_bench_model

    from app import contract
    from app.overlay import overlay_png

    current = bench_model_is_current(BENCH_MODEL)
    loaded = tf.saved_model.load(str(BENCH_MODEL)) if current else None
    if loaded is None or contract.EXPLAIN_SIGNATURE_KEY not in loaded.signatures:
        log(f"building the benchmark model (with its explain signature) into {BENCH_MODEL} …")
        export_bench_model(BENCH_MODEL)
        loaded = tf.saved_model.load(str(BENCH_MODEL))
    x_all = p002_slices()
    serve = loaded.signatures[contract.SIGNATURE_KEY]
    explain = loaded.signatures[contract.EXPLAIN_SIGNATURE_KEY]
    log(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs visible, {len(x_all)} P002 slices")
    rss_loaded = peak_rss_mb()

    rows = []
    for b in sizes:
        x = tf.constant(x_all[:b])
        first_serve = timed(serve, x)  # trace, select kernels
        t_serve, t_explain = [], []
        for _ in range(args.repeats):
            t_serve.append(timed(serve, x) / b)
        rss_forward = peak_rss_mb()
        first_explain = timed(explain, x)
        log(f"batch {b}: first call {first_serve:.1f} s forward, {first_explain:.1f} s explain")
        for _ in range(args.repeats):  # alternate: outside load hits both alike
            t_explain.append(timed(explain, x) / b)
            t_serve.append(timed(serve, x) / b)
        rss_explain = peak_rss_mb()
        s, e = statistics.median(t_serve), statistics.median(t_explain)
        rows.append((b, s, e, rss_forward, rss_explain))
        log(
            f"batch {b}: forward {s * 1000:.0f} ms/slice, explain {e * 1000:.0f} ms/slice, "
            f"ratio {e / s:.2f}; peak RSS {rss_forward:.0f} MB after forward, "
            f"{rss_explain:.0f} MB after explain (+{rss_explain - rss_forward:.0f} MB)"
        )
    out = explain(slices=tf.constant(x_all[:1]))
    heat = out[contract.OUTPUT_HEATMAP].numpy()[0]
    draws = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        png = overlay_png(x_all[0, ..., 0], heat)
        draws.append(time.perf_counter() - t0)
    log(
        f"overlay: {statistics.median(draws) * 1000:.0f} ms per slice, {len(png) / 1000:.0f} KB PNG"
    )
    log(f"peak RSS with the model loaded: {rss_loaded:.0f} MB")
    log(
        "| batch | forward ms/slice | explain ms/slice | explain / forward | peak RSS forward → explain |"
    )
    log("|---|---|---|---|---|")
    for b, s, e, rf, re in rows:
        log(
            f"| {b} | {s * 1000:.0f} | {e * 1000:.0f} | {e / s:.2f} | {rf:.0f} → {re:.0f} MB (+{re - rf:.0f}) |"
        )


if __name__ == "__main__":
    main()
