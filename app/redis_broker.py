"""What the Redis transport keeps of a message a worker took, and what the API does with it.

kombu moves a late-acked message out of its queue's list when a worker takes it and into the `unacked`
hash (by delivery tag; `unacked_index` holds the time it was taken), where it stays until the worker
acknowledges it. Redis gives it back to the queue only once the visibility timeout has passed, which is
sized for quantizations (hours). A live worker starts what it takes at once (prefetch 1, late acks), so
a message held while its task never started was taken by a worker that died first:
- a transcription still PENDING (app.task_wait);
- a quantization whose job is still `queued` a while after the message was taken (lost_quantizations,
  run by the API's reaper, which also sends again a job queued that long with no message anywhere).
The API then drops the held copy, as kombu's own reject does, and sends the task again, so that Redis does
not run it a second time hours later. A job the reaper hands back after its worker died mid-run has its
held copy dropped the same way.

Only kombu's key names (the channel's `unacked_key` and `unacked_index_key`, transport options) and its
entry format, JSON [message, exchange, routing key], are relied on. The hash holds one entry per message
that workers hold (running tasks), so reading it is cheap.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from app import broker_messages


@dataclass
class Held:
    tag: str  # kombu's delivery tag
    taken_at: float  # when a worker took it (time.time())
    task: str | None  # the Celery task name; None for an entry that is not a Celery message
    task_id: str | None
    args: list


@contextmanager
def _channel(celery) -> Iterator:
    with celery.pool.acquire(block=True, timeout=10) as conn:
        yield conn.default_channel


def _parse(tag: str, taken_at: float, entry: bytes | str | None) -> Held:
    try:
        headers, args = broker_messages.parts(json.loads(entry)[0])
        task, task_id = headers.get("task"), headers.get("id")
        return Held(tag, taken_at, task and str(task), task_id and str(task_id), list(args))
    except (TypeError, ValueError, KeyError, IndexError):  # not a Celery message of protocol 2
        return Held(tag, taken_at, None, None, [])


def held(celery) -> list[Held]:
    """Every message that workers took and have not acknowledged."""
    with _channel(celery) as channel:
        client = channel.client
        index = [(t.decode() if isinstance(t, bytes) else str(t), float(score))
                 for t, score in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)]
        if not index:
            return []
        pipe = client.pipeline(transaction=False)
        for tag, _ in index:
            pipe.hget(channel.unacked_key, tag)
        return [_parse(tag, taken_at, entry) for (tag, taken_at), entry in zip(index, pipe.execute())
                if entry is not None]  # acknowledged between the two reads


def held_tags(celery, task_id: str) -> list[str]:
    """The delivery tags under which workers took `task_id`'s messages and have not acknowledged them."""
    return [h.tag for h in held(celery) if h.task_id == task_id]


def drop(celery, tags: list[str]) -> None:
    """Remove held messages, as kombu's reject without requeue does. A worker that still holds one and
    acknowledges it later finds nothing to remove, which is harmless."""
    if tags:
        with _channel(celery) as channel:
            pipe = channel.client.pipeline()
            for tag in tags:
                pipe.zrem(channel.unacked_index_key, tag).hdel(channel.unacked_key, tag)
            pipe.execute()


def drop_held(celery, task_id: str) -> list[str]:
    """Remove `task_id`'s held messages; returns their tags."""
    tags = held_tags(celery, task_id)
    drop(celery, tags)
    return tags


def drop_held_jobs(celery, job_ids: set[str]) -> list[str]:
    """Remove the held quantization messages of these jobs; returns their tags."""
    tags = [h.tag for h in held(celery) if h.task == "tarq.quantize" and h.args and str(h.args[0]) in job_ids]
    drop(celery, tags)
    return tags


def waiting_job_ids(celery) -> set[str]:
    """The jobs of the quantization messages waiting in the queue's list (tarq publishes without a
    priority, so kombu keeps them all in the one list named after the queue)."""
    with _channel(celery) as channel:
        raw = channel.client.lrange("quantize", 0, -1)
    ids = set()
    for entry in raw:
        try:
            headers, args = broker_messages.parts(json.loads(entry))
        except (TypeError, ValueError, KeyError, IndexError):
            continue
        if headers.get("task") == "tarq.quantize" and args:
            ids.add(str(args[0]))
    return ids


def lost_quantizations(celery, queued: dict[str, datetime], older_than: float) -> dict[str, str]:
    """Jobs among `queued` (job id -> when it became queued) that no worker will run, and why: a worker took
    its message more than `older_than` seconds ago without claiming the job (the held copy is dropped), or
    it has been queued that long with no message at all (a reaper whose send failed, an API that died
    between its database write and the send). The caller sends them again."""
    stale = time.time() - older_than
    waiting = waiting_job_ids(celery)  # read before the held ones: a message moves from there to here
    quantize = [h for h in held(celery) if h.task == "tarq.quantize" and h.args]
    lost = [h for h in quantize if str(h.args[0]) in queued and h.taken_at < stale]
    drop(celery, [h.tag for h in lost])
    held_jobs = {str(h.args[0]) for h in quantize}
    why = {job_id: "had no message" for job_id, since in queued.items()
           if job_id not in waiting and job_id not in held_jobs and since.timestamp() < stale}
    why.update({str(h.args[0]): "was taken by a worker that never started it (it died)" for h in lost})
    return why
