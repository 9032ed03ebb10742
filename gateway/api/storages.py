"""Source storages (`/api/storages/gcs`), as Label Studio's "Add Source Storage" names things.

Storages from the config file are listed beside those created here but change only with the
file. `google_application_credentials` is write-only: accepted, checked, encrypted at rest,
reported only as `has_credentials`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

from aiohttp import web

from .. import strictjson
from ..config import BUCKET_RE, LAYOUTS, StorageSettings, cidr_problem, normalize_prefix, parse_network
from ..errors import Refused
from ..keyfilter import FilterError, compile_filter
from ..registry.sql import empty_counters
from ..signer import SigningError, build_signer, probe, resolve_identity
from ..state import CATALOG, REGISTRY, SYNC_WORKER
from ..storage import Backend, BucketNotFound, StorageError, build_backend, load_storage_credential
from ..storage.base import UpstreamDenied
from ..storage.credentials import CredentialsError, check_destinations
from ..sync.engine import preview
from .auth import require_admin
from .body import SETTINGS_BYTES, parse_json, read_body

SECRET = "google_application_credentials"
MAX_ALLOWLIST = 1000
API_CREDENTIAL_TYPES = frozenset({"service_account", "authorized_user"})  # others: config file only
_READ_ONLY = frozenset(
    {
        "id",
        "type",
        "source",
        "status",
        "last_sync",
        "last_sync_count",
        "last_sync_job",
        "meta",
        "created_at",
        "updated_at",
        "has_credentials",
        "problem",
        "synchronizable",
    }
)
_DEFAULTS: dict[str, Any] = {
    "title": "",
    "description": "",
    "prefix": "",
    "regex_filter": "",
    "use_blob_urls": True,
    "recursive_scan": False,
    "presign": False,
    "presign_ttl": 15,
    "data_key": "$undefined$",
    "sync_interval": 0,
    "google_project_id": None,
    "client_allowlist": [],
}
_STATUS = {"queued": "queued", "running": "in_progress"}


class Invalid(Refused):
    """400 with Label Studio's `validation_errors` shape: {field: [message]}."""

    def __init__(self, errors: dict[str, str], reason: str = "validation_error") -> None:
        field, message = next(iter(errors.items()))
        details = {"validation_errors": {name: [text] for name, text in errors.items()}}
        super().__init__(400, reason, f"{field}: {message}", details)


def add_storage_routes(app: web.Application) -> None:
    base = "/api/storages/gcs"
    one = base + r"/{storage_id:[A-Za-z0-9._-]+}"
    app.router.add_get(base, list_storages, name="api_storages")
    app.router.add_post(base, create_storage, name="api_storage_create")
    app.router.add_post(base + "/validate", validate_storage, name="api_storage_validate")
    app.router.add_post(base + "/preview", preview_unsaved, name="api_storage_preview_unsaved")
    app.router.add_get(one, get_storage, name="api_storage")
    app.router.add_patch(one, update_storage, name="api_storage_update")
    app.router.add_delete(one, delete_storage, name="api_storage_delete")
    app.router.add_post(one + "/preview", preview_storage, name="api_storage_preview")
    app.router.add_post(one + "/sync", sync_storage, name="api_storage_sync")


# -- representation --------------------------------------------------------------------------


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat().replace("+00:00", "Z")


def represent(storage: StorageSettings, job: dict[str, Any] | None, row: dict[str, Any] | None, problem: str | None):  # type: ignore[no-untyped-def]
    finished = (job or {}).get("last_finished")
    answer: dict[str, Any] = {
        "id": int(storage.id) if storage.from_api else storage.id,
        "type": "gcs" if storage.type == "gcs" else storage.type,
        "source": "api" if storage.from_api else "config",
        "project": storage.project,
        "title": storage.title,
        "description": storage.description,
        "bucket": storage.bucket,
        "prefix": storage.prefix,
        "regex_filter": storage.regex_filter,
        "use_blob_urls": storage.use_blob_urls,
        "recursive_scan": storage.recursive_scan,
        "presign": storage.presign,
        "presign_ttl": storage.presign_ttl,
        "google_project_id": storage.google_project_id,
        "data_key": storage.data_key,
        "sync_interval": storage.sync_interval,
        "client_allowlist": list(storage.client_allowlist),
        # From the row when there is one: credentials this replica cannot decrypt are still set.
        "has_credentials": bool(row["credentials"] if row else storage.google_application_credentials),
        "created_at": _iso(row["created_at"]) if row else None,
        "updated_at": _iso(row["updated_at"]) if row else None,
        "status": "initialized" if job is None else _STATUS.get(job["status"], job["status"]),
        "last_sync": _iso(finished["finished_at"]) if finished else None,
        "last_sync_count": finished["counters"]["created"] if finished else None,
        "last_sync_job": job["id"] if job else None,
        "meta": _job_meta(job),
        "problem": problem,
    }
    return answer


async def refuse_unreadable_credentials(request: web.Request, body: dict[str, Any], current: Any, shelf: Any) -> None:
    """A stored storage tested without new credentials whose own cannot be read here (another
    replica's encryption key): refused, never tested with other (default) credentials."""
    problem = shelf.problems.get(current.id)
    if SECRET not in body and current.from_api and not current.google_application_credentials and problem:
        row = await request.app[REGISTRY].get_storage(int(current.id), shelf.kind)
        if row is not None and row["credentials"]:
            raise Invalid({SECRET: f"the stored credentials cannot be used here: {problem}"}, "bad_credentials")


def _job_meta(job: dict[str, Any] | None) -> dict[str, Any]:
    if job is None:
        return {**empty_counters(), "errors_sample": [], "message": None}
    return {
        **job["counters"],
        "errors_sample": job["errors"],
        "message": job["message"],
        "queued_at": _iso(job["created_at"]),
        "started_at": _iso(job["started_at"]),
        "finished_at": _iso(job["finished_at"]),
        "heartbeat_at": _iso(job["heartbeat_at"]),
        "attempts": job["attempts"],
    }


async def _represent_all(request: web.Request, storages: list[StorageSettings]) -> list[dict[str, Any]]:
    registry, catalog = request.app[REGISTRY], request.app[CATALOG]
    jobs = await registry.latest_jobs(s.id for s in storages)
    rows = {str(r["id"]): r for r in await registry.list_storages()} if any(s.from_api for s in storages) else {}
    return [represent(s, jobs.get(s.id), rows.get(s.id), catalog.problems.get(s.id)) for s in storages]


async def _storage(request: web.Request, storage_id: str | None = None) -> StorageSettings:
    """The storage named in the path (or `storage_id`), as the registry has it now: the catalog
    is reloaded first, so a storage created, changed or deleted through another replica counts."""
    catalog = request.app[CATALOG]
    await catalog.refresh()
    storage = catalog.get(request.match_info["storage_id"] if storage_id is None else storage_id)
    if storage is None:
        raise Refused(404, "unknown_storage", "no such storage")
    return storage


# -- handlers ----------------------------------------------------------------------------------


async def list_storages(request: web.Request) -> web.Response:
    await require_admin(request)
    await request.app[CATALOG].refresh()
    project = request.query.get("project")
    storages = [s for s in request.app[CATALOG].all() if project is None or s.project == project]
    return web.json_response(await _represent_all(request, storages))


async def get_storage(request: web.Request) -> web.Response:
    await require_admin(request)
    [answer] = await _represent_all(request, [await _storage(request)])
    return web.json_response(answer)


async def create_storage(request: web.Request) -> web.Response:
    await require_admin(request)
    values = await _checked(request, await _body(request), partial=False)
    values.pop("_plain_credentials", None)
    row = await request.app[REGISTRY].create_storage(values)
    await request.app[CATALOG].refresh()
    storage = request.app[CATALOG].get(str(row["id"]))
    assert storage is not None
    return web.json_response(represent(storage, None, row, request.app[CATALOG].problems.get(storage.id)), status=201)


async def update_storage(request: web.Request) -> web.Response:
    await require_admin(request)
    storage = await _api_storage(request)
    values = await _checked(request, await _body(request), partial=True)
    values.pop("_plain_credentials", None)
    if values.get("project", storage.project) != storage.project:
        # Its tasks belong to the project they were imported into; moving the storage would strand them.
        raise Invalid({"project": "a storage cannot move to another project; create one there"})
    if await request.app[REGISTRY].update_storage(int(storage.id), values) is None:
        raise Refused(404, "unknown_storage", "no such storage")
    await request.app[CATALOG].refresh()
    return await get_storage(request)


async def delete_storage(request: web.Request) -> web.Response:
    await require_admin(request)
    storage = await _api_storage(request)
    job = (await request.app[REGISTRY].latest_jobs([storage.id])).get(storage.id)
    if job is not None and job["status"] == "running":
        raise Refused(409, "sync_running", "a sync of this storage is running; delete it when the sync ends")
    await request.app[REGISTRY].delete_storage(int(storage.id))
    await request.app[CATALOG].refresh()
    return web.Response(status=204)


async def validate_storage(request: web.Request) -> web.Response:
    """ "Test connection": the fields, the credentials, then the bucket with a one-object listing."""
    await require_admin(request)
    storage = await _unsaved(request, await _body(request))
    await _try_connection(request, storage)
    return web.json_response({"ok": True, "message": f"bucket {storage.bucket} can be listed with these settings"})


async def preview_storage(request: web.Request) -> web.Response:
    await require_admin(request)
    storage = await _storage(request)
    body = await _body(request, allow_empty=True)
    return await _preview(storage, request.app[CATALOG].backend(storage), _limit(body))


async def preview_unsaved(request: web.Request) -> web.Response:
    """ "Load preview" of a form not saved yet (or a stored storage with changes), as validate takes it."""
    await require_admin(request)
    body = await _body(request)
    limit = _limit(body)
    storage = await _unsaved(request, {k: v for k, v in body.items() if k != "limit"})
    backend, _ = await _connect(request, storage)
    return await _preview(storage, backend, limit)


async def _unsaved(request: web.Request, body: dict[str, Any]) -> StorageSettings:
    """Settings from a form (`id`: a stored storage with these changes), checked, saving nothing."""
    current = None
    if body.get("id") is not None:  # editing a stored storage: its credentials unless new ones are given
        current = await _storage(request, str(body["id"]))
        await refuse_unreadable_credentials(request, body, current, request.app[CATALOG].sources)
    values = await _checked(request, {k: v for k, v in body.items() if k != "id"}, partial=current is not None)
    return _as_settings(values, current)


def _limit(body: dict[str, Any]) -> int:
    limit = body.get("limit", 20)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100:
        raise Invalid({"limit": "expected an integer from 1 to 100"})
    return limit


async def _preview(storage: StorageSettings, backend: Backend, limit: int) -> web.Response:
    try:
        answer = await preview(storage, backend, limit)
    except StorageError as exc:
        raise _connection_refusal(exc, storage) from None
    return web.json_response(answer)


async def sync_storage(request: web.Request) -> web.Response:
    """ "Sync": queue a sync (or join the one queued or running) and answer with the storage."""
    await require_admin(request)
    storage = await _storage(request)
    await request.app[REGISTRY].enqueue_job(storage.id)
    # The answer is read before the in-process worker is woken, so it shows the job queued (or
    # running), never already finished.
    [answer] = await _represent_all(request, [storage])
    worker = request.app[SYNC_WORKER]
    if worker is not None:
        worker.wake()
    return web.json_response(answer, status=202)


# -- field checks ------------------------------------------------------------------------------


async def _api_storage(request: web.Request) -> StorageSettings:
    storage = await _storage(request)
    if not storage.from_api:
        raise Refused(409, "declared_in_config", "this storage is declared in the config file; change it there")
    return storage


async def _body(request: web.Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await read_body(request, SETTINGS_BYTES)
    if not raw.strip() and allow_empty:
        return {}
    body = await parse_json(raw)
    if not isinstance(body, dict):
        raise Refused(400, "bad_json", "the body must be a JSON object")
    return body


async def _checked(
    request: web.Request,
    body: dict[str, Any],
    *,
    partial: bool,
    defaults: dict[str, Any] = _DEFAULTS,
    read_only: frozenset[str] = _READ_ONLY,
) -> dict[str, Any]:
    """The storage's column values from a request body; every problem named by its field.

    `defaults` are the fields a storage of this kind has beside project, bucket and credentials
    (source storages: _DEFAULTS; target storages pass theirs); `read_only` ones are ignored."""
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key in body:
        if key not in defaults and key not in ("project", "bucket", SECRET) and key not in read_only:
            errors[key] = "unknown field"
    fields = {k: v for k, v in body.items() if k not in read_only}
    if not partial:
        fields = {**defaults, **fields}
        for required in ("project", "bucket"):
            if required not in fields:
                errors[required] = "this field is required"

    def text(name: str, limit: int = 255, allow_none: bool = False) -> None:
        if name not in fields:
            return
        value = fields[name]
        if value is None and allow_none:
            values[name] = None
        elif isinstance(value, int) and not isinstance(value, bool) and name == "project":
            values[name] = str(value)
        elif not isinstance(value, str):
            errors[name] = "expected a string"
        elif len(value) > limit:
            errors[name] = f"at most {limit} characters"
        elif "\x00" in value:  # PostgreSQL cannot store NUL in text
            errors[name] = "must not contain NUL characters"
        else:
            values[name] = value

    def flag(name: str) -> None:
        if name in fields:
            if isinstance(fields[name], bool):
                values[name] = fields[name]
            else:
                errors[name] = "expected true or false"

    def number(name: str, low: int, high: int) -> None:
        if name in fields:
            value = fields[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                errors[name] = f"expected an integer from {low} to {high}"
            else:
                values[name] = value

    text("project")
    text("title")
    text("description", 10000)
    text("bucket")
    text("prefix", 1024)
    text("regex_filter", 1024)
    text("data_key")
    text("google_project_id", allow_none=True)
    for name in ("use_blob_urls", "recursive_scan", "presign", "can_delete_objects", "json_extension"):
        flag(name)
    number("presign_ttl", 1, 10080)
    number("sync_interval", 0, 7 * 24 * 3600)
    if values.get("project") == "":
        errors["project"] = "must not be empty"
    if "bucket" in values and not BUCKET_RE.fullmatch(values["bucket"]):
        errors["bucket"] = "not a valid bucket name (3-222 characters: a-z, 0-9, '.', '-', '_')"
    if "prefix" in values:
        if values["prefix"].startswith("/"):
            errors["prefix"] = "must not start with '/'"
        values["prefix"] = normalize_prefix(values["prefix"])
    if "regex_filter" in values:
        try:
            compile_filter(values["regex_filter"])
        except FilterError as exc:
            errors["regex_filter"] = str(exc)
    if "client_allowlist" in fields:
        _check_allowlist(fields["client_allowlist"], values, errors)
    if "layout" in fields:
        if fields["layout"] in LAYOUTS:
            values["layout"] = fields["layout"]
        else:
            errors["layout"] = "expected 'annotation' or 'task'"
    if "data_key" in values and not values["data_key"].strip():
        errors["data_key"] = "must not be empty"
    if SECRET in fields:
        await _check_credentials(request, fields[SECRET], fields.get("google_project_id"), values, errors)
    if errors:
        raise Invalid(errors)
    return values


def _check_allowlist(value: Any, values: dict[str, Any], errors: dict[str, str]) -> None:
    """CIDRs of the clients that may read the storage (besides [network]); [] allows any."""
    if not isinstance(value, list) or not all(isinstance(cidr, str) for cidr in value):
        errors["client_allowlist"] = "expected a list of CIDR strings like 10.0.0.0/8 or 2001:db8::/32"
    elif len(value) > MAX_ALLOWLIST:
        errors["client_allowlist"] = f"at most {MAX_ALLOWLIST} networks"
    else:
        for cidr in value:
            try:
                parse_network(cidr)
            except ValueError as exc:
                errors["client_allowlist"] = cidr_problem(cidr, exc)
                return
        values["client_allowlist"] = [cidr.strip() for cidr in value]


async def _check_credentials(
    request: web.Request, value: Any, project_id: Any, values: dict[str, Any], errors: dict[str, str]
) -> None:
    """Parse the credentials (never echoing them) and encrypt them for storage."""
    if value is None or value == "":
        values["credentials"] = None  # Application Default Credentials
        return
    if not isinstance(value, str):
        if isinstance(value, dict):  # a parsed JSON key is accepted as well
            value = json.dumps(value)
        else:
            errors[SECRET] = "expected the JSON key file's content as a string"
            return
    if not value.lstrip().startswith("{"):
        errors[SECRET] = "expected the content of a JSON credentials file (paths are accepted only in the config file)"
        return
    try:
        kind = strictjson.loads(value.encode()).get("type")  # bounded: the field is JSON inside JSON
    except (ValueError, AttributeError):
        kind = None
    if kind not in API_CREDENTIAL_TYPES:
        # external_account / impersonation configs name files, URLs and commands that google-auth
        # reads or calls on refresh: from the API they would read the gateway's own secrets.
        errors[SECRET] = "only service_account and authorized_user credentials may be given to the API"
        return
    try:
        check_destinations(value, request.app[CATALOG].settings.upstream.allowed_credential_endpoints)
    except CredentialsError as exc:
        errors[SECRET] = _credentials_problem(exc, value)
        return
    probe = StorageSettings(
        id="probe",
        project="-",
        type="gcs",
        bucket="probe",
        google_application_credentials=value,
        google_project_id=project_id if isinstance(project_id, str) else None,
        presign=True,
    )
    try:
        await asyncio.to_thread(load_storage_credential, probe, {})
    except CredentialsError as exc:
        errors[SECRET] = _credentials_problem(exc, value)
        return
    vault = request.app[CATALOG].vault
    if not vault.enabled:
        errors[SECRET] = "the server cannot store credentials: set [registry].encryption_keys in its config"
        return
    values["credentials"] = vault.seal(value)
    values["_plain_credentials"] = value  # for a connection test; never stored


_CREDENTIAL_TYPES = frozenset(
    {
        "service_account",
        "authorized_user",
        "external_account",
        "external_account_authorized_user",
        "impersonated_service_account",
        "gdch_service_account",
    }
)


def _credentials_problem(exc: CredentialsError, value: str | None) -> str:
    """google-auth's reason, unless it repeats a string of the submitted JSON (it quotes an
    unknown `type`, for one): then a generic reason. The credentials are never echoed."""
    message = str(exc)
    try:
        info = strictjson.loads(value.encode()) if value else None
    except ValueError:
        info = None
    if any(len(s) >= 4 and s not in _CREDENTIAL_TYPES and s in message for s in _strings(info)):
        message = "not a supported Google credentials JSON (check its type and fields)"
    return f"these credentials cannot be used: {message}"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def _as_settings(
    values: dict[str, Any], current: Any, cls: type = StorageSettings, defaults: dict[str, Any] = _DEFAULTS
) -> Any:
    """Settings of kind `cls` to test: the checked `values` over the `current` storage's, if any."""
    merged: dict[str, Any] = (
        {}
        if current is None
        else {
            "project": current.project,
            "bucket": current.bucket,
            **{name: getattr(current, name) for name in defaults},
            SECRET: current.google_application_credentials,
        }
    )
    merged.update({k: v for k, v in values.items() if k in defaults or k in ("project", "bucket")})
    if "_plain_credentials" in values or "credentials" in values:
        merged[SECRET] = values.get("_plain_credentials")
    if "client_allowlist" in merged:
        merged["client_allowlist"] = tuple(merged["client_allowlist"])
    return cls(id=current.id if current else "validate", type="gcs", **merged)


async def _connect(request: web.Request, storage: StorageSettings) -> tuple[Backend, Any]:
    """A backend for unsaved settings and its credentials; ones google-auth refuses name their field."""
    catalog = request.app[CATALOG]
    try:
        credentials = await asyncio.to_thread(load_storage_credential, storage, None)
    except CredentialsError as exc:
        message = _credentials_problem(exc, storage.google_application_credentials)
        raise Invalid({SECRET: message}, "bad_credentials") from None
    return build_backend(catalog.settings, storage, catalog.session, credentials), credentials


async def _try_connection(request: web.Request, storage: StorageSettings) -> None:
    backend, credentials = await _connect(request, storage)
    try:
        await backend.list_page(storage.prefix, storage.recursive_scan, None, 1)
    except StorageError as exc:
        raise _connection_refusal(exc, storage) from None
    catalog = request.app[CATALOG]
    if storage.presign and credentials is not None:
        try:
            signer, token_source = build_signer(credentials, catalog.session, catalog.settings.upstream.iam_endpoint)
            if token_source is not None:
                await resolve_identity(signer, *token_source)
            await probe(signer)  # what every presigned media request will do
        except SigningError as exc:
            raise Invalid({"presign": f"these credentials cannot sign URLs: {exc}"}, "cannot_sign") from None


def _connection_refusal(exc: StorageError, storage: StorageSettings) -> Refused:
    if isinstance(exc, BucketNotFound):
        return Invalid({"bucket": f"bucket {storage.bucket!r} does not exist"}, "bucket_not_found")
    if isinstance(exc, UpstreamDenied):
        if "access token" in str(exc):
            message = "these credentials could not get an access token from Google (revoked or disabled key?)"
            return Invalid({SECRET: message}, "bad_credentials")
        message = (
            f"the credentials may not list bucket {storage.bucket!r}: they need the storage.objects.list "
            "and storage.objects.get permissions (e.g. roles/storage.objectViewer)"
        )
        return Invalid({SECRET: message}, "permission_denied")
    return Refused(exc.status if exc.status >= 500 else 502, exc.reason, exc.public_message or str(exc))
