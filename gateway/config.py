"""Typed settings from one TOML file plus environment overrides, validated once at start-up.

Every problem a user can make in the file is reported as one `ConfigError` line that names the
offending key (`[auth].leeway: expected a number, got 'soon'`), so `gateway check-config` and
`gateway serve` stop before anything listens.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .keyfilter import FilterError, compile_filter

ENV_PREFIX = "GATEWAY_"
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")  # use with fullmatch
SUPPORTED_ALGORITHMS = frozenset(
    {
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    shutdown_timeout: float = 30.0
    access_log: bool = True
    # Connection discipline, the same on both lanes (gateway/fastlane.py): aiohttp's limits for a
    # request head, and the timers no connection is ever without.
    max_line_size: int = 8190  # bytes of the request line (and of any header line)
    max_field_size: int = 8190  # bytes of one header field, name and value
    max_headers: int = 128  # header fields per request
    head_timeout: float = 15.0  # seconds from a request's first byte to its complete head
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection is kept
    send_timeout: float = 60.0  # seconds a client may accept no byte before its connection is closed
    max_connections: int = 10000  # open connections per process; beyond, 503 and close


@dataclass(frozen=True)
class AuthSettings:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = field(default=None, repr=False)
    public_key_file: str | None = None
    private_key_file: str | None = None
    jwks_url: str | None = None
    jwks_cooldown: float = 30.0  # least seconds between key-set refetches caused by an unknown kid
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 30.0
    # Tokens whose exp lies further ahead are refused (there is no revocation list); seconds.
    max_token_lifetime: float = 24 * 3600.0
    header: bool = True
    cookie: str = "gateway_token"
    query_param: str = "token"
    token_cache_size: int = 10000


@dataclass(frozen=True)
class RegistrySettings:
    url: str = "sqlite:///gateway.db"
    task_cache_ttl: float = 60.0
    task_cache_size: int = 100000
    # Keys that encrypt storage credentials given to the API; the first encrypts, all decrypt.
    encryption_keys: tuple[str, ...] = field(default=(), repr=False)
    storage_refresh: float = 2.0  # seconds before a storage created through another replica is served


@dataclass(frozen=True)
class SyncSettings:
    worker: bool = True  # `gateway serve` runs the sync worker in-process (in its first worker)
    concurrency: int = 1  # syncs one worker process runs at once
    poll_interval: float = 1.0
    heartbeat_interval: float = 2.0
    stale_after: float = 60.0  # a running job without heartbeat for this long is re-queued
    max_attempts: int = 3
    page_size: int = 1000  # objects per listing page
    batch_size: int = 1000  # tasks per registry transaction
    max_parquet_bytes: int = 2 * 1024**3  # a Parquet task file is spooled to disk to be read: at most this


@dataclass(frozen=True)
class MediaSettings:
    cache_control_max_age: int = 3600
    metadata_ttl: float = 10.0
    metadata_cache_size: int = 10000
    chunk_size: int = 256 * 1024


@dataclass(frozen=True)
class UpstreamSettings:
    connect_timeout: float = 5.0
    first_byte_timeout: float = 30.0
    idle_timeout: float = 60.0
    retries: int = 3
    retry_backoff: float = 0.1
    pool_size: int = 256
    buffer_size: int = 64 * 1024  # bytes read ahead per stream before reading from GCS pauses
    iam_endpoint: str = "https://iamcredentials.googleapis.com"  # signBlob, for keyless presign identities
    # URLs besides Google's own that credentials given to the storage API may name (token_uri …);
    # exact matches. The config file's credentials are the operator's and are not checked.
    allowed_credential_endpoints: tuple[str, ...] = ()
    signed_url_cache_size: int = 10000


@dataclass(frozen=True)
class CorsSettings:
    origins: tuple[str, ...] = ()
    max_age: int = 600


@dataclass(frozen=True)
class NetworkSettings:
    """Who the client is and which clients may use the gateway (gateway/netguard.py)."""

    client_allowlist: tuple[str, ...] = ()  # CIDRs allowed on every route but /healthz, /readyz; empty = any
    trusted_proxies: tuple[str, ...] = ()  # peers whose forwarded header names the client
    forwarded_header: str = "X-Forwarded-For"  # or "Forwarded" (RFC 7239); only this one is read


@dataclass(frozen=True)
class LimitSettings:
    """Load shedding: concurrent media streams, refused beyond the caps (never queued)."""

    max_streams: int = 1000  # per process; 0 = no cap
    max_streams_per_subject: int = 64  # per token `sub`, per process; 0 = no cap
    retry_after: int = 5  # seconds, in the Retry-After of 503/429 answers
    not_ready_after_shedding: float = 10.0  # seconds /readyz stays 503 after the last refusal at the cap


@dataclass(frozen=True)
class StorageSettings:
    id: str
    project: str
    type: str
    bucket: str
    prefix: str = ""
    presign: bool = False
    presign_ttl: int = 15
    google_application_credentials: str | None = field(default=None, repr=False)
    google_project_id: str | None = None
    root: str | None = None
    # Import (source storage) settings, named as Label Studio names them.
    title: str = ""
    description: str = ""
    regex_filter: str = ""
    use_blob_urls: bool = True
    recursive_scan: bool = False
    data_key: str = "$undefined$"
    sync_interval: int = 0  # seconds between periodic syncs; 0 = only when asked
    client_allowlist: tuple[str, ...] = ()  # CIDRs that may read this storage (besides [network]); empty = any

    @property
    def from_api(self) -> bool:
        """Storages created through the API have numeric ids; config-file ids never are."""
        return self.id.isdigit()

    def holds(self, bucket: str, key: str) -> bool:
        """Whether `gs://bucket/key` lies inside this storage (bucket and prefix)."""
        return bucket == self.bucket and key.startswith(self.prefix)


@dataclass(frozen=True)
class ExportSettings:
    worker: bool = True  # `gateway serve` runs the export worker in-process (in its first worker)
    poll_interval: float = 0.5  # seconds between looks at the outbox (events in this process wake it)
    batch: int = 50  # deliveries leased at once
    concurrency: int = 8  # uploads at once per worker
    lease_seconds: float = 60.0  # a leased delivery is retried by anyone after this (a dead worker)
    retry_base: float = 1.0  # seconds before the first retry of a failed upload, doubled each time
    retry_max: float = 300.0


LAYOUTS = ("annotation", "task")  # Label Studio's target storage layouts


@dataclass(frozen=True)
class ExportStorageSettings:
    """A target storage (Label Studio's "Add Target Storage"): annotations written as JSON objects."""

    id: str
    project: str
    type: str
    bucket: str
    prefix: str = ""
    can_delete_objects: bool = False
    json_extension: bool = False  # `<prefix>/<annotation_id>.json` instead of Label Studio's `<prefix>/<id>`
    # Label Studio's two layouts: "annotation" (`<prefix>/<annotation id>`, the annotation with its
    # task) or "task" (FUTURE_SAVE_TASK_TO_STORAGE: `<prefix>/<task id>`, the task with its annotations)
    layout: str = "annotation"
    google_application_credentials: str | None = field(default=None, repr=False)
    google_project_id: str | None = None
    root: str | None = None
    title: str = ""
    description: str = ""
    presign: bool = False  # never used for export; lets the storage backends treat both kinds alike

    @property
    def from_api(self) -> bool:
        """Target storages created through the API have numeric ids; config-file ids never are."""
        return self.id.isdigit()

    def object_key(self, ident: int) -> str:
        """The key of an annotation's object, or of a task's in the "task" layout."""
        name = f"{ident}.json" if self.json_extension else str(ident)
        return f"{self.prefix}{name}"


@dataclass(frozen=True)
class WebhookSettings:
    """`POST /api/webhooks/label-studio`: a shared secret in a header, or an HMAC-SHA256 signature."""

    secret: str | None = field(default=None, repr=False)  # Label Studio sends it as a static header
    header: str = "X-Gateway-Webhook-Secret"
    hmac_secret: str | None = field(default=None, repr=False)
    signature_header: str = "X-Signature-256"  # "sha256=<hex of HMAC-SHA256(body)>"
    project_map: tuple[str, ...] = ()  # "<Label Studio project id>=<gateway project>"; default: the same id


@dataclass(frozen=True)
class LabelStudioSettings:
    """The `label_studio` authenticator: Label Studio's own credentials on its resolve URLs."""

    url: str | None = None  # Label Studio's base URL as the gateway reaches it; unset: off
    timeout: float = 5.0  # seconds for one access check; Label Studio slower than this → 503
    cache_ttl: float = 30.0  # seconds a granted (credential, task) decision is kept
    negative_cache_ttl: float = 5.0  # seconds a refusal is kept
    cache_size: int = 10000
    session_cookie: str = "sessionid"  # Label Studio's SESSION_COOKIE_NAME
    # An API token of a Label Studio user who can see the annotators (an organisation admin): the
    # export asks Label Studio for `completed_by`'s name and email, as its own target storage writes.
    api_token: str | None = field(default=None, repr=False)
    user_cache_ttl: float = 600.0  # seconds a looked-up user is kept


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    registry: RegistrySettings = RegistrySettings()
    media: MediaSettings = MediaSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    cors: CorsSettings = CorsSettings()
    sync: SyncSettings = SyncSettings()
    webhooks: WebhookSettings = WebhookSettings()
    export: ExportSettings = ExportSettings()
    label_studio: LabelStudioSettings = LabelStudioSettings()
    network: NetworkSettings = NetworkSettings()
    limits: LimitSettings = LimitSettings()
    storages: tuple[StorageSettings, ...] = ()
    export_storages: tuple[ExportStorageSettings, ...] = ()
    source: str = "<defaults>"

    def storages_of(self, project: str) -> tuple[StorageSettings, ...]:
        return tuple(s for s in self.storages if s.project == project)


_SECTIONS = {
    "server": ServerSettings,
    "auth": AuthSettings,
    "registry": RegistrySettings,
    "media": MediaSettings,
    "upstream": UpstreamSettings,
    "cors": CorsSettings,
    "sync": SyncSettings,
    "webhooks": WebhookSettings,
    "export": ExportSettings,
    "label_studio": LabelStudioSettings,
    "network": NetworkSettings,
    "limits": LimitSettings,
}


def load_settings(path: str | os.PathLike[str] | None, env: dict[str, str] | None = None) -> Settings:
    """Read `path` (or only defaults when None), apply `GATEWAY_*` overrides, validate."""
    env = dict(os.environ if env is None else env)
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text (TOML must be UTF-8)") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return settings_from_dict(raw, env, source, base_dir=Path(path).parent if path else Path.cwd())


def settings_from_dict(
    raw: dict[str, Any], env: dict[str, str], source: str = "<dict>", base_dir: Path | None = None
) -> Settings:
    unknown = set(raw) - set(_SECTIONS) - {"storages", "export_storages"}
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}]")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}]: expected a table")
        table = _with_env_overrides(name, cls, table, env)
        sections[name] = _build(cls, table, f"[{name}]")
    storages = _storage_tables(raw, "storages", StorageSettings, _validate_storage, env, base_dir)
    targets = _storage_tables(raw, "export_storages", ExportStorageSettings, _validate_target, env, base_dir)
    settings = Settings(**sections, storages=storages, export_storages=targets, source=source)
    validate(settings)
    return settings


def _storage_tables(
    raw: dict[str, Any], name: str, cls: type, check: Any, env: dict[str, str], base_dir: Path | None
) -> tuple[Any, ...]:
    """An array of storage tables (`[[storages]]`, `[[export_storages]]`), each built and checked."""
    tables = raw.get(name, [])
    if not isinstance(tables, list):
        raise ConfigError(f"[[{name}]]: expected an array of tables")
    built = []
    for index, table in enumerate(tables):
        where = f"[[{name}]] #{index + 1}"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        if "id" in table:
            where = f"[[{name}]] id={table['id']!r}"
            table = _with_storage_env_overrides(table, env)
        built.append(check(_build(cls, table, where), where, base_dir))
    return tuple(built)


def _with_env_overrides(section: str, cls: type, table: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`GATEWAY_AUTH_SECRET=…` overrides `[auth] secret` (strings parsed by the field's type)."""
    table = dict(table)
    for f in dataclasses.fields(cls):
        value = env.get(f"{ENV_PREFIX}{section}_{f.name}".upper())
        if value is not None:
            table[f.name] = _parse_env(value, f.type, f"{ENV_PREFIX}{section}_{f.name}".upper())
    return table


def _with_storage_env_overrides(table: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`GATEWAY_STORAGE_<ID>_GOOGLE_APPLICATION_CREDENTIALS` keeps a key out of the file."""
    ident = re.sub(r"[^A-Za-z0-9]", "_", str(table["id"])).upper()
    value = env.get(f"{ENV_PREFIX}STORAGE_{ident}_GOOGLE_APPLICATION_CREDENTIALS")
    return table if value is None else {**table, "google_application_credentials": value}


def _parse_env(value: str, annotation: Any, name: str) -> Any:
    kind = _base_type(annotation)
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if kind is tuple:
        return [item.strip() for item in value.split(",") if item.strip()]
    if kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    return value


def _base_type(annotation: Any) -> Any:
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    return origin or hint


_SECRET_FIELDS = frozenset({"secret", "hmac_secret", "google_application_credentials", "encryption_keys"})


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"{where}.{name}: required")
            continue
        try:
            values[name] = _coerce(table[name], _base_type(f.type), f"{where}.{name}")
        except ConfigError as exc:
            if name in _SECRET_FIELDS:  # the message would quote the value
                raise ConfigError(f"{where}.{name}: expected a string") from None
            raise exc
    return cls(**values)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if kind is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # project = 1 and project = "1" mean the same project
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported setting type {kind}")  # pragma: no cover


def _validate_storage(s: StorageSettings, where: str, base_dir: Path | None) -> StorageSettings:
    _check_id(s.id, where, " (numeric ids belong to API storages)")
    check_import_fields(s, where)
    s = _checked_place(s, where)
    if s.presign and s.type != "gcs":
        raise ConfigError(f"{where}.presign: signed URLs need type 'gcs'")
    if not 1 <= s.presign_ttl <= 10080:
        raise ConfigError(f"{where}.presign_ttl: minutes between 1 and 10080 (7 days), got {s.presign_ttl}")
    check_cidrs(s.client_allowlist, f"{where}.client_allowlist")
    return _resolved_root(s, where, base_dir)


def _validate_target(s: ExportStorageSettings, where: str, base_dir: Path | None) -> ExportStorageSettings:
    _check_id(s.id, where, " (numeric ids belong to API storages)")
    s = _checked_place(s, where)
    if s.presign:
        raise ConfigError(f"{where}.presign: not a setting of export storages")
    if s.layout not in LAYOUTS:
        raise ConfigError(f"{where}.layout: expected 'annotation' or 'task', got {s.layout!r}")
    return _resolved_root(s, where, base_dir)


def _check_id(ident: str, where: str, hint: str = "") -> None:
    if not ident or ident.isdigit():
        raise ConfigError(f"{where}.id: use a name with a letter in it{hint}")


def _checked_place(s: Any, where: str) -> Any:
    """Type, bucket and prefix of a source or target storage; the prefix ends with '/'."""
    if s.type not in ("gcs", "local"):
        raise ConfigError(f"{where}.type: expected 'gcs' or 'local', got {s.type!r}")
    if not BUCKET_RE.fullmatch(s.bucket):
        raise ConfigError(f"{where}.bucket: {s.bucket!r} is not a valid bucket name")
    if s.prefix.startswith("/"):
        raise ConfigError(f"{where}.prefix: must not start with '/'")
    return dataclasses.replace(s, prefix=normalize_prefix(s.prefix))


def _resolved_root(s: Any, where: str, base_dir: Path | None) -> Any:
    """A local storage's directory, made absolute (relative to the config file) and checked."""
    if s.type == "local":
        if not s.root:
            raise ConfigError(f"{where}.root: required for type 'local'")
        root = Path(s.root)
        if not root.is_absolute() and base_dir is not None:
            root = base_dir / root
        if not root.is_dir():
            raise ConfigError(f"{where}.root: {str(root)!r} is not a directory")
        return dataclasses.replace(s, root=str(root.resolve()))
    if s.root:
        raise ConfigError(f"{where}.root: only for type 'local'")
    return s


def normalize_prefix(prefix: str) -> str:
    """Label Studio's rule: a non-empty prefix names a folder, so it ends with '/'."""
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or one address) as a network; host bits must be zero (`10.1.2.3/8` is a typo).

    IPv4-mapped IPv6 ranges (`::ffff:10.0.0.0/104`) become the IPv4 ones, as clients are compared
    by their IPv4 address (gateway/netguard.py).
    """
    network = ipaddress.ip_network(text.strip(), strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_IPV4_MAPPED):
        return ipaddress.IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


def check_cidrs(cidrs: tuple[str, ...], where: str) -> None:
    """Every entry an IPv4 or IPv6 network (`10.0.0.0/8`, `2001:db8::/32`, or one address)."""
    for cidr in cidrs:
        try:
            parse_network(cidr)
        except ValueError as exc:
            raise ConfigError(f"{where}: {cidr_problem(cidr, exc)}") from None


def cidr_problem(cidr: str, exc: ValueError) -> str:
    if "host bits set" in str(exc):
        return f"{cidr!r} has host bits set (the network is {ipaddress.ip_network(cidr.strip(), strict=False)})"
    return f"{cidr!r} is not an IP network like 10.0.0.0/8 or 2001:db8::/32"


def check_import_fields(s: StorageSettings, where: str) -> None:
    """The import fields, as checked for config-file and API storages alike."""
    try:
        compile_filter(s.regex_filter)
    except FilterError as exc:
        raise ConfigError(f"{where}.regex_filter: {exc}") from None
    if not s.data_key.strip():
        raise ConfigError(f"{where}.data_key: must not be empty")
    if s.sync_interval < 0:
        raise ConfigError(f"{where}.sync_interval: expected 0 (off) or more seconds, got {s.sync_interval}")


def validate(settings: Settings) -> None:
    """Checks across fields; also run after command-line overrides."""
    server, auth = settings.server, settings.auth
    if not 0 < server.port < 65536:
        raise ConfigError(f"[server].port: expected 1-65535, got {server.port}")
    if server.workers < 1:
        raise ConfigError(f"[server].workers: expected at least 1, got {server.workers}")
    if not auth.algorithms:
        raise ConfigError("[auth].algorithms: at least one algorithm is required")
    for alg in auth.algorithms:
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"[auth].algorithms: {alg!r} is not supported (never 'none')")
    wants_hmac = any(a.startswith("HS") for a in auth.algorithms)
    wants_public = any(not a.startswith("HS") for a in auth.algorithms)
    if wants_hmac and not auth.secret:
        raise ConfigError("[auth].secret: required for HS* algorithms (or set GATEWAY_AUTH_SECRET)")
    if wants_hmac and len(auth.secret or "") < 32:
        raise ConfigError("[auth].secret: use at least 32 characters")
    if wants_public and not (auth.public_key_file or auth.jwks_url):
        raise ConfigError("[auth].public_key_file: required for RS/ES/PS/EdDSA algorithms (or jwks_url)")
    for name in ("public_key_file", "private_key_file"):
        path = getattr(auth, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"[auth].{name}: {path!r} is not a readable file")
    if not (auth.header or auth.cookie or auth.query_param):
        raise ConfigError("[auth]: every token source is switched off (header, cookie, query_param)")
    if not settings.registry.url.startswith(("sqlite", "postgresql")):
        scheme = settings.registry.url.partition(":")[0]  # never the rest: it may hold a password
        raise ConfigError(f"[registry].url: expected a sqlite:// or postgresql:// URL, got a {scheme!r} URL")
    media, registry, upstream = settings.media, settings.registry, settings.upstream
    for where, value, minimum in (
        ("[auth].token_cache_size", auth.token_cache_size, 1),
        ("[registry].task_cache_size", registry.task_cache_size, 1),
        ("[media].metadata_cache_size", media.metadata_cache_size, 1),
        ("[upstream].pool_size", upstream.pool_size, 1),
        ("[upstream].signed_url_cache_size", upstream.signed_url_cache_size, 1),
        ("[auth].leeway", auth.leeway, 0),
        ("[auth].max_token_lifetime", auth.max_token_lifetime, 1),
        ("[auth].jwks_cooldown", auth.jwks_cooldown, 0),
        ("[server].shutdown_timeout", server.shutdown_timeout, 0),
        ("[server].max_line_size", server.max_line_size, 256),
        ("[server].max_field_size", server.max_field_size, 256),
        ("[server].max_headers", server.max_headers, 8),
        ("[server].max_connections", server.max_connections, 1),
        ("[media].cache_control_max_age", media.cache_control_max_age, 0),
        ("[media].metadata_ttl", media.metadata_ttl, 0),
        ("[registry].task_cache_ttl", registry.task_cache_ttl, 0),
        ("[upstream].retry_backoff", upstream.retry_backoff, 0),
        ("[upstream].retries", upstream.retries, 0),
        ("[sync].concurrency", settings.sync.concurrency, 1),
        ("[sync].max_attempts", settings.sync.max_attempts, 1),
        ("[sync].page_size", settings.sync.page_size, 1),
        ("[sync].batch_size", settings.sync.batch_size, 1),
        ("[sync].max_parquet_bytes", settings.sync.max_parquet_bytes, 1),
        ("[export].batch", settings.export.batch, 1),
        ("[export].concurrency", settings.export.concurrency, 1),
        ("[label_studio].cache_size", settings.label_studio.cache_size, 1),
        ("[label_studio].cache_ttl", settings.label_studio.cache_ttl, 0),
        ("[label_studio].negative_cache_ttl", settings.label_studio.negative_cache_ttl, 0),
    ):
        if value < minimum:
            raise ConfigError(f"{where}: expected {minimum} or more, got {value}")
    for where, seconds in (
        ("[upstream].connect_timeout", upstream.connect_timeout),
        ("[upstream].first_byte_timeout", upstream.first_byte_timeout),
        ("[upstream].idle_timeout", upstream.idle_timeout),
        ("[registry].storage_refresh", registry.storage_refresh),
        ("[sync].poll_interval", settings.sync.poll_interval),
        ("[sync].heartbeat_interval", settings.sync.heartbeat_interval),
        ("[sync].stale_after", settings.sync.stale_after),
        ("[export].poll_interval", settings.export.poll_interval),
        ("[export].lease_seconds", settings.export.lease_seconds),
        ("[export].retry_base", settings.export.retry_base),
        ("[label_studio].timeout", settings.label_studio.timeout),
        ("[server].head_timeout", server.head_timeout),
        ("[server].keepalive_timeout", server.keepalive_timeout),
        ("[server].send_timeout", server.send_timeout),
    ):
        if seconds <= 0:
            raise ConfigError(f"{where}: expected more than 0 seconds, got {seconds}")
    if settings.media.chunk_size < 4096:
        raise ConfigError("[media].chunk_size: expected at least 4096 bytes")
    if settings.upstream.buffer_size < 4096:
        raise ConfigError("[upstream].buffer_size: expected at least 4096 bytes")
    for url in upstream.allowed_credential_endpoints:
        if not re.match(r"^https?://[^/\s?#@]+(/\S*)?$", url):
            raise ConfigError(f"[upstream].allowed_credential_endpoints: {url!r} is not an http(s) URL")
    for origin in settings.cors.origins:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ConfigError(f"[cors].origins: {origin!r} is not an origin like https://host[:port]")
    network, limits = settings.network, settings.limits
    check_cidrs(network.client_allowlist, "[network].client_allowlist")
    check_cidrs(network.trusted_proxies, "[network].trusted_proxies")
    if network.forwarded_header.lower() not in ("x-forwarded-for", "forwarded"):
        raise ConfigError(
            f"[network].forwarded_header: expected 'X-Forwarded-For' or 'Forwarded', got {network.forwarded_header!r}"
        )
    for where, value in (
        ("[limits].max_streams", limits.max_streams),
        ("[limits].max_streams_per_subject", limits.max_streams_per_subject),
        ("[limits].retry_after", limits.retry_after),
        ("[limits].not_ready_after_shedding", limits.not_ready_after_shedding),
    ):
        if value < 0:
            raise ConfigError(f"{where}: expected 0 or more, got {value}")
    if settings.sync.stale_after <= settings.sync.heartbeat_interval * 2:
        raise ConfigError("[sync].stale_after: must exceed twice [sync].heartbeat_interval")
    if settings.sync.page_size > 1000:
        raise ConfigError("[sync].page_size: GCS lists at most 1000 objects per page")
    if settings.export.retry_max < settings.export.retry_base:
        raise ConfigError("[export].retry_max: must be at least [export].retry_base")
    if settings.sync.batch_size > 1000:
        raise ConfigError("[sync].batch_size: at most 1000 (one statement parameter per task)")
    for key in settings.registry.encryption_keys:
        if len(key) < 32:
            raise ConfigError("[registry].encryption_keys: use keys of at least 32 characters")
    for entry in settings.webhooks.project_map:
        if not re.fullmatch(r"[^=\s]+=[^=\s]+", entry):
            raise ConfigError(f"[webhooks].project_map: {entry!r} is not '<Label Studio project id>=<project>'")
    for name in ("secret", "hmac_secret"):
        if len(getattr(settings.webhooks, name) or "x" * 16) < 16:
            raise ConfigError(f"[webhooks].{name}: use at least 16 characters")
    ls_url = settings.label_studio.url
    if ls_url is not None and not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", ls_url):
        raise ConfigError(f"[label_studio].url: {ls_url!r} is not an http(s) base URL like http://label-studio:8080")
    if not settings.label_studio.session_cookie:
        raise ConfigError("[label_studio].session_cookie: must not be empty")
    seen_targets: set[str] = set()
    for t in settings.export_storages:
        if t.id in seen_targets:
            raise ConfigError(f"[[export_storages]] id={t.id!r}: duplicate id")
        seen_targets.add(t.id)
    seen: set[str] = set()
    for s in settings.storages:
        if s.id in seen:
            raise ConfigError(f"[[storages]] id={s.id!r}: duplicate id")
        seen.add(s.id)
