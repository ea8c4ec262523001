"""Bans and per-IP limits (issue 13, items 2 and 3): wrong passwords from 127.0.0.2 get it banned (421 at connect)
while 127.0.0.1 logs in throughout; a second gateway on the same Redis refuses it too; the ban expires; ``ban
list``/``ban delete``; a Redis that does not answer leaves the bans in memory; a slowed user name still logs in;
every connection the server refuses gets 421 first."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway import cli
from gateway.audit import AuditLog
from gateway.bans import Bans, BanStoreError, Failure, FallbackStore, MemoryStore, ban_key, client_key, redis_store
from gateway.config import BanSettings
from gateway.config_permissions import secrets_in
from gateway.metrics import Metrics
from tests.helpers import (
    GatewayThread,
    free_passive_range,
    gateway_settings,
    missing,
    running,
    stop_server,
    wait_until,
)

REDIS_URL = os.environ.get("FTP_GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ATTACKER = "127.0.0.2"
# Small numbers, so that a test takes a second or two: five failures in ten seconds ban for two.
BANS = {"max_failures": 5, "window": 10, "duration": 2, "name_delay_max": 0.3}
LIMITS = {"failed_login_delay": 0.01}


@pytest.fixture
def redis_bans() -> dict[str, Any]:
    """The test Redis, under a key prefix of this test's own."""
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError:
        missing("Redis on 127.0.0.1:6379")
    return {**BANS, "redis_url": REDIS_URL, "key_prefix": f"test-bans-{uuid.uuid4().hex}"}


def connect(gateway: GatewayThread, source: str) -> ftplib.FTP:
    """A control connection from ``source``; ftplib raises error_temp when the greeting is a 421."""
    ftp = ftplib.FTP(source_address=(source, 0))
    try:
        ftp.connect(gateway.host, gateway.port, timeout=10)
    except BaseException:
        ftp.close()
        raise
    return ftp


def refused(gateway: GatewayThread, source: str) -> str | None:
    """The 421 a new connection from ``source`` gets (after which the server has closed it), or None."""
    try:
        ftp = connect(gateway, source)
    except ftplib.error_temp as exc:
        return str(exc)
    ftp.close()
    return None


def wrong_password(gateway: GatewayThread, source: str, name: str = "alice") -> str:
    """One wrong password on a new connection: the reply (530, or 421 when it closes); ``refused`` if the
    connection itself got 421."""
    try:
        ftp = connect(gateway, source)
    except ftplib.error_temp as exc:
        return "refused " + str(exc)
    try:
        ftp.login(name, "wrong")
    except (ftplib.error_perm, ftplib.error_temp) as exc:
        return str(exc)
    finally:
        ftp.close()
    raise AssertionError("a wrong password logged in")


def good_login(gateway: GatewayThread) -> None:
    ftp = connect(gateway, "127.0.0.1")
    try:
        assert ftp.login("alice", "secret").startswith("230")
        ftp.quit()
    finally:
        ftp.close()


@contextlib.contextmanager
def serve(tmp_path: Path, config: Path) -> Iterator[int]:
    """``ftp-gateway serve`` with ``config``, in a process of its own; its control port."""
    low, high = free_passive_range(10)
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ftp-gateway")), "serve", "--workers", "1", "--config", str(config),
         "--listen", "127.0.0.1:0", "--admin-listen", "off", "--passive-ports", f"{low}-{high}",
         "--database", f"sqlite:///{tmp_path / 'third.db'}", "--storage", f"file://{tmp_path}/third/{{username}}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on ftp://127.0.0.1:"), line
        yield int(line.rsplit(":", 1)[1])
    finally:
        stop_server(process)
        if process.stdout is not None:
            process.stdout.close()


def refusals(gateway: GatewayThread, reason: str) -> float:
    assert gateway.server is not None
    value = gateway.server.metrics.registry.get_sample_value(
        "ftp_gateway_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


def test_thirty_wrong_passwords_ban_the_ip_not_the_user_and_the_ban_expires(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    settings = gateway_settings(tmp_path, bans=BANS, limits=LIMITS, log={"audit": str(audit)})
    with running(settings) as gateway:
        gateway.add_user("alice")
        replies = []
        for _ in range(30):
            replies.append(wrong_password(gateway, ATTACKER))
            good_login(gateway)  # the user, from another address, throughout
        # Four 530s, the fifth failure closes with 421, and every connection after it is refused at once.
        assert [r[:3] for r in replies[:4]] == ["530"] * 4, replies
        assert replies[4].startswith("421 Too many failed logins from your address"), replies
        assert all(r.startswith("refused 421 Too many failed logins") for r in replies[5:]), replies
        assert refusals(gateway, "banned") == 25
        # The ban ends after bans.duration (2 s): a wrong password is answered 530 again.
        wait_until(lambda: refused(gateway, ATTACKER) is None, timeout=5, what="the ban to expire")
        assert wrong_password(gateway, ATTACKER).startswith("530")
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    bans = [e for e in events if e["event"] == "ban"]
    assert [(e["client_ip"], e["failures"]) for e in bans] == [(ATTACKER, 5)]
    refused_events = [e for e in events if e["event"] == "refused"]
    # 25 in the loop, and those of the wait for the expiry.
    assert len(refused_events) >= 25 and {e["reason"] for e in refused_events} == {"banned"}


def test_two_gateways_share_the_bans_in_redis_and_ban_cli_lists_and_lifts_them(
    tmp_path: Path, redis_bans: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    first_settings = gateway_settings(tmp_path / "a", bans=redis_bans, limits=LIMITS)
    second_settings = gateway_settings(tmp_path / "b", bans=redis_bans, limits=LIMITS)
    config = tmp_path / "ban.toml"
    config.write_text(
        f'[bans]\nredis_url = "{REDIS_URL}"\nkey_prefix = "{redis_bans["key_prefix"]}"\nmax_failures = 5\n'
    )
    with running(first_settings) as first, running(second_settings) as second, serve(tmp_path, config) as third:
        first.add_user("alice")
        second.add_user("alice")
        replies = [wrong_password(first, ATTACKER) for _ in range(4)] + [wrong_password(second, ATTACKER)]
        assert replies[-1].startswith("421 Too many failed logins from your address"), replies
        for gateway in (first, second):
            assert (refused(gateway, ATTACKER) or "").startswith("421 Too many failed logins"), gateway.port
            good_login(gateway)
        # A gateway in a process of its own (``ftp-gateway serve``) on the same Redis refuses the address too.
        with ftplib.FTP(source_address=(ATTACKER, 0)) as ftp, pytest.raises(ftplib.error_temp, match="^421 Too many"):
            ftp.connect("127.0.0.1", third, timeout=10)

        assert cli.main(["ban", "list", "--config", str(config)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split() == ["IP", "REMAINING", "FAILURES"]
        assert out[1].split()[0::2] == [ATTACKER, "5"], out
        # alice collected the five failures too: slowed, and listed as such.
        assert out[-2:][0].startswith("NAME") and out[-1].split() == ["alice", "5"], out

        assert cli.main(["ban", "delete", ATTACKER, "--config", str(config)]) == 0
        assert capsys.readouterr().out == f"ban of {ATTACKER} lifted\n"
        assert refused(first, ATTACKER) is None and refused(second, ATTACKER) is None
        assert cli.main(["ban", "delete", ATTACKER, "--config", str(config)]) == 2
        assert capsys.readouterr().err == f"ftp-gateway: error: {ATTACKER} is not banned\n"
        assert cli.main(["ban", "list", "--config", str(config)]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "no IP is banned"


def test_ban_cli_refuses_a_bad_ip_and_says_where_memory_bans_live(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ban", "delete", "300.1.2.3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid IP address '300.1.2.3'" in err
    config = tmp_path / "none.toml"
    config.write_text("")
    assert cli.main(["ban", "list", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "memory of the serving process" in err
    # A password in the bans' Redis URL makes a readable config file a warning, as the other URLs do.
    assert secrets_in({"bans": {"redis_url": "redis://:pw@redis:6379/0"}}) == ["bans.redis_url"]


def test_an_unreachable_redis_leaves_the_bans_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bans = {**BANS, "redis_url": "redis://127.0.0.1:1/0", "redis_timeout": 0.5}
    with (
        caplog.at_level(logging.ERROR, logger="gateway.bans"),
        running(gateway_settings(tmp_path, bans=bans, limits=LIMITS)) as gateway,
    ):
        gateway.add_user("alice")
        replies = [wrong_password(gateway, ATTACKER) for _ in range(5)]
        assert replies[-1].startswith("421 Too many failed logins from your address"), replies
        assert (refused(gateway, ATTACKER) or "").startswith("421 Too many failed logins")
        good_login(gateway)
    down = [r for r in caplog.records if "ban store" in r.getMessage()]
    assert len(down) == 1, [r.getMessage() for r in down]


def test_a_slowed_user_name_still_logs_in(tmp_path: Path) -> None:
    """Failures on alice from several addresses, none banned (two each), pass max_failures (3): every login as
    alice then waits, doubling from 0.01 s up to name_delay_max (0.1 s), the owner's too, and the owner logs in."""
    settings = gateway_settings(tmp_path, bans={**BANS, "max_failures": 3, "name_delay_max": 0.1}, limits=LIMITS)
    with running(settings) as gateway:
        gateway.add_user("alice")
        good_login(gateway)  # argon2id paid once; the next right password is remembered
        for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"):
            for _ in range(2):
                assert wrong_password(gateway, source).startswith("530")
        started = time.monotonic()
        good_login(gateway)
        assert 0.1 <= time.monotonic() - started < 3


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[GatewayThread]:
    settings = gateway_settings(tmp_path, limits={"max_connections_per_ip": 2, "max_connections": 4})
    with running(settings) as gateway:
        gateway.add_user("alice")
        yield gateway


def test_past_the_per_ip_limit_only_the_newcomer_gets_421(limited: GatewayThread) -> None:
    first, second = connect(limited, ATTACKER), connect(limited, ATTACKER)
    try:
        first.login("alice", "secret")
        assert (refused(limited, ATTACKER) or "").startswith("421 Too many connections from your address")
        good_login(limited)  # another address is not limited
        assert first.voidcmd("NOOP").startswith("200") and second.voidcmd("NOOP").startswith("200")
        second.quit()
        wait_until(lambda: refused(limited, ATTACKER) is None, timeout=5, what="the closed session to count")
    finally:
        first.close()
        second.close()
    assert refusals(limited, "per_ip_limit") >= 1


def test_past_the_server_limit_the_newcomer_gets_421_then_eof(limited: GatewayThread) -> None:
    """aioftp's own limit (limits.max_connections = 4) answers 421 before it closes, and is counted."""
    open_ = [connect(limited, source) for source in ("127.0.0.1", "127.0.0.1", ATTACKER, "127.0.0.3")]
    try:
        sock = socket.create_connection((limited.host, limited.port), timeout=10, source_address=("127.0.0.4", 0))
        with sock, sock.makefile("rb") as reply:
            assert reply.readline() == b"421 Too many connections\r\n"
            assert reply.readline() == b""
        assert open_[0].voidcmd("NOOP").startswith("200")
    finally:
        for ftp in open_:
            ftp.close()
    assert refusals(limited, "max_connections") == 1


# -- the stores, without a server -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_memory_store_counts_in_a_sliding_window_and_bans_expire() -> None:
    clock = Clock()
    store = MemoryStore(BanSettings(max_failures=3, window=10, duration=5), clock)

    async def scenario() -> None:
        assert not (await store.failure("10.0.0.1", "bob")).banned
        clock.now += 8
        assert not (await store.failure("10.0.0.1", "bob")).banned
        clock.now += 3  # the first failure has left the window
        assert not (await store.failure("10.0.0.1", "eve")).banned
        assert await store.check("10.0.0.1", "bob") == (None, 1)
        banning = await store.failure("10.0.0.1", "bob")
        assert (banning.banned, banning.newly, banning.ip_failures, banning.name_failures) == (True, True, 3, 2)
        assert await store.banned("10.0.0.2") is None
        assert await store.banned("10.0.0.1") == 5
        assert [(b.ip, b.failures) for b in await store.bans()] == [("10.0.0.1", 3)]
        clock.now += 5
        assert await store.banned("10.0.0.1") is None
        assert not await store.delete("10.0.0.1")

    asyncio.run(scenario())


def test_the_name_delay_doubles_up_to_its_cap() -> None:
    settings = gateway_settings(
        Path("/nonexistent"), bans={"max_failures": 3, "name_delay_max": 10}, limits={"failed_login_delay": 1}
    )
    bans = Bans(settings, Metrics(), AuditLog("off"))
    assert [bans.name_delay(n) for n in (0, 2, 3, 4, 5, 7, 50)] == [0, 0, 1, 2, 4, 10, 10]


class FlakyShared(MemoryStore):
    """A shared store that can be switched off, as a Redis that stops answering."""

    def __init__(self) -> None:
        super().__init__(BanSettings(max_failures=2))
        self.up = True
        self.asked = 0

    async def banned(self, ip: str) -> float | None:
        self.asked += 1
        if not self.up:
            raise BanStoreError("Redis unreachable: test")
        return await super().banned(ip)

    async def failure(self, ip: str, name: str | None) -> Failure:
        if not self.up:
            raise BanStoreError("Redis unreachable: test")
        return await super().failure(ip, name)


def test_fallback_store_uses_memory_while_redis_is_down_and_goes_back(caplog: pytest.LogCaptureFixture) -> None:
    shared = FlakyShared()
    store = FallbackStore(shared, MemoryStore(BanSettings(max_failures=2)), retry_after=0.2)

    async def scenario() -> None:
        shared.up = False
        await store.failure("10.0.0.1", "bob")
        assert (await store.failure("10.0.0.1", "bob")).newly  # counted in memory
        assert await store.banned("10.0.0.1") is not None
        asked = shared.asked
        assert await store.banned("10.0.0.9") is None
        assert shared.asked == asked  # not asked again before retry_after
        shared.up = True
        await asyncio.sleep(0.25)
        assert await store.banned("10.0.0.9") is None
        assert shared.asked == asked + 1 and not store.down
        assert await store.banned("10.0.0.1") is not None  # the ban made in memory holds

    with caplog.at_level(logging.WARNING, logger="gateway.bans"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("counting failed logins in this process's memory" in m for m in messages) == 1, messages
    assert "ban store: Redis reachable again" in messages


def test_serve_flags_and_the_cluster_redis_as_the_bans_store(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        ["serve", "--max-connections-per-ip", "3", "--ban-redis-url", "redis://bans:6379/1"]
    )
    settings = cli.settings_from(args)
    assert settings.limits.max_connections_per_ip == 3 and settings.bans.redis_url == "redis://bans:6379/1"
    # Unset, the bans go where the cluster's registry is, under its key prefix.
    clustered = gateway_settings(tmp_path, cluster={"redis_url": "redis://shared:6379/0", "key_prefix": "east"})
    store = redis_store(clustered)
    assert store is not None and store.prefix == "east:bans:"
    asyncio.run(store.aclose())
    assert redis_store(gateway_settings(tmp_path)) is None


# -- the review of the bans: parallel guesses, made-up names, IPv6 networks -----------------------------------


def logins(gateway: GatewayThread, result: str) -> float:
    assert gateway.server is not None
    value = gateway.server.metrics.registry.get_sample_value("ftp_gateway_logins_total", {"result": result})
    return value or 0.0


def test_parallel_wrong_passwords_from_one_ip_get_no_more_checks_than_max_failures(tmp_path: Path) -> None:
    """Ten connections from one address send a wrong PASS at once: its PASS take turns, so the third failure
    bans it and the seven others get 421 without their password being checked."""
    settings = gateway_settings(tmp_path, bans={**BANS, "max_failures": 3}, limits=LIMITS)
    with running(settings) as gateway:
        gateway.add_user("alice")
        sessions = [connect(gateway, ATTACKER) for _ in range(10)]
        try:
            for ftp in sessions:
                assert ftp.sendcmd("USER alice").startswith("331")
            for ftp in sessions:
                ftp.putcmd("PASS wrong")
            replies = sorted(ftp.getline()[:3] for ftp in sessions)
        finally:
            for ftp in sessions:
                ftp.close()
        assert logins(gateway, "failure") == 3, replies  # passwords checked
        assert replies == ["421"] * 8 + ["530"] * 2
        assert (refused(gateway, ATTACKER) or "").startswith("421 Too many failed logins")
        good_login(gateway)
        assert gateway.server is not None and gateway.server.bans._turns == {}


def test_login_turns_are_per_ip_and_forgotten_when_unused() -> None:
    settings = gateway_settings(Path("/nonexistent"), bans={"ipv6_prefix": 64})
    bans = Bans(settings, Metrics(), AuditLog("off"))
    order: list[str] = []

    async def login(host: str, tag: str) -> None:
        async with bans.login_turn(host):
            order.append(f"{tag}+")
            await asyncio.sleep(0.05)
            order.append(f"{tag}-")

    async def scenario() -> None:
        # a and b in one IPv6 /64 take turns; c (another address) is not held up by them.
        await asyncio.gather(login("2001:db8::1", "a"), login("2001:db8::2", "b"), login("10.0.0.1", "c"))
        assert order.index("b+") > order.index("a-") and order.index("c+") < order.index("a-"), order
        assert bans._turns == {}
        # A PASS cancelled while it waits for its turn (its connection closed) leaves nothing behind either.
        holder = asyncio.create_task(login("10.0.0.1", "d"))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(login("10.0.0.1", "e"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await holder
        assert "e+" not in order and bans._turns == {}

    asyncio.run(scenario())


def test_made_up_user_names_are_not_counted_per_name_and_are_shortened_in_logs(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    settings = gateway_settings(tmp_path, bans={**BANS, "max_failures": 3}, limits=LIMITS, log={"audit": str(audit)})
    long_name = "x" * 5000
    with running(settings) as gateway:
        gateway.add_user("alice")
        for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
            assert wrong_password(gateway, source, long_name).startswith("530")
            assert wrong_password(gateway, source, "bad name!").startswith("530")
        assert gateway.server is not None
        bans = gateway.server.bans
        assert gateway.call(bans.store.names) == []  # six failures, no name kept
        assert gateway.call(lambda: bans.before_login("127.0.0.6", long_name)) == (False, 0.0)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    failed = [e for e in events if e["event"] == "login" and e["result"] == "failed"]
    assert len(failed) == 6 and {e["user"] for e in failed} == {"x" * 64 + "…", "bad name!"}
    assert max(len(line) for line in audit.read_text().splitlines()) < 1000


def test_names_that_could_be_users_are_counted_and_slowed_invalid_ones_never() -> None:
    settings = gateway_settings(
        Path("/nonexistent"), bans={"max_failures": 2, "name_delay_max": 5}, limits={"failed_login_delay": 1}
    )
    bans = Bans(settings, Metrics(), AuditLog("off"))

    async def scenario() -> None:
        for index, name in enumerate(["alice", "alice", "a" * 65, "a" * 65, "x\r\ny", "x\r\ny"]):
            await bans.failed(f"10.0.0.{index}", name)
        assert await bans.before_login("10.0.0.9", "alice") == (False, 1.0)
        assert await bans.before_login("10.0.0.9", "a" * 65) == (False, 0.0)
        assert [(n.name, n.failures) for n in await bans.store.names()] == [("alice", 2)]

    asyncio.run(scenario())


def test_ipv6_clients_are_banned_per_network_ipv4_per_address() -> None:
    settings = gateway_settings(Path("/nonexistent"), bans={"max_failures": 3})
    assert settings.bans.ipv6_prefix == 64
    bans = Bans(settings, Metrics(), AuditLog("off"))

    async def scenario() -> None:
        # Three addresses of one /64, each failing once: the network is banned, the next /64 is not.
        assert [await bans.failed(f"2001:db8:1:2::{n}", "alice") for n in (1, 2, 3)] == [False, False, True]
        assert (await bans.refusal("2001:db8:1:2:ffff::9") or ("",))[0] == "banned"
        assert await bans.refusal("2001:db8:1:3::1") is None
        # IPv4-mapped IPv6 is the IPv4 address; IPv4 neighbours are not banned with it.
        for _ in range(3):
            await bans.failed("::ffff:10.0.0.1", "alice")
        assert (await bans.refusal("10.0.0.1") or ("",))[0] == "banned"
        assert await bans.refusal("10.0.0.2") is None
        assert [b.ip for b in await bans.store.bans()] == ["10.0.0.1", "2001:db8:1:2::/64"]
        assert await bans.store.delete(ban_key("2001:db8:1:2::abcd", 64))
        assert await bans.refusal("2001:db8:1:2::1") is None

    asyncio.run(scenario())
    assert client_key("2001:db8::1", 128) == "2001:db8::1" and client_key("2001:db8:0:ff::1", 48) == "2001:db8::/48"
    assert ban_key("2001:db8:1:2::/64", 64) == ban_key("2001:db8:1:2::7/64", 64) == "2001:db8:1:2::/64"
    assert ban_key("::ffff:10.0.0.1", 64) == ban_key("10.0.0.1/32", 64) == "10.0.0.1"
    with pytest.raises(ValueError, match="/64 network"):
        ban_key("2001:db8::/48", 64)
    for bad in (47, 129):
        with pytest.raises(ValidationError):
            BanSettings(ipv6_prefix=bad)


def test_ban_cli_lists_and_lifts_an_ipv6_network(
    tmp_path: Path, redis_bans: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The Redis store keyed by network (and a failure with no name counted), read by ``ban list`` / ``delete``."""
    config = tmp_path / "ban.toml"
    config.write_text(
        f'[bans]\nredis_url = "{REDIS_URL}"\nkey_prefix = "{redis_bans["key_prefix"]}"\nmax_failures = 2\n'
    )
    settings = gateway_settings(tmp_path, bans={**redis_bans, "max_failures": 2})
    store = redis_store(settings)
    assert store is not None
    key = client_key("2001:db8:1:2::5", 64)

    async def fail_twice() -> list[Failure]:
        try:
            return [await store.failure(key, None), await store.failure(key, None)]
        finally:
            await store.aclose()

    first, second = asyncio.run(fail_twice())
    assert (first.banned, first.name_failures, second.newly, second.ip_failures) == (False, 0, True, 2)
    assert cli.main(["ban", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0::2] == ["2001:db8:1:2::/64", "2"] and len(out) == 2, out
    assert cli.main(["ban", "delete", "2001:db8:1:2::/48", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(bans.ipv6_prefix)" in err
    assert cli.main(["ban", "delete", "2001:db8:1:2::abcd", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "ban of 2001:db8:1:2::/64 lifted\n"
    with pytest.raises(SystemExit):
        cli.main(["ban", "delete", "2001:db8::/300"])
    assert "invalid IP network '2001:db8::/300'" in capsys.readouterr().err
