"""Alembic's environment: migrations run on the connection app.db.migrate hands over, inside its
transaction (and, on PostgreSQL, under its advisory lock); there is no offline (SQL script) mode."""
from alembic import context

from app.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("tarq's migrations run through app.db.migrate, which passes the connection")
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
