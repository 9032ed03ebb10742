"""Source storages, imported objects, sync jobs; tasks remember their storage, object and row.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

KEY = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.add_column("tasks", sa.Column("storage_id", sa.String(255), nullable=True))
    op.add_column("tasks", sa.Column("object_key", KEY, nullable=True))
    op.add_column("tasks", sa.Column("row", sa.Integer, nullable=True))
    op.add_column("tasks", sa.Column("updated_at", sa.Float, nullable=True))
    op.create_index("ux_tasks_source", "tasks", ["storage_id", "object_key", "row"], unique=True)
    op.create_table(
        "storages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(255), nullable=False),
        sa.Column("title", sa.String(255), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("prefix", sa.Text, nullable=False, server_default=""),
        sa.Column("regex_filter", sa.Text, nullable=False, server_default=""),
        sa.Column("use_blob_urls", sa.Boolean, nullable=False),
        sa.Column("recursive_scan", sa.Boolean, nullable=False),
        sa.Column("presign", sa.Boolean, nullable=False),
        sa.Column("presign_ttl", sa.Integer, nullable=False),
        sa.Column("data_key", sa.String(255), nullable=False),
        sa.Column("sync_interval", sa.Integer, nullable=False, server_default="0"),
        sa.Column("credentials", sa.Text, nullable=True),
        sa.Column("google_project_id", sa.String(255), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,  # a deleted storage's id is never given to another
    )
    op.create_table(
        "storage_objects",
        sa.Column("storage_id", sa.String(255), primary_key=True),
        sa.Column("object_key", KEY, primary_key=True),
        sa.Column("generation", sa.String(64), nullable=True),
        sa.Column("task_count", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "sync_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("storage_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("heartbeat_at", sa.Float, nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("counters", sa.JSON, nullable=False),
        sa.Column("errors", sa.JSON, nullable=False),
        sa.Column("message", sa.Text, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_sync_jobs_storage", "sync_jobs", ["storage_id", "id"])
    op.create_index("ix_sync_jobs_status", "sync_jobs", ["status"])
    op.create_index(
        "ux_sync_jobs_active", "sync_jobs", ["storage_id"], unique=True, sqlite_where=ACTIVE, postgresql_where=ACTIVE
    )
