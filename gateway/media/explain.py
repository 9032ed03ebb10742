"""Why a task's media is served the way it is — or refused: the media core's rules, spelled out.

`explain` answers "which storage serves each object this task references, in which mode, with
which TTL, allowlist and signing identity, and would this client be let in?" with the very
functions the media path runs (`acl.storage_for_reference`, `netguard.check_allowlist`), so the
explanation cannot drift from the decision. `GET /api/tasks/{id}/access` and `gateway explain`
show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..acl import storage_for_reference
from ..config import StorageSettings
from ..errors import Refused
from ..netguard import ClientGuard, IPAddress, admit_to_storage
from ..registry import TaskAccess
from ..signer import Signer
from ..uris import BadFileUri, GsUri, parse_gs_uri

_NOT_ASKED = object()


def explain(
    task: TaskAccess,
    storages: tuple[StorageSettings, ...],
    guard: ClientGuard,
    signers: Mapping[str, Signer],
    problems: Mapping[str, str],
    uris: list[str] | None = None,
    client: IPAddress | object | None = _NOT_ASKED,
) -> dict[str, Any]:
    """The explanation for `task` (every URI it references, or `uris`), and for `client` when given."""
    objects = [_object(task, text, storages, guard, signers, problems, client) for text in uris or sorted(task.uris)]
    return {"task": task.id, "project": task.project, "imported_by": task.storage_id, "objects": objects}


def _object(
    task: TaskAccess,
    text: str,
    storages: tuple[StorageSettings, ...],
    guard: ClientGuard,
    signers: Mapping[str, Signer],
    problems: Mapping[str, str],
    client: IPAddress | object | None,
) -> dict[str, Any]:
    found: dict[str, Any] = {"uri": text}
    try:
        uri: GsUri = parse_gs_uri(text)
        storage = storage_for_reference(task.id, task.uris, uri, storages, task.storage_id)
    except (Refused, BadFileUri) as exc:
        reason = exc.reason if isinstance(exc, Refused) else "bad_uri"
        return found | {"served": False, "reason": reason, "message": getattr(exc, "message", str(exc))}
    signer = signers.get(storage.id)
    found |= {
        "served": True,
        "storage": storage.id,
        "why": "the storage that imported the task"
        if storage.id == task.storage_id
        else "the storage of the bucket whose prefix holds the key (longest prefix, then the first listed)",
        "mode": "presign" if storage.presign else "proxy",
        "presign_ttl_minutes": storage.presign_ttl if storage.presign else None,
        "client_allowlist": list(storage.client_allowlist),
        "signing_identity": None if signer is None else {"method": signer.method, "email": signer.email},
        "storage_problem": problems.get(storage.id),
    }
    if client is not _NOT_ASKED:
        found["client"] = _admission(guard, storage, client)  # type: ignore[arg-type]
    return found


def _admission(guard: ClientGuard, storage: StorageSettings, client: IPAddress | None) -> dict[str, Any]:
    """Whether the client would pass both allowlists, in the order the media path checks them."""
    address = None if client is None else str(client)
    try:
        if guard.allowed:
            guard.admit(client)
        admit_to_storage(storage.id, storage.client_allowlist, client)
    except Refused as exc:
        return {"address": address, "allowed": False, "reason": exc.reason, "message": exc.message}
    return {"address": address, "allowed": True}
