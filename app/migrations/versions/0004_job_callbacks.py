"""Job callbacks: a URL a job's final state is POSTed to (app.callbacks), and how its delivery went.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("tarq_jobs") as batch:
        batch.add_column(sa.Column("callback_url", sa.Text))
        batch.add_column(sa.Column("callback_status", sa.String(16)))
        batch.add_column(sa.Column("callback_attempts", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("callback_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("callback_error", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("tarq_jobs") as batch:
        for column in ("callback_error", "callback_at", "callback_attempts", "callback_status", "callback_url"):
            batch.drop_column(column)
