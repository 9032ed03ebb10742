"""Schemathesis against the gateway's own OpenAPI document (gateway/api/openapi.json), every
management and webhook operation, through a real `gateway serve` over fake-gcs-server.

Each operation gets a bounded number of generated requests (valid ones and deliberately invalid
ones), derandomized so CI runs the same cases every time. Every answer must be no 5xx, a
documented status with a body that fits its documented schema and content type, and must not echo
a credential: the admin token, the webhook secret, or the credentials sent in the request (for
these a service-account key is put in place of what was generated, so a real key's text is what
must never come back). The process's log is checked for them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.api.openapi import document

from .conftest import Emulator
from .test_presign import service_account_json
from .test_registry_durability import ADMIN, HOOK, import_task, make_gateway

EXAMPLES = 25  # per operation and registry: ~1,150 requests in all
schema = schemathesis.openapi.from_dict(document())
# 1024 bits: what matters is the key's text, and cryptography checks a key each time it is
# loaded (several times per request that carries credentials), which 2048 bits makes 4x dearer.
KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
# A key whose every network use would stay on this machine (a closed loopback port).
CREDENTIALS = json.loads(service_account_json(KEY)) | {"token_uri": "http://127.0.0.1:9/token"}
# What the issue asks of every answer. Not run: schemathesis's checks that valid data is accepted
# (it is not when the bucket does not exist) and that invalid data is refused (the gateway ignores
# query parameters it does not know, and the mutation "no Authorization header" is undone by the
# admin header every request carries), nor the Allow check (aiohttp's 405 lists the methods of
# every route matching the URL: /api/storages/gcs/validate is also a `{storage_id}` route).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
SECRETS = [ADMIN["Authorization"].removeprefix("Bearer "), *HOOK.values()]
PEM_LINE = CREDENTIALS["private_key"].splitlines()[5]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway_url(
    request: pytest.FixtureRequest, emulator: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One gateway per registry kind: PostgreSQL refuses values SQLite stores (the run on it
    found a task id beyond its 32-bit column answered as an outage)."""
    directory = tmp_path_factory.mktemp("fuzz")
    if request.param == "sqlite":
        url = f"sqlite:///{directory / 'registry.db'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.url(server.create_database())
    node = make_gateway(directory, url, [], STORAGE_EMULATOR_HOST=emulator.host)
    node.serve()
    import_task(node.port)  # task 1 exists, so task and annotation routes reach their handlers
    yield f"http://127.0.0.1:{node.port}"
    node.stop()
    log = node.log()
    leaked = [secret for secret in [*SECRETS, PEM_LINE] if secret in log]
    assert not leaked, "a credential reached the log"


def no_credential_echoed(case: Any, response: requests.Response) -> None:
    sent = case.body.get("google_application_credentials") if isinstance(case.body, dict) else None
    echoed = [s for s in [*SECRETS, PEM_LINE, sent] if isinstance(s, str) and len(s) >= 16 and s in response.text]
    assert not echoed, f"{case.method} {case.path} echoed a credential"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: Any, gateway_url: str) -> None:
    if isinstance(case.body, dict) and isinstance(case.body.get("google_application_credentials"), str):
        case.body["google_application_credentials"] = json.dumps(CREDENTIALS)
    headers = {**ADMIN, **HOOK}
    response = case.call_and_validate(base_url=gateway_url, headers=headers, checks=CHECKS)
    no_credential_echoed(case, response)
