"""Model uploads take an Idempotency-Key, unique per owner as a job's is.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("tarq_models") as batch:  # SQLite adds a constraint by copying the table
        batch.add_column(sa.Column("idempotency_key", sa.String(200)))
        batch.create_unique_constraint("uq_tarq_models_owner_idem", ["owner", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("tarq_models") as batch:
        batch.drop_constraint("uq_tarq_models_owner_idem", type_="unique")
        batch.drop_column("idempotency_key")
