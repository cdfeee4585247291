"""SQL schema and engine. Job records are the source of truth for a job (Celery task state is not).

SQLAlchemy Core tables, shared by the API and the worker; SQLite by default, PostgreSQL when
TARQ_DATABASE_URL says postgresql+psycopg://. A PostgreSQL schema can be chosen in the URL
(`?options=-csearch_path%3Dmyschema`), which is how the tests isolate their runs.
"""
from __future__ import annotations

import os
import threading

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
)

metadata = MetaData()

jobs = Table(
    "tarq_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False, index=True),
    Column("owner", String(64), nullable=False),  # sha256 of the API key that submitted it
    Column("idempotency_key", String(200)),
    Column("source_model", Text, nullable=False),  # Hub id or server folder
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
)

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
            try:
                metadata.create_all(engine)
            except Exception:
                # another process may have created the tables at the same moment; one retry settles it
                metadata.create_all(engine)
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
