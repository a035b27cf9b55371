"""Studies being received over STOW-RS (app/dicomweb/pending.py): instances join their
study, a quiet study becomes one job (once, across a crash), what was acknowledged is on
disk, and a new process finds it there."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

import pytest

from app.dicomweb import FailureReason, InstanceRefused, PendingStudies, PendingStudy, StudyLimits
from app.dicomweb.instances import CheckedInstance
from stow_support import CT_IMAGE, uid

LIMITS = StudyLimits(max_instances=3, max_bytes=1000, max_frames=3)
QUIET_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def instance(study: str, n: int) -> CheckedInstance:
    return CheckedInstance(study, CT_IMAGE, uid(study, str(n)), "PID", 1)


class Jobs:
    """Stands in for the job service: what was submitted, and whether a job exists."""

    def __init__(self) -> None:
        self.submitted: dict[str, tuple[PendingStudy, dict[str, bytes]]] = {}
        self.refuse: Exception | None = None

    def submit(self, study: PendingStudy, source: BinaryIO, size: int) -> None:
        if self.refuse is not None:
            raise self.refuse
        data = source.read()
        assert len(data) == size
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = {name: zf.read(name) for name in zf.namelist()}
        self.submitted[study.job_id] = (study, members)

    def exists(self, job_id: str) -> bool:
        return job_id in self.submitted


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def area(tmp_path: Path, clock: Clock) -> PendingStudies:
    return PendingStudies(tmp_path / "stow", LIMITS, quiet_s=QUIET_S, clock=clock)


def add(area: PendingStudies, jobs: Jobs, owner: str, inst: CheckedInstance, data: bytes) -> str:
    path, out = area.new_part()
    with out:
        out.write(data)
    return area.add(owner, inst, path, len(data), request_id="r", submitted=jobs.exists)


def test_instances_of_a_study_join_it_and_it_becomes_one_job_when_quiet(
    area: PendingStudies, clock: Clock
) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    first = add(area, jobs, "owner", instance(study, 1), b"one")
    clock.now += QUIET_S - 1  # another request, before the study is quiet
    assert add(area, jobs, "owner", instance(study, 2), b"two") == first
    clock.now += QUIET_S - 1
    assert area.due() == []
    assert area.flush(first, jobs.submit, jobs.exists) is None  # not quiet yet
    clock.now += 1
    [due] = area.due()
    assert (due.job_id, due.instances, due.bytes, due.study_uid) == (first, 2, 6, study)
    flushed = area.flush(first, jobs.submit, jobs.exists)
    assert flushed is not None and flushed.job_id == first
    _, members = jobs.submitted[first]
    assert members == {f"{uid(study, '1')}.dcm": b"one", f"{uid(study, '2')}.dcm": b"two"}
    assert area.get(first) is None and area.pending() == []
    assert area.jobs_of("owner", study) == [first]
    # Later instances of the same study start another job.
    later = add(area, jobs, "owner", instance(study, 3), b"three")
    assert later != first
    assert area.jobs_of("owner", study) == [later, first]


def test_owners_and_studies_are_kept_apart(area: PendingStudies) -> None:
    jobs, a, b = Jobs(), uid("pending", "a"), uid("pending", "b")
    ids = {
        add(area, jobs, "owner-1", instance(a, 1), b"x"),
        add(area, jobs, "owner-2", instance(a, 1), b"x"),
        add(area, jobs, "owner-1", instance(b, 1), b"x"),
    }
    assert len(ids) == 3
    assert area.jobs_of("owner-3", a) == []


def test_an_instance_sent_twice_is_kept_once(area: PendingStudies) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "o", instance(study, 1), b"first copy")
    assert add(area, jobs, "o", instance(study, 1), b"second copy") == job
    pending = area.get(job)
    assert pending is not None and (pending.instances, pending.bytes) == (1, 10)
    assert list(area.incoming.iterdir()) == []  # the duplicate's part file is gone


@pytest.mark.parametrize(
    ("sizes", "frames"),
    [([1, 1, 1, 1], 1), ([600, 600], 1), ([1], 4)],  # count, bytes, frames over LIMITS
)
def test_a_study_past_its_limits_refuses_the_instance(
    area: PendingStudies, sizes: list[int], frames: int
) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    with pytest.raises(InstanceRefused) as refused:
        for n, size in enumerate(sizes):
            inst = CheckedInstance(study, CT_IMAGE, uid(study, str(n)), "", frames)
            add(area, jobs, "o", inst, b"x" * size)
    assert refused.value.reason == FailureReason.OUT_OF_RESOURCES


def test_a_full_queue_keeps_the_study_for_later(area: PendingStudies, clock: Clock) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "o", instance(study, 1), b"x")
    clock.now += QUIET_S
    jobs.refuse = RuntimeError("queue full")
    with pytest.raises(RuntimeError):
        area.flush(job, jobs.submit, jobs.exists)
    assert area.get(job) is not None and list(area.incoming.iterdir()) == []
    jobs.refuse = None
    assert area.flush(job, jobs.submit, jobs.exists) is not None
    assert list(jobs.submitted) == [job]


def test_a_new_process_finds_the_pending_studies(
    tmp_path: Path, area: PendingStudies, clock: Clock
) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "o", instance(study, 1), b"x")
    clock.now += QUIET_S  # the service was down for longer than the quiet period
    restarted = PendingStudies(tmp_path / "stow", LIMITS, quiet_s=QUIET_S, clock=clock)
    assert [s.job_id for s in restarted.due()] == [job]
    assert restarted.flush(job, jobs.submit, jobs.exists) is not None
    assert list(jobs.submitted) == [job]


def test_a_crash_after_queueing_never_queues_the_study_twice(
    area: PendingStudies, clock: Clock
) -> None:
    # The job was queued, then the process died before it cleared the study: the study is
    # still on disk, its job already in the store.
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "o", instance(study, 1), b"x")
    clock.now += QUIET_S
    jobs.submitted[job] = (area.get(job), {})  # type: ignore[assignment]
    assert area.flush(job, jobs.submit, jobs.exists) is None
    assert area.get(job) is None and area.jobs_of("o", study) == [job]
    # An instance arriving meanwhile starts a new study instead of joining the queued one.
    jobs2 = Jobs()
    jobs2.submitted = dict(jobs.submitted)
    assert add(area, jobs2, "o", instance(study, 2), b"y") != job


def test_an_instance_arriving_after_a_crash_does_not_join_a_queued_study(
    area: PendingStudies, clock: Clock
) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "o", instance(study, 1), b"x")
    jobs.submitted[job] = (area.get(job), {})  # type: ignore[assignment]
    assert add(area, jobs, "o", instance(study, 2), b"y") != job
    assert area.get(job) is None


def test_cancel_drops_a_pending_study_of_its_owner_only(area: PendingStudies) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "owner", instance(study, 1), b"x")
    assert not area.cancel(job, "someone else")
    assert area.cancel(job, "owner")
    assert area.get(job) is None and area.jobs_of("owner", study) == []


def test_concurrent_requests_of_one_study_make_one_job(area: PendingStudies) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    found: list[str] = []

    def send(n: int) -> None:
        found.append(
            add(area, jobs, "o", CheckedInstance(study, CT_IMAGE, uid(study, str(n)), "", 0), b"")
        )

    threads = [threading.Thread(target=send, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1
    pending = area.get(found[0])
    assert pending is not None and pending.instances == 3


def test_sweep_removes_leftovers_only(area: PendingStudies, clock: Clock) -> None:
    jobs, study = Jobs(), uid("pending", "a")
    job = add(area, jobs, "o", instance(study, 1), b"x")
    clock.now += QUIET_S
    area.flush(job, jobs.submit, jobs.exists)
    path, out = area.new_part()
    out.close()
    area.sweep(keep_jobs_s=3600, older_than_s=3600)
    assert path.exists() and area.jobs_of("o", study) == [job]  # young: maybe on its way
    clock.now += 7200  # the job's record is past its keep time
    os.utime(path, (time.time() - 7200, time.time() - 7200))  # left by a crash long ago
    area.sweep(keep_jobs_s=3600, older_than_s=3600)
    assert not path.exists() and area.jobs_of("o", study) == []
