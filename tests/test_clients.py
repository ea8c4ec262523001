"""The same session through every client (ftplib and curl passive and active, aioftp, lftp, rclone) against a
real gateway on loopback, on local disk and on S3: a row each of the compatibility matrix."""

from __future__ import annotations

import pytest

from tests.clients import CLIENTS, FtpClient
from tests.helpers import GatewayThread, MiB, random_bytes, sha256

DIRECTORY = "dir with space ñ"
FILES = {
    "empty.bin": random_bytes(0),
    "one byte.bin": random_bytes(1, seed=1),
    "one mib.bin": random_bytes(MiB, seed=3),
    "ten mib ünïcødé ✓ 名前.bin": random_bytes(10 * MiB, seed=2),
    "twenty-mib.bin": random_bytes(20 * MiB, seed=4),
}


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest, backend_gateway: GatewayThread) -> FtpClient:
    backend_gateway.add_user("alice", "s3cret pass")
    client: FtpClient = CLIENTS[request.param](backend_gateway.host, backend_gateway.port)
    client.login("alice", "s3cret pass")
    yield client
    client.quit()


@pytest.mark.matrix
def test_session_round_trip(client: FtpClient, backend_gateway: GatewayThread) -> None:
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
    stored = {name: sha256(data) for name, data in backend_gateway.files.files("alice").items()}
    assert stored == {f"{DIRECTORY}/{n}": sha256(d) for n, d in FILES.items()}

    client.rename("one byte.bin", "renamed ✓.bin")
    listing = client.list()
    assert "one byte.bin" not in listing
    assert listing["renamed ✓.bin"] == ("file", 1)
    assert client.retr("renamed ✓.bin") == FILES["one byte.bin"]

    for name in [*(set(FILES) - {"one byte.bin"}), "renamed ✓.bin"]:
        client.dele(name)
    assert client.list() == {}
    client.cwd("..")
    assert client.pwd() == "/"
    client.rmd(DIRECTORY)
    assert client.list() == {}
    assert client.mlsd() == {}
