"""The job store's semantics, the same tests against SQLite and a real Redis (`kit`).

Expected values are written out by hand from the config (lease and TTL arithmetic on a
settable clock); several store instances stand for several processes or replicas.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from app.jobs import (
    MAX_ATTEMPTS,
    DeleteOutcome,
    JobsConfig,
    JobState,
    JobStore,
    NewJob,
    QueueFull,
    StoreUnavailable,
    new_job_id,
    owner_for,
)
from app.jobs.model import valid_job_id
from app.jobs.redis_store import RedisJobStore
from app.jobs.sqlite import SqliteJobStore

OWNER = owner_for("key-of-hospital-a")
OTHER = owner_for("key-of-hospital-b")


def new(nbytes: int = 10, owner: str = OWNER, **extra: Any) -> NewJob:
    job_id = new_job_id()
    return NewJob(job_id, owner, f"{job_id}.upload", nbytes, **extra)


def claimed(store: JobStore, worker: str = "w") -> tuple[str, str]:
    job = store.claim(worker)
    assert job is not None and job.lease_owner is not None
    return job.id, job.lease_owner


def test_ids_are_unguessable_and_owners_are_hashes() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(valid_job_id(i) for i in ids)
    assert all(len(i) == 32 for i in ids)  # 24 random bytes, base64url: 192 bits
    owner = owner_for("secret-key")
    assert "secret-key" not in owner and len(owner) == 64
    assert owner == owner_for("secret-key") != owner_for("secret-kez")


def test_enqueue_and_get_by_owner_only(kit: Any, clock: Any) -> None:
    store = kit.make(clock=clock)
    job = store.enqueue(new(123, params={"patient_id": "P1", "threshold": 0.2}))
    assert job.state is JobState.QUEUED and job.attempts == 0
    assert job.created_at == job.updated_at == clock.now and job.expires_at is None
    assert job.lease_owner is None and job.lease_expires_at is None
    assert job.params == {"patient_id": "P1", "threshold": 0.2} and job.upload_bytes == 123

    assert store.get(job.id, OWNER) == job
    assert store.get(job.id, OTHER) is None  # another key's job: as if it didn't exist
    assert store.get(new_job_id(), OWNER) is None
    replica = kit.make(clock=clock)  # another process or replica sees it too
    assert replica.get(job.id, OWNER) == job


def test_claims_oldest_first_under_a_fresh_lease(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(lease_s=45), clock)
    ids = [store.enqueue(new()).id for _ in range(3)]
    first = store.claim("worker-1")
    assert first is not None and first.id == ids[0]
    assert first.state is JobState.RUNNING and first.attempts == 1
    assert first.lease_owner is not None and first.lease_owner.startswith("worker-1/")
    assert first.lease_expires_at == clock.now + 45
    second = store.claim("worker-1")
    assert second is not None and second.id == ids[1]
    assert second.lease_owner != first.lease_owner  # a new lease at every claim
    assert [claimed(store)[0]] == ids[2:]
    assert store.claim("worker-1") is None


def test_complete_once_under_the_lease(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(result_ttl_s=600), clock)
    job_id, lease = claimed_after_enqueue(store)
    assert store.complete(job_id, "w/not-the-lease", {"diagnosis": "covid"}) is None
    clock.advance(5)
    done = store.complete(job_id, lease, {"diagnosis": "covid", "k": 3})
    assert done is not None and done.state is JobState.DONE
    assert done.result == {"diagnosis": "covid", "k": 3} and done.problem is None
    assert done.expires_at == clock.now + 600 and done.updated_at == clock.now
    # Ended once: neither a second complete nor a fail changes it.
    assert store.complete(job_id, lease, {"diagnosis": "normal"}) is None
    assert store.fail(job_id, lease, {"type": "x"}) is None
    assert store.renew(job_id, lease) is False
    assert store.release(job_id, lease) is False
    assert store.get(job_id, OWNER) == done


def test_fail_keeps_the_problem(kit: Any, clock: Any) -> None:
    store = kit.make(clock=clock)
    job_id, lease = claimed_after_enqueue(store)
    problem = {"type": "https://covidct.example/problems/not-a-zip", "status": 400}
    failed = store.fail(job_id, lease, problem)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.problem == problem and failed.result is None
    assert store.claim("w") is None  # a job that failed by itself is not retried


def test_renew_extends_only_the_holders_lease(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(lease_s=30), clock)
    job_id, lease = claimed_after_enqueue(store)
    clock.advance(20)
    assert store.renew(job_id, lease) is True
    assert store.peek(job_id).lease_expires_at == clock.now + 30
    assert store.renew(job_id, "w/other") is False
    clock.advance(29)  # 49 s after the claim: expired without the renewal, not with it
    assert store.requeue_expired().requeued == ()


def test_expired_lease_retried_once_then_failed_with_reason(kit: Any, clock: Any) -> None:
    config = kit.config(lease_s=30, result_ttl_s=100)
    first, second = kit.make(config, clock), kit.make(config, clock)  # two replicas
    job = first.enqueue(new(50))
    _, lease_1 = claimed(first, "replica-1")

    clock.advance(29)
    assert second.requeue_expired().requeued == ()  # not yet expired
    clock.advance(1)  # lease_expires_at == now: expired
    recovered = second.requeue_expired()
    assert recovered.requeued == (job.id,) and recovered.failed == ()
    again = second.claim("replica-2")
    assert again is not None and again.id == job.id and again.attempts == 2
    assert again.lease_owner is not None and again.lease_owner.startswith("replica-2/")
    # The first worker comes back: its lease is gone, it can't end or renew the job.
    assert first.complete(job.id, lease_1, {"diagnosis": "covid"}) is None
    assert first.renew(job.id, lease_1) is False

    clock.advance(30)
    recovered = first.requeue_expired()
    assert recovered.requeued == ()
    assert [j.id for j in recovered.failed] == [job.id]
    failed = first.get(job.id, OWNER)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.attempts == MAX_ATTEMPTS == 2
    assert failed.problem is not None
    assert failed.problem["type"].endswith("/job-worker-lost")
    assert "lease expired" in failed.problem["detail"]
    assert failed.expires_at == clock.now + 100
    assert second.complete(job.id, again.lease_owner, {"diagnosis": "covid"}) is None
    assert second.claim("replica-2") is None
    assert first.usage().pending_bytes == 0  # its upload no longer counts


def test_release_gives_the_attempt_back(kit: Any, clock: Any) -> None:
    store = kit.make(clock=clock)
    first = store.enqueue(new())
    store.enqueue(new())
    job_id, lease = claimed(store)
    assert store.release(job_id, "w/other") is False
    assert store.release(job_id, lease) is True
    back = store.peek(job_id)
    assert back.state is JobState.QUEUED and back.attempts == 0 and back.lease_owner is None
    assert claimed(store)[0] == first.id  # it keeps its place at the head of the queue


def test_queue_bound_counts_pending_jobs(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(max_queued_jobs=2, retry_after_s=17), clock)
    store.enqueue(new())
    store.enqueue(new())
    with pytest.raises(QueueFull) as refused:
        store.enqueue(new())
    assert refused.value.reason == "jobs" and refused.value.retry_after_s == 17
    job_id, lease = claimed(store)  # running still counts
    with pytest.raises(QueueFull):
        store.enqueue(new())
    store.complete(job_id, lease, {})  # ended: room for one
    store.enqueue(new())
    assert store.usage().pending == 2


def test_upload_byte_budget(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(upload_budget_bytes=100), clock)
    store.enqueue(new(60))
    with pytest.raises(QueueFull) as refused:
        store.enqueue(new(41))  # 60 + 41 > 100
    assert refused.value.reason == "bytes"
    store.enqueue(new(40))  # 60 + 40 == 100: fits exactly
    assert store.usage().pending_bytes == 100
    job_id, lease = claimed(store)  # the 60-byte one
    assert store.usage().pending_bytes == 100  # running still holds its upload
    store.fail(job_id, lease, {"type": "x"})
    assert store.usage().pending_bytes == 40
    store.enqueue(new(60))


def test_delete_cancels_queued_forgets_ended_spares_running(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(upload_budget_bytes=1000), clock)
    running = store.enqueue(new(100))
    ended = store.enqueue(new(200))
    queued = store.enqueue(new(300))
    assert claimed(store)[0] == running.id
    ended_id, lease = claimed(store)
    assert ended_id == ended.id
    store.complete(ended_id, lease, {"diagnosis": "normal"})

    assert store.delete(queued.id, OTHER).outcome is DeleteOutcome.NOT_FOUND
    assert store.peek(queued.id) is not None
    deleted = store.delete(queued.id, OWNER)
    assert deleted.outcome is DeleteOutcome.DELETED and deleted.job.id == queued.id
    assert store.peek(queued.id) is None
    assert store.usage().pending_bytes == 100  # its 300 bytes are free again
    assert store.claim("w") is None  # the cancelled job never runs

    assert store.delete(running.id, OWNER).outcome is DeleteOutcome.RUNNING
    assert store.peek(running.id).state is JobState.RUNNING

    assert store.delete(ended_id, OTHER).outcome is DeleteOutcome.NOT_FOUND
    assert store.delete(ended_id, OWNER).outcome is DeleteOutcome.DELETED
    assert store.get(ended_id, OWNER) is None
    assert store.delete(ended_id, OWNER).outcome is DeleteOutcome.NOT_FOUND
    assert store.delete(new_job_id(), OWNER).outcome is DeleteOutcome.NOT_FOUND
    assert store.usage().done == 0


def test_results_expire_after_their_ttl(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(result_ttl_s=3600), clock)
    job_id, lease = claimed_after_enqueue(store)
    store.complete(job_id, lease, {"diagnosis": "covid"})
    pending_id = store.enqueue(new()).id
    clock.advance(3599)
    assert store.expire() == [] and store.get(job_id, OWNER) is not None
    clock.advance(1)
    assert store.get(job_id, OWNER) is None  # gone for readers at once
    assert store.delete(job_id, OWNER).outcome is DeleteOutcome.NOT_FOUND
    assert [j.id for j in store.expire()] == [job_id]  # and from the store at the sweep
    assert store.peek(job_id) is None and store.expire() == []
    assert store.peek(pending_id) is not None  # queued jobs don't expire
    assert store.usage().done == 0


def claimed_after_enqueue(store: JobStore) -> tuple[str, str]:
    store.enqueue(new())
    return claimed(store)


def test_usage_counts_states(kit: Any, clock: Any) -> None:
    store = kit.make(clock=clock)
    for _ in range(5):
        store.enqueue(new(7))
    a, lease_a = claimed(store)
    b, lease_b = claimed(store)
    claimed(store)
    store.complete(a, lease_a, {})
    store.fail(b, lease_b, {})
    usage = store.usage()
    assert (usage.queued, usage.running, usage.done, usage.failed) == (2, 1, 1, 1)
    assert usage.pending_bytes == 3 * 7


def test_concurrent_claimers_complete_each_job_once(kit: Any) -> None:
    """Eight threads, each with its own store (connection), drain 40 jobs at once."""
    seed = kit.make()
    ids = [seed.enqueue(new()).id for _ in range(40)]
    completed: list[list[str]] = [[] for _ in range(8)]
    barrier = threading.Barrier(8)

    def drain(i: int) -> None:
        store = kit.make()
        barrier.wait()
        while (job := store.claim(f"t{i}")) is not None:
            assert job.lease_owner is not None
            if store.complete(job.id, job.lease_owner, {"by": i}) is not None:
                completed[i].append(job.id)

    run_threads(drain, 8)
    everything = [job_id for part in completed for job_id in part]
    assert sorted(everything) == sorted(ids)  # each once: none lost, none twice
    assert all(seed.peek(i).attempts == 1 for i in ids)


def test_an_expired_lease_is_lost_even_before_a_takeover(kit: Any, clock: Any) -> None:
    store = kit.make(kit.config(lease_s=30), clock)
    job_id, lease = claimed_after_enqueue(store)
    clock.advance(30)
    assert store.renew(job_id, lease) is False
    assert store.complete(job_id, lease, {"diagnosis": "covid"}) is None
    assert store.release(job_id, lease) is False
    assert store.peek(job_id).state is JobState.RUNNING  # until requeue_expired runs
    assert store.requeue_expired().requeued == (job_id,)


def test_replicas_race_to_take_over_an_expired_job(kit: Any, clock: Any) -> None:
    """Two replicas requeue and claim the same expired job at once while its old holder
    tries to complete it: exactly one replica runs it, and the job ends once."""
    config = kit.config(lease_s=30)
    old, one, two = (kit.make(config, clock) for _ in range(3))
    for _ in range(20):
        job_id, lease = claimed_after_enqueue(old)
        clock.advance(31)
        ended = race_takeover(old, [one, two], job_id, lease)
        assert len(ended) == 1, ended
        final = old.peek(job_id)
        assert final.state is JobState.DONE and final.result == {"by": ended[0]}
        assert final.attempts == 2


def race_takeover(old: JobStore, replicas: list[JobStore], job_id: str, lease: str) -> list[str]:
    """Which of the racers ended the job."""
    outcomes: dict[str, Any] = {}
    barrier = threading.Barrier(1 + len(replicas))

    def race(i: int) -> None:
        barrier.wait()
        if i == 0:
            outcomes["old"] = old.complete(job_id, lease, {"by": "old"})
            return
        store = replicas[i - 1]
        store.requeue_expired()
        job = store.claim(f"replica-{i}")
        if job is not None:
            assert job.id == job_id and job.lease_owner is not None
            outcomes[f"replica-{i}"] = store.complete(
                job.id, job.lease_owner, {"by": f"replica-{i}"}
            )

    run_threads(race, 1 + len(replicas))
    return [k for k, v in outcomes.items() if v is not None]


def test_claimer_processes_complete_each_job_once(kit: Any, spawn: Any) -> None:
    """Four processes race on one store (the SQLite file, or Redis)."""
    config = kit.config()
    store = kit.make(config)
    ids = [store.enqueue(new()).id for _ in range(60)]
    children = [spawn([*kit.child_args(config), "--mode", "drain"]) for _ in range(4)]
    for child in children:
        child.expect("ready")
    for child in children:
        child.send("go")
    completed = [child.expect_json("done ") for child in children]
    assert all(child.finish() == 0 for child in children)
    assert sorted(i for part in completed for i in part) == sorted(ids)
    assert {store.peek(i).state for i in ids} == {JobState.DONE}


def test_sqlite_store_is_in_wal_mode_and_survives_reopening(tmp_path: Path, clock: Any) -> None:
    path = tmp_path / "jobs.sqlite3"
    config = JobsConfig(data_dir=tmp_path)
    store = SqliteJobStore(path, config, clock)
    job = store.enqueue(new())
    store.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reopened = SqliteJobStore(path, config, clock)
    assert reopened.peek(job.id) == job
    reopened.close()


def run_threads(target: Callable[[int], object], n: int) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # surfaced below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_a_locked_sqlite_store_is_unavailable_not_broken(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path, JobsConfig(data_dir=tmp_path), busy_timeout_s=0.05)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StoreUnavailable):
            store.enqueue(new())
        other.execute("ROLLBACK")
    assert store.enqueue(new()).state is JobState.QUEUED  # and recovers once it's free
    store.close()


def test_an_unreachable_redis_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = JobsConfig(data_dir=tmp_path, store_url=f"redis://127.0.0.1:{port}/0")
    store = RedisJobStore.from_url(config.store_url, config)
    with pytest.raises(StoreUnavailable):
        store.usage()
    with pytest.raises(StoreUnavailable):
        store.claim("w")
    store.close()
