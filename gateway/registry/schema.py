"""The registry's tables (SQLAlchemy Core), one definition for SQLite and PostgreSQL.

Object keys are compared in byte order on both databases (PostgreSQL's "C" collation, SQLite's
BINARY default): the sync walks a bucket listing, which GCS returns in that order, side by side
with the registry's rows (see gateway/sync/engine.py).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData()

KEY = Text().with_variant(Text(collation="C"), "postgresql")  # byte order, as GCS lists

tasks_table = Table(
    "tasks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(255), nullable=False),
    Column("task", JSON, nullable=False),
    # Where a synced task came from: its storage, object and row (NULL for API imports).
    Column("storage_id", String(255), nullable=True),
    Column("object_key", KEY, nullable=True),
    Column("row", Integer, nullable=True),
    Column("updated_at", Float, nullable=True),
    Index("ix_tasks_project", "project"),
    Index("ux_tasks_source", "storage_id", "object_key", "row", unique=True),
    sqlite_autoincrement=True,  # ids are never reused (migration 0003): tokens grant tasks by id
)

task_uris_table = Table(
    "task_uris",
    metadata,
    Column("task_id", Integer, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("uri", Text, primary_key=True),
)

# Source storages created through the API (config-file storages live in the config).
storages_table = Table(
    "storages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(255), nullable=False),
    Column("title", String(255), nullable=False, server_default=""),
    Column("description", Text, nullable=False, server_default=""),
    Column("bucket", String(255), nullable=False),
    Column("prefix", Text, nullable=False, server_default=""),
    Column("regex_filter", Text, nullable=False, server_default=""),
    Column("use_blob_urls", Boolean, nullable=False),
    Column("recursive_scan", Boolean, nullable=False),
    Column("presign", Boolean, nullable=False),
    Column("presign_ttl", Integer, nullable=False),
    Column("data_key", String(255), nullable=False),
    Column("sync_interval", Integer, nullable=False, server_default="0"),
    Column("credentials", Text, nullable=True),  # encrypted (gateway/vault.py), never returned
    Column("google_project_id", String(255), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("client_allowlist", JSON, nullable=False, server_default="[]"),  # CIDRs (migration 0006)
    sqlite_autoincrement=True,  # a deleted storage's id is never given to another
)

# One row per imported object: its generation when last imported (NULL while an import of it is
# unfinished) and how many tasks it produced.
storage_objects_table = Table(
    "storage_objects",
    metadata,
    Column("storage_id", String(255), primary_key=True),
    Column("object_key", KEY, primary_key=True),
    Column("generation", String(64), nullable=True),
    Column("task_count", Integer, nullable=False, server_default="0"),
    Column("row_errors", Integer, nullable=False, server_default="0"),  # bad rows of a task file (migration 0008)
)

ACTIVE = ("queued", "running")

sync_jobs_table = Table(
    "sync_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("storage_id", String(255), nullable=False),
    Column("status", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("heartbeat_at", Float, nullable=True),
    Column("worker", String(255), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("counters", JSON, nullable=False),
    Column("errors", JSON, nullable=False),
    Column("message", Text, nullable=True),
    Index("ix_sync_jobs_storage", "storage_id", "id"),
    Index("ix_sync_jobs_status", "status"),
    # At most one queued-or-running job per storage, whatever the number of workers.
    Index(
        "ux_sync_jobs_active",
        "storage_id",
        unique=True,
        sqlite_where=text("status IN ('queued', 'running')"),
        postgresql_where=text("status IN ('queued', 'running')"),
    ),
    sqlite_autoincrement=True,
)

# Target storages created through the API (config-file ones live in the config). Ids are their
# own sequence, as in Label Studio: deliveries name them by this id.
export_storages_table = Table(
    "export_storages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project", String(255), nullable=False),
    Column("title", String(255), nullable=False, server_default=""),
    Column("description", Text, nullable=False, server_default=""),
    Column("bucket", String(255), nullable=False),
    Column("prefix", Text, nullable=False, server_default=""),
    Column("can_delete_objects", Boolean, nullable=False),
    Column("json_extension", Boolean, nullable=False),
    Column("layout", String(16), nullable=False, server_default="annotation"),
    Column("credentials", Text, nullable=True),  # encrypted (gateway/vault.py), never returned
    Column("google_project_id", String(255), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_export_storages_project", "project"),
    sqlite_autoincrement=True,  # a deleted storage's id (and its deliveries' key) is never reused
)

# The export outbox: the latest state of every annotation the gateway was told about, and for
# each target storage of its project the version wanted there and the version delivered.
annotations_table = Table(
    "annotations",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),  # Label Studio's annotation id
    Column("project", String(255), nullable=False),
    Column("task_id", BigInteger, nullable=True),
    Column("version", Integer, nullable=False),  # +1 per recorded event: orders them
    Column("body", JSON, nullable=True),  # the object written (annotation + task), None once deleted
    Column("deleted", Boolean, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_annotations_project", "project"),
    Index("ix_annotations_task", "project", "task_id"),  # a task's annotations (the per-task layout)
)

deliveries_table = Table(
    "deliveries",
    metadata,
    Column("target_id", String(255), primary_key=True),
    Column("annotation_id", BigInteger, primary_key=True),
    Column("wanted_version", Integer, nullable=False),
    Column("delivered_version", Integer, nullable=False, server_default="0"),
    Column("pending_since", Float, nullable=True),
    Column("next_attempt_at", Float, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", String(255), nullable=True),  # the worker uploading it now
    Column("lease_until", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", Float, nullable=True),
    Index(
        "ix_deliveries_pending",
        "next_attempt_at",
        sqlite_where=text("wanted_version > delivered_version"),
        postgresql_where=text("wanted_version > delivered_version"),
    ),
)
