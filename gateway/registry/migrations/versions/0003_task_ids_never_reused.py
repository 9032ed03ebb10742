"""Task ids are never reused on SQLite either (AUTOINCREMENT), as PostgreSQL's sequences never do.

A token grants tasks by id: without AUTOINCREMENT, SQLite gives a new task the id of the newest
task removed before it (a sync removes tasks whose objects vanished), and a token issued for
the old task would open the new one. SQLite cannot add AUTOINCREMENT to a table, so `tasks` and
`task_uris` are rebuilt: both renamed away (the renamed child keeps pointing at the renamed
parent, so nothing cascades), new tables created, rows copied, the old tables dropped.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TASK_COLUMNS = 'id, project, task, storage_id, object_key, "row", updated_at'


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for statement in (
        "ALTER TABLE task_uris RENAME TO task_uris_0002",
        "ALTER TABLE tasks RENAME TO tasks_0002",
        """CREATE TABLE tasks (
            id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
            project VARCHAR(255) NOT NULL,
            task JSON NOT NULL,
            storage_id VARCHAR(255),
            object_key TEXT,
            "row" INTEGER,
            updated_at FLOAT
        )""",
        """CREATE TABLE task_uris (
            task_id INTEGER NOT NULL,
            uri TEXT NOT NULL,
            PRIMARY KEY (task_id, uri),
            FOREIGN KEY(task_id) REFERENCES tasks (id) ON DELETE CASCADE
        )""",
        f"INSERT INTO tasks ({TASK_COLUMNS}) SELECT {TASK_COLUMNS} FROM tasks_0002",
        "INSERT INTO task_uris (task_id, uri) SELECT task_id, uri FROM task_uris_0002",
        "DROP TABLE task_uris_0002",
        "DROP TABLE tasks_0002",  # with its indexes
        "CREATE INDEX ix_tasks_project ON tasks (project)",
        'CREATE UNIQUE INDEX ux_tasks_source ON tasks (storage_id, object_key, "row")',
    ):
        op.execute(statement)
