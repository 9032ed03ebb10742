"""Target storages created through the API.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "export_storages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(255), nullable=False),
        sa.Column("title", sa.String(255), nullable=False, server_default=""),
        sa.Column("description", sa.Text, nullable=False, server_default=""),
        sa.Column("bucket", sa.String(255), nullable=False),
        sa.Column("prefix", sa.Text, nullable=False, server_default=""),
        sa.Column("can_delete_objects", sa.Boolean, nullable=False),
        sa.Column("json_extension", sa.Boolean, nullable=False),
        sa.Column("credentials", sa.Text, nullable=True),
        sa.Column("google_project_id", sa.String(255), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_export_storages_project", "export_storages", ["project"])
