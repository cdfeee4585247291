"""SQL schema and engine. Job records are the source of truth for a job (Celery task state is not).

SQLAlchemy Core tables, shared by the API and the worker; SQLite by default, PostgreSQL when
TARQ_DATABASE_URL says postgresql+psycopg://. A PostgreSQL schema can be chosen in the URL
(`?options=-csearch_path%3Dmyschema`), which is how the tests isolate their runs.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)

metadata = MetaData()

jobs = Table(
    "tarq_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False, index=True),
    Column("owner", String(64), nullable=False),  # sha256 of the API key that submitted it
    Column("idempotency_key", String(200)),
    Column("source_model", Text, nullable=False),  # Hub id, server folder or model id (what `model` named)
    Column("config", JSON, nullable=False),  # QuantConfig.to_dict()
    Column("files", JSON, nullable=False),  # {"calibration": [names], "eval": [names], "transcripts": bool}
    Column("stage", String(64)),
    Column("layer", Integer),
    Column("layers_total", Integer),
    Column("fraction", Float, nullable=False, default=0.0),
    Column("loss", Float),
    Column("error", Text),
    Column("model_id", String(64)),  # the artifact, once succeeded
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("heartbeat_at", DateTime(timezone=True)),
    # what the job does: "quantize" (makes model_id) or "evaluate" (makes result); app.jobs.KINDS
    Column("kind", String(16), nullable=False, server_default="quantize", index=True),
    Column("result", JSON),  # an evaluation's scores and hypotheses
    # where the job's final state is POSTed (app.callbacks) and how that went: status None until it ends,
    # then pending (next try at callback_at) | sending (claimed at callback_at) | delivered | failed
    Column("callback_url", Text),
    Column("callback_status", String(16)),
    Column("callback_attempts", Integer, nullable=False, server_default="0"),
    Column("callback_at", DateTime(timezone=True)),
    Column("callback_error", Text),
    UniqueConstraint("owner", "idempotency_key", name="uq_tarq_jobs_owner_idem"),
)

models = Table(
    "tarq_models",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("job_id", String(32), index=True),
    Column("owner", String(64), nullable=False),
    Column("base_model", Text, nullable=False),
    Column("method", String(16), nullable=False),
    Column("bits", Integer, nullable=False),
    Column("group_size", Integer, nullable=False),
    Column("size_bytes", Integer, nullable=False, default=0),
    Column("info", JSON, nullable=False),  # tarq.artifact_info.artifact_info(): metrics, report summary
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("idempotency_key", String(200)),  # of the upload that made it (POST /v1/models)
    UniqueConstraint("owner", "idempotency_key", name="uq_tarq_models_owner_idem"),
)
# The revision app/migrations brings a database to, which the tables above describe; a change to them is a
# new revision there (tests/service/test_migrations.py checks that the two agree).
HEAD = "0004"
FIRST = "0001"  # the schema create_all made before migrations existed

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL + a busy timeout: the API and the worker processes write the same file concurrently.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def get_engine(url: str) -> Engine:
    """One engine per process and URL; keyed by pid so a forked Celery child never reuses its parent's pool."""
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                                       connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})
            migrate(engine)
            _engines[key] = engine
        return engine


def _alembic_config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "app:migrations")
    config.attributes["connection"] = connection
    return config


@contextmanager
def _migration_lock(engine: Engine):
    """One process at a time brings a database up to date: the API and its workers start together. A
    file lock beside a SQLite file (all its users are on one host); PostgreSQL's advisory lock is taken
    inside the migration's transaction instead."""
    database = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    from filelock import FileLock

    with FileLock(f"{database}.migrate.lock", timeout=120):
        yield


def migrate(engine: Engine) -> str:
    """Create the tables or bring them to HEAD with app/migrations (Alembic), in one transaction; a
    database made before migrations existed is recognised (tables, no alembic_version) and taken from
    FIRST. Returns the revision it was at ("" for an empty database)."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(7236512)"))  # 'tarq' in a number: any constant
        config = _alembic_config(conn)
        tables = set(inspect(conn).get_table_names())
        if "tarq_jobs" in tables and "alembic_version" not in tables:
            command.stamp(config, FIRST)
        before = MigrationContext.configure(conn).get_current_revision() or ""
        if before != HEAD:
            command.upgrade(config, "head")
        return before


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
