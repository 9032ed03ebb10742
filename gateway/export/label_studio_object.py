"""The object Label Studio's own GCS target storage writes for an annotation, built from the
webhook's annotation: its `StorageAnnotationSerializer` drops `prediction`, `result_count` and
`unique_id`, expands `completed_by` to `{id, first_name, last_name, email}`, and adds
`created_username` and `created_ago`. The user's name and email are not in the webhook; they are
asked of Label Studio (`GET /api/users/{id}/` with `[label_studio] api_token`) and cached.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import aiohttp

from ..caching import ExpiringCache
from ..config import LabelStudioSettings

NOT_IN_LABEL_STUDIOS_OBJECT = ("prediction", "result_count", "unique_id", "state")
USER_FIELDS = ("id", "first_name", "last_name", "email")


class UsersUnavailable(Exception):
    """Label Studio could not say who a user is (down, slow, 5xx, the token refused): the write
    waits and is retried, so no object is written in another shape than Label Studio's."""


class LabelStudioUsers:
    """Annotators' names and emails from Label Studio, kept `user_cache_ttl` seconds."""

    def __init__(self, settings: LabelStudioSettings, session: Callable[[], aiohttp.ClientSession | None]) -> None:
        assert settings.url is not None and settings.api_token is not None
        self.settings = settings
        self._base = settings.url.rstrip("/")
        self._session = session
        # A user Label Studio does not know is kept as {} (for negative_cache_ttl).
        self._users: ExpiringCache[int, dict[str, Any]] = ExpiringCache(10_000, settings.user_cache_ttl)

    async def get(self, user_id: int) -> dict[str, Any] | None:
        """The user's `{id, first_name, last_name, email}`; None when Label Studio has no such user."""
        user = self._users.get(user_id)
        if user is None:
            user = await self._ask(user_id)
        return user or None

    async def _ask(self, user_id: int) -> dict[str, Any]:
        session = self._session()
        if session is None:
            raise UsersUnavailable("the gateway is starting")
        headers = {"Authorization": f"Token {self.settings.api_token}", "Accept": "application/json"}
        url = f"{self._base}/api/users/{user_id}/"
        try:
            async with asyncio.timeout(self.settings.timeout):
                async with session.get(url, headers=headers, allow_redirects=False) as response:
                    status = response.status
                    body = await response.json(content_type=None) if status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise UsersUnavailable(
                f"Label Studio cannot be asked who user {user_id} is ({type(exc).__name__})"
            ) from None
        if status == 404:
            self._users.store(user_id, {}, self.settings.negative_cache_ttl)
            return {}
        if status != 200 or not isinstance(body, dict) or body.get("id") != user_id:
            raise UsersUnavailable(f"Label Studio answered the lookup of user {user_id} with {status}")
        user = {name: body.get(name) or "" for name in USER_FIELDS} | {"id": user_id}
        self._users[user_id] = user
        return user


def storage_object(annotation: dict[str, Any], user: dict[str, Any] | None, now: dt.datetime) -> dict[str, Any]:
    """Label Studio's per-annotation object from the webhook's annotation (with its `task`) and
    the annotator as Label Studio describes them (None: unknown, `completed_by` stays the id)."""
    body = {k: v for k, v in annotation.items() if k not in NOT_IN_LABEL_STUDIOS_OBJECT}
    if user is not None:
        body["completed_by"] = user = {name: user.get(name, "") for name in USER_FIELDS}
        name = f"{user['first_name']}" + (f" {user['last_name']}" if user["last_name"] else "")
        body["created_username"] = f"{name} {user['email']}, {user['id']}"
    elif "completed_by" in body:
        body["created_username"] = ""
    created = annotation.get("created_at")
    if isinstance(created, str):
        try:
            body["created_ago"] = timesince(dt.datetime.fromisoformat(created.replace("Z", "+00:00")), now)
        except ValueError:
            body["created_ago"] = ""
    return body


MINUTE, HOUR, DAY, WEEK = 60, 3600, 86400, 604800
MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
NBSP = "\xa0"  # Django's avoid_wrapping


def timesince(then: dt.datetime, now: dt.datetime) -> str:
    """Django's `timesince` (5.2, English, depth 2), which Label Studio's `created_ago` is:
    calendar years and months, then weeks, days, hours and minutes; two adjacent units at most."""
    if then.tzinfo is not None and now.tzinfo is not None:
        now = now.astimezone(then.tzinfo)
    delta = now - then
    if delta.days * DAY + delta.seconds <= 0:
        return f"0{NBSP}minutes"
    months = (now.year - then.year) * 12 + (now.month - then.month)
    if then.day > now.day or (then.day == now.day and then.time() > now.time()):
        months -= 1
    years, months = divmod(months, 12)
    pivot = then
    if years or months:
        year, month = then.year + years, then.month + months
        if month > 12:
            year, month = year + 1, month - 12
        day = min(MONTH_DAYS[month - 1], then.day)
        pivot = dt.datetime(year, month, day, then.hour, then.minute, then.second, tzinfo=then.tzinfo)
    remaining = (now - pivot).total_seconds()
    parts = [years, months]
    for chunk in (WEEK, DAY, HOUR, MINUTE):
        count = int(remaining // chunk)
        parts.append(count)
        remaining -= chunk * count
    names = ("year", "month", "week", "day", "hour", "minute")
    first = next((i for i, value in enumerate(parts) if value), None)
    if first is None:
        return f"0{NBSP}minutes"
    shown = []
    for i in range(first, min(first + 2, len(parts))):
        if not parts[i]:
            break
        shown.append(f"{parts[i]}{NBSP}{names[i]}{'' if parts[i] == 1 else 's'}")
    return ", ".join(shown)


# Label Studio's per-task object (its ExportDataSerializer) leaves these task fields out;
# `file_upload` there is the uploaded file's name (absent for tasks imported from a storage), which
# the webhook does not carry (it sends the upload's id).
NOT_IN_LABEL_STUDIOS_TASK = ("overlap", "is_labeled", "precomputed_agreement", "annotations", "file_upload")


def task_object(annotations: list[dict[str, Any]]) -> dict[str, Any]:
    """Label Studio's per-task object (FUTURE_SAVE_TASK_TO_STORAGE) from the webhook annotations of
    one task (each with its `task`, `completed_by` already expanded), in id order: the task as the
    latest of them carries it, with every annotation as Label Studio's model has it (`task` its id).
    `drafts` and `predictions` (id lists in Label Studio's object) are not in any webhook: [] here."""
    ordered = sorted(annotations, key=lambda a: a.get("id") or 0)
    latest = max(ordered, key=lambda a: str((a.get("task") or {}).get("updated_at") or ""))
    task = latest.get("task") if isinstance(latest.get("task"), dict) else {}
    body = {k: v for k, v in task.items() if k not in NOT_IN_LABEL_STUDIOS_TASK}
    body["drafts"], body["predictions"] = [], []
    body["annotations"] = [
        {**a, "task": a["task"].get("id") if isinstance(a.get("task"), dict) else a.get("task")} for a in ordered
    ]
    return body
