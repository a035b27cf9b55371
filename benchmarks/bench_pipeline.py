"""Benchmark: the paper's own code path vs. the service's pipeline vs. the service over HTTP.

One run, on the real P002 series (133 DICOM slices, JPEG Lossless):
  (a) baseline, the paper's way, in a process of its own with TensorFlow's defaults: read
      each file, count dark pixels with a Python loop over the ROI's pixels, Keras
      `model.predict` one slice at a time on the Keras network as models/ builds it;
  (b) the service's pipeline in process (ingest → select → batched SavedModel → diagnose);
  (c) the service over HTTP (uvicorn on 127.0.0.1) with 1, 2, 4 and 8 concurrent clients;
  (d) decode throughput of P002's frames in this thread and with 1…N decode workers (N: the
      cores this process may use);
  (e) a three-series study (P002 under three SeriesInstanceUIDs) through the sequential
      path and the overlapped one, with this CPU's model and with a stand-in model stage
      that holds no CPU (as a GPU's).
With --gpu-check it prints only what scripts/gpu_check.sh reports on a GPU host.
It prints slices/s, per-stage medians, ratios, the server's peak RSS (with its decode
workers), the model stage's GFLOP/s against an fp32 matrix-multiply peak measured in the
same run, and (with --bf16) the reduced-precision speed-up and its largest probability
deviation.

The network is the paper's, taking the raw stored values (HU + 1024) unscaled, seeded,
with batch-norm statistics calibrated on CT-like slices and a head init of std 0.05 (built
into var/bench/ on first use, and rebuilt when the one there predates the card's
`preprocessing` field, i.e. the unscaled network), so that its outputs vary: the baseline
and the pipeline must give the same probabilities, and the bf16 deviation means something.
Its weights are random: speed does not depend on them.

Usage: .venv/bin/python benchmarks/bench_pipeline.py [--bf16] [--clients 1,2,4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.inference import FROZEN_WEIGHTS_ENV  # noqa: E402  (TensorFlow is imported lazily)
from app.ingest import configure_libraries  # noqa: E402

BENCH_MODEL = ROOT / "var" / "bench" / "model"
BENCH_SEED = 0
# With batch-norm statistics calibrated on CT-like slices, the first batch norm absorbs the
# scale of the raw values and a head init of std 0.05 spreads P002's scores (the run prints
# their range; std 0.5 would saturate them at 0 or 1 and make any deviation meaningless).
BENCH_HEAD_STD = 0.05

DATA = Path(os.environ.get("COVIDCT_SHARED_DATA", ROOT.parent / "shared" / "data"))
P002 = DATA / "covid-ct-md" / "P002"
GFLOP_PER_SLICE = 40.79


def log(msg: str) -> None:
    print(msg, flush=True)


def p002_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(P002.glob("*.dcm")):
            zf.write(p, f"P002/{p.name}")
    return buf.getvalue()


def matmul_gflops(seconds: float = 5.0, n: int = 2048) -> tuple[float, float]:
    """fp32 GEMM throughput through TensorFlow (same threads as the model): best, median."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    mm = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    mm(a, b).numpy()
    rates, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            mm(a, b).numpy()
        rates.append(4 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return max(rates), statistics.median(rates)


def jpeg_lossless_plugin() -> str:
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    return next(iter(get_decoder(JPEGLosslessSV1).available_plugins), "none")


# --- (a) the paper's code path ----------------------------------------------------------


def bench_network() -> object:
    """The paper's Keras network, seeded, head std 0.05, BN statistics calibrated."""
    from models.architecture import build_fpn_resnet50v2
    from models.calibration import give_trained_statistics

    model = build_fpn_resnet50v2(head_init_std=BENCH_HEAD_STD, seed=BENCH_SEED)
    return give_trained_statistics(model, seed=BENCH_SEED)


def export_bench_model(out: Path) -> None:
    from models.export import export_saved_model, untrained_card

    card = untrained_card(seed=BENCH_SEED, head_init_std=BENCH_HEAD_STD, version="bench")
    export_saved_model(bench_network(), out, card, overwrite=True)


def bench_model_is_current(model_dir: Path) -> bool:
    """A model there, built for the unscaled network (its card states the preprocessing)."""
    from app.contract import read_card

    try:
        return read_card(model_dir).preprocessing is not None
    except (OSError, ValueError):
        return False


def baseline(limit: int | None) -> dict:
    import pydicom

    files = sorted(P002.glob("*.dcm"))[:limit]
    model = bench_network()
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    images = []
    for p in files:
        ds = pydicom.dcmread(p)
        images.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) + 1024)
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    counts = []
    for img in images:  # the paper's loop over the ROI's pixels
        c = 0
        for y in range(240, 340):
            for x in range(120, 370):
                if img[y, x] < 300:
                    c += 1
        counts.append(c)
    threshold = (max(counts) - min(counts)) / 1.5
    selected = [img for img, c in zip(images, counts, strict=True) if c > threshold]
    t_select = time.perf_counter() - t0

    t0 = time.perf_counter()
    probs = []
    for img in selected:  # model.predict one slice at a time
        out = model.predict(img[None, ..., None].astype(np.float32), verbose=0)
        probs.append(float(out[0, 0]))
    t_model = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    return {
        "slices": len(files),
        "selected": len(selected),
        "read_s": t_read,
        "select_s": t_select,
        "model_s": t_model,
        "total_s": total,
        "probs": probs,
    }


def baseline_in_subprocess(limit: int | None) -> dict:
    """(a) with TensorFlow's defaults, as the paper ran it: no frozen-weights cache."""
    env = {**os.environ, FROZEN_WEIGHTS_ENV: "0"}
    cmd = [sys.executable, __file__, "--baseline-only"]
    if limit is not None:
        cmd += ["--baseline-slices", str(limit)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- (b) the service's pipeline in process ----------------------------------------------


def pipeline_in_process(model_dir: Path, archive: bytes, repeats: int, **overrides) -> dict:
    from app.inference import load_engine
    from app.ingest import DecodePool
    from app.pipeline import diagnose_upload
    from app.settings import Settings

    settings = Settings(_env_file=None, model_dir=model_dir, **overrides)
    engine = load_engine(settings.served_model())
    engine.start()
    workers = settings.decode_workers
    pool = DecodePool(workers) if workers else None  # as the service's Runtime holds one
    runs = []
    probs = None

    async def once() -> None:
        nonlocal probs
        t0 = time.perf_counter()
        _, result = await diagnose_upload(
            archive, engine, settings.pipeline_config(), threshold=0.1, decode_pool=pool
        )
        total = time.perf_counter() - t0
        n = result.series[0].selection.n_selected
        probs = result.series[0].covid_probability
        runs.append({**{k: v / 1000 for k, v in result.timings_ms.items()}, "total": total, "n": n})

    if pool is not None:  # start the workers before timing, as a service's first upload would
        pool.start()
    for _ in range(repeats):
        asyncio.run(once())
    engine.stop()
    if pool is not None:
        pool.shutdown()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["infer_best"] = min(r["infer"] for r in runs)
    med["probs"] = probs
    return med


# --- (d) decode throughput, (e) series overlapping within a study ------------------------


def decode_tasks() -> list[tuple]:
    """P002's frames as the decode workers get them (DecodeTask: pixel data and description)."""
    from app.ingest import IngestLimits
    from app.ingest.dicom import one_frame, read_dicom

    tasks = []
    for i, p in enumerate(sorted(P002.glob("*.dcm"))):
        for frame in read_dicom(i + 1, p.name, p.read_bytes(), IngestLimits()):
            assert frame.task is not None
            tasks.append(one_frame(frame.task))
    return tasks


def worker_counts(n: int) -> list[int]:
    """1…n, every count up to 16, then powers of two and n."""
    return sorted({*range(1, min(n, 16) + 1), *(2**k for k in range(n.bit_length())), n})


def decode_scaling(repeats: int) -> list[dict]:
    """P002's 133 frames decoded in this thread, then by pools of 1…N workers (N: the cores
    this process may use): slices/s, median of `repeats` passes over a started pool."""
    from app.ingest import DecodePool
    from app.ingest.dicom import decode_frame

    tasks = decode_tasks()
    rows = []

    def rate(pool: DecodePool | None) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if pool is None:
                for task in tasks:
                    decode_frame(*task)
            else:
                for _ in pool.decode(decode_frame, tasks):
                    pass
            times.append(time.perf_counter() - t0)
        return len(tasks) / statistics.median(times)

    rows.append({"workers": 0, "slices_per_s": rate(None)})
    for workers in worker_counts(usable_cores_note()[0]):
        pool = DecodePool(workers)
        try:
            pool.start()
            rows.append({"workers": workers, "slices_per_s": rate(pool)})
        finally:
            pool.shutdown()
    return rows


def usable_cores_note() -> tuple[int, str]:
    """The cores this process may use, and how that was found, in words."""
    from app.ingest.pool import cpu_quota, usable_cores

    quota = cpu_quota()
    affinity = len(os.sched_getaffinity(0))
    limit = f"cgroup CPU quota {quota:g}" if quota else "no cgroup CPU quota"
    return usable_cores(), f"affinity {affinity}, {limit}; host {os.cpu_count()}"


def three_series_zip() -> bytes:
    """P002 under three SeriesInstanceUIDs (3 × 133 slices), built in memory."""
    import pydicom
    from pydicom.uid import generate_uid

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k in range(3):
            uid = generate_uid(entropy_srcs=[f"covidct-bench-series-{k}"])  # same each run
            for p in sorted(P002.glob("*.dcm")):
                ds = pydicom.dcmread(p)
                ds.SeriesInstanceUID = uid
                out = io.BytesIO()
                ds.save_as(out)
                zf.writestr(f"S{k}/{p.name}", out.getvalue())
    return buf.getvalue()


class DeviceStandIn:
    """A model stage that holds no CPU, as one on a GPU: `ms_per_slice` of waiting per
    slice (the only use of sleep here: it stands in for a device's compute time)."""

    def __init__(self, ms_per_slice: float) -> None:
        self.seconds = ms_per_slice / 1000
        self.card = None
        self.device = "stand-in accelerator"  # not this host's CPU: the service overlaps

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds * len(batch))
        return np.full(len(batch), 0.5, np.float32)


def overlap_in_process(
    model_dir: Path,
    archive: bytes,
    repeats: int,
    device_ms_per_slice: float | None = None,
    **overrides,
) -> dict:
    """The three-series study through the sequential path (the whole study ingested, then
    every series to the model) and the overlapped one (`diagnose_upload` with overlap: a
    series to the model as soon as it is decoded), alternating, on the real model or a
    stand-in. The service overlaps where the model is not on this host's CPU."""
    from starlette.concurrency import run_in_threadpool

    from app.inference import BatchingConfig, InferenceEngine, load_engine
    from app.ingest import DecodePool, ingest_zip, open_study
    from app.pipeline import diagnose_study, diagnose_upload
    from app.settings import Settings

    settings = Settings(_env_file=None, model_dir=model_dir, **overrides)
    config = settings.pipeline_config()
    if device_ms_per_slice is None:
        engine = load_engine(settings.served_model())
    else:
        batching = BatchingConfig(max_batch_size=settings.max_batch_size)
        engine = InferenceEngine(DeviceStandIn(device_ms_per_slice), batching)
    engine.start()
    auto = "overlapped" if not engine.uses_host_cpu else "sequential"  # the service's choice
    pool = DecodePool(settings.decode_workers) if settings.decode_workers else None
    if pool is not None:
        pool.start()
    runs: dict[str, list[dict]] = {"sequential": [], "overlapped": []}
    probs: dict[str, list[np.ndarray]] = {}

    async def sequential() -> None:
        t0 = time.perf_counter()
        study = await run_in_threadpool(ingest_zip, archive, config.ingest, pool)
        ingest = time.perf_counter() - t0
        result = await diagnose_study(study, engine, config.selection, threshold=0.1)
        record("sequential", t0, {**result.timings_ms, "ingest": ingest * 1000}, result)

    async def overlapped() -> None:
        t0 = time.perf_counter()
        _, result = await diagnose_upload(
            archive, engine, config, threshold=0.1, decode_pool=pool, overlap=True
        )
        record("overlapped", t0, result.timings_ms, result)

    def record(path: str, t0: float, timings: dict, result) -> None:
        total = time.perf_counter() - t0
        runs[path].append({**{k: v / 1000 for k, v in timings.items()}, "total": total})
        probs[path] = [s.covid_probability for s in result.series]

    t0 = time.perf_counter()
    for _ in range(repeats):
        open_study(archive, config.ingest)  # headers only: what overlapping cannot hide
    headers = (time.perf_counter() - t0) / repeats
    for i in range(repeats):
        for path in (sequential, overlapped) if i % 2 == 0 else (overlapped, sequential):
            asyncio.run(path())
    engine.stop()
    if pool is not None:
        pool.shutdown()
    med = {
        path: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for path, rows in runs.items()
    }
    a, b = probs["sequential"], probs["overlapped"]
    delta = max(float(np.nanmax(np.abs(x - y))) for x, y in zip(a, b, strict=True))
    return {**med, "headers": headers, "max_delta_p": delta, "probs": b, "auto": auto}


def report_overlap(label: str, o: dict) -> None:
    seq, ovl = o["sequential"], o["overlapped"]
    # What overlapping can hide: the decoding of series 2 and 3 (the study's ingest less
    # its header reading, two thirds of it), at most the model time of series 1 and 2.
    decode_later = (seq["ingest"] - o["headers"]) * 2 / 3
    hideable = min(decode_later, seq["infer"] * 2 / 3)
    hidden = seq["total"] - ovl["total"]
    log(f"  {label}: sequential {seq['total']:.2f} s (ingest {seq['ingest']:.2f} s, of which "
        f"headers {o['headers']:.2f} s; infer {seq['infer']:.2f} s), overlapped "
        f"{ovl['total']:.2f} s → {seq['total'] / ovl['total']:.3f}×; the service runs it "
        f"{o['auto']}")  # fmt: skip
    log(f"    hidden {hidden:.2f} s of the {hideable:.2f} s it could hide (decode of series 2 "
        f"and 3: {decode_later:.2f} s; model time of series 1 and 2: {seq['infer'] * 2 / 3:.2f} s)"
        f" = {100 * hidden / hideable:.0f} %; max |Δp| overlapped vs sequential "
        f"{o['max_delta_p']:.1e}")  # fmt: skip


# --- (c) the service over HTTP ---------------------------------------------------------


def serve(model_dir: Path, port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {
        **os.environ,
        "COVIDCT_MODEL_DIR": str(model_dir),
        "COVIDCT_LOG_LEVEL": "WARNING",
        **env_extra,
    }
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory",
           "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("service did not become ready")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_rss_sum = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop_flag.is_set():
            # The server's RSS, plus what its decode workers add: their unique memory
            # (USS), since the pages they share with each other would be counted twice.
            # The plain sum of RSS is kept too.
            rss = self.proc.memory_info().rss
            total, rss_sum = rss, rss
            for child in self.proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # a worker may exit meanwhile
                    info = child.memory_full_info()
                    total, rss_sum = total + info.uss, rss_sum + info.rss
            self.peak = max(self.peak, total)
            self.peak_rss_sum = max(self.peak_rss_sum, rss_sum)
            time.sleep(0.05)


def http_load(port: int, archive: bytes, clients: int, requests_per_client: int) -> dict:
    import httpx

    def client_loop(i: int) -> list[tuple[int, float, int]]:
        out = []
        with httpx.Client(timeout=1800) as c:
            for _ in range(requests_per_client):
                t0 = time.perf_counter()
                r = c.post(
                    f"http://127.0.0.1:{port}/patients/diagnose",
                    files={"file": ("p.zip", archive, "application/zip")},
                    data={"patient_id": f"bench-{i}"},
                )
                slices = sum(s["slices_total"] for s in r.json()["series"]) if r.is_success else 0
                out.append((r.status_code, time.perf_counter() - t0, slices))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [
            x for f in [pool.submit(client_loop, i) for i in range(clients)] for x in f.result()
        ]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == 200]
    return {
        "clients": clients,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "slices_per_s": sum(r[2] for r in ok) / wall,
        "median_latency_s": statistics.median(r[1] for r in results),
        "wall_s": wall,
    }


# --- the GPU check (scripts/gpu_check.sh) ------------------------------------------------


def gpu_check(args: argparse.Namespace) -> None:
    """What a GPU host gives: the model stage's slices/s, P002 end to end (warm), the decode
    share and the GPU's memory, at each batch size; decode throughput; the overlap."""
    import tensorflow as tf

    from app.inference import configure_devices

    device = configure_devices("auto", memory_growth=True)  # before anything touches a GPU
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and not args.allow_cpu:
        sys.exit("TensorFlow sees no GPU (the CUDA build and a driver are needed)")
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        log(f"GPU: {details.get('device_name', gpu.name)}, compute capability "
            f"{details.get('compute_capability', '?')}")  # fmt: skip
    cores, how = usable_cores_note()
    log(f"device {device}; usable cores: {cores} ({how}); JPEG Lossless decoder: "
        f"{jpeg_lossless_plugin()}")  # fmt: skip
    peak, median = matmul_gflops()
    log(f"fp32 matmul (TensorFlow, 2048², 5 s; TF32 where the GPU has it): peak {peak:.0f} "
        f"GFLOP/s, median {median:.0f}")  # fmt: skip

    log("\ndecode throughput, P002's 133 frames (medians of 3) …")
    for row in decode_scaling(3):
        who = f"{row['workers']} worker(s)" if row["workers"] else "in this thread"
        log(f"  {who}: {row['slices_per_s']:.1f} slices/s")

    archive = p002_zip()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    log(f"\nP002 through the pipeline, medians of {args.repeats} warm runs per batch size …")
    for size in sizes:
        if gpus:
            tf.config.experimental.reset_memory_stats("GPU:0")
        pipe = pipeline_in_process(args.model_dir, archive, args.repeats, max_batch_size=size)
        n, total = pipe["n"], pipe["total"]
        memory = (
            f"GPU memory peak {tf.config.experimental.get_memory_info('GPU:0')['peak'] / 1e9:.2f}"
            " GB (TensorFlow's allocator)" if gpus else "no GPU"
        )  # fmt: skip
        log(f"  batch {size}: model stage {n / pipe['infer']:.0f} slices/s "
            f"({n * GFLOP_PER_SLICE / pipe['infer']:.0f} GFLOP/s, {n} slices in "
            f"{pipe['infer']:.3f} s); end to end {total:.3f} s ({133 / total:.0f} slices/s); "
            f"ingest {pipe['ingest']:.3f} s = decode share {100 * pipe['ingest'] / total:.0f} %, "
            f"non-model {100 * (total - pipe['infer']) / total:.0f} %; {memory}")  # fmt: skip

    log("\na three-series study (P002 under three SeriesInstanceUIDs, 399 slices) …")
    best = max(sizes)
    three = three_series_zip()
    overlap = overlap_in_process(args.model_dir, three, args.repeats, max_batch_size=best)
    report_overlap(f"batch {best}", overlap)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=BENCH_MODEL)
    parser.add_argument("--repeats", type=int, default=3, help="in-process pipeline runs")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--baseline-slices", type=int, default=None, help="limit (a) to N files")
    parser.add_argument(
        "--bf16", action="store_true", help="also measure the reduced-precision mode"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="the service's default")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--skip-overlap", action="store_true", help="skip (d) decode throughput and (e) overlap"
    )
    parser.add_argument(
        "--device-ms-per-slice", default="10,30",
        help="(e): the stand-in model stage's times per slice (a GPU's, holding no CPU): "
        "one shorter than decoding a series (its model time is hidden), one longer (its "
        "decode time is)",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-check", action="store_true",
        help="only what scripts/gpu_check.sh prints: per batch size (--batch-sizes) the model "
        "stage, P002 end to end, the decode share and GPU memory; decode throughput; overlap",
    )  # fmt: skip
    parser.add_argument("--batch-sizes", default="8,16,32", help="--gpu-check's batch sizes")
    parser.add_argument("--allow-cpu", action="store_true", help="--gpu-check without a GPU")
    parser.add_argument("--baseline-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_libraries()  # the service's decoders (GDCM out) for (a) and (b) alike
    if args.baseline_only:
        print(json.dumps(baseline(args.baseline_slices)))
        return
    # As the service runs (load_engine), set before TensorFlow starts in this process.
    os.environ.setdefault(FROZEN_WEIGHTS_ENV, "1")
    if not P002.is_dir():
        sys.exit(f"P002 not found at {P002}: set COVIDCT_SHARED_DATA")
    if not bench_model_is_current(args.model_dir):
        if args.model_dir != BENCH_MODEL:
            sys.exit(f"no SavedModel with a current model card at {args.model_dir}")
        log(f"building the benchmark's model at {args.model_dir} …")
        export_bench_model(args.model_dir)
    if args.gpu_check:
        gpu_check(args)
        return

    archive = p002_zip()
    from app.settings import Settings

    workers = Settings(_env_file=None).decode_workers
    cores, how = usable_cores_note()
    log(f"P002: {len(archive) / 1e6:.1f} MB zip, usable cores: {cores} ({how}), "
        f"JPEG Lossless decoder: {jpeg_lossless_plugin()}, decode workers: {workers}")  # fmt: skip
    log(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    peak, peak_median = matmul_gflops()
    log(f"fp32 matmul (TensorFlow, 2048², 5 s): peak {peak:.1f} GFLOP/s, median {peak_median:.1f}")

    log("\n(a) baseline: the paper's code path …")
    base = baseline_in_subprocess(args.baseline_slices)
    base_sps = base["slices"] / base["total_s"]
    log(f"  {base['slices']} slices, {base['selected']} selected: read {base['read_s']:.2f} s, "
        f"select (Python loop) {base['select_s']:.2f} s, predict 1-by-1 {base['model_s']:.2f} s, "
        f"total {base['total_s']:.2f} s → {base_sps:.2f} slices/s")  # fmt: skip
    base_per_selected = base["model_s"] / max(base["selected"], 1)

    log("\n(b) the service's pipeline in process …")
    pipe = pipeline_in_process(
        args.model_dir, archive, args.repeats, max_batch_size=args.max_batch_size
    )
    n = pipe["n"]
    pipe_sps = 133 / pipe["total"]
    model_gflops = n * GFLOP_PER_SLICE / pipe["infer"]
    non_model = pipe["total"] - pipe["infer"]
    log(f"  medians over {args.repeats}: ingest {pipe['ingest']:.2f} s, select {pipe['select']:.3f} s, "
        f"infer {pipe['infer']:.2f} s ({n} slices), diagnose {pipe['diagnose']:.4f} s, "
        f"total {pipe['total']:.2f} s → {pipe_sps:.2f} slices/s")  # fmt: skip
    best_gflops = n * GFLOP_PER_SLICE / pipe["infer_best"]
    log(f"  model stage: median {model_gflops:.1f} GFLOP/s = {100 * model_gflops / peak:.0f} % of "
        f"the matmul peak ({100 * model_gflops / peak_median:.0f} % of its median); best run "
        f"{best_gflops:.1f} GFLOP/s = {100 * best_gflops / peak:.0f} % of the peak")  # fmt: skip
    log(
        f"  non-model wall time: {non_model:.2f} s = {100 * non_model / pipe['total']:.1f} % of end to end"
    )
    log(f"  decode share (ingest / end to end): {100 * pipe['ingest'] / pipe['total']:.1f} %")
    if args.baseline_slices is None:
        log(f"  end-to-end speed-up vs baseline: {base['total_s'] / pipe['total']:.2f}×")
        same = pipe["probs"][~np.isnan(pipe["probs"])]
        log(f"  same slices and scores as the baseline: {len(same) == len(base['probs'])}, "
            f"max |Δp| = {np.abs(same - np.array(base['probs'])).max():.1e}")  # fmt: skip
    scored = pipe["probs"][~np.isnan(pipe["probs"])]
    log(f"  covid probabilities of the {len(scored)} selected slices: {scored.min():.3f} … "
        f"{scored.max():.3f} (median {np.median(scored):.3f})")  # fmt: skip
    log(f"  model stage per selected slice: baseline {base_per_selected:.3f} s, "
        f"pipeline {pipe['infer'] / n:.3f} s ({base_per_selected / (pipe['infer'] / n):.2f}×)")  # fmt: skip

    if args.bf16:
        log("\n(b') reduced precision (bf16 on CPU / fp16 on GPU) …")
        import tensorflow as tf  # noqa: F401  (the grappler option is process-wide)

        low = pipeline_in_process(
            args.model_dir, archive, args.repeats, max_batch_size=args.max_batch_size,
            mixed_precision=True,
        )  # fmt: skip
        a, b = pipe["probs"], low["probs"]
        keep = ~np.isnan(a)
        delta = np.abs(a[keep] - b[keep])
        flips = int(np.sum((a[keep] > 0.5) != (b[keep] > 0.5)))
        log(f"  infer {low['infer']:.2f} s vs fp32 {pipe['infer']:.2f} s → "
            f"{pipe['infer'] / low['infer']:.2f}× ; max |Δp| = {delta.max():.2e}, "
            f"median {np.median(delta):.2e}, class flips {flips} of {int(keep.sum())}")  # fmt: skip

    if not args.skip_overlap:
        log("\n(d) decode throughput, P002's 133 frames (medians of 3) …")
        for row in decode_scaling(3):
            who = f"{row['workers']} worker(s)" if row["workers"] else "in this thread"
            log(f"  {who}: {row['slices_per_s']:.1f} slices/s")
        log("\n(e) a three-series study (P002 under three SeriesInstanceUIDs, 399 slices) …")
        three = three_series_zip()
        batch = {"max_batch_size": args.max_batch_size}
        real = overlap_in_process(args.model_dir, three, args.repeats, **batch)
        report_overlap("this CPU's model", real)
        same = pipe["probs"][~np.isnan(pipe["probs"])]
        worst = max(float(np.abs(p[~np.isnan(p)] - same).max()) for p in real["probs"])
        log(f"    every series scores as P002 alone in (b): max |Δp| = {worst:.1e}")
        for ms in [float(v) for v in args.device_ms_per_slice.split(",")]:
            stand_in = overlap_in_process(args.model_dir, three, args.repeats, ms, **batch)
            report_overlap(f"a model stage holding no CPU ({ms:g} ms a slice)", stand_in)

    log("\n(c) the service over HTTP …")
    proc = serve(args.model_dir, args.port, {"COVIDCT_MAX_BATCH_SIZE": str(args.max_batch_size)})
    sampler = RssSampler(proc.pid)
    sampler.start()
    rows = []
    try:
        for clients in [int(c) for c in args.clients.split(",")]:
            sampler.peak = sampler.peak_rss_sum = 0
            row = http_load(args.port, archive, clients, args.requests_per_client)
            row["peak_rss_gb"] = sampler.peak / 1e9
            row["peak_rss_sum_gb"] = sampler.peak_rss_sum / 1e9
            rows.append(row)
            log(f"  {clients} client(s): {row['requests']} requests, {row['failed']} failed, "
                f"{row['slices_per_s']:.2f} slices/s, median latency {row['median_latency_s']:.1f} s, "
                f"peak RSS {row['peak_rss_gb']:.2f} GB (server RSS + workers' USS; "
                f"sum of RSS {row['peak_rss_sum_gb']:.2f})")  # fmt: skip
    finally:
        sampler.stop_flag.set()
        proc.terminate()
        proc.wait(30)
    best_single = rows[0]["slices_per_s"]
    for row in rows:
        log(
            f"  {row['clients']} clients: {100 * row['slices_per_s'] / best_single:.0f} % of single-stream"
        )


if __name__ == "__main__":
    main()
