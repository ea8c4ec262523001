"""``ftp-gateway dev``: the gateway on an S3 server inside the process (moto), with one ``demo`` user.

For trying the gateway and for developing it: nothing to install or configure. moto keeps the bucket in
memory, so the files are gone when the command stops; the users stay in ``--data-dir`` if one is given.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from gateway.config import DatabaseSettings, Settings, StorageSettings, TLSSettings
from gateway.server import GatewayServer, format_address, listening_lines
from gateway.users.passwords import Passwords
from gateway.users.store import UserChanges, UserExists, UserStore
from pathio_backends.s3.settings import S3Settings

logger = logging.getLogger(__name__)

BUCKET = "ftp-gateway-dev"
DEMO_USER = "demo"
# moto accepts any credentials; these are what `aws s3 ls` needs to be given as well.
ACCESS_KEY = "dev"
SECRET_KEY = "dev-secret"  # noqa: S105 - for the in-process S3 only


class MotoMissing(Exception):
    pass


@contextmanager
def in_process_s3() -> Iterator[str]:
    """moto's S3 on a free loopback port, with the dev bucket; yields its endpoint URL."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise MotoMissing(f"ftp-gateway dev needs moto: pip install 'ftp-gateway[dev]' ({exc})") from None
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        try:
            client.create_bucket(Bucket=BUCKET)
        finally:
            client.close()
        yield endpoint
    finally:
        server.stop()


def dev_settings(settings: Settings, endpoint: str, data_dir: Path, database_given: bool) -> Settings:
    changes: dict[str, Any] = {
        "storage": StorageSettings(default_uri=f"s3://{BUCKET}/{{username}}"),
        "s3": S3Settings(
            endpoint_url=endpoint,
            region="us-east-1",
            addressing_style="path",
            access_key_id=ACCESS_KEY,
            secret_access_key=SecretStr(SECRET_KEY),
        ),
    }
    if not database_given:
        changes["database"] = DatabaseSettings(url=f"sqlite:///{data_dir / 'users.db'}")
    return settings.model_copy(update=changes)


async def ensure_demo_user(store: UserStore, passwords: Passwords, password: str) -> None:
    password_hash = await passwords.hash(password)
    try:
        await store.add(DEMO_USER, password_hash)
    except UserExists:
        await store.change(DEMO_USER, UserChanges(password_hash=password_hash, enabled=True))


def self_signed_certificate(directory: Path) -> TLSSettings:
    """A key and a self-signed certificate for 127.0.0.1, ::1 and localhost, valid for a week, written to
    ``directory`` (the key readable by its owner only): for ``dev --tls``, which clients accept with ``-k``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:
        raise MotoMissing(f"ftp-gateway dev --tls needs cryptography: pip install 'ftp-gateway[dev]' ({exc})") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ftp-gateway dev")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    names.append(x509.IPAddress(ipaddress.ip_address("::1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "dev-cert.pem", directory / "dev-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TLSSettings(cert_file=cert_file, key_file=key_file)


@contextmanager
def environment(
    settings: Settings, data_dir: Path | None, database_given: bool, tls: bool = False
) -> Iterator[tuple[Settings, str]]:
    """The data directory and the in-process S3; yields the settings that point at them and S3's endpoint.
    ``tls``: explicit FTPS with a self-signed certificate made in the data directory."""
    with _data_dir(data_dir) as directory, in_process_s3() as endpoint:
        configured = dev_settings(settings, endpoint, directory, database_given)
        if tls:
            tls_settings = self_signed_certificate(directory)
            configured = configured.model_copy(update={"tls": tls_settings, "event_loop": "asyncio"})
        yield configured, endpoint


@contextmanager
def _data_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="ftp-gateway-dev-") as directory:
        yield Path(directory)


def when_ready(settings: Settings, endpoint: str, password: str) -> Callable[[GatewayServer], Awaitable[None]]:
    async def ready(server: GatewayServer) -> None:
        await ensure_demo_user(server.user_manager.store, server.user_manager.passwords, password)
        announce(server, settings, endpoint, password)

    return ready


def announce(server: GatewayServer, settings: Settings, endpoint: str, password: str) -> None:
    address = format_address(settings.listen_host, server.server_port)
    print(f"login: {DEMO_USER} / {password}", flush=True)
    print(f"S3 endpoint: {endpoint}  bucket: {BUCKET}  (files of user X under s3://{BUCKET}/X/)", flush=True)
    print(
        f"  AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY} "
        f"aws s3 ls --recursive --endpoint-url {endpoint} s3://{BUCKET}/",
        flush=True,
    )
    # -k: the certificate is self-signed (dev --tls made it).
    tls = "--ssl-reqd -k " if settings.tls.enabled else ""
    print(f"try: curl {tls}-T somefile ftp://{DEMO_USER}:{password}@{address}/", flush=True)
    sys.stdout.write(listening_lines(settings, server.server_port, server.admin_url, server.implicit_port))
    sys.stdout.flush()
