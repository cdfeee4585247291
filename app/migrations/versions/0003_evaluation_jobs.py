"""Jobs of a second kind: evaluations (POST /v1/evaluations), whose outcome is a result, not a model.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("tarq_jobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="quantize"))
        batch.add_column(sa.Column("result", sa.JSON))
        batch.create_index("ix_tarq_jobs_kind", ["kind"])


def downgrade() -> None:
    with op.batch_alter_table("tarq_jobs") as batch:
        batch.drop_index("ix_tarq_jobs_kind")
        batch.drop_column("result")
        batch.drop_column("kind")
