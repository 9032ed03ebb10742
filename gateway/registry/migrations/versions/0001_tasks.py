"""Tasks and the gs:// URIs each one references (the schema before migrations existed).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("project", sa.String(255), nullable=False),
        sa.Column("task", sa.JSON, nullable=False),
    )
    op.create_index("ix_tasks_project", "tasks", ["project"])
    op.create_table(
        "task_uris",
        sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("uri", sa.Text, primary_key=True),
    )
