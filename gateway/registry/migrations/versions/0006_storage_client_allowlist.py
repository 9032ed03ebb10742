"""Client allowlists of source storages created through the API.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: SQLite adds the column in place (no table rebuild, AUTOINCREMENT kept).
    op.add_column("storages", sa.Column("client_allowlist", sa.JSON, nullable=False, server_default="[]"))
