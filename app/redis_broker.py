"""What the Redis transport keeps of a message a worker took, for app.task_wait.

kombu moves a late-acked message out of its queue's list when a worker takes it and into the `unacked`
hash (by delivery tag; `unacked_index` orders the tags by time), where it stays until the worker
acknowledges it. Redis gives it back to the queue only once the visibility timeout has passed, which is
sized for quantizations (hours). A transcription whose message is held there while its task never
started was taken by a worker that died first; the API sends it again and drops the held copy, so that
Redis does not run it a second time hours later.

Only kombu's key names (the channel's `unacked_key` and `unacked_index_key`, transport options) and its
entry format, JSON [message, exchange, routing key], are relied on. The hash holds one entry per message
that workers hold (running tasks), so reading it on each look is cheap.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _channel(celery) -> Iterator:
    with celery.pool.acquire(block=True, timeout=10) as conn:
        yield conn.default_channel


def _task_id(entry: bytes | str | None) -> str | None:
    try:
        message = json.loads(entry)[0]
        return str(message["headers"]["id"])
    except (TypeError, ValueError, KeyError, IndexError):  # not a Celery message of protocol 2
        return None


def held_tags(celery, task_id: str) -> list[str]:
    """The delivery tags under which workers took `task_id`'s messages and have not acknowledged them."""
    with _channel(celery) as channel:
        client = channel.client
        tags = [t.decode() if isinstance(t, bytes) else str(t)
                for t in client.zrange(channel.unacked_index_key, 0, -1)]
        if not tags:
            return []
        pipe = client.pipeline(transaction=False)
        for tag in tags:
            pipe.hget(channel.unacked_key, tag)
        return [tag for tag, entry in zip(tags, pipe.execute()) if _task_id(entry) == task_id]


def drop_held(celery, task_id: str) -> list[str]:
    """Remove `task_id`'s held messages, as kombu's own reject without requeue does; returns their tags.
    A worker that still holds one and acknowledges it later finds nothing to remove, which is harmless."""
    tags = held_tags(celery, task_id)
    if tags:
        with _channel(celery) as channel:
            pipe = channel.client.pipeline()
            for tag in tags:
                pipe.zrem(channel.unacked_index_key, tag).hdel(channel.unacked_key, tag)
            pipe.execute()
    return tags
