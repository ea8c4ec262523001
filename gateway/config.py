"""Settings: one typed, frozen object built from a TOML file, then ``FTP_GATEWAY_*`` variables, then flags.

Nothing below the CLI reads the environment: ``cli.py`` calls :func:`load_settings` once and hands the
result down to the server, the user store and the storage backends.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway.runtime import EventLoopChoice
from pathio_backends.s3.settings import S3Settings
from pathio_backends.uri import check_uri

ENV_PREFIX = "FTP_GATEWAY_"
ENV_NESTED_DELIMITER = "__"

MiB = 1024 * 1024

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class ConfigError(Exception):
    """A configuration problem, reported to the operator as one line."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PassiveSettings(_Section):
    # Ports the server listens on for passive data connections (PASV/EPSV); open them in the firewall.
    port_min: Port = 30000
    port_max: Port = 30099
    # IPv4 address announced in PASV replies, for a server behind NAT or a load balancer.
    masquerade_address: ipaddress.IPv4Address | None = None

    @model_validator(mode="after")
    def _range(self) -> Self:
        if self.port_min > self.port_max:
            raise ValueError(f"port_min ({self.port_min}) is above port_max ({self.port_max})")
        return self

    @property
    def ports(self) -> range:
        return range(self.port_min, self.port_max + 1)


class DatabaseSettings(_Section):
    # SQLAlchemy URL; sqlite:/// and postgresql:// get their async drivers (aiosqlite, asyncpg).
    url: str = "sqlite:///./ftp-gateway.db"
    # Bound on every query, so a stalled database fails a login instead of hanging it.
    timeout: Seconds = 10.0


class StorageSettings(_Section):
    # Storage of users who have none of their own; "{username}" is replaced by the login name.
    default_uri: str = "file://./ftp-data/{username}"

    @field_validator("default_uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        check_uri(value.replace("{username}", "user"))
        return value


class TransferSettings(_Section):
    # Bytes read from a data connection or a file at a time; aioftp's 8 KiB is ~10x too slow.
    block_size: Annotated[int, Field(ge=4096, le=64 * MiB)] = 1 * MiB
    # Threads that move local-disk transfers with blocking recv/write/sendfile; more transfers than this at
    # once go through the event loop (slower, same result). 0: always the event loop.
    pump_threads: Annotated[int, Field(ge=0, le=1024)] = 64
    # After an upload's data connection ends, the control connection is watched before the commit: a client that
    # was killed closes both, and the control connection's end can come a few ms after the data's. The watch
    # lasts ``close_grace_fraction`` of the upload's own duration, at most ``close_grace`` seconds: a small file
    # is not held up, a long upload (the one a kill most likely hits) waits up to 20 ms.
    close_grace: Annotated[float, Field(ge=0, le=5)] = 0.02
    close_grace_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01


class TimeoutSettings(_Section):
    # A control connection with no command and no transfer for this long is closed (421).
    idle: Seconds = 900.0
    # How long a client has to open the data connection after PASV/EPSV and a transfer command.
    data_connection: Seconds = 30.0
    # A data or control connection that moves no byte for this long is dropped.
    socket: Seconds = 60.0
    # Bound on each storage operation (stat, mkdir, rename, one block of a transfer ...).
    path: Seconds = 30.0
    # On SIGTERM, running transfers may finish for this long; then what is left is aborted (nothing partial).
    drain: Annotated[float, Field(ge=0, le=86400)] = 30.0
    # A connection that has not logged in this many seconds after connecting gets 421 and is closed (a PASS
    # already running finishes first).
    login: Annotated[float, Field(gt=0, le=86400)] = 60.0


class LimitSettings(_Section):
    # Control connections the server accepts at once; the next one gets 421. None: as many as the open-files
    # limit allows (raised to its hard limit at start), after what the passive ports' transfers need.
    max_connections: Annotated[int, Field(ge=1)] | None = None
    # Pause before answering a wrong password, to slow guessing down.
    failed_login_delay: Annotated[float, Field(ge=0, le=60)] = 1.0
    # Wrong passwords after which a session is closed (421).
    max_login_failures: Annotated[int, Field(ge=1)] = 3
    # Control connections one client IP may hold at once; the next one gets 421 (its others go on). 0: no limit.
    max_connections_per_ip: Annotated[int, Field(ge=0)] = 0


class LoginSettings(_Section):
    # Remember correct logins in memory (a keyed hash of name and password, never either): the next login with
    # the same name and password skips argon2id while the user's row is unchanged. Wrong passwords always pay.
    password_cache: bool = True
    # Seconds a remembered login counts; then the password is checked with argon2id again.
    password_cache_ttl: Annotated[float, Field(gt=0, le=86400)] = 300.0
    # Logins remembered at most; the least recently used go first.
    password_cache_size: Annotated[int, Field(ge=1)] = 10000
    # A login writes the user's last-login time only when the stored one is older than this many seconds: under a
    # login storm that spares a database write per login. 0: every login writes it.
    last_login_resolution: Annotated[float, Field(ge=0, le=86400)] = 60.0


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one object per line (time, level, logger, session id, client IP, user, message); "text": for people;
    # "auto": json when stderr is not a terminal.
    format: Literal["auto", "json", "text"] = "auto"
    # Audit events (login, upload, download, delete, rename, mkdir, rmdir), one JSON object per line: "stdout",
    # a file path (appended to), or "off".
    audit: str = "stdout"


class AdminSettings(_Section):
    # HOST:PORT of the admin HTTP endpoint (/healthz, /readyz, /metrics); port 0 picks a free one; "off": none;
    # "unix:PATH": a unix socket (what ``serve --workers`` gives each worker).
    listen: str = "127.0.0.1:9090"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value == "off":
            return value
        if value.startswith("unix:"):
            if not value.removeprefix("unix:"):
                raise ValueError("unix: needs a socket path")
            return value
        parse_host_port(value)
        return value


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocolSettings(_Section):
    # Networks whose connections (control and passive) may start with a PROXY protocol v1/v2 header, as a load
    # balancer sends it; the client address it carries then counts for every per-IP rule. Empty: off.
    trusted: tuple[IPNetwork, ...] = ()
    # A connection from a trusted network without the header is refused (else it counts as its own address, after
    # a wait of up to 0.2 s for a header that does not come: keep it required where every connection has one).
    required: bool = True
    # The whole header must arrive within this many seconds of the connection, or the connection is refused.
    header_timeout: Annotated[float, Field(gt=0, le=60)] = 5.0


class ClusterSettings(_Section):
    # redis:// URL of the registry the replicas share (who handed out which passive port). None: one replica,
    # registry in memory.
    redis_url: str | None = None
    # Address other replicas reach this one on (the pod IP); None: the control listener's host.
    node_address: str | None = None
    # Prefix of every Redis key, so several gateways (or tests) can share one Redis.
    key_prefix: str = "ftp-gateway"
    # Seconds a passive port's claim and a replica's heartbeat live in Redis without being renewed (renewed every
    # third of it): a replica that dies frees its ports after this long.
    claim_ttl: Annotated[float, Field(ge=3, le=3600)] = 30.0
    # Bound on each Redis request; a slower Redis counts as down (ports then come from the local pool).
    redis_timeout: Annotated[float, Field(gt=0, le=60)] = 1.0


class BanSettings(_Section):
    # Failed logins from one client IP within ``window`` seconds that ban it for ``duration`` seconds (its new
    # connections get 421). The same count of failures on one user name only slows that name's logins.
    max_failures: Annotated[int, Field(ge=1)] = 10
    window: Annotated[float, Field(gt=0, le=7 * 86400)] = 600.0
    duration: Annotated[float, Field(gt=0, le=30 * 86400)] = 900.0
    # A slowed user name: every PASS for it first waits limits.failed_login_delay, doubled with each further failure,
    # at most this many seconds (below the 20 s after which FileZilla gives up on a reply). 0: names are not slowed.
    name_delay_max: Annotated[float, Field(ge=0, le=60)] = 10.0
    # IPv6 clients are counted, banned and limited per network of this prefix length (one client's addresses rotate
    # within its /64); IPv4 ones per address. 128: per IPv6 address.
    ipv6_prefix: Annotated[int, Field(ge=48, le=128)] = 64
    # redis:// URL of the store the replicas share. None: cluster.redis_url when set, else this process's memory.
    redis_url: str | None = None
    # Prefix of the bans' Redis keys (``PREFIX:bans:...``); None: cluster.key_prefix.
    key_prefix: str | None = None
    # Bound on each Redis request; a slower or unreachable Redis counts as down (the bans then live in memory).
    redis_timeout: Annotated[float, Field(gt=0, le=60)] = 1.0


class TLSSettings(_Section):
    # FTPS (RFC 4217): the certificate chain (the server's certificate first) and its private key, PEM files; both
    # or neither. SIGHUP reads them again.
    cert_file: Path | None = None
    key_file: Path | None = None
    # USER before AUTH TLS gets 530, a transfer or listing under PROT C gets 521 (a user's own ``tls`` overrides it).
    required: bool = False
    # HOST:PORT of a listener whose connections are TLS from the first byte (implicit FTPS, usually port 990).
    implicit_listen: str | None = None
    # A TLS data connection must resume the control connection's TLS session (vsftpd's require_ssl_reuse): proof
    # that the data connection comes from the client who holds the control connection.
    session_reuse: bool = True
    # Seconds between looks at the certificate files: when one has changed (renewed by cert-manager into a mounted
    # Kubernetes Secret, by certbot ...) they are read again as on SIGHUP. 0: only SIGHUP reloads them.
    reload_interval: Annotated[float, Field(ge=0, le=86400)] = 60.0

    @field_validator("implicit_listen")
    @classmethod
    def _implicit_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @model_validator(mode="after")
    def _certificate(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        if self.cert_file is None:
            if self.required:
                raise ValueError("required = true needs a certificate (cert_file and key_file)")
            if self.implicit_listen is not None:
                raise ValueError("implicit_listen needs a certificate (cert_file and key_file)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    # HOST:PORT of the control connection; port 0 picks a free one (the start-up line names it).
    listen: str = "127.0.0.1:2121"
    welcome_message: str = "ftp-gateway ready"
    # The event loop: uvloop where it is installed ("auto"), else asyncio's own. With TLS, always asyncio's: uvloop's
    # TLS loses the end of an upload whose client resets the connection after its last record (curl, lftp do).
    event_loop: EventLoopChoice = "auto"
    # Processes of ``serve`` sharing the control port (SO_REUSEPORT), each with a slice of the passive range;
    # 0: one per CPU.
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    passive: PassiveSettings = PassiveSettings()
    database: DatabaseSettings = DatabaseSettings()
    storage: StorageSettings = StorageSettings()
    s3: S3Settings = S3Settings()
    transfer: TransferSettings = TransferSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    limits: LimitSettings = LimitSettings()
    login: LoginSettings = LoginSettings()
    log: LogSettings = LogSettings()
    admin: AdminSettings = AdminSettings()
    proxy_protocol: ProxyProtocolSettings = ProxyProtocolSettings()
    cluster: ClusterSettings = ClusterSettings()
    bans: BanSettings = BanSettings()
    tls: TLSSettings = TLSSettings()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _event_loop_for_tls(cls, data: Any) -> Any:
        """``auto`` means asyncio's loop once a certificate is given (see ``event_loop``)."""
        if isinstance(data, dict) and data.get("event_loop", "auto") == "auto":
            tls = data.get("tls")
            cert_file = tls.get("cert_file") if isinstance(tls, dict) else getattr(tls, "cert_file", None)
            if cert_file is not None:
                data = {**data, "event_loop": "asyncio"}
        return data

    @model_validator(mode="after")
    def _uvloop_without_tls(self) -> Self:
        if self.tls.enabled and self.event_loop == "uvloop":
            raise ValueError("event_loop = uvloop does not go with TLS (uvloop's TLS can lose the end of uploads)")
        return self

    @model_validator(mode="after")
    def _control_port_outside_passive_range(self) -> Self:
        port = self.listen_port
        if port and port in self.passive.ports:
            raise ValueError(
                f"listen port {port} lies inside the passive range {self.passive.port_min}-{self.passive.port_max}"
            )
        return self

    @property
    def listen_host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_host_port(self.listen)[1]


def parse_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` to ``(host, port)``; raises ValueError with a readable message."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} is above 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not host.replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return host, port


def parse_port_range(value: str) -> tuple[int, int]:
    low, sep, high = value.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise ValueError(f"expected LOW-HIGH, got {value!r}")
    return int(low), int(high)


def open_file(path: Path, what: str, error: type[ConfigError] = ConfigError) -> BinaryIO:
    """``path`` opened for reading; a file missing, a directory or not readable is ``error``, one line naming
    ``what`` ("config file", "TLS key file") and the path."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise error(f"{what} {str(path)!r} not found") from None
    except IsADirectoryError:
        raise error(f"{what} {str(path)!r} is a directory") from None
    except PermissionError:
        raise error(f"{what} {str(path)!r} is not readable") from None


def read_config_file(path: Path) -> dict[str, Any]:
    with open_file(path, "config file") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings: file < ``FTP_GATEWAY_*`` environment < ``overrides`` (the flags the user gave).

    Raises :class:`ConfigError` with a one-line message naming the offending key or file.
    """
    file_data = read_config_file(config_file) if config_file is not None else {}

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, file_data)

    try:
        return _Layered(**(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, config_file)) from None


def describe_validation_error(exc: ValidationError, config_file: Path | None) -> str:
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"])
        env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in error["loc"]).upper()
        if error["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file else ""
            parts.append(f"unknown setting {key!r}{where}")
            continue
        message = error["msg"].removeprefix("Value error, ")
        origin = f" (from {env_name})" if key and env_name in os.environ else ""
        parts.append(f"{key}{origin}: {message}" if key else message)
    return "invalid configuration: " + "; ".join(parts)
