"""Target storages (`/api/storages/export/gcs`), as Label Studio's "Add Target Storage" names things.

Annotations recorded by the webhook and the native API are written to every target storage of
their project by the export worker (gateway/export/worker.py). Storages from the config file are
listed beside those created here but change only with the file; credentials are write-only, as
for source storages (gateway/api/storages.py, whose field checks these handlers share).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiohttp import web

from ..config import ExportStorageSettings
from ..errors import Refused
from ..registry.outbox import Outbox
from ..state import CATALOG, EXPORT_WORKER, REGISTRY
from ..storage import BucketNotFound, StorageError, build_backend, load_storage_credential
from ..storage.base import UpstreamDenied
from ..storage.credentials import CredentialsError
from .auth import require_admin
from .storages import (
    SECRET,
    Invalid,
    _as_settings,
    _body,
    _checked,
    _credentials_problem,
    _iso,
    refuse_unreadable_credentials,
)

_DEFAULTS: dict[str, Any] = {
    "title": "",
    "description": "",
    "prefix": "",
    "can_delete_objects": False,
    "json_extension": False,
    "layout": "annotation",
    "google_project_id": None,
}
_READ_ONLY = frozenset(
    {
        "id",
        "type",
        "source",
        "status",
        "last_sync",
        "last_sync_count",
        "meta",
        "created_at",
        "updated_at",
        "has_credentials",
        "problem",
    }
)
CHECK_OBJECT = ".gateway-write-check"  # written and deleted under the prefix by "Test connection"


def add_export_storage_routes(app: web.Application) -> None:
    base = "/api/storages/export/gcs"
    one = base + r"/{storage_id:[A-Za-z0-9._-]+}"
    app.router.add_get(base, list_targets, name="api_targets")
    app.router.add_post(base, create_target, name="api_target_create")
    app.router.add_post(base + "/validate", validate_target, name="api_target_validate")
    app.router.add_get(one, get_target, name="api_target")
    app.router.add_patch(one, update_target, name="api_target_update")
    app.router.add_delete(one, delete_target, name="api_target_delete")
    app.router.add_post(one + "/sync", sync_target, name="api_target_sync")


# -- representation --------------------------------------------------------------------------


def represent(
    storage: ExportStorageSettings, outbox: dict[str, Any], row: dict[str, Any] | None, problem: str | None
) -> dict[str, Any]:
    """The storage with its export status in Label Studio's words: `initialized` (nothing
    exported yet), `in_progress` (deliveries pending), `failed` (pending ones whose last attempt
    failed: the worker keeps retrying them), `completed`; `meta` has the outbox's figures."""
    if outbox["pending"]:
        status = "failed" if outbox["failing"] else "in_progress"
    else:
        status = "completed" if outbox["delivered"] else "initialized"
    return {
        "id": int(storage.id) if storage.from_api else storage.id,
        "type": storage.type,
        "source": "api" if storage.from_api else "config",
        "project": storage.project,
        "title": storage.title,
        "description": storage.description,
        "bucket": storage.bucket,
        "prefix": storage.prefix,
        "can_delete_objects": storage.can_delete_objects,
        "json_extension": storage.json_extension,
        "layout": storage.layout,
        "google_project_id": storage.google_project_id,
        # From the row when there is one: credentials this replica cannot decrypt are still set.
        "has_credentials": bool(row["credentials"] if row else storage.google_application_credentials),
        "created_at": _iso(row["created_at"]) if row else None,
        "updated_at": _iso(row["updated_at"]) if row else None,
        "status": status,
        "last_sync": _iso(outbox["last_delivered_at"]),
        "last_sync_count": outbox["delivered"],
        "meta": {k: v for k, v in outbox.items() if k != "last_delivered_at"},
        "problem": problem,
    }


async def _represent_all(request: web.Request, storages: list[ExportStorageSettings]) -> list[dict[str, Any]]:
    registry, shelf = request.app[REGISTRY], request.app[CATALOG].targets
    status = await Outbox(registry).status([s.id for s in storages])
    api = any(s.from_api for s in storages)
    rows = {str(r["id"]): r for r in await registry.list_storages("export")} if api else {}
    return [represent(s, status[s.id], rows.get(s.id), shelf.problems.get(s.id)) for s in storages]


async def _target(request: web.Request, storage_id: str | None = None) -> ExportStorageSettings:
    """The target storage named in the path (or `storage_id`), as the registry has it now."""
    catalog = request.app[CATALOG]
    await catalog.refresh()
    storage = catalog.targets.get(request.match_info["storage_id"] if storage_id is None else storage_id)
    if storage is None:
        raise Refused(404, "unknown_storage", "no such target storage")
    return storage


async def _api_target(request: web.Request) -> ExportStorageSettings:
    storage = await _target(request)
    if not storage.from_api:
        raise Refused(409, "declared_in_config", "this storage is declared in the config file; change it there")
    return storage


async def _values(request: web.Request, body: dict[str, Any], *, partial: bool) -> dict[str, Any]:
    return await _checked(request, body, partial=partial, defaults=_DEFAULTS, read_only=_READ_ONLY)


# -- handlers ----------------------------------------------------------------------------------


async def list_targets(request: web.Request) -> web.Response:
    await require_admin(request)
    await request.app[CATALOG].refresh()
    project = request.query.get("project")
    storages = [s for s in request.app[CATALOG].targets.all() if project is None or s.project == project]
    return web.json_response(await _represent_all(request, storages))


async def get_target(request: web.Request) -> web.Response:
    await require_admin(request)
    [answer] = await _represent_all(request, [await _target(request)])
    return web.json_response(answer)


async def create_target(request: web.Request) -> web.Response:
    await require_admin(request)
    values = await _values(request, await _body(request), partial=False)
    values.pop("_plain_credentials", None)
    row = await request.app[REGISTRY].create_storage(values, "export")
    await request.app[CATALOG].refresh()
    storage = await _target(request, str(row["id"]))
    [answer] = await _represent_all(request, [storage])
    return web.json_response(answer, status=201)


async def update_target(request: web.Request) -> web.Response:
    await require_admin(request)
    storage = await _api_target(request)
    values = await _values(request, await _body(request), partial=True)
    values.pop("_plain_credentials", None)
    if values.get("project", storage.project) != storage.project:
        # Its deliveries are the project's annotations; another project's would need a sync anyway.
        raise Invalid({"project": "a storage cannot move to another project; create one there"})
    if await request.app[REGISTRY].update_storage(int(storage.id), values, "export") is None:
        raise Refused(404, "unknown_storage", "no such target storage")
    await request.app[CATALOG].refresh()
    return await get_target(request)


async def delete_target(request: web.Request) -> web.Response:
    """Forget the storage and its pending deliveries; the objects it holds stay in the bucket."""
    await require_admin(request)
    storage = await _api_target(request)
    await request.app[REGISTRY].delete_storage(int(storage.id), "export")
    await request.app[CATALOG].refresh()
    return web.Response(status=204)


async def sync_target(request: web.Request) -> web.Response:
    """ "Sync": every annotation the gateway knows for the project is wanted again; the worker
    rewrites the objects whose content differs and skips the rest."""
    await require_admin(request)
    storage = await _target(request)
    await Outbox(request.app[REGISTRY]).want_all(storage.project, storage.id)
    [answer] = await _represent_all(request, [storage])
    worker = request.app[EXPORT_WORKER]
    if worker is not None:
        worker.wake()
    return web.json_response(answer, status=202)


async def validate_target(request: web.Request) -> web.Response:
    """ "Test connection": the fields, the credentials, then a small object written under the
    prefix and deleted again — the permissions an export needs, tried for real."""
    await require_admin(request)
    body = await _body(request)
    current = None
    if body.get("id") is not None:  # editing a stored storage: its credentials unless new ones are given
        current = await _target(request, str(body["id"]))
        await refuse_unreadable_credentials(request, body, current, request.app[CATALOG].targets)
    values = await _values(request, {k: v for k, v in body.items() if k != "id"}, partial=current is not None)
    storage = _as_settings(values, current, ExportStorageSettings, _DEFAULTS)
    return web.json_response({"ok": True, "message": await _try_writing(request, storage)})


async def _try_writing(request: web.Request, storage: ExportStorageSettings) -> str:
    catalog = request.app[CATALOG]
    try:
        credentials = await asyncio.to_thread(load_storage_credential, storage, None, True)  # type: ignore[arg-type]
    except CredentialsError as exc:
        message = _credentials_problem(exc, storage.google_application_credentials)
        raise Invalid({SECRET: message}, "bad_credentials") from None
    backend = build_backend(catalog.settings, storage, catalog.session, credentials)  # type: ignore[arg-type]
    key = f"{storage.prefix}{CHECK_OBJECT}"
    probe = f'{{"written_by": "gcs-media-gateway", "check": "{uuid.uuid4()}"}}'.encode()
    where = f"gs://{storage.bucket}/{storage.prefix}"
    try:
        await backend.put_object(key, probe, "application/json")
    except StorageError as exc:
        raise _refusal(
            exc, storage, "write objects (storage.objects.create, e.g. roles/storage.objectCreator)"
        ) from None
    try:
        await backend.delete_object(key)
    except StorageError as exc:
        if storage.can_delete_objects or not isinstance(exc, UpstreamDenied):
            raise _refusal(
                exc,
                storage,
                "delete objects (storage.objects.delete, e.g. roles/storage.objectUser)",
                "can_delete_objects",
            ) from None
        return (
            f"annotations can be written to {where}; these credentials may not delete objects, so "
            f"the check object {key!r} stays there (and deleted annotations will stay too)"
        )
    return f"annotations can be written to {where}" + (" and deleted from it" if storage.can_delete_objects else "")


def _refusal(exc: StorageError, storage: ExportStorageSettings, needed: str, field: str = SECRET) -> Refused:
    if isinstance(exc, BucketNotFound):
        return Invalid({"bucket": f"bucket {storage.bucket!r} does not exist"}, "bucket_not_found")
    if isinstance(exc, UpstreamDenied):
        if "access token" in str(exc):
            message = "these credentials could not get an access token from Google (revoked or disabled key?)"
            return Invalid({SECRET: message}, "bad_credentials")
        return Invalid({field: f"the credentials may not {needed} in bucket {storage.bucket!r}"}, "permission_denied")
    return Refused(exc.status if exc.status >= 500 else 502, exc.reason, exc.public_message or str(exc))
