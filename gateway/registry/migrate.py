"""Schema migrations (Alembic), run by the registry before first use.

`gateway serve` migrates once before forking its workers; on PostgreSQL an advisory lock, on
SQLite the database's write lock, also serialises processes that start at the same moment. A
database created before migrations existed (tables present, no version row) is stamped at
revision 0001 and upgraded from there.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

_LOCK_ID = 0x6D656469  # any constant shared by every replica


def upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    elif connection.dialect.name == "sqlite" and not connection.connection.driver_connection.in_transaction:
        # SQLite's write lock, taken before looking at the schema: processes (or registries of
        # one process, which would also share Alembic's module-level context) opening one
        # database at once migrate one after the other, and the later ones find it up to date.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    tables = set(inspect(connection).get_table_names())
    if "tasks" in tables and "alembic_version" not in tables:
        command.stamp(config, "0001")
    command.upgrade(config, "head")
