"""`gateway demo`: the bundled sample media served as a local bucket, with tasks and a token.

Idempotent: the state directory keeps the signing secret, the registry and the task ids, so a
second run serves the same tasks and prints fresh URLs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from ..config import Settings, load_settings
from ..uris import encode_fileuri

PROJECT = "demo"
BUCKET = "demo-media"
SAMPLES = {
    "photo.jpg": {"image": f"gs://{BUCKET}/photo.jpg", "caption": "A test card"},
    "document.pdf": {"pdf": f"gs://{BUCKET}/document.pdf", "pages": 4},
    "clip.mp4": {"video": f"gs://{BUCKET}/clip.mp4"},
    "audio.mp3": {"audio": f"gs://{BUCKET}/audio.mp3"},
}


def media_root() -> Path:
    return Path(str(resources.files(__package__) / "media"))


def prepare_demo(state: Path, host: str, port: int) -> tuple[Settings, str]:
    state.mkdir(parents=True, exist_ok=True)
    secret_file, vault_file = state / "secret", state / "encryption-key"
    for path in (secret_file, vault_file):
        if not path.exists():
            path.write_text(secrets.token_urlsafe(48))
            path.chmod(0o600)
    config_file = state / "gateway.toml"
    config_file.write_text(
        "# Written by `gateway demo`; ./secret and ./encryption-key come in via the environment.\n"
        f"[server]\nhost = {json.dumps(host)}\nport = {port}\n\n"
        f"[registry]\nurl = {json.dumps('sqlite:///' + str((state / 'registry.db').resolve()))}\n\n"
        f'[[storages]]\nid = "demo-local"\nproject = {json.dumps(PROJECT)}\ntype = "local"\n'
        f"bucket = {json.dumps(BUCKET)}\nroot = {json.dumps(str(media_root()))}\n"
    )
    settings = load_settings(
        config_file,
        env={
            "GATEWAY_AUTH_SECRET": secret_file.read_text(),
            "GATEWAY_REGISTRY_ENCRYPTION_KEYS": vault_file.read_text(),
        },
    )
    task_ids = _ensure_tasks(settings, state / "tasks.json")

    from ..tokens import mint_token

    token = mint_token(settings, "demo-annotator", projects=[PROJECT], ttl=24 * 3600)
    admin = mint_token(settings, "demo-admin", ttl=24 * 3600, admin=True)
    base = f"http://{host}:{port}"
    lines = [
        f"Media gateway demo: {len(task_ids)} tasks of project {PROJECT!r}, bucket gs://{BUCKET} "
        f"served from {media_root()}",
        "",
        f"Token (24 h, project {PROJECT!r}):",
        token,
        "",
        "Media URLs (open in a browser; the token rides in the query string):",
    ]
    first_url = ""
    for name, task_id in task_ids.items():
        url = f"{base}/tasks/{task_id}/resolve/?fileuri={encode_fileuri(SAMPLES[name][_media_field(name)])}"
        first_url = first_url or url
        lines.append(f"  task {task_id} {name:<13} {url}&token={quote(token)}")
    first_task = next(iter(task_ids.values()))
    lines += [
        "",
        "Web pages (README: Web pages):",
        f"  viewer of task {first_task}: {base}/view/tasks/{first_task}?token={quote(token)}",
        f"  Cloud Storage settings: {base}/ui/  (sign in with this admin token, 24 h:)",
        f"  {admin}",
        "",
        "Fetch the first KiB of the video with a bearer token:",
        f"  curl -s -D - -o /dev/null -r 0-1023 -H 'Authorization: Bearer {token}' \\\n"
        f"    '{base}/tasks/{task_ids['clip.mp4']}/resolve/?fileuri="
        f"{encode_fileuri(SAMPLES['clip.mp4']['video'])}'",
        "",
        "The tasks above came from a task file. Preview what a sync of the bucket would import instead",
        "(one task per object; POST …/sync would add those tasks beside these), then list the tasks:",
        f"  curl -s -X POST -H 'Authorization: Bearer {admin}' {base}/api/storages/gcs/demo-local/preview",
        f"  curl -s -H 'Authorization: Bearer {admin}' '{base}/api/projects/{PROJECT}/tasks?resolve=true'",
        "",
        f"Metrics: {base}/metrics   Health: {base}/healthz   Ready: {base}/readyz   API: {base}/api/openapi.json",
    ]
    return settings, "\n".join(lines)


def _media_field(name: str) -> str:
    return next(k for k, v in SAMPLES[name].items() if isinstance(v, str) and v.startswith("gs://"))


def _ensure_tasks(settings: Settings, ids_file: Path) -> dict[str, int]:
    """Register the sample tasks once; later runs reuse the recorded ids."""
    from ..registry import open_registry

    async def run() -> dict[str, int]:
        registry = open_registry(settings.registry.url)
        try:
            if ids_file.exists():
                known = json.loads(ids_file.read_text())
                if all([await registry.task_access(i) is not None for i in known.values()]):
                    return known
            ids = await registry.add_tasks(PROJECT, [{"data": data} for data in SAMPLES.values()])
            return dict(zip(SAMPLES, ids, strict=True))
        finally:
            await registry.close()

    task_ids = asyncio.run(run())
    ids_file.write_text(json.dumps(task_ids))
    return task_ids
