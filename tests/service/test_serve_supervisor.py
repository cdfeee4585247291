"""tarq serve's EmbeddedWorker on real child processes: a worker that dies is started again, with a growing
pause while it keeps dying young; once stopped, nothing is started again."""
from __future__ import annotations

import re
import sys
import time

from tarq.cli_serve import EmbeddedWorker


def test_a_dying_worker_is_started_again_with_growing_pauses_until_stopped(capfd):
    worker = EmbeddedWorker([sys.executable, "-c", "raise SystemExit(3)"], env={})
    deadline = time.monotonic() + 20
    seen = ""
    while seen.count("exited with 3") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        seen += capfd.readouterr().err
    worker.stop()
    pauses = [int(p) for p in re.findall(r"exited with 3; starting another in (\d+) s", seen)]
    assert pauses[:3] == [1, 2, 4], seen
    # the first start and one after each pause but the last, which stop() cut short
    assert len(re.findall(r"worker: pid \d+, queues", seen)) == len(pauses) == 3, seen
    time.sleep(1.5)
    after = capfd.readouterr().err
    assert "worker: pid" not in after  # stopped: not started again


def test_stop_ends_a_running_worker(capfd):
    worker = EmbeddedWorker([sys.executable, "-c", "import time; time.sleep(60)"], env={})
    proc = worker.proc
    worker.stop()
    assert proc.poll() is not None
    time.sleep(1.5)
    assert "exited" not in capfd.readouterr().err  # its end was asked for, not a death to answer
