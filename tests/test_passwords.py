"""Password checks: argon2id in a pool of its own whose memory goes back to the system, and the cache of correct
logins that spares most of them."""

from __future__ import annotations

import ftplib
import hashlib
import io
import platform
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import argon2
import pytest

from gateway.cli import main
from gateway.users.passwords import Passwords
from tests.clients import ftp_login
from tests.helpers import GatewayThread, gateway_settings, running

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Eight verifications, four at a time, in a pool of four threads; prints how much the RSS grew (MiB).
RSS_AFTER_VERIFICATIONS = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.users.passwords import Passwords, unmap_large_blocks

    def rss_mib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    async def main():
        passwords = Passwords(concurrency=4)
        password_hash = passwords.hash_now("secret")
        if sys.argv[1] == "unmap":
            assert unmap_large_blocks()
        before = rss_mib()
        try:
            assert all(await asyncio.gather(*(passwords.verify(password_hash, "secret") for _ in range(8))))
        finally:
            passwords.close()
        print(rss_mib() - before)

    asyncio.run(main())
    """
)


def rss_growth(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_VERIFICATIONS, mode], capture_output=True, text=True, check=True
    )
    return float(result.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc keeps freed blocks in per-thread arenas; others differ")
def test_argon2_memory_goes_back_to_the_system_after_each_verification() -> None:
    # Without the setting, each hashing thread keeps its 19 MiB (the case the setting exists for) ...
    assert rss_growth("keep") > 19 * 2
    # ... with it, every block is unmapped when freed.
    assert rss_growth("unmap") < 10


def password_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("ftp-password")]


def test_hashing_threads_are_the_servers_own_and_end_with_it(tmp_path: Path) -> None:
    assert password_threads() == []
    with running(gateway_settings(tmp_path)) as gateway:
        gateway.add_user("alice", "right")
        ftp_login(gateway.host, gateway.port, "alice", "right").quit()
        assert password_threads() != []
        assert len(password_threads()) <= server_passwords(gateway).concurrency
    assert password_threads() == []


def server_passwords(gateway: GatewayThread) -> Passwords:
    assert gateway.server is not None
    return gateway.server.user_manager.passwords


# -- the password cache --------------------------------------------------------------------------------------


def verifications(gateway: GatewayThread) -> int:
    """argon2id verifications the gateway has run so far."""
    passwords = server_passwords(gateway)

    async def count() -> int:
        return passwords.verifications

    return gateway.call(count)


def login(gateway: GatewayThread, name: str, password: str) -> None:
    ftp_login(gateway.host, gateway.port, name, password).quit()


def refused(gateway: GatewayThread, name: str, password: str) -> None:
    with pytest.raises(ftplib.error_perm, match="^530"):
        login(gateway, name, password)


def cli(*argv: str, stdin: str = "") -> None:
    """``ftp-gateway ARGV`` as an operator runs it, from outside the gateways."""
    sys.stdin = io.StringIO(stdin)
    try:
        assert main(list(argv)) == 0
    finally:
        sys.stdin = sys.__stdin__


def test_a_second_correct_login_skips_argon2(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "right")
    before = verifications(db_gateway)
    login(db_gateway, "alice", "right")
    assert verifications(db_gateway) == before + 1
    for _ in range(3):
        login(db_gateway, "alice", "right")
    assert verifications(db_gateway) == before + 1


def test_a_wrong_password_always_pays_argon2(db_gateway: GatewayThread) -> None:
    db_gateway.add_user("alice", "right")
    login(db_gateway, "alice", "right")
    before = verifications(db_gateway)
    for attempt in range(1, 4):
        refused(db_gateway, "alice", "wrong")  # the same wrong password each time: failures are not remembered
        assert verifications(db_gateway) == before + attempt
    refused(db_gateway, "nobody", "right")
    assert verifications(db_gateway) == before + 4
    login(db_gateway, "alice", "right")  # the right one is still remembered
    assert verifications(db_gateway) == before + 4


def test_changes_count_at_the_next_login_in_every_gateway(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gateways on one database, each with its own cache; the operator changes alice with the CLI."""
    monkeypatch.delenv("FTP_GATEWAY_CONFIG", raising=False)
    with (
        running(gateway_settings(tmp_path, database_url)) as first,
        running(gateway_settings(tmp_path, database_url)) as second,
    ):
        gateways = (first, second)
        cli("user", "add", "alice", "--password-stdin", "--database", database_url, stdin="old\n")

        def each_logs_in(password: str, *, argon2: bool) -> None:
            for gateway in gateways:
                before = verifications(gateway)
                login(gateway, "alice", password)
                login(gateway, "alice", password)
                assert verifications(gateway) == before + argon2, "argon2 for the first login only, if at all"

        def each_refuses(password: str) -> None:
            for gateway in gateways:
                before = verifications(gateway)
                refused(gateway, "alice", password)
                assert verifications(gateway) == before + 1

        each_logs_in("old", argon2=True)
        each_logs_in("old", argon2=False)

        cli("user", "passwd", "alice", "--password-stdin", "--database", database_url, stdin="new\n")
        each_refuses("old")
        each_logs_in("new", argon2=True)

        cli("user", "disable", "alice", "--database", database_url)
        each_refuses("new")
        cli("user", "enable", "alice", "--database", database_url)
        each_logs_in("new", argon2=True)

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        cli("user", "set", "alice", "--storage", f"file://{elsewhere}", "--database", database_url)
        for number, gateway in enumerate(gateways):
            before = verifications(gateway)
            client = ftp_login(gateway.host, gateway.port, "alice", "new")
            client.stor(f"from-{number}.txt", b"x")
            client.quit()
            assert verifications(gateway) == before + 1
        assert sorted(path.name for path in elsewhere.iterdir()) == ["from-0.txt", "from-1.txt"]

        cli("user", "delete", "alice", "--database", database_url)
        each_refuses("new")


def test_a_user_deleted_and_added_again_is_a_new_user(db_gateway: GatewayThread) -> None:
    """SQLite gives the new row the old one's id (the highest id is reused) and both are at revision 1: only the
    password hash, salted afresh, tells them apart."""
    assert db_gateway.server is not None
    store = db_gateway.server.user_manager.store
    db_gateway.add_user("alice", "old")
    login(db_gateway, "alice", "old")
    old = db_gateway.call(lambda: store.get("alice"))
    db_gateway.call(lambda: store.delete("alice"))
    db_gateway.add_user("alice", "new")
    new = db_gateway.call(lambda: store.get("alice"))
    assert old is not None and new is not None and old.revision == new.revision == 1
    assert (old.id == new.id) == db_gateway.settings.database.url.startswith("sqlite")
    refused(db_gateway, "alice", "old")
    before = verifications(db_gateway)
    login(db_gateway, "alice", "new")
    login(db_gateway, "alice", "new")
    assert verifications(db_gateway) == before + 1


def test_a_remembered_login_is_checked_again_after_the_ttl(tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path, login={"password_cache_ttl": 1.5})) as gateway:
        gateway.add_user("alice", "right")
        login(gateway, "alice", "right")
        remembered = time.monotonic()
        before = verifications(gateway)
        login(gateway, "alice", "right")
        if time.monotonic() - remembered < 1.5:
            assert verifications(gateway) == before
        time.sleep(max(0.0, remembered + 1.6 - time.monotonic()))
        login(gateway, "alice", "right")
        assert verifications(gateway) == before + 1
        login(gateway, "alice", "right")
        assert verifications(gateway) == before + 1


def test_without_the_cache_every_login_pays_argon2(tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path, login={"password_cache": False})) as gateway:
        gateway.add_user("alice", "right")
        assert gateway.server is not None and gateway.server.user_manager.password_cache is None
        before = verifications(gateway)
        for _ in range(3):
            login(gateway, "alice", "right")
        assert verifications(gateway) == before + 3


def everything_in(value: object, seen: set[int] | None = None) -> Iterator[bytes]:
    """Every str and bytes reachable from ``value`` (attributes, slots, containers), as bytes."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, bytes | bytearray):
        yield bytes(value)
    elif isinstance(value, str):
        yield value.encode()
    elif isinstance(value, int | float | bool) or value is None:
        yield str(value).encode()
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from everything_in(key, seen)
            yield from everything_in(item, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from everything_in(item, seen)
    else:
        names = list(getattr(value, "__dict__", {})) + list(getattr(type(value), "__slots__", ()))
        assert names, f"cannot look inside {value!r}"
        for name in names:
            yield from everything_in(getattr(value, name), seen)


def test_the_cache_holds_neither_passwords_nor_plain_hashes_of_them(db_gateway: GatewayThread) -> None:
    passwords = {"alice": "correct horse battery", "bob": "Tr0ub4dor&3"}
    for name, password in passwords.items():
        db_gateway.add_user(name, password)
        login(db_gateway, name, password)
    assert db_gateway.server is not None
    manager = db_gateway.server.user_manager
    cache = manager.password_cache
    assert cache is not None and len(cache) == 2

    async def contents() -> list[bytes]:
        return list(everything_in(cache))

    async def stored_hashes() -> list[str]:
        rows = [await manager.store.get(name) for name in passwords]
        return [row.password_hash for row in rows if row is not None]

    found = b"\n".join(db_gateway.call(contents))
    forbidden = [hash_text.encode() for hash_text in db_gateway.call(stored_hashes)]
    for name, password in passwords.items():
        secret = password.encode()
        forbidden.append(secret)
        for algorithm in ("md5", "sha1", "sha256", "sha512", "blake2b"):
            for text in (secret, name.encode() + secret, name.encode() + b":" + secret):
                digest = hashlib.new(algorithm, text)
                forbidden += [digest.digest(), digest.hexdigest().encode()]
    assert len(forbidden) == 2 + 2 + 2 * 5 * 3 * 2
    assert [item for item in forbidden if item in found] == []
    # The argon2 hash's own digest (its last field, base64) is not there either.
    assert [h for h in forbidden if h.startswith(b"$argon2") and h.rsplit(b"$", 1)[1] in found] == []


def test_a_login_remembered_after_a_rehash_needs_neither_argon2_nor_another_rehash(db_gateway: GatewayThread) -> None:
    assert db_gateway.server is not None
    store = db_gateway.server.user_manager.store
    weaker = argon2.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1, type=argon2.Type.ID)
    db_gateway.call(lambda: store.add("alice", weaker.hash("right")))
    login(db_gateway, "alice", "right")  # verified, then rehashed with the current parameters
    row = db_gateway.call(lambda: store.get("alice"))
    assert row is not None and not server_passwords(db_gateway).needs_rehash(row.password_hash)
    before = verifications(db_gateway)
    login(db_gateway, "alice", "right")
    assert verifications(db_gateway) == before
    again = db_gateway.call(lambda: store.get("alice"))
    assert again is not None and again.password_hash == row.password_hash
