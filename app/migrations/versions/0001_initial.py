"""The schema as metadata.create_all made it before migrations existed (tarq 0.1, up to November 2026).

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tarq_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("source_model", sa.Text, nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("files", sa.JSON, nullable=False),
        sa.Column("stage", sa.String(64)),
        sa.Column("layer", sa.Integer),
        sa.Column("layers_total", sa.Integer),
        sa.Column("fraction", sa.Float, nullable=False),
        sa.Column("loss", sa.Float),
        sa.Column("error", sa.Text),
        sa.Column("model_id", sa.String(64)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_tarq_jobs_owner_idem"),
    )
    op.create_index("ix_tarq_jobs_status", "tarq_jobs", ["status"])
    op.create_table(
        "tarq_models",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(32)),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("base_model", sa.Text, nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("bits", sa.Integer, nullable=False),
        sa.Column("group_size", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("info", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_tarq_models_job_id", "tarq_models", ["job_id"])


def downgrade() -> None:
    op.drop_table("tarq_models")
    op.drop_table("tarq_jobs")
