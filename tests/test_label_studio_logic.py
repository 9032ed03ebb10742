"""Pure logic of the `label_studio` authenticator: which credential a request carries, and which
objects a task Label Studio returned references. (Decisions against a real Label Studio are in
tests/test_label_studio.py.)"""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.config import ConfigError, LabelStudioSettings
from gateway.labelstudio import credential_from, referenced_uris
from gateway.uris import encode_fileuri

from .conftest import SECRET, build_settings, make_token

LS = LabelStudioSettings(url="http://127.0.0.1:8081")
# A Label Studio access token (djangorestframework-simplejwt): token_type, jti, user_id — no sub.
LS_JWT = jwt.encode({"token_type": "access", "exp": 4102444800, "jti": "abc", "user_id": 7}, "ls-secret-key" * 3)


def request(headers: dict[str, str] | None = None, cookie: str | None = None, query: str = ""):  # type: ignore[no-untyped-def]
    headers = dict(headers or {})
    if cookie:
        headers["Cookie"] = cookie
    mocked = make_mocked_request("GET", f"/tasks/1/resolve/?fileuri=x{query}", headers=headers)
    return mocked.headers, mocked.cookies


@pytest.mark.parametrize(
    ("headers", "cookie", "expected"),
    [
        ({"Authorization": "Token 0123abcd"}, None, ("Authorization", "Token 0123abcd")),
        ({"Authorization": f"Bearer {LS_JWT}"}, None, ("Authorization", f"Bearer {LS_JWT}")),
        ({}, "sessionid=s3ss10n; csrftoken=c", ("Cookie", "sessionid=s3ss10n")),
        # The header decides over the session cookie, both ways.
        ({"Authorization": "Token t"}, "sessionid=s", ("Authorization", "Token t")),
        ({"Authorization": f"Bearer {make_token(tasks=[1])}"}, "sessionid=s", None),
        ({}, None, None),
        ({"Authorization": "Token "}, None, None),
        ({"Authorization": "Bearer not.a-jwt.at-all"}, None, None),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "sessionid=s", None),
    ],
)
def test_which_credential_a_request_carries(headers, cookie, expected):
    gateway_token = (headers.get("Authorization") or "").partition(" ")[2] or None
    found = credential_from(*request(headers, cookie), LS, gateway_token)
    assert (None if found is None else (found.header, found.value)) == expected
    if found is not None:
        assert found.value not in found.digest and len(found.digest) == 64  # the cache key is a hash


def test_a_gateway_token_in_the_cookie_or_query_wins_over_the_session_cookie():
    assert credential_from(*request(cookie="sessionid=s"), LS, make_token(tasks=[1])) is None
    # A renamed Label Studio session cookie is honoured; the default name then is not.
    renamed = LabelStudioSettings(url="http://ls", session_cookie="ls_session")
    assert credential_from(*request(cookie="sessionid=s"), renamed, None) is None
    assert credential_from(*request(cookie="ls_session=s"), renamed, None).value == "ls_session=s"


def test_the_gateways_own_tokens_are_never_taken_for_label_studio_ones():
    ours = jwt.encode({"sub": "u", "exp": 4102444800, "token_type": "access"}, SECRET)  # has sub: ours
    assert credential_from(*request({"Authorization": f"Bearer {ours}"}), LS, ours) is None


def test_referenced_uris_written_out_or_inside_label_studio_resolve_urls():
    image = "gs://media/images/a b.jpg"
    audio = "gs://media/audio/c.wav"
    data = {
        "image": f"/tasks/5/resolve/?fileuri={encode_fileuri(image)}",
        "audio": f"http://ls.example/projects/2/resolve/?x=1&fileuri={encode_fileuri(audio)}",
        "raw": "gs://other/raw.txt",
        "text": "nothing here",
        "broken": "/tasks/5/resolve/?fileuri=%%%",
        "nested": [{"again": f"/tasks/5/resolve?fileuri={base64.urlsafe_b64encode(b'gs://nest/x.png').decode()}"}],
    }
    assert referenced_uris(data) == {image, audio, "gs://other/raw.txt", "gs://nest/x.png"}
    assert referenced_uris(None) == frozenset()
    assert referenced_uris(json.loads('{"a": 1}')) == frozenset()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"url": "label-studio:8080"}, "[label_studio].url"),
        ({"url": "ftp://ls"}, "[label_studio].url"),
        ({"url": "http://ls", "timeout": 0}, "[label_studio].timeout"),
        ({"url": "http://ls", "cache_size": 0}, "[label_studio].cache_size"),
        ({"url": "http://ls", "session_cookie": ""}, "[label_studio].session_cookie"),
    ],
)
def test_bad_settings_are_named(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_settings([], tmp_path, label_studio=section)


def test_settings_defaults(tmp_path):
    settings = build_settings([], tmp_path, label_studio={"url": "http://127.0.0.1:8081/"})
    assert settings.label_studio.url == "http://127.0.0.1:8081/" and settings.label_studio.cache_ttl == 30.0
