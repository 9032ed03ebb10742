"""The layout of target storages created through the API (Label Studio's per-annotation or per-task).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: SQLite adds the column in place (no table rebuild, AUTOINCREMENT kept).
    op.create_index("ix_annotations_task", "annotations", ["project", "task_id"])
    op.add_column("export_storages", sa.Column("layout", sa.String(16), nullable=False, server_default="annotation"))
