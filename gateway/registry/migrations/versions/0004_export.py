"""Annotations and their deliveries to target storages (the export outbox).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

PENDING = sa.text("wanted_version > delivered_version")


def upgrade() -> None:
    op.create_table(
        "annotations",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("project", sa.String(255), nullable=False),
        sa.Column("task_id", sa.BigInteger, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("body", sa.JSON, nullable=True),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_annotations_project", "annotations", ["project"])
    op.create_table(
        "deliveries",
        sa.Column("target_id", sa.String(255), primary_key=True),
        sa.Column("annotation_id", sa.BigInteger, primary_key=True),
        sa.Column("wanted_version", sa.Integer, nullable=False),
        sa.Column("delivered_version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pending_since", sa.Float, nullable=True),
        sa.Column("next_attempt_at", sa.Float, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_until", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("delivered_at", sa.Float, nullable=True),
    )
    op.create_index(
        "ix_deliveries_pending",
        "deliveries",
        ["next_attempt_at"],
        sqlite_where=PENDING,
        postgresql_where=PENDING,
    )
