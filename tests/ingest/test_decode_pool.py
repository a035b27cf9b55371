"""Decoding in worker processes (app/ingest/pool.py) gives ingest's pixels, configures the
libraries in each worker, and survives a worker that dies; the pool's default size follows
the cores this process may use (affinity, cgroup CPU quota)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from app.ingest import (
    DecodePool,
    DecodePoolBroken,
    IngestLimits,
    default_decode_workers,
    ingest_zip,
    usable_cores,
)
from app.ingest.pool import cpu_quota
from dicom_factory import file_bytes, multi_frame_ct
from shared_data import P002, VARIANTS, needs_data, zip_dirs, zip_files

LIMITS = IngestLimits()


def die(code: int) -> None:
    """A decode task whose worker process dies, as it would on a crashing decoder."""
    os._exit(code)


def square(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return x * x


def worker_set_up(_: int) -> tuple[bool, list[str]]:
    """In a worker: pydicom's validation mode off?, and the JPEG Lossless decoder's plugins."""
    from pydicom import config
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    validation_off = config.settings.reading_validation_mode == config.IGNORE
    return validation_off, list(get_decoder(JPEGLosslessSV1).available_plugins)


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    p = DecodePool(2)
    yield p
    p.shutdown()


def test_tasks_come_back_in_order_with_their_own_errors(pool: DecodePool) -> None:
    out = list(pool.decode(square, [(3,), (-1,), (5,)]))
    assert out[0] == 9 and out[2] == 25
    assert isinstance(out[1], ValueError)


def test_workers_start_with_the_libraries_configured(pool: DecodePool) -> None:
    for validation_off, plugins in pool.decode(worker_set_up, [(0,), (1,)]):
        assert validation_off and "gdcm" not in plugins and "pylibjpeg" in plugins


def test_a_dead_worker_raises_and_the_next_call_gets_a_fresh_pool(pool: DecodePool) -> None:
    with pytest.raises(DecodePoolBroken):
        list(pool.decode(die, [(3,), (3,)]))
    assert list(pool.decode(square, [(4,)])) == [16]


def test_at_least_one_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        DecodePool(0)


@needs_data
def test_p002_through_the_pool_equals_decoding_in_thread(pool: DecodePool) -> None:
    archive = zip_dirs(P002)
    here = ingest_zip(archive, LIMITS).series[0]
    there = ingest_zip(archive, LIMITS, pool).series[0]
    assert [s.source for s in there.slices] == [s.source for s in here.slices]
    np.testing.assert_array_equal(there.pixels, here.pixels)


@needs_data
def test_a_frame_that_fails_to_decode_is_skipped_in_the_pool_too(pool: DecodePool) -> None:
    good = sorted(P002.glob("*.dcm"))[:3]
    ds = pydicom.dcmread(good[1])
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(1000)])  # a JPEG stream with no image
    buf = io.BytesIO()
    ds.save_as(buf)
    files = [("s/a.dcm", good[0]), ("s/b.dcm", buf.getvalue()), ("s/c.dcm", good[2])]
    study = ingest_zip(zip_files(files), LIMITS, pool)
    (series,) = study.series
    assert [s.source for s in series.slices] == ["s/a.dcm", "s/c.dcm"]
    assert [(m.index, m.reason) for m in study.skipped] == [(2, "pixel data could not be decoded")]


def test_multi_frame_files_through_the_pool_give_each_frame(
    pool: DecodePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker gets one frame's bytes of a multi-frame file, not the file: each frame is
    its own, in order, as decoding the datasets in this thread gives them."""
    rng = np.random.default_rng(2)
    values = rng.integers(0, 3000, (2, 3, 512, 512)).astype(np.uint16)  # HU + 1024
    archive = zip_files(
        [
            ("mf/a.dcm", multi_frame_ct(values[0], rle=True, offset_table=False)),
            ("mf/b.dcm", multi_frame_ct(values[1])),  # uncompressed
        ]
    )
    sent: list[int] = []
    real = pool.decode

    def noted(tasks: Iterable[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
        for task in tasks:
            sent.append(len(task[1]))  # the pixel bytes a worker gets
            yield task

    def recording(fn: Callable[..., Any], tasks: Iterable[tuple[Any, ...]]) -> Iterator[Any]:
        return real(fn, noted(tasks))

    monkeypatch.setattr(pool, "decode", recording)
    there = ingest_zip(archive, LIMITS, pool).series[0]
    # One frame each, not three: RLE of random values is ~1.04 × the raw 512 KB frame
    # (measured 544,026 bytes a frame).
    assert len(sent) == 6 and max(sent) < 1.2 * values[0, 0].nbytes, sent
    here = ingest_zip(archive, LIMITS).series[0]
    assert [(s.source, s.frame) for s in there.slices] == [
        (name, i) for name in ("mf/a.dcm", "mf/b.dcm") for i in range(3)
    ]
    np.testing.assert_array_equal(there.pixels, values.reshape(6, 512, 512))
    np.testing.assert_array_equal(here.pixels, there.pixels)


@needs_data
def test_enhanced_ct_through_the_pool_equals_decoding_in_thread(pool: DecodePool) -> None:
    archive = zip_files([("e/mf.dcm", VARIANTS / "enhanced-ct-2-frames.dcm")])
    there = ingest_zip(archive, LIMITS, pool).series[0]
    here = ingest_zip(archive, LIMITS).series[0]
    assert [s.frame for s in there.slices] == [s.frame for s in here.slices] == [1, 0]
    assert not np.array_equal(there.pixels[0], there.pixels[1])  # the frame index matters
    np.testing.assert_array_equal(there.pixels, here.pixels)


def test_a_corrupt_frame_of_a_multi_frame_file_is_skipped_in_the_pool_too(
    pool: DecodePool,
) -> None:
    values = np.random.default_rng(3).integers(0, 3000, (3, 64, 64)).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(multi_frame_ct(values, rle=True)))
    encoded = list(generate_frames(ds.PixelData, number_of_frames=3))
    ds.PixelData = encapsulate([encoded[0], bytes(64), encoded[2]])  # an RLE frame of nothing
    archive = zip_files([("mf.dcm", file_bytes(ds))])
    studies = ingest_zip(archive, LIMITS, pool), ingest_zip(archive, LIMITS)
    for study in studies:
        (series,) = study.series
        assert [s.frame for s in series.slices] == [0, 2]
        assert [(m.index, m.reason) for m in study.skipped] == [
            (1, "pixel data could not be decoded")
        ]
    np.testing.assert_array_equal(studies[0].series[0].pixels, studies[1].series[0].pixels)


@needs_data
def test_a_pool_that_breaks_midway_leaves_the_rest_to_this_thread(
    pool: DecodePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pool.decode

    def breaks_after_ten(
        fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]
    ) -> Iterator[Any]:  # as when a worker dies while the series decodes
        for i, outcome in enumerate(real(fn, tasks)):
            if i == 10:
                raise DecodePoolBroken
            yield outcome

    monkeypatch.setattr(pool, "decode", breaks_after_ten)
    archive = zip_dirs(P002)
    np.testing.assert_array_equal(
        ingest_zip(archive, LIMITS, pool).series[0].pixels,
        ingest_zip(archive, LIMITS).series[0].pixels,
    )


def test_results_come_back_in_order_past_the_tasks_kept_ahead(pool: DecodePool) -> None:
    # 2 workers keep 4 tasks submitted ahead: 50 tasks take the window along.
    out = list(pool.decode(square, [(i,) for i in range(50)]))
    assert out == [i * i for i in range(50)]


def test_a_default_pool_has_a_worker_per_usable_core() -> None:
    assert DecodePool().workers == default_decode_workers() == min(usable_cores(), 64)
    assert DecodePool(3).workers == 3
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


# --- the cores this process may use: affinity and the cgroup's CPU quota ---------------


def fake_proc(tmp_path: Path, cgroup: str, mounts: list[tuple[str, str, str, str]]) -> Path:
    """/proc/self/cgroup and /proc/self/mountinfo under tmp_path; `mounts`: (root inside
    the hierarchy, mount point, filesystem type, super options) per cgroup mount."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    lines = [
        f"{30 + i} 23 0:{28 + i} {root} {point} rw,relatime shared:{i} - {fstype} cgroup {opts}"
        for i, (root, point, fstype, opts) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(["23 1 8:1 / / rw - ext4 /dev/sda1 rw", *lines]))
    return proc


def write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text + "\n")


def test_cgroup_v2_quota_rounds_up_and_the_smallest_along_the_path_counts(
    tmp_path: Path,
) -> None:
    fs = tmp_path / "cgroup2"
    proc = fake_proc(tmp_path, "0::/kubepods/pod1/ctr\n", [("/", str(fs), "cgroup2", "rw")])
    write(fs / "kubepods" / "pod1" / "ctr", cpu__max="150000 100000")
    assert cpu_quota(proc) == 1.5
    assert usable_cores(proc, affinity=8) == 2  # 1.5 CPUs: two workers share them
    write(fs / "kubepods", cpu__max="max 100000")
    write(fs / "kubepods" / "pod1", cpu__max="100000 100000")  # the pod's limit binds
    assert usable_cores(proc, affinity=8) == 1
    assert usable_cores(proc, affinity=1) == 1


def test_cgroup_v2_without_a_limit_leaves_the_affinity(tmp_path: Path) -> None:
    fs = tmp_path / "cgroup2"
    proc = fake_proc(tmp_path, "0::/\n", [("/", str(fs), "cgroup2", "rw")])
    write(fs, cpu__max="max 100000")
    assert cpu_quota(proc) is None
    assert usable_cores(proc, affinity=6) == 6


def test_cgroup_v1_quota_in_a_namespaced_container(tmp_path: Path) -> None:
    # Docker on cgroup v1: the container's cgroup is the root of what it has mounted.
    cpu = tmp_path / "cpu,cpuacct"
    proc = fake_proc(
        tmp_path,
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/system.slice\n",
        [("/docker/abc", str(cpu), "cgroup", "rw,cpu,cpuacct"),
         ("/docker/abc", str(tmp_path / "memory"), "cgroup", "rw,memory")],
    )  # fmt: skip
    write(cpu, cpu__cfs_quota_us="300000", cpu__cfs_period_us="100000")
    assert cpu_quota(proc) == 3.0
    assert usable_cores(proc, affinity=64) == 3
    write(cpu, cpu__cfs_quota_us="-1", cpu__cfs_period_us="100000")  # no limit
    assert usable_cores(proc, affinity=64) == 64


def test_no_cgroup_information_leaves_the_affinity(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path / "missing") is None
    proc = fake_proc(tmp_path, "0::/x\n", [])  # no cgroup mount listed
    assert usable_cores(proc, affinity=4) == 4


@pytest.mark.parametrize("value", [None, "auto", " AUTO ", ""])
def test_the_setting_unset_or_auto_means_a_worker_per_usable_core(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    from app.settings import Settings

    if value is None:
        monkeypatch.delenv("COVIDCT_DECODE_WORKERS", raising=False)
    else:
        monkeypatch.setenv("COVIDCT_DECODE_WORKERS", value)
    assert Settings(_env_file=None).decode_workers == default_decode_workers()


def test_the_setting_overrides_the_default() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    assert Settings(_env_file=None, decode_workers=0).decode_workers == 0
    assert Settings(_env_file=None, decode_workers="96").decode_workers == 96
    with pytest.raises(ValidationError):
        Settings(_env_file=None, decode_workers=-1)
