"""The API's wait for a transcription's result, which sends the task again when no worker will finish it.

Two ways a worker's death leaves a transcription nobody runs:
- taken, never started. The filesystem transport (embedded broker) moves a message out of the queue
  folder when a worker takes it, and a worker that dies before starting it leaves no copy. Redis keeps a
  taken message aside until it is acknowledged, but gives it back only once its visibility timeout, sized
  for quantizations (hours), has passed (app.redis_broker). So: a task still PENDING whose message is
  no longer in the folder, or is held unacknowledged in Redis, was taken by a worker that did not start
  it (a live one starts what it takes at once: prefetch 1 and late acks). Redis's held copy is dropped
  when the task is sent again.
- started, then the process running it died together with the worker's main process (the OOM killer, a
  kill of the worker's process group, a lost machine). Celery's main process requeues the task of a pool
  process that died, but nothing does when both go, on any broker: Redis only after the visibility
  timeout. The worker's transcription task rewrites its STARTED state every TARQ_HEARTBEAT_SECONDS with
  a counter (worker.tasks.beating); a counter that stops moving, or Celery's own STARTED that no first
  beat follows, means the task is lost, on whichever machine it ran. Redis's held copy is dropped here too.
Either for TARQ_TRANSCRIBE_LOST_AFTER_SECONDS, and the task is sent again under the same id. Should both
copies run after all, the result is written twice, alike (and the late one finds its audio deleted).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from app import redis_broker
from app.embedded_broker import queue_folder, waiting_task_ids
from app.settings import Settings

log = logging.getLogger("tarq.api")
_UNSEEN = object()


class LostWatch:
    """Whether a task has been lost for `grace` seconds, from what the API sees of its state over time."""

    def __init__(self, result, grace: float, folder: Path | None, redis: bool = False):
        # where a taken message is seen: gone from the embedded broker's `folder`, or held in `redis`
        self.result, self.grace, self.folder, self.redis = result, grace, folder, redis
        self.beat = _UNSEEN  # the last beat counter seen
        self.since: float | None = None  # when the task was first seen in its current lost-looking state

    def lost(self) -> str | None:
        """Why no worker will finish the task, once it has looked that way for `grace` seconds; else None."""
        why = self._looks_lost()
        if why is None:
            self.since = None
            return None
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return why if now - self.since >= self.grace else None

    def reset(self) -> None:
        self.since, self.beat = None, _UNSEEN

    def _taken(self) -> bool:
        if self.folder is not None:
            return self.result.id not in waiting_task_ids(self.folder, "transcribe")
        if self.redis:
            try:
                return bool(redis_broker.held_tags(self.result.app, self.result.id))
            except Exception as err:  # noqa: BLE001 -- cannot tell now; result.get reports a lasting outage
                log.warning("cannot read the messages workers hold for task %s: %s", self.result.id, err)
        return False

    def drop_taken_copy(self) -> None:
        """Before sending a taken task again: Redis would give the dead worker's copy back hours later."""
        if self.redis:
            try:
                tags = redis_broker.drop_held(self.result.app, self.result.id)
            except Exception as err:  # noqa: BLE001 -- at worst it runs twice, alike (see the module)
                log.warning("could not drop the held copy of task %s: %s", self.result.id, err)
                return
            if tags:
                log.info("task %s: dropped the copy a dead worker held (delivery tag %s)", self.result.id,
                         ", ".join(tags))

    def _looks_lost(self) -> str | None:
        # one read of the backend (AsyncResult.state and .info would each read it again)
        meta = self.result.backend.get_task_meta(self.result.id)
        state = meta.get("status")
        if state == "PENDING":
            return "was taken by a worker that never started it (it died)" if self._taken() else None
        if state == "STARTED":
            info = meta.get("result") if isinstance(meta.get("result"), dict) else {}
            beat = info.get("beat")  # None: Celery's own STARTED, which the task's first beat follows at once
            if beat != self.beat:
                self.beat = beat
                return None
            return f"stopped beating while running in process {info.get('pid')} on {info.get('hostname')}"
        return None


def wait(result, timeout: float, settings: Settings, resend, grace: float | None = None):
    """result.get(timeout) that calls resend() when the task has been lost (see the module) for `grace`
    seconds (TARQ_TRANSCRIBE_LOST_AFTER_SECONDS); resend() sends the same task under the same id."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    watch = LostWatch(result, settings.transcribe_lost_after_seconds if grace is None else grace,
                      queue_folder(settings) if settings.embedded_broker else None,
                      redis=settings.redis_broker)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CeleryTimeout(f"no result within {timeout} s")
        try:
            # interval: how often the result backend is polled (Celery's 0.5 s default added a quarter of
            # a second to the average request on the embedded broker's database backend)
            return result.get(timeout=min(left, 2.0), propagate=True, interval=0.05)
        except CeleryTimeout:
            pass
        why = watch.lost()
        if why is not None:
            log.warning("task %s %s: sent again", result.id, why)
            watch.drop_taken_copy()
            resend()
            watch.reset()
