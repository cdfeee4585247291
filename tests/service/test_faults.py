"""Fault injection with real processes: the API restarted while a job runs, Redis killed and restarted
(AOF on, on a Redis of our own) while jobs wait in the queue, and a task that runs out of memory.

(The worker SIGKILLed mid-job is in test_e2e.py; the database down in test_api.py.)"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port, stop, tarq_command, wait_http
from tests.service.test_e2e import follow, run_logged, tail


def _files(clips, transcripts: bytes | None):
    files = [("files", (c.name, c.read_bytes(), "audio/flac")) for c in clips]
    if transcripts:
        files.append(("transcripts", ("transcripts.tsv", transcripts, "text/tab-separated-values")))
    return files


def _wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(every)


class Started:
    """The processes one test starts. At teardown they stop in dependency order, workers (with their pool:
    each runs in its own session) before the APIs before Redis, and the tail of every log is printed:
    pytest shows that output only when the test failed."""

    ORDER = {"worker": 0, "api": 1, "redis": 2}

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.items: list[tuple[str, subprocess.Popen, object]] = []  # (kind, process, its log file)

    def start(self, argv, env, name: str, kind: str = "api") -> subprocess.Popen:
        proc, log = run_logged(argv, env, self.tmp_path / f"{name}.log", new_session=kind == "worker")
        self.items.append((kind, proc, log))
        return proc

    def worker(self, env) -> subprocess.Popen:
        return self.start(tarq_command("worker", "-c", "1"), env, "worker", kind="worker")

    def api(self, env, port: int, name: str = "api") -> subprocess.Popen:
        proc = self.start(tarq_command("serve", "--no-worker", "--port", str(port)), env, name)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        return proc

    def serve(self, env, port: int) -> tuple[subprocess.Popen, Path]:
        """`tarq serve` with its embedded worker, ready; returns the process and its log. Its own session:
        teardown stops serve, its worker and that worker's pool together."""
        proc = self.start(tarq_command("serve", "--port", str(port), "--concurrency", "1"), env, "serve",
                          kind="worker")
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        log = self.tmp_path / "serve.log"
        _wait_for(lambda: re.search(r"worker: pid \d+", log.read_text(errors="replace"))
                  and " ready." in log.read_text(errors="replace"), 120, "the embedded worker starting")
        return proc, log

    def redis(self, port: int, folder) -> subprocess.Popen:
        # The compose file's persistence: AOF, fsync every second.
        import redis

        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", str(folder), "--appendonly", "yes", "--appendfsync", "everysec",
                                 "--save", "", "--daemonize", "no", "--protected-mode", "yes"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.items.append(("redis", proc, None))
        _wait_for(lambda: _pings(redis.Redis(port=port, socket_connect_timeout=1)), 20, "redis starting")
        return proc

    def close(self) -> None:
        for kind, proc, log in sorted(self.items, key=lambda item: self.ORDER[item[0]]):
            _stop_group(proc) if kind == "worker" else stop(proc)
            if log is not None:
                log.close()
        for _, _, log in self.items:
            if log is not None:
                print(f"--- {log.name}\n{tail(Path(log.name))}")


@pytest.fixture
def started(tmp_path):
    procs = Started(tmp_path)
    yield procs
    procs.close()


def _stop_group(proc) -> None:
    """Stop a process started in its own session (the Celery parent and its pool children)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _submit_job_and_transcription(client: httpx.Client, background, clip: Path):
    """An RTN job on the tiny model, and a transcription of `clip` waiting in `background`: (job id, its future)."""
    answer = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"})
    assert answer.status_code == 202, answer.text
    transcription = background.submit(client.post, "/v1/audio/transcriptions", data={"model": "tiny-whisper"},
                                      files={"file": (clip.name, clip.read_bytes(), "audio/wav")}, timeout=200)
    return answer.json()["id"], transcription


def _client(port: int, key: str) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                        timeout=60)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
def test_api_restart_while_a_job_runs_keeps_its_state_and_progress(started, subprocess_env, clips,
                                                                   clip_transcripts):
    """SIGKILL `tarq serve --no-worker` while a separate worker quantizes, start it again on the same
    data dir (SQLite, filesystem broker): the job is still there, its progress never went back, it was
    never handed to a second attempt, and it finishes."""
    env = dict(subprocess_env, TARQ_API_KEYS="restart-key", TARQ_STALE_AFTER_SECONDS="20")
    port = free_port()
    api = started.api(env, port, "api1")
    started.worker(env)
    with _client(port, "restart-key") as client:
        created = client.post("/v1/quantizations", files=_files(clips, clip_transcripts),
                              data={"model": "tiny-whisper", "method": "tarq"})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        def started_job():
            j = client.get(f"/v1/quantizations/{job_id}").json()
            return j["status"] != "queued" and j["progress"]["stage"] and j

        before = _wait_for(started_job, 180, "the job starting")
        api.kill()  # no shutdown of any kind
        api.wait()
        time.sleep(1.0)
        started.api(env, port, "api2")
        after = client.get(f"/v1/quantizations/{job_id}").json()
        assert after["status"] in ("running", "succeeded"), after
        assert after["progress"]["fraction"] >= before["progress"]["fraction"]
        assert after["attempts"] == 1 and after["created_at"] == before["created_at"]
        assert after["config"] == before["config"] and after["files"] == before["files"]
        job, _ = follow(client, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert job["model"] in [m["id"] for m in client.get("/v1/models").json()["data"]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_killed_and_restarted_loses_no_queued_job(started, tmp_path, subprocess_env, clips):
    """Jobs accepted while no worker runs wait in a Redis of our own (AOF everysec, as in
    docker-compose.yml). Redis is SIGKILLed and started again on the same folder: every accepted job is
    still queued and finishes once a worker starts. While Redis is down a submission is refused with 503
    and leaves a failed record, not a queued job nobody will run."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis_port = free_port()
    redis_proc = started.redis(redis_port, redis_dir)
    env = dict(subprocess_env, TARQ_API_KEYS="redis-key", TARQ_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0")
    port = free_port()
    started.api(env, port)
    with _client(port, "redis-key") as client:
        def submit():
            return client.post("/v1/quantizations", files=_files(clips[:1], None),
                               data={"model": "tiny-whisper", "method": "rtn"})

        accepted = []
        for _ in range(3):
            response = submit()
            assert response.status_code == 202, response.text
            accepted.append(response.json()["id"])
        time.sleep(2.0)  # past appendfsync everysec: what a restart must keep is on disk
        redis_proc.kill()
        redis_proc.wait()

        down = client.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["broker"].startswith("error"), down.text
        refused = submit()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "broker_unavailable"
        listed = {j["id"]: j for j in client.get("/v1/quantizations", params={"limit": 100}).json()["data"]}
        assert {listed[i]["status"] for i in accepted} == {"queued"}
        assert [j["status"] for i, j in listed.items() if i not in accepted] == ["failed"]

        started.redis(redis_port, redis_dir)
        _wait_for(lambda: client.get("/readyz").status_code == 200, 30, "the API seeing Redis again")
        response = submit()  # the API reconnects by itself
        assert response.status_code == 202, response.text
        accepted.append(response.json()["id"])

        started.worker(env)
        for job_id in accepted:
            job, _ = follow(client, job_id, timeout=300)
            assert job["status"] == "succeeded" and job["attempts"] == 1, job


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_killed_while_a_job_runs_the_job_still_ends(started, tmp_path, subprocess_env, clips,
                                                          clip_transcripts):
    """Redis dies (SIGKILL) and comes back while a worker quantizes: the job is never stuck `running`
    and never lost; it ends `succeeded` (on the first attempt, or on a second after the reaper requeues
    it if the worker dropped it when its broker connection broke)."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis_port = free_port()
    redis_proc = started.redis(redis_port, redis_dir)
    env = dict(subprocess_env, TARQ_API_KEYS="redis-key", TARQ_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
               TARQ_STALE_AFTER_SECONDS="6", TARQ_HEARTBEAT_SECONDS="1")
    port = free_port()
    started.api(env, port)
    worker = started.worker(env)
    with _client(port, "redis-key") as client:
        created = client.post("/v1/quantizations", files=_files(clips, clip_transcripts),
                              data={"model": "tiny-whisper", "method": "tarq"})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        _wait_for(lambda: client.get(f"/v1/quantizations/{job_id}").json()["status"] == "running", 180,
                  "the job starting")
        redis_proc.kill()
        redis_proc.wait()
        time.sleep(2.0)
        started.redis(redis_port, redis_dir)
        job, _ = follow(client, job_id, timeout=300)
        assert job["status"] == "succeeded" and job["attempts"] in (1, 2), job
        assert worker.poll() is None, "the worker died with its broker"


@pytest.mark.slow
def test_out_of_memory_in_a_task_fails_the_job_and_the_worker_lives_on(started, tmp_path, subprocess_env,
                                                                       model_root):
    """TARQ_WORKER_MEMORY_LIMIT_MB caps each pool process's address space (RLIMIT_AS) at its loaded
    libraries plus 600 MB: an RTN job on a 300 MB model (768 wide) needs more than that and fails with
    "out of memory"; the same worker process then quantizes the tiny model."""
    from tests.conftest import build_tiny_whisper

    wide_root = tmp_path / "models"
    build_tiny_whisper(wide_root / "wide-whisper", d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    env = dict(subprocess_env, TARQ_API_KEYS="oom-key", TARQ_WORKER_MEMORY_LIMIT_MB="600",
               TARQ_MODEL_ROOTS=f"{model_root},{wide_root}")
    port = free_port()
    started.api(env, port)
    worker = started.worker(env)
    with _client(port, "oom-key") as client:
        big = client.post("/v1/quantizations", data={"model": "wide-whisper", "method": "rtn"})
        assert big.status_code == 202, big.text
        job, _ = follow(client, big.json()["id"], timeout=300)
        assert job["status"] == "failed" and job["error"].startswith("out of memory"), job
        assert job["attempts"] == 1 and job["model"] is None
        assert worker.poll() is None, "the worker died"
        small = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"})
        job, _ = follow(client, small.json()["id"], timeout=300)
        assert job["status"] == "succeeded", job
        assert worker.poll() is None
        log = (tmp_path / "worker.log").read_text(errors="replace")
        assert "memory cap" in log and "WorkerLostError" not in log


def test_out_of_memory_without_a_memory_error_is_named_so():
    """Host RAM running out reaches the task in three shapes (seen under RLIMIT_AS): MemoryError,
    torch's RuntimeError from its CPU allocator, and the loader's ModelError around a failed mmap."""
    from tarq.errors import ModelError
    from worker.tasks import _out_of_memory

    torch_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 9437184 bytes. Error code 12 (Cannot allocate memory)")
    mmap_oom = ModelError("cannot load Whisper from /m: unable to mmap 305456072 bytes from file "
                          "</m/model.safetensors>: Cannot allocate memory (12)")
    for err in (torch_oom, mmap_oom):
        assert _out_of_memory(err).startswith("out of memory (host RAM) while quantizing: ")
    assert _out_of_memory(RuntimeError("shape mismatch")) is None
    assert _out_of_memory(ModelError("/m has no weights (*.safetensors)")) is None


def test_pool_processes_share_the_cores(started, tmp_path, subprocess_env):
    """torch takes a thread per core in every process; a worker's pool processes divide the cores among
    themselves instead (TARQ_TORCH_THREADS overrides, an explicit OMP_NUM_THREADS is left alone)."""
    env = {k: v for k, v in subprocess_env.items() if k != "OMP_NUM_THREADS"}
    cores = len(os.sched_getaffinity(0))
    runs = {"shared": (env, "2"), "fixed": (dict(env, TARQ_TORCH_THREADS="3"), "1"),
            "omp": (dict(env, OMP_NUM_THREADS="1"), "2")}
    for name, (run_env, concurrency) in runs.items():
        started.start(tarq_command("worker", "-c", concurrency), run_env, name, kind="worker")
    logs = {name: tmp_path / f"{name}.log" for name in runs}
    for name in runs:
        _wait_for(lambda name=name: " ready." in logs[name].read_text(errors="replace"), 120, f"worker {name} ready")
    said = lambda name: re.findall(r"torch uses (\d+) CPU threads \((\w+)", logs[name].read_text(errors="replace"))
    _wait_for(lambda: len(said("shared")) == 2 and len(said("fixed")) == 1 and len(said("omp")) == 2, 60,
              "pool processes set their threads")
    assert said("shared") == [(str(max(1, cores // 2)), str(cores))] * 2
    assert said("fixed") == [("3", "TARQ_TORCH_THREADS")]
    assert said("omp") == [("1", "OMP_NUM_THREADS")] * 2


def test_worker_preloads_models(started, tmp_path, subprocess_env, tone_wav):
    """TARQ_PRELOAD_MODELS: a worker's pool process loads the named models when it starts, so the first
    request for one loads nothing; a name that resolves to no model is reported and skipped. A worker that
    takes no transcriptions (-Q quantize) loads none."""
    env = dict(subprocess_env, TARQ_API_KEYS="preload-key", TARQ_PRELOAD_MODELS="tiny-whisper, no-such-model")
    port = free_port()
    started.api(env, port)
    started.start(tarq_command("worker", "-Q", "quantize"), env, "quantizer", kind="worker")
    started.worker(env)
    log = tmp_path / "worker.log"
    text = lambda: log.read_text(errors="replace")
    _wait_for(lambda: "preloaded model 'tiny-whisper'" in text() and "cannot preload model 'no-such-model'" in text(),
              120, "the preload")
    assert re.search(r"preloaded model 'tiny-whisper' \((float32|bfloat16)\) in [\d.]+ s", text()), text()
    assert "'no-such-model' is neither a model of this server" in text()
    with _client(port, "preload-key") as client:
        clip = tone_wav(tmp_path / "tone.wav", 2.0)
        answer = client.post("/v1/audio/transcriptions", data={"model": "tiny-whisper", "response_format": "json"},
                             files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
        assert answer.status_code == 200, answer.text
    assert len(re.findall(r"loading model \S*tiny-whisper", text())) == 1  # by the preload, not again
    quantizer = (tmp_path / "quantizer.log").read_text(errors="replace")
    assert " ready." in quantizer and not re.search("preloaded model|cannot preload|loading model", quantizer)


@pytest.mark.slow
def test_embedded_worker_killed_holding_a_job_is_restarted_and_the_job_runs(started, tmp_path, subprocess_env,
                                                                             tone_wav):
    """`tarq serve`'s own worker SIGKILLed after taking a quantization's and a transcription's messages,
    before starting them: the filesystem broker has no copy left (Redis would redeliver). serve starts
    another worker, which sends the queued job again; the API, seeing the transcription's message gone and
    the task never started, sends it again. Both finish."""
    key = "embedded-key"
    env = dict(subprocess_env, TARQ_API_KEYS=key, TARQ_TRANSCRIBE_WAIT_SECONDS="120",
               TARQ_TRANSCRIBE_LOST_AFTER_SECONDS="5")
    port = free_port()
    serve, log = started.serve(env, port)
    text = lambda: log.read_text(errors="replace")  # noqa: E731
    pids = lambda: [int(p) for p in re.findall(r"worker: pid (\d+)", text())]  # noqa: E731
    first = pids()[0]
    pool = _wait_for(lambda: _children_of(first), 30, "the worker's pool process")
    os.kill(first, signal.SIGSTOP)  # it takes nothing from now on
    with _client(port, key) as client, concurrent.futures.ThreadPoolExecutor(1) as background:
        job_id, transcription = _submit_job_and_transcription(client, background, tone_wav(tmp_path / "tone.wav", 2.0))
        queue = tmp_path / "data" / "broker" / "queue"
        for kind in ("quantize", "transcribe"):
            for message in _wait_for(lambda: list(queue.glob(f"*.{kind}.msg")), 10, f"the {kind} message"):
                message.unlink()  # what a worker that took the message leaves behind
        os.kill(first, signal.SIGKILL)
        _wait_for(lambda: len(pids()) == 2, 30, "serve starting another worker")
        assert f"worker: pid {first} exited with -9" in text()
        final, _ = follow(client, job_id, timeout=120)
        answered = transcription.result()
    assert final["status"] == "succeeded", final
    assert f"job {job_id} was queued with no message" in text()
    assert answered.status_code == 200 and isinstance(answered.json()["text"], str), answered.text
    assert "was taken by a worker that never started it (it died): sent again" in text()
    assert serve.poll() is None
    # the dead worker's pool process did not stay behind
    _wait_for(lambda: not [p for p in pool if _alive(p)], 30, "the killed worker's pool exiting")


@pytest.mark.slow
def test_a_transcription_running_longer_than_the_lost_window_is_not_sent_again(started, tmp_path,
                                                                                subprocess_env, tone_wav):
    """The task beats while it runs (from a thread of the pool process, under the task's own id): a live
    transcription several lost-after windows long is answered once, never taken for lost."""
    key = "long-key"
    env = dict(subprocess_env, TARQ_API_KEYS=key, TARQ_HEARTBEAT_SECONDS="0.5",
               TARQ_TRANSCRIBE_LOST_AFTER_SECONDS="1")
    port = free_port()
    _, log = started.serve(env, port)
    with _client(port, key) as client:
        # the random model never ends a window early: 448 decoding steps in each of two, seconds of work
        clip = tone_wav(tmp_path / "tone.wav", 50.0)
        answered = client.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"},
                               files={"file": (clip.name, clip.read_bytes(), "audio/wav")}, timeout=200)
    assert answered.status_code == 200, answered.text
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", answered.headers["Server-Timing"]))
    assert float(timing["transcribe"]) > 4000, timing  # four lost-after windows at least
    text = log.read_text(errors="replace")
    assert "sent again" not in text, text
    assert len(re.findall(r"Task tarq\.transcribe\[\S+\] received", text)) == 1, text
    # and the log holds no noise: kombu's fallback to localhost, transformers' progress bar
    assert "loading model" in text and "No hostname was supplied" not in text and "Loading weights" not in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_worker_killed_holding_a_job_and_a_transcription_another_runs_both(started, tmp_path,
                                                                                 subprocess_env, tone_wav):
    """A worker on Redis SIGKILLed after taking a quantization's and a transcription's messages, before
    starting either (its pool processes stopped). Redis holds both for the dead worker until its visibility
    timeout (hours). The API's reaper sees the job still queued with its message held past
    TARQ_STALE_AFTER_SECONDS, the API's wait sees the transcription PENDING with its message held; each
    drops the held copy and sends the task again, and a second worker runs both."""
    import redis

    from app import redis_broker
    from app.deps import celery_client
    from app.settings import Settings

    key = "held-key"
    redis_port = free_port()
    (tmp_path / "redis").mkdir()
    started.redis(redis_port, tmp_path / "redis")
    env = dict(subprocess_env, TARQ_API_KEYS=key, TARQ_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
               TARQ_TRANSCRIBE_WAIT_SECONDS="150", TARQ_TRANSCRIBE_LOST_AFTER_SECONDS="5",
               TARQ_STALE_AFTER_SECONDS="5", TARQ_HEARTBEAT_SECONDS="1")
    port = free_port()
    started.api(env, port)
    worker = started.start(tarq_command("worker", "-c", "2"), env, "first-worker", kind="worker")
    _wait_for(lambda: " ready." in (tmp_path / "first-worker.log").read_text(errors="replace"), 120,
              "the worker starting")
    pool = _wait_for(lambda: len(_children_of(worker.pid)) == 2 and _children_of(worker.pid), 30,
                     "the worker's pool processes")
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)  # the main process still takes messages; nothing starts them
    broker = redis.Redis(port=redis_port)
    celery = celery_client(Settings(broker_url=env["TARQ_BROKER_URL"], data_dir=tmp_path / "probe"))
    with _client(port, key) as client, concurrent.futures.ThreadPoolExecutor(1) as background:
        job_id, transcription = _submit_job_and_transcription(client, background, tone_wav(tmp_path / "tone.wav", 2.0))
        _wait_for(lambda: broker.hlen("unacked") == 2, 30, "the worker taking both messages")
        held = {h.task: h for h in redis_broker.held(celery)}
        assert held["tarq.quantize"].args == [job_id] and broker.llen("quantize") == broker.llen("transcribe") == 0
        task_id = held["tarq.transcribe"].task_id
        os.killpg(worker.pid, signal.SIGKILL)  # main and pool processes; nothing gives the messages back
        started.start(tarq_command("worker", "-c", "1"), env, "second-worker", kind="worker")
        answered = transcription.result()
        final, _ = follow(client, job_id, timeout=120)
    assert answered.status_code == 200 and isinstance(answered.json()["text"], str), answered.text
    assert final["status"] == "succeeded" and final["attempts"] == 1, final
    text = (tmp_path / "api.log").read_text(errors="replace")
    assert f"task {task_id} was taken by a worker that never started it (it died): sent again" in text, text
    assert f"job {job_id} was taken by a worker that never started it (it died): sent again" in text, text
    assert redis_broker.held(celery) == [] and broker.llen("quantize") == broker.llen("transcribe") == 0
    second = (tmp_path / "second-worker.log").read_text(errors="replace")
    assert f"Task tarq.transcribe[{task_id}] received" in second and f"job {job_id} succeeded" in second, second


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["embedded", "redis"])
def test_worker_killed_running_a_transcription_is_replaced_and_it_answers(started, tmp_path, subprocess_env,
                                                                        tone_wav, broker):
    """A worker and its pool process SIGKILLed together (as the OOM killer or a kill of the group would)
    while the pool process runs a transcription. Nothing requeues it: Celery's main process does that for
    a pool process that died, and it died too; Redis would give the message back only after its
    visibility timeout (hours, sized for quantizations). The task stops beating, the API sends it again,
    and the worker that replaces the dead one (`tarq serve` starts it; on Redis, another one) answers."""
    if broker == "redis" and shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    key = "running-key"
    env = dict(subprocess_env, TARQ_API_KEYS=key, TARQ_TRANSCRIBE_WAIT_SECONDS="150",
               TARQ_TRANSCRIBE_LOST_AFTER_SECONDS="5")
    port = free_port()
    if broker == "redis":
        import redis

        redis_port = free_port()
        (tmp_path / "redis").mkdir()
        started.redis(redis_port, tmp_path / "redis")
        env["TARQ_BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        started.api(env, port)
        results = redis.Redis(port=redis_port)
        running = lambda: any(b'"STARTED"' in (results.get(k) or b"")  # noqa: E731
                              for k in results.scan_iter("celery-task-meta-*"))
        worker = started.start(tarq_command("worker", "-c", "1"), env, "first-worker", kind="worker")
        log = tmp_path / "api.log"
        _wait_for(lambda: " ready." in (tmp_path / "first-worker.log").read_text(errors="replace"), 120,
                  "the worker starting")
        first = worker.pid
    else:
        serve, log = started.serve(env, port)
        pids = lambda: {int(p) for p in re.findall(r"worker: pid (\d+)", log.read_text(errors="replace"))}  # noqa: E731
        first = pids().pop()
        running = lambda: _started_in_sqlite(tmp_path / "data" / "celery-results.sqlite")  # noqa: E731

    with _client(port, key) as client, concurrent.futures.ThreadPoolExecutor(1) as background:
        # the random model never ends a window early: 448 decoding steps in each of two, seconds of work
        clip = tone_wav(tmp_path / "tone.wav", 50.0)
        transcription = background.submit(client.post, "/v1/audio/transcriptions", data={"model": "tiny-whisper"},
                                          files={"file": (clip.name, clip.read_bytes(), "audio/wav")}, timeout=200)
        _wait_for(running, 60, "the transcription starting", every=0.02)
        assert _children_of(first), "the worker has no pool process"
        os.killpg(first, signal.SIGKILL)  # the worker runs in its own session: main and pool process
        if broker == "redis":
            started.start(tarq_command("worker", "-c", "1"), env, "second-worker", kind="worker")
        answered = transcription.result()
    assert answered.status_code == 200 and isinstance(answered.json()["text"], str), answered.text
    text = log.read_text(errors="replace")
    assert re.search(r"task \S+ stopped beating while running in process \d+ on celery@\S+: sent again", text), text
    if broker == "embedded":
        assert f"worker: pid {first} exited with -9" in text and len(pids()) == 2  # serve started another
        assert serve.poll() is None


def _started_in_sqlite(results: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(results, timeout=5) as db:
            return db.execute("SELECT 1 FROM celery_taskmeta WHERE status = 'STARTED'").fetchone() is not None
    except sqlite3.OperationalError:  # the table is created with the first result
        return False


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_worker_that_cannot_reach_the_store_requeues_jobs_and_answers_503(started, tmp_path, subprocess_env,
                                                                           s3_server, clips, tone_wav):
    """The API reaches S3 (moto on loopback), the worker does not (its endpoint is a port nothing listens
    on). A transcription answers 503 storage_unavailable without the store's address. A job goes back to
    `queued`, saying why, and is sent again after TARQ_STORAGE_RETRY_SECONDS; when its attempts run out it
    fails with the reason. A job whose worker is replaced by one that reaches the store runs on its next
    attempt with its calibration clips still there."""
    endpoint, bucket = s3_server
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis_port = free_port()
    started.redis(redis_port, redis_dir)
    key = "store-key"
    env = dict(subprocess_env, TARQ_API_KEYS=key, TARQ_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
               TARQ_STORAGE_URL=f"s3://{bucket}/tarq", TARQ_S3_ENDPOINT_URL=endpoint,
               TARQ_S3_ACCESS_KEY_ID="testing", TARQ_S3_SECRET_ACCESS_KEY="testing", TARQ_S3_REGION="us-east-1",
               TARQ_MAX_ATTEMPTS="2", TARQ_STORAGE_RETRY_SECONDS="4", TARQ_STALE_AFTER_SECONDS="20")
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    started.api(env, port)
    cut_off = started.start(tarq_command("worker", "-c", "1"), dict(env, TARQ_S3_ENDPOINT_URL=dead), "worker-cut-off",
                            kind="worker")
    status = lambda client, job_id: client.get(f"/v1/quantizations/{job_id}").json()  # noqa: E731
    with _client(port, key) as client:
        clip = tone_wav(tmp_path / "tone.wav", 1.0)
        answered = client.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"},
                               files={"file": (clip.name, clip.read_bytes(), "audio/wav")}, timeout=200)
        assert answered.status_code == 503, answered.text
        err = answered.json()["error"]
        assert err["code"] == "storage_unavailable" and dead.rsplit(":", 1)[1] not in err["message"], err

        lost = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"}).json()["id"]
        job = _wait_for(lambda: (j := status(client, lost))["attempts"] == 1 and j["status"] == "queued" and j,
                        120, "the job queued again")
        assert job["error"] == "the artifact store was unavailable (attempt 1 of 2); trying again in 4 s", job
        job, _ = follow(client, lost, timeout=120)
        assert job["status"] == "failed" and job["attempts"] == 2, job
        assert job["error"].startswith("the artifact store was unavailable in all 2 attempts"), job
        assert job["model"] is None and client.get("/v1/models").json()["data"] == []

        kept = client.post("/v1/quantizations", files=_files(clips[:2], None),
                           data={"model": "tiny-whisper", "method": "gptq", "num_samples": "2"}).json()["id"]
        _wait_for(lambda: status(client, kept)["attempts"] == 1 and status(client, kept)["status"] == "queued", 120,
                  "the second job queued again")
        _stop_group(cut_off)  # before its retry: the message it held for later goes back to Redis
        started.worker(env)
        job, _ = follow(client, kept, timeout=300)
        assert job["status"] == "succeeded" and job["attempts"] == 2 and job["error"] is None, job
        assert job["model"] in [m["id"] for m in client.get("/v1/models").json()["data"]]
