"""Bad rows of an imported task file, so that a re-sync of the unchanged file reports them again.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: SQLite adds the column in place (no table rebuild).
    op.add_column("storage_objects", sa.Column("row_errors", sa.Integer, nullable=False, server_default="0"))
