"""Schema migrations (Alembic, app/migrations) on real SQLite and PostgreSQL: a fresh database is made at
HEAD, a database made before migrations existed is brought up with its rows, the tables in app.db agree
with what the migrations make, and processes starting together migrate once."""
from __future__ import annotations

import secrets
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.service.conftest import PG_ADMIN_URL, ROOT, pg_available


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path):
    """An empty database of its own: a SQLite file, or a PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite'}"
        return
    if not pg_available():
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not reachable")
    import psycopg

    schema = "tarq_mig_" + secrets.token_hex(6)
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def revision(engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_a_fresh_database_is_made_at_head_and_matches_the_tables_of_app_db(fresh_url):
    from alembic import command

    from app.db import HEAD, _alembic_config, migrate

    engine = create_engine(fresh_url)
    try:
        assert migrate(engine) == ""
        assert revision(engine) == HEAD
        with engine.connect() as conn:
            command.check(_alembic_config(conn))  # raises when app.db's tables differ from what HEAD made
        assert migrate(engine) == HEAD  # a second start changes nothing
    finally:
        engine.dispose()


def test_a_database_made_before_migrations_is_brought_to_head_with_its_rows(fresh_url):
    """What tarq wrote before app/migrations existed: create_all's tables, no alembic_version."""
    from alembic import command

    from app import jobs
    from app.db import FIRST, HEAD, _alembic_config, migrate

    engine = create_engine(fresh_url)
    try:
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), FIRST)  # 0001 is that schema, as create_all made it
            conn.execute(text("DROP TABLE alembic_version"))
        stamp = datetime(2026, 11, 1, tzinfo=timezone.utc)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tarq_models (id, owner, base_model, method, bits, group_size, size_bytes, "
                              "info, created_at) VALUES ('m-old', 'o', 'b', 'gptq', 4, 128, 10, '{}', :t)"), {"t": stamp})
            conn.execute(text("INSERT INTO tarq_jobs (id, status, owner, source_model, config, files, fraction, "
                              "cancel_requested, attempts, created_at, updated_at) VALUES ('j-old', 'succeeded', 'o', "
                              "'b', '{}', '{}', 1.0, false, 1, :t, :t)"), {"t": stamp})
        assert "idempotency_key" not in [c["name"] for c in inspect(engine).get_columns("tarq_models")]

        assert migrate(engine) == FIRST
        assert revision(engine) == HEAD
        old = jobs.get_model(engine, "m-old")
        assert old["method"] == "gptq" and old["idempotency_key"] is None
        job = jobs.get_job(engine, "j-old", jobs.QUANTIZE)  # jobs from before evaluations are quantizations
        assert job["status"] == "succeeded" and job["kind"] == "quantize" and job["result"] is None
        with engine.connect() as conn:
            command.check(_alembic_config(conn))
    finally:
        engine.dispose()


MIGRATE = """
import sys, time
from sqlalchemy import create_engine
from app.db import migrate
engine = create_engine(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all imported: go at the same instant
print(repr(migrate(engine)))
"""


def test_processes_starting_together_migrate_once(fresh_url):
    """The API and its workers start at once on an empty database: one of them makes the tables, the
    others wait for it and find them at HEAD."""
    from app.db import HEAD

    start = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, fresh_url, start], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["''"] + [repr(HEAD)] * 5
    engine = create_engine(fresh_url)
    try:
        assert revision(engine) == HEAD
    finally:
        engine.dispose()
