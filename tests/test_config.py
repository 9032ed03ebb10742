"""Table-driven tests of `gateway.config`: defaults, validation errors naming their key, environment overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    AuthSettings,
    ConfigError,
    CorsSettings,
    ServerSettings,
    Settings,
    StorageSettings,
    load_settings,
    settings_from_dict,
)

SECRET = "0123456789abcdef0123456789abcdef"  # exactly 32 characters
DROP = object()  # a table value meaning "leave this key out"


def storage(**overrides: Any) -> dict[str, Any]:
    """One valid [[storages]] table; a value of DROP removes that key."""
    table = {"id": "s1", "project": "7", "type": "gcs", "bucket": "media-bucket", **overrides}
    return {k: v for k, v in table.items() if v is not DROP}


def raw_config(sections: dict[str, Any]) -> dict[str, Any]:
    """A valid configuration (an HS secret) with `sections` merged in table by table; DROP removes a key."""
    raw: dict[str, Any] = {"auth": {"secret": SECRET}}
    for name, table in sections.items():
        if isinstance(table, dict) and isinstance(raw.get(name), dict):
            table = {**raw[name], **table}
        raw[name] = {k: v for k, v in table.items() if v is not DROP} if isinstance(table, dict) else table
    return raw


def build(sections: dict[str, Any] | None = None, env: dict[str, str] | None = None, base_dir: Path | None = None):
    return settings_from_dict(raw_config(sections or {}), env or {}, base_dir=base_dir)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """A configuration directory holding a `media` directory and a `file.txt` file."""
    (tmp_path / "media").mkdir()
    (tmp_path / "file.txt").write_text("not a directory")
    return tmp_path


# --------------------------------------------------------------------------- defaults


def test_defaults_are_valid_with_an_hs_secret() -> None:
    settings = settings_from_dict({"auth": {"secret": SECRET}}, env={}, source="test.toml")
    assert settings == Settings(auth=AuthSettings(secret=SECRET), source="test.toml")
    assert settings.auth.algorithms == ("HS256",)
    assert settings.server == ServerSettings()
    assert settings.storages == ()


def test_defaults_need_a_secret() -> None:
    with pytest.raises(ConfigError, match=r"\[auth\]\.secret"):
        load_settings(None, env={})


def test_defaults_with_secret_from_environment() -> None:
    settings = load_settings(None, env={"GATEWAY_AUTH_SECRET": SECRET})
    assert (settings.auth.secret, settings.source) == (SECRET, "<defaults>")


@pytest.mark.parametrize(
    ("sections", "attribute", "expected"),
    [
        pytest.param({"server": {"port": 9000}}, ("server", "port"), 9000, id="int"),
        pytest.param({"server": {"shutdown_timeout": 5}}, ("server", "shutdown_timeout"), 5.0, id="int-as-float"),
        pytest.param({"server": {"access_log": False}}, ("server", "access_log"), False, id="bool"),
        pytest.param({"auth": {"algorithms": "HS512"}}, ("auth", "algorithms"), ("HS512",), id="one-string-as-list"),
        pytest.param({"auth": {"secret": "x" * 32}}, ("auth", "secret"), "x" * 32, id="secret-32-chars"),
        pytest.param({"auth": {"leeway": 0}}, ("auth", "leeway"), 0.0, id="zero-leeway"),
        pytest.param({"auth": {"header": False}}, ("auth", "header"), False, id="one-token-source-off"),
        pytest.param({"registry": {"url": "postgresql://db/gw"}}, ("registry", "url"), "postgresql://db/gw", id="pg"),
        pytest.param({"media": {"chunk_size": 4096}}, ("media", "chunk_size"), 4096, id="smallest-chunk"),
        pytest.param({"upstream": {"retries": 0}}, ("upstream", "retries"), 0, id="no-retries"),
        pytest.param({"cors": {"origins": ["*"]}}, ("cors", "origins"), ("*",), id="cors-star"),
        pytest.param(
            {"cors": {"origins": ["https://a.example", "http://b.example:8080"]}},
            ("cors", "origins"),
            ("https://a.example", "http://b.example:8080"),
            id="cors-origins",
        ),
    ],
)
def test_valid_values(sections: dict[str, Any], attribute: tuple[str, str], expected: Any) -> None:
    section, name = attribute
    value = getattr(getattr(build(sections), section), name)
    assert value == expected
    assert type(value) is type(expected)


# --------------------------------------------------------------------------- errors name their key


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        pytest.param({"logging": {"level": "debug"}}, "logging", id="unknown-section"),
        pytest.param({"server": {"prot": 8080}}, "[server].prot", id="unknown-key"),
        pytest.param({"auth": {"secrets": SECRET}}, "[auth].secrets", id="unknown-auth-key"),
        pytest.param({"server": []}, "[server]", id="section-not-a-table"),
        pytest.param({"server": {"port": "8080"}}, "[server].port", id="string-for-int"),
        pytest.param({"server": {"port": True}}, "[server].port", id="bool-for-int"),
        pytest.param({"media": {"chunk_size": 65536.0}}, "[media].chunk_size", id="float-for-int"),
        pytest.param({"server": {"access_log": 1}}, "[server].access_log", id="number-for-bool"),
        pytest.param({"server": {"access_log": "yes"}}, "[server].access_log", id="string-for-bool"),
        pytest.param({"auth": {"leeway": "soon"}}, "[auth].leeway", id="string-for-float"),
        pytest.param({"auth": {"leeway": False}}, "[auth].leeway", id="bool-for-float"),
        pytest.param({"auth": {"secret": 12345}}, "[auth].secret", id="number-for-secret"),
        pytest.param({"auth": {"audience": ["a"]}}, "[auth].audience", id="list-for-string"),
        pytest.param({"auth": {"algorithms": [256]}}, "[auth].algorithms", id="number-in-list"),
        pytest.param({"server": {"port": 0}}, "[server].port", id="port-zero"),
        pytest.param({"server": {"port": 65536}}, "[server].port", id="port-too-big"),
        pytest.param({"server": {"workers": 0}}, "[server].workers", id="no-workers"),
        pytest.param({"auth": {"algorithms": []}}, "[auth].algorithms", id="no-algorithm"),
        pytest.param({"auth": {"algorithms": ["HS256", "none"]}}, "[auth].algorithms", id="alg-none"),
        pytest.param({"auth": {"algorithms": ["NONE"]}}, "[auth].algorithms", id="alg-none-uppercase"),
        pytest.param({"auth": {"algorithms": ["HS1024"]}}, "[auth].algorithms", id="alg-unknown"),
        pytest.param({"auth": {"secret": DROP}}, "[auth].secret", id="hs-without-secret"),
        pytest.param({"auth": {"secret": ""}}, "[auth].secret", id="hs-empty-secret"),
        pytest.param({"auth": {"secret": "x" * 31}}, "[auth].secret", id="secret-31-chars"),
        pytest.param({"auth": {"algorithms": ["RS256"]}}, "[auth].public_key_file", id="rs256-without-key"),
        pytest.param(
            {"auth": {"algorithms": ["RS256"], "public_key_file": "/nonexistent/key.pem"}},
            "[auth].public_key_file",
            id="missing-public-key-file",
        ),
        pytest.param(
            {"auth": {"private_key_file": "/nonexistent/key.pem"}},
            "[auth].private_key_file",
            id="missing-private-key-file",
        ),
        pytest.param({"auth": {"leeway": -1}}, "[auth].leeway", id="negative-leeway"),
        pytest.param({"auth": {"max_token_lifetime": 0}}, "[auth].max_token_lifetime", id="no-token-lifetime"),
        pytest.param(
            {"upstream": {"allowed_credential_endpoints": ["127.0.0.1:9/token"]}},
            "[upstream].allowed_credential_endpoints",
            id="credential-endpoint-without-scheme",
        ),
        pytest.param({"auth": {"header": False, "cookie": "", "query_param": ""}}, "header", id="no-token-source"),
        pytest.param({"registry": {"url": "mysql://db/gw"}}, "[registry].url", id="bad-registry-url"),
        pytest.param({"media": {"chunk_size": 4095}}, "[media].chunk_size", id="chunk-too-small"),
        pytest.param({"upstream": {"retries": -1}}, "[upstream].retries", id="negative-retries"),
        pytest.param({"cors": {"origins": ["example.com"]}}, "[cors].origins", id="origin-without-scheme"),
        pytest.param({"cors": {"origins": ["https://a.example/"]}}, "[cors].origins", id="origin-with-path"),
        pytest.param({"cors": {"origins": ["ftp://a.example"]}}, "[cors].origins", id="origin-bad-scheme"),
        pytest.param({"cors": {"origins": ["https://a b"]}}, "[cors].origins", id="origin-with-space"),
    ],
)
def test_errors_name_the_key(sections: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(sections)
    assert key in str(caught.value)


def test_public_key_algorithms_need_no_secret(base_dir: Path) -> None:
    settings = build({"auth": {"algorithms": ["RS256"], "secret": DROP, "public_key_file": str(base_dir / "file.txt")}})
    assert settings.auth.public_key_file == str(base_dir / "file.txt")
    assert (
        build({"auth": {"algorithms": ["ES256"], "jwks_url": "https://idp/jwks"}}).auth.jwks_url == "https://idp/jwks"
    )


# --------------------------------------------------------------------------- [[storages]]


@pytest.mark.parametrize(
    ("storages", "key"),
    [
        pytest.param({"id": "s1"}, "[[storages]]", id="not-an-array"),
        pytest.param(["s1"], "[[storages]] #1", id="entry-not-a-table"),
        pytest.param([storage(id=DROP)], "[[storages]] #1.id", id="missing-id"),
        pytest.param([storage(bucket=DROP)], ".bucket", id="missing-bucket"),
        pytest.param([storage(project=DROP)], ".project", id="missing-project"),
        pytest.param([storage(type=DROP)], ".type", id="missing-type"),
        pytest.param([storage(credentials="/k.json")], ".credentials", id="unknown-key"),
        pytest.param([storage(type="s3")], ".type", id="bad-type"),
        pytest.param([storage(bucket="Media-Bucket")], ".bucket", id="uppercase-bucket"),
        pytest.param([storage(bucket="ab")], ".bucket", id="bucket-too-short"),
        pytest.param([storage(bucket="_media")], ".bucket", id="bucket-starts-with-underscore"),
        pytest.param([storage(bucket="media-bucket\n")], ".bucket", id="bucket-with-trailing-newline"),
        pytest.param([storage(presign_ttl=0)], ".presign_ttl", id="presign-ttl-zero"),
        pytest.param([storage(presign_ttl=10081)], ".presign_ttl", id="presign-ttl-over-a-week"),
        pytest.param([storage(presign_ttl="15")], ".presign_ttl", id="presign-ttl-string"),
        pytest.param([storage(presign="yes")], ".presign", id="presign-string"),
        pytest.param([storage(presign=True, type="local", root=".")], ".presign", id="presign-needs-gcs"),
        pytest.param([storage(prefix="/media/")], ".prefix", id="prefix-with-leading-slash"),
        pytest.param([storage(type="local")], ".root", id="local-without-root"),
        pytest.param([storage(type="local", root="missing")], ".root", id="local-root-missing"),
        pytest.param([storage(type="local", root="file.txt")], ".root", id="local-root-is-a-file"),
        pytest.param([storage(root="media")], ".root", id="root-for-gcs"),
        pytest.param([storage(), storage(bucket="other-bucket")], "id='s1'", id="duplicate-id"),
    ],
)
def test_storage_errors_name_the_key(storages: Any, key: str, base_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        build({"storages": storages}, base_dir=base_dir)
    assert key in str(caught.value)


def test_storage_error_names_the_storage_id() -> None:
    with pytest.raises(ConfigError, match=r"\[\[storages\]\] id='videos'\.bucket"):
        build({"storages": [storage(id="videos", bucket="Bad")]})


def test_duplicate_storage_id_is_reported_as_such() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        build({"storages": [storage(), storage(project="8")]})


@pytest.mark.parametrize(
    ("overrides", "attribute", "expected"),
    [
        pytest.param({"presign_ttl": 1}, "presign_ttl", 1, id="presign-ttl-min"),
        pytest.param({"presign_ttl": 10080}, "presign_ttl", 10080, id="presign-ttl-max"),
        pytest.param({"project": 1}, "project", "1", id="int-project-is-a-string"),
        pytest.param({"prefix": "media/"}, "prefix", "media/", id="prefix"),
        pytest.param({"bucket": "a.b-c_d"}, "bucket", "a.b-c_d", id="bucket-with-dot-dash-underscore"),
        pytest.param({"presign": False}, "presign", False, id="presign-off"),
        pytest.param({}, "root", None, id="gcs-has-no-root"),
    ],
)
def test_valid_storage(overrides: dict[str, Any], attribute: str, expected: Any) -> None:
    (built,) = build({"storages": [storage(**overrides)]}).storages
    assert getattr(built, attribute) == expected


def test_int_and_string_project_are_the_same_project() -> None:
    settings = build({"storages": [storage(id="a", project=1), storage(id="b", project="1")]})
    assert [s.id for s in settings.storages_of("1")] == ["a", "b"]


@pytest.mark.parametrize(
    "root",
    [
        pytest.param("media", id="relative"),
        pytest.param("./media/../media", id="relative-with-dots"),
        pytest.param("{base}/media", id="absolute"),
    ],
)
def test_local_root_is_resolved_against_base_dir(root: str, base_dir: Path) -> None:
    table = storage(type="local", root=root.format(base=base_dir))
    (built,) = build({"storages": [table]}, base_dir=base_dir).storages
    assert built.root == str((base_dir / "media").resolve())


def test_storages_of_project() -> None:
    settings = build(
        {"storages": [storage(id="a", project="7"), storage(id="b", project="8"), storage(id="c", project="7")]}
    )
    assert [s.id for s in settings.storages_of("7")] == ["a", "c"]
    assert [s.id for s in settings.storages_of("8")] == ["b"]
    assert settings.storages_of("9") == ()


@pytest.mark.parametrize(
    ("prefix", "bucket", "key", "expected"),
    [
        pytest.param("media/", "media-bucket", "media/a.png", True, id="inside-prefix"),
        pytest.param("media/", "media-bucket", "media/deep/a.png", True, id="deep-inside-prefix"),
        pytest.param("media/", "media-bucket", "other/a.png", False, id="outside-prefix"),
        pytest.param("media/", "media-bucket", "a.png", False, id="top-level-outside-prefix"),
        pytest.param("media/", "other-bucket", "media/a.png", False, id="other-bucket"),
        pytest.param("", "media-bucket", "anything/at/all.png", True, id="no-prefix"),
        pytest.param("", "other-bucket", "a.png", False, id="no-prefix-other-bucket"),
    ],
)
def test_storage_holds(prefix: str, bucket: str, key: str, expected: bool) -> None:
    held = StorageSettings(id="s1", project="7", type="gcs", bucket="media-bucket", prefix=prefix)
    assert held.holds(bucket, key) is expected


# --------------------------------------------------------------------------- environment overrides


@pytest.mark.parametrize(
    ("env", "attribute", "expected"),
    [
        pytest.param({"GATEWAY_AUTH_SECRET": "e" * 40}, ("auth", "secret"), "e" * 40, id="secret-overrides-file"),
        pytest.param({"GATEWAY_SERVER_PORT": "9000"}, ("server", "port"), 9000, id="int"),
        pytest.param({"GATEWAY_AUTH_LEEWAY": "1.5"}, ("auth", "leeway"), 1.5, id="float"),
        pytest.param({"GATEWAY_AUTH_ALGORITHMS": "HS256,HS512"}, ("auth", "algorithms"), ("HS256", "HS512"), id="list"),
        pytest.param(
            {"GATEWAY_CORS_ORIGINS": " https://a.example , ,http://b.example:8080 "},
            ("cors", "origins"),
            ("https://a.example", "http://b.example:8080"),
            id="list-whitespace-and-empty-items",
        ),
        pytest.param({"GATEWAY_SERVER_ACCESS_LOG": "false"}, ("server", "access_log"), False, id="bool-false"),
        pytest.param({"GATEWAY_SERVER_ACCESS_LOG": "0"}, ("server", "access_log"), False, id="bool-0"),
        pytest.param({"GATEWAY_SERVER_ACCESS_LOG": "Off"}, ("server", "access_log"), False, id="bool-off"),
        pytest.param({"GATEWAY_AUTH_HEADER": "no"}, ("auth", "header"), False, id="bool-no"),
        pytest.param({"GATEWAY_SERVER_ACCESS_LOG": "TRUE"}, ("server", "access_log"), True, id="bool-true"),
        pytest.param({"GATEWAY_SERVER_ACCESS_LOG": "yes"}, ("server", "access_log"), True, id="bool-yes"),
        pytest.param({"GATEWAY_AUTH_AUDIENCE": "labeling"}, ("auth", "audience"), "labeling", id="optional-string"),
        pytest.param({"GATEWAY_REGISTRY_URL": "sqlite:///x.db"}, ("registry", "url"), "sqlite:///x.db", id="string"),
        pytest.param({"GATEWAY_SERVER_HOST": "0.0.0.0", "OTHER_PORT": "1"}, ("server", "port"), 8080, id="unrelated"),
    ],
)
def test_environment_overrides(env: dict[str, str], attribute: tuple[str, str], expected: Any) -> None:
    section, name = attribute
    settings = build({"server": {"access_log": True}, "auth": {"secret": "f" * 40}}, env=env)
    value = getattr(getattr(settings, section), name)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        pytest.param({"GATEWAY_SERVER_PORT": "abc"}, "GATEWAY_SERVER_PORT", id="int-not-a-number"),
        pytest.param({"GATEWAY_SERVER_PORT": "80.5"}, "GATEWAY_SERVER_PORT", id="int-with-fraction"),
        pytest.param({"GATEWAY_SERVER_PORT": ""}, "GATEWAY_SERVER_PORT", id="int-empty"),
        pytest.param({"GATEWAY_AUTH_LEEWAY": "soon"}, "GATEWAY_AUTH_LEEWAY", id="float-not-a-number"),
        pytest.param({"GATEWAY_SERVER_ACCESS_LOG": "maybe"}, "GATEWAY_SERVER_ACCESS_LOG", id="bool-not-a-bool"),
    ],
)
def test_bad_environment_value_names_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build(env=env)
    assert name in str(caught.value)


@pytest.mark.parametrize("storage_id", [42, "42"])
def test_numeric_storage_ids_are_reserved_for_api_storages(storage_id) -> None:
    with pytest.raises(ConfigError, match=r"id=.*\.id: use a name with a letter"):
        build({"storages": [storage(id=storage_id)]})


def test_environment_values_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match=r"\[auth\]\.algorithms"):
        build(env={"GATEWAY_AUTH_ALGORITHMS": "HS256,none"})


@pytest.mark.parametrize(
    ("storage_id", "variable"),
    [
        pytest.param("s1", "GATEWAY_STORAGE_S1_GOOGLE_APPLICATION_CREDENTIALS", id="simple"),
        pytest.param("media-store.eu", "GATEWAY_STORAGE_MEDIA_STORE_EU_GOOGLE_APPLICATION_CREDENTIALS", id="punct"),
        pytest.param("7b", "GATEWAY_STORAGE_7B_GOOGLE_APPLICATION_CREDENTIALS", id="digit-first"),
    ],
)
def test_storage_credentials_from_environment(storage_id: Any, variable: str) -> None:
    credentials = "/run/secrets/sa-key-do-not-print.json"
    settings = build(
        {"storages": [storage(id=storage_id, google_application_credentials="/from/file.json"), storage(id="other")]},
        env={variable: credentials},
    )
    overridden, other = settings.storages
    assert overridden.google_application_credentials == credentials
    assert other.google_application_credentials is None
    assert credentials not in repr(overridden)
    assert credentials not in repr(settings)


def test_storage_credentials_stay_when_no_variable() -> None:
    (built,) = build({"storages": [storage(google_application_credentials="/from/file.json")]}).storages
    assert built.google_application_credentials == "/from/file.json"
    assert "/from/file.json" not in repr(built)


# --------------------------------------------------------------------------- load_settings

VALID_TOML = f"""
[server]
port = 9000

[auth]
secret = "{SECRET}"

[[storages]]
id = "local"
project = 7
type = "local"
bucket = "media-bucket"
root = "media"
"""


def test_load_settings_reads_toml_and_resolves_root_next_to_file(base_dir: Path) -> None:
    path = base_dir / "gateway.toml"
    path.write_text(VALID_TOML, encoding="utf-8")
    settings = load_settings(path, env={"GATEWAY_SERVER_PORT": "9001"})
    assert settings.source == str(path)
    assert settings.server.port == 9001
    (built,) = settings.storages
    assert (built.project, built.root) == ("7", str((base_dir / "media").resolve()))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param("missing.toml", None, id="missing-file"),
        pytest.param("broken.toml", b"[server\nport = 1\n", id="invalid-toml"),
        pytest.param("dup.toml", b"[server]\nport = 1\nport = 2\n", id="duplicate-key"),
        pytest.param("latin1.toml", '[auth]\nsecret = "caf\u00e9"\n'.encode("latin-1"), id="not-utf8"),
        pytest.param("media", None, id="a-directory"),
    ],
)
def test_load_settings_unreadable_file_names_the_file(name: str, content: bytes | None, base_dir: Path) -> None:
    path = base_dir / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={"GATEWAY_AUTH_SECRET": SECRET})
    assert str(path) in str(caught.value)


def test_load_settings_error_inside_file() -> None:
    with pytest.raises(ConfigError, match=r"\[server\]\.port"):
        load_settings(None, env={"GATEWAY_AUTH_SECRET": SECRET, "GATEWAY_SERVER_PORT": "70000"})


def test_settings_are_immutable() -> None:
    settings = build()
    with pytest.raises(AttributeError):
        settings.server.port = 1  # type: ignore[misc]
    assert isinstance(settings.cors, CorsSettings)


def test_secrets_stay_out_of_reprs_and_type_errors() -> None:
    secret = "s" * 40
    settings = settings_from_dict({"auth": {"secret": secret}}, env={})
    assert secret not in repr(settings)
    key_table = {"private_key": "-----BEGIN PRIVATE KEY-----"}
    raw = {
        "auth": {"secret": secret},
        "storages": [
            {"id": "g", "project": "1", "type": "gcs", "bucket": "bkt", "google_application_credentials": key_table}
        ],
    }
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(raw, env={})
    assert "google_application_credentials" in str(caught.value) and "PRIVATE" not in str(caught.value)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("media", "metadata_cache_size", 0),
        ("auth", "token_cache_size", 0),
        ("registry", "task_cache_size", 0),
        ("media", "cache_control_max_age", -1),
        ("server", "shutdown_timeout", -1.0),
        ("upstream", "idle_timeout", 0.0),
    ],
)
def test_sizes_and_durations_out_of_range_are_refused(section: str, key: str, value: float) -> None:
    raw: dict[str, Any] = {"auth": {"secret": "s" * 40}}
    raw.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=re.escape(f"[{section}].{key}")):
        settings_from_dict(raw, env={})


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("export", "lease_seconds", 0, r"\[export\]\.lease_seconds: expected more than 0"),
        ("export", "batch", 0, r"\[export\]\.batch: expected 1 or more"),
        ("export", "retry_max", 0.5, r"\[export\]\.retry_max: must be at least"),
        ("sync", "batch_size", 5000, r"\[sync\]\.batch_size: at most 1000"),
    ],
)
def test_export_and_sync_limits_are_named(section, key, value, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build({section: {key: value}})
