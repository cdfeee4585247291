"""`tarq serve` and `tarq worker`: the service from the command line.

Both import the service (FastAPI, Celery, uvicorn) inside the command body, so `import tarq.cli` stays
free of them (the import rules test enforces it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click


def _project_root() -> str:
    import app

    return str(Path(app.__file__).resolve().parent.parent)


def _die_with_parent() -> None:
    """Runs in the worker child before exec: on Linux, the kernel sends it SIGTERM if `tarq serve` dies
    (even by SIGKILL), so no orphan worker outlives the server."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _exit_on_sigterm(signum, _frame) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; turning it into SystemExit
    # lets `serve` stop its worker on the way out instead of dying on the spot.
    raise SystemExit(128 + signum)


def _worker_argv(queues: str, concurrency: int, loglevel: str, embedded: bool) -> list[str]:
    argv = ["worker", "-Q", queues, "-c", str(concurrency), "--loglevel", loglevel]
    if embedded:
        # no broadcast chatter between workers over the filesystem transport
        argv += ["--without-mingle", "--without-gossip"]
    return argv


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--no-worker", is_flag=True, help="Start only the API (workers run elsewhere: `tarq worker`).")
@click.option("--concurrency", default=2, show_default=True, type=int,
              help="Processes of the embedded worker (one quantization and one transcription at a time).")
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, no_worker: bool, concurrency: int, log_level: str) -> None:
    """Start the HTTP API and, unless --no-worker, one worker on both queues.

    With no TARQ_* settings this needs nothing else: Celery runs over a local folder transport, jobs
    live in SQLite and files in a folder, all under the data dir (TARQ_DATA_DIR, default
    ~/.local/share/tarq). Without TARQ_API_KEYS a key is generated into <data dir>/api_key.
    """
    import uvicorn

    from app.auth import ensure_api_key
    from app.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    key_file = ensure_api_key(settings)
    if key_file is not None:
        click.echo(f"API key: in {key_file} (send it as 'Authorization: Bearer <key>')", err=True)
    worker = None
    if not no_worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app",
                *_worker_argv("quantize,transcribe", concurrency, log_level.upper(), settings.embedded_broker)]
        worker = EmbeddedWorker(argv, env)
    click.echo(f"API: http://{host}:{port}/v1 (docs at /docs), data in {settings.data_dir}", err=True)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_level=log_level)
    finally:
        if worker is not None:
            worker.stop()


class EmbeddedWorker:
    """The worker `tarq serve` runs beside its API, started again whenever it dies: a laptop service has
    no supervisor of its own. (A quantization the dead worker had taken is sent again when the next one
    starts, app.embedded_broker; one it was running, by the API's reaper once its heartbeat stops.) While
    it keeps dying young (a bad setting, say) the restarts back off to one a minute."""

    def __init__(self, argv: list[str], env: dict):
        self.argv, self.env = argv, env
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name="tarq-worker-watch", daemon=True).start()

    def _spawn(self) -> subprocess.Popen:
        # A session of its own: Ctrl-C in the terminal reaches serve alone, which stops the worker itself
        # (a worker that the terminal's SIGINT stopped first would look dead and be started again).
        proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        click.echo(f"worker: pid {proc.pid}, queues quantize,transcribe", err=True)
        return proc

    def _watch(self) -> None:
        delay = 0.5
        while True:
            started, proc = time.monotonic(), self.proc
            code = proc.wait()
            if self.stopping.is_set():
                return
            delay = 1.0 if time.monotonic() - started >= 60 else min(2 * delay, 60.0)
            click.echo(f"worker: pid {proc.pid} exited with {code}; starting another in {delay:.0f} s", err=True)
            if self.stopping.wait(delay):
                return
            with self.lock:
                if self.stopping.is_set():
                    return
                self.proc = self._spawn()

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
            proc = self.proc
        if proc.poll() is None:
            # warm shutdown: the worker finishes or gives back (late ack) what it holds
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@click.command("worker")
@click.option("-Q", "--queues", default="quantize,transcribe", show_default=True,
              help="Comma-separated queues: quantize (long, one per GPU), transcribe (short).")
@click.option("-c", "--concurrency", default=1, show_default=True, type=int)
@click.option("--log-level", default="info", show_default=True)
def worker(queues: str, concurrency: int, log_level: str) -> None:
    """Run a Celery worker for the service (same settings as `tarq serve`; point TARQ_BROKER_URL,
    TARQ_DATABASE_URL and TARQ_STORAGE_URL at the shared services)."""
    from app.settings import QUEUES, get_settings

    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = [q for q in wanted if q not in QUEUES]
    if unknown or not wanted:
        raise click.BadParameter(f"unknown queue {unknown[0] if unknown else queues!r}; choose from "
                                 f"{', '.join(QUEUES)}", param_hint="-Q")
    from worker.celery_app import app

    app.worker_main(_worker_argv(",".join(wanted), concurrency, log_level.upper(), get_settings().embedded_broker))


if __name__ == "__main__":  # python -m tarq.cli_serve serve|worker (before tarq.cli gains them)
    @click.group()
    def _main() -> None:
        pass

    _main.add_command(serve)
    _main.add_command(worker)
    _main()
