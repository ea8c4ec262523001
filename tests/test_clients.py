"""The same session through ftplib, aioftp.Client and curl against a real gateway on loopback."""

from __future__ import annotations

import pytest

from tests.clients import CLIENTS, FtpClient
from tests.helpers import GatewayThread, MiB, random_bytes, sha256

DIRECTORY = "dir with space ñ"
FILES = {
    "empty.bin": random_bytes(0),
    "one byte.bin": random_bytes(1, seed=1),
    "ten mib ünïcødé ✓ 名前.bin": random_bytes(10 * MiB, seed=2),
}


@pytest.fixture
def gateway(backend_gateway: GatewayThread) -> GatewayThread:
    return backend_gateway


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest, gateway: GatewayThread) -> FtpClient:
    gateway.add_user("alice", "s3cret pass")
    client: FtpClient = CLIENTS[request.param](gateway.host, gateway.port)
    client.login("alice", "s3cret pass")
    yield client
    client.quit()


def test_session_round_trip(client: FtpClient, gateway: GatewayThread) -> None:
    assert client.pwd() == "/"
    client.mkd(DIRECTORY)
    assert client.list() == {DIRECTORY: ("dir", 0)}
    client.cwd(DIRECTORY)
    assert client.pwd() == f"/{DIRECTORY}"

    for name, data in FILES.items():
        client.stor(name, data)
    expected = {name: ("file", len(data)) for name, data in FILES.items()}
    assert client.list() == expected
    assert client.mlsd() == expected
    for name, data in FILES.items():
        assert sha256(client.retr(name)) == sha256(data), name
    # What landed in the storage is exactly what was sent.
    stored = {name: sha256(data) for name, data in gateway.files.files("alice").items()}
    assert stored == {f"{DIRECTORY}/{n}": sha256(d) for n, d in FILES.items()}

    client.rename("one byte.bin", "renamed ✓.bin")
    listing = client.list()
    assert "one byte.bin" not in listing
    assert listing["renamed ✓.bin"] == ("file", 1)
    assert client.retr("renamed ✓.bin") == FILES["one byte.bin"]

    for name in ["empty.bin", "renamed ✓.bin", "ten mib ünïcødé ✓ 名前.bin"]:
        client.dele(name)
    assert client.list() == {}
    client.cwd("..")
    assert client.pwd() == "/"
    client.rmd(DIRECTORY)
    assert client.list() == {}
    assert client.mlsd() == {}
