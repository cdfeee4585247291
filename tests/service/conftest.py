"""Service fixtures: settings in a temp data dir, the app behind an httpx TestClient, on real SQLite
and real PostgreSQL (a fresh schema per test session, dropped afterwards), and real audio clips."""
from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("TARQ_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TARQ_TEST_REDIS", "redis://127.0.0.1:6379/15")
API_KEY = "test-key-" + secrets.token_hex(8)
ROOT = Path(__file__).resolve().parents[2]


def pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3).close()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_schema_url():
    """A PostgreSQL URL whose search_path is a schema of its own, dropped at the end."""
    if not pg_available():
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    import psycopg

    schema = "tarq_test_" + secrets.token_hex(6)
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    from app.db import dispose_engines

    dispose_engines()
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(scope="session")
def model_root(tiny_whisper_dir) -> Path:
    return tiny_whisper_dir.parent


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    url = request.getfixturevalue("pg_schema_url")
    from sqlalchemy import delete

    from app.db import get_engine, metadata

    with get_engine(url).begin() as conn:  # each test starts from empty tables
        for table in reversed(metadata.sorted_tables):
            conn.execute(delete(table))
    return url


@pytest.fixture
def make_settings(tmp_path, model_root):
    from app.settings import Settings

    def make(**overrides):
        values = dict(data_dir=tmp_path / "data", api_keys=API_KEY, model_roots=str(model_root),
                      hub_offline=True, stale_after_seconds=60)
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings, database_url):
    return make_settings(database_url=database_url)


@pytest.fixture
def make_client():
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import get_settings

    clients = []

    def make(settings, key: str | None = API_KEY):
        app = create_app()
        app.dependency_overrides[get_settings] = lambda: settings
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        if key:
            client.headers["Authorization"] = f"Bearer {key}"
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client, settings):
    return make_client(settings)


@pytest.fixture
def engine(settings):
    from app.db import get_engine

    return get_engine(settings.database)


@pytest.fixture(scope="session")
def clips(speech_dir) -> list[Path]:
    return sorted(speech_dir.glob("*.flac"))[:3]


@pytest.fixture(scope="session")
def clip_transcripts(speech_dir, clips) -> bytes:
    wanted = {c.name for c in clips}
    lines = [ln for ln in (speech_dir / "transcripts.tsv").read_text().splitlines() if ln.split("\t")[0] in wanted]
    return ("\n".join(lines) + "\n").encode()


def upload(paths) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "audio/flac")) for p in paths]


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tarq_command(*args: str) -> list[str]:
    """`tarq ARGS` as the console script would run it (the package need not be pip-installed here).
    Falls back to tarq.cli_serve's own entry while tarq.cli cannot be imported yet."""
    probe = subprocess.run([sys.executable, "-c", "import tarq.cli"], cwd=ROOT, capture_output=True)
    if probe.returncode != 0:
        return [sys.executable, "-m", "tarq.cli_serve", *args]
    return [sys.executable, "-c", "import sys; from tarq.cli import main; sys.argv[0] = 'tarq'; main()", *args]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# A consumer that takes one message as a Celery worker's does (kombu's basic_get without ack: out of the
# queue, and on Redis into the hash of unacknowledged messages) and dies before doing anything with it.
_TAKE_AND_DIE = """
import os, signal, sys
from kombu import Connection
conn = Connection(sys.argv[1], transport_options=dict(TRANSPORT_OPTIONS))
message = conn.default_channel.basic_get(sys.argv[2], no_ack=False)
assert message is not None, "no message to take"
print(message.headers["id"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def take_and_die(settings, celery, queue: str) -> str:
    """Take the next message of `queue` in a process that is then killed; returns its task id."""
    code = _TAKE_AND_DIE.replace("TRANSPORT_OPTIONS", repr(celery.conf.broker_transport_options or {}))
    done = subprocess.run([sys.executable, "-c", code, settings.broker, queue], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == -9, done.stderr
    return done.stdout.strip()


@pytest.fixture
def subprocess_env(tmp_path, model_root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARQ_")}
    env.update(TARQ_DATA_DIR=str(tmp_path / "data"), TARQ_MODEL_ROOTS=str(model_root), TARQ_HUB_OFFLINE="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TARQ_DEVICE="cpu", TARQ_HEARTBEAT_SECONDS="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture
def cleanup_dir():
    made = []
    yield made
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def s3_server():
    """A real S3-protocol server (moto) on loopback; yields (endpoint, bucket)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    bucket = "tarq-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    yield endpoint, bucket
    server.stop()
