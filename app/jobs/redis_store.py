"""The job store for several replicas: Redis, every change one Lua script (atomic).

Keys, all under one prefix with a hash tag (`covidct:{jobs}:` by default, one cluster
slot): `job:<id>` (a hash per job), `queue` (sorted set: queued ids by arrival), `running`
(sorted set: running ids by lease expiry), `done` and `failed` (sorted sets: ended ids by
expiry), `pending_bytes` (upload bytes of pending jobs) and `seq` (arrival counter).
Times come from the caller's clock: replicas' clocks must agree to well within a lease
(NTP does). For durability configure Redis with `appendonly yes`
(`appendfsync everysec` loses at most a second of accepted jobs when Redis itself dies).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import redis.exceptions

from app.jobs.config import JobsConfig
from app.jobs.model import MAX_ATTEMPTS, Job, JobState, JSONObject, NewJob
from app.jobs.store import (
    Clock,
    Deleted,
    DeleteOutcome,
    JobStore,
    Recovered,
    StoreUnavailable,
    Usage,
    encode_json,
    job_from_fields,
    worker_lost_problem,
)

DEFAULT_PREFIX = "covidct:{jobs}:"

# KEYS: queue running pending_bytes seq job
# ARGV: max_jobs budget upload_bytes now id owner upload_path params callback_url
_ENQUEUE = """
if redis.call('EXISTS', KEYS[5]) == 1 then return {-1} end
if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then
  return {0, 'jobs'}
end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used + tonumber(ARGV[3]) > tonumber(ARGV[2]) then return {0, 'bytes'} end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[5], 'id', ARGV[5], 'seq', seq, 'owner', ARGV[6], 'state', 'queued',
  'created_at', ARGV[4], 'updated_at', ARGV[4], 'expires_at', '', 'attempts', 0,
  'lease_owner', '', 'lease_expires_at', '', 'upload_path', ARGV[7],
  'upload_bytes', ARGV[3], 'params', ARGV[8], 'result', '', 'problem', '',
  'callback_url', ARGV[9])
redis.call('ZADD', KEYS[1], seq, ARGV[5])
redis.call('INCRBY', KEYS[3], ARGV[3])
return {1}
"""

# KEYS: queue running; ARGV: job_key_prefix lease_owner lease_expires_at now
_CLAIM = """
while true do
  local ids = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #ids == 0 then return false end
  local id = ids[1]
  local key = ARGV[1] .. id
  redis.call('ZREM', KEYS[1], id)
  if redis.call('HGET', key, 'state') == 'queued' then
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HSET', key, 'state', 'running', 'lease_owner', ARGV[2],
      'lease_expires_at', ARGV[3], 'updated_at', ARGV[4])
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    return redis.call('HGETALL', key)
  end
end
"""

# KEYS: running job; ARGV: id lease_owner lease_expires_at now
_RENEW = """
local f = redis.call('HMGET', KEYS[2], 'state', 'lease_owner', 'lease_expires_at')
if f[1] ~= 'running' or f[2] ~= ARGV[2] or tonumber(f[3]) <= tonumber(ARGV[4]) then
  return 0
end
redis.call('HSET', KEYS[2], 'lease_expires_at', ARGV[3], 'updated_at', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# KEYS: running ended(done|failed) pending_bytes job
# ARGV: id lease_owner state field value now expires_at
_END = """
local f = redis.call('HMGET', KEYS[4], 'state', 'lease_owner', 'lease_expires_at', 'upload_bytes')
if f[1] ~= 'running' or f[2] ~= ARGV[2] or tonumber(f[3]) <= tonumber(ARGV[6]) then
  return false
end
redis.call('HSET', KEYS[4], 'state', ARGV[3], ARGV[4], ARGV[5], 'lease_expires_at', '',
  'updated_at', ARGV[6], 'expires_at', ARGV[7])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
redis.call('DECRBY', KEYS[3], f[4])
return redis.call('HGETALL', KEYS[4])
"""

# KEYS: queue running job; ARGV: id lease_owner now
_RELEASE = """
local f = redis.call('HMGET', KEYS[3], 'state', 'lease_owner', 'lease_expires_at', 'seq')
if f[1] ~= 'running' or f[2] ~= ARGV[2] or tonumber(f[3]) <= tonumber(ARGV[3]) then
  return 0
end
redis.call('HINCRBY', KEYS[3], 'attempts', -1)
redis.call('HSET', KEYS[3], 'state', 'queued', 'lease_owner', '', 'lease_expires_at', '',
  'updated_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], f[4], ARGV[1])
return 1
"""

# KEYS: queue running failed pending_bytes
# ARGV: job_key_prefix now max_attempts expires_at problem limit
_REQUEUE_EXPIRED = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, ARGV[6])
local requeued, failed = {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  redis.call('ZREM', KEYS[2], id)
  local f = redis.call('HMGET', key, 'state', 'attempts', 'seq', 'upload_bytes')
  if f[1] == 'running' then
    if tonumber(f[2]) < tonumber(ARGV[3]) then
      redis.call('HSET', key, 'state', 'queued', 'lease_owner', '', 'lease_expires_at', '',
        'updated_at', ARGV[2])
      redis.call('ZADD', KEYS[1], f[3], id)
      table.insert(requeued, id)
    else
      redis.call('HSET', key, 'state', 'failed', 'problem', ARGV[5], 'lease_expires_at', '',
        'updated_at', ARGV[2], 'expires_at', ARGV[4])
      redis.call('ZADD', KEYS[3], ARGV[4], id)
      redis.call('DECRBY', KEYS[4], f[4])
      table.insert(failed, redis.call('HGETALL', key))
    end
  end
end
return {requeued, failed}
"""

# KEYS: done failed; ARGV: job_key_prefix now limit
_EXPIRE = """
local out = {}
for i = 1, 2 do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
  for _, id in ipairs(ids) do
    local key = ARGV[1] .. id
    local job = redis.call('HGETALL', key)
    if #job > 0 then table.insert(out, job) end
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[i], id)
  end
end
return out
"""

# KEYS: queue done failed pending_bytes job; ARGV: id owner now
_DELETE = """
local f = redis.call('HMGET', KEYS[5], 'state', 'owner', 'expires_at', 'upload_bytes')
if not f[1] or f[2] ~= ARGV[2] then return {'not-found'} end
if f[3] ~= '' and tonumber(f[3]) <= tonumber(ARGV[3]) then return {'not-found'} end
local job = redis.call('HGETALL', KEYS[5])
if f[1] == 'running' then return {'running', job} end
if f[1] == 'queued' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DECRBY', KEYS[4], f[4])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('DEL', KEYS[5])
return {'deleted', job}
"""


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """HGETALL's flat [field, value, ...] list from Lua, as a dict."""
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _time(t: float) -> str:
    return repr(float(t))


class RedisJobStore(JobStore):
    def __init__(
        self,
        client: redis.Redis,
        config: JobsConfig,
        clock: Clock = time.time,
        *,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        super().__init__(config, clock)
        self._r = client
        self._prefix = prefix
        self._keys = {
            name: prefix + name
            for name in ("queue", "running", "done", "failed", "pending_bytes", "seq")
        }
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._end = client.register_script(_END)
        self._release = client.register_script(_RELEASE)
        self._requeue_expired = client.register_script(_REQUEUE_EXPIRED)
        self._expire = client.register_script(_EXPIRE)
        self._delete = client.register_script(_DELETE)

    @classmethod
    def from_url(
        cls, url: str, config: JobsConfig, clock: Clock = time.time, **kwargs: Any
    ) -> RedisJobStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5
        )
        return cls(client, config, clock, **kwargs)

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _k(self, *names: str) -> list[str]:
        return [self._keys[name] for name in names]

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailable(f"Redis job store: {type(e).__name__}") from e

    # --- the interface --------------------------------------------------------------

    def enqueue(self, new: NewJob) -> Job:
        args: list[str | int | float] = [
            self.config.max_queued_jobs,
            self.config.upload_budget_bytes,
            new.upload_bytes,
            _time(self.clock()),
            new.id,
            new.owner,
            new.upload_path,
            encode_json(new.params),
            new.callback_url or "",
        ]
        keys = [*self._k("queue", "running", "pending_bytes", "seq"), self._job_key(new.id)]
        with self._guard():
            answer = self._enqueue(keys=keys, args=args)
        if answer[0] == 0:
            raise self.queue_full("bytes" if answer[1] == "bytes" else "jobs")
        job = self.peek(new.id)
        assert job is not None
        if answer[0] == -1 and job.upload_path != new.upload_path:
            # -1 with the same upload: a retry of this very call whose answer was lost.
            raise ValueError("a job with this id exists already")
        return job

    def claim(self, worker: str) -> Job | None:
        now = self.clock()
        args = [
            self._job_key(""),
            self.new_lease_owner(worker),
            _time(now + self.config.lease_s),
            _time(now),
        ]
        with self._guard():
            flat = self._claim(keys=self._k("queue", "running"), args=args)
        return None if not flat else job_from_fields(_pairs(flat))

    def renew(self, job_id: str, lease_owner: str) -> bool:
        now = self.clock()
        args = [job_id, lease_owner, _time(now + self.config.lease_s), _time(now)]
        with self._guard():
            renewed = self._renew(keys=[*self._k("running"), self._job_key(job_id)], args=args)
        return bool(renewed)

    def complete(self, job_id: str, lease_owner: str, result: JSONObject) -> Job | None:
        return self._finish(job_id, lease_owner, JobState.DONE, "result", encode_json(result))

    def fail(self, job_id: str, lease_owner: str, problem: JSONObject) -> Job | None:
        return self._finish(job_id, lease_owner, JobState.FAILED, "problem", encode_json(problem))

    def _finish(
        self, job_id: str, lease_owner: str, state: JobState, field: str, value: str
    ) -> Job | None:
        now = self.clock()
        keys = [*self._k("running", state.value, "pending_bytes"), self._job_key(job_id)]
        args = [
            job_id,
            lease_owner,
            state.value,
            field,
            value,
            _time(now),
            _time(now + self.config.result_ttl_s),
        ]
        with self._guard():
            flat = self._end(keys=keys, args=args)
        return None if not flat else job_from_fields(_pairs(flat))

    def release(self, job_id: str, lease_owner: str) -> bool:
        keys = [*self._k("queue", "running"), self._job_key(job_id)]
        with self._guard():
            released = self._release(keys=keys, args=[job_id, lease_owner, _time(self.clock())])
        return bool(released)

    def peek(self, job_id: str) -> Job | None:
        with self._guard():
            fields: dict[str, Any] = self._r.hgetall(self._job_key(job_id))  # type: ignore[assignment]
        return job_from_fields(fields) if fields else None

    def delete(self, job_id: str, owner: str) -> Deleted:
        keys = [*self._k("queue", "done", "failed", "pending_bytes"), self._job_key(job_id)]
        with self._guard():
            answer = self._delete(keys=keys, args=[job_id, owner, _time(self.clock())])
        outcome = DeleteOutcome(answer[0])
        job = job_from_fields(_pairs(answer[1])) if len(answer) > 1 else None
        return Deleted(outcome, job)

    def requeue_expired(self, limit: int = 100) -> Recovered:
        now = self.clock()
        args: list[str | int | float] = [
            self._job_key(""),
            _time(now),
            MAX_ATTEMPTS,
            _time(now + self.config.result_ttl_s),
            encode_json(worker_lost_problem()),
            limit,
        ]
        with self._guard():
            requeued, failed = self._requeue_expired(
                keys=self._k("queue", "running", "failed", "pending_bytes"), args=args
            )
        return Recovered(
            tuple(str(i) for i in requeued), tuple(job_from_fields(_pairs(f)) for f in failed)
        )

    def expire(self, limit: int = 100) -> list[Job]:
        args: list[str | int | float] = [self._job_key(""), _time(self.clock()), limit]
        with self._guard():
            flats = self._expire(keys=self._k("done", "failed"), args=args)
        return [job_from_fields(_pairs(flat)) for flat in flats]

    def usage(self) -> Usage:
        with self._guard(), self._r.pipeline(transaction=True) as pipe:
            for name in ("queue", "running", "done", "failed"):
                pipe.zcard(self._keys[name])
            pipe.get(self._keys["pending_bytes"])
            queued, running, done, failed, pending = pipe.execute()
        return Usage(
            queued=int(queued),
            running=int(running),
            done=int(done),
            failed=int(failed),
            pending_bytes=int(pending or 0),
        )

    def close(self) -> None:
        self._r.close()
