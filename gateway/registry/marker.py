"""How a start tells "first start" from "the registry was lost" (SQLite).

The first start that opens a SQLite registry leaves a marker file beside it (`gateway.db` →
`gateway.db.created`). Later starts that find the marker but no registry — the file missing,
empty, or without the gateway's tables — refuse to start instead of creating a new, empty
registry in its place, which would silently drop every task and acknowledged annotation. So
`make demo` and a first `gateway serve` need no extra command, and deleting the marker is the
explicit way to start over.

PostgreSQL needs no marker: the gateway never creates a database, and a server that lost its
data directory has lost the database too, which the start-up then cannot open.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
from pathlib import Path

SUFFIX = ".created"


class RegistryLost(Exception):
    """A registry was created here and is gone; the message says what to do."""


def marker_for(database: Path) -> Path:
    return database.with_name(database.name + SUFFIX)


def check_not_lost(database: Path | None) -> None:
    if database is None:
        return
    marker = marker_for(database)
    if marker.exists() and not _has_tables(database):
        state = "empty" if database.exists() else "missing"
        raise RegistryLost(
            f"the registry {database} is {state}, but {marker} records that one was created there. "
            f"Restore it from a backup, or delete {marker} to start with a new, empty registry"
        )


def mark(database: Path | None) -> None:
    """Leave the marker beside a registry that now exists (once)."""
    if database is None:
        return
    marker = marker_for(database)
    if not marker.exists():
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        marker.write_text(
            f"The media gateway created its registry {database.name} here ({now}). While this file exists, "
            "the gateway refuses to start without that registry; delete this file to start over.\n",
            encoding="utf-8",
        )


def _has_tables(database: Path) -> bool:
    if not database.exists() or database.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(database.as_uri() + "?mode=ro", uri=True)) as connection:
            found = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone()
    except sqlite3.Error:
        return True  # unreadable here: the registry's own open says why, more precisely
    return found is not None
