"""PROXY protocol v1/v2: the parser on its own (hypothesis), then a gateway behind a "load balancer" on
127.0.0.1 whose headers claim other client addresses (any 127.0.0.0/8 address is this machine)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.proxy_protocol import (
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    read_header,
)
from tests.helpers import GatewayThread, gateway_settings, random_bytes, running, sha256

# -- the parser -----------------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


def parse(data: bytes) -> tuple[ProxyHeader, bytes]:
    """Read a header from ``data`` as a connection would deliver it; what follows it stays unread."""

    async def run() -> tuple[ProxyHeader, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        header = await read_header(reader)
        return header, await reader.read()

    return asyncio.run(run())


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports, st.binary(max_size=64))
def test_v1_and_v2_carry_the_addresses_and_leave_the_payload(
    hosts: tuple[str, str], sport: int, dport: int, payload: bytes
) -> None:
    for encode, version in ((encode_v1, 1), (encode_v2, 2)):
        header, rest = parse(encode((hosts[0], sport), (hosts[1], dport)) + payload)
        assert header == ProxyHeader(version, (hosts[0], sport), (hosts[1], dport))
        assert rest == payload


@given(st.binary(max_size=300))
def test_anything_else_is_refused_with_a_reason(data: bytes) -> None:
    try:
        header, _ = parse(data)
    except ProxyHeaderError:
        return
    # Random bytes that happen to be a header must really be one.
    assert data.startswith((b"PROXY ", V2_SIGNATURE)) and header.version in (1, 2)


@given(st.binary(min_size=0, max_size=200))
def test_v2_tlvs_are_skipped(tlvs: bytes) -> None:
    body = struct.pack("!4s4sHH", bytes([192, 0, 2, 7]), bytes([10, 0, 0, 1]), 40000, 21) + tlvs
    header, rest = parse(V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body + b"USER x\r\n")
    assert header.source == ("192.0.2.7", 40000)
    assert rest == b"USER x\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2" + b" " * 80 + b"\r\n",  # above 107 bytes
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",  # LF alone
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # IPv6 under TCP4
        b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n",
        b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", MAX_V2_LENGTH),  # oversized: refused before reading
        V2_SIGNATURE + bytes([0x21, 0x11, 0, 4]) + b"\0" * 4,  # addresses cut short
        V2_SIGNATURE + bytes([0x11, 0x11, 0, 12]) + b"\0" * 12,  # version 1 in a v2 header
        V2_SIGNATURE + bytes([0x22, 0x11, 0, 12]) + b"\0" * 12,  # command 2
        V2_SIGNATURE + bytes([0x21, 0x12, 0, 12]) + b"\0" * 12,  # datagram
        b"USER anonymous\r\n",
        b"PROXY TCP4 192.0.2.1",  # closed early
    ],
)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_local_and_unknown_carry_no_address() -> None:
    assert parse(V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]))[0].source is None
    assert parse(V2_SIGNATURE + bytes([0x21, 0x00, 0, 0]))[0].source is None
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")[0].source is None


# -- a gateway behind a balancer on 127.0.0.1 -------------------------------------------------------------------


class Session:
    """A raw control connection: the test decides what goes first on the wire."""

    def __init__(self, port: int, first: bytes = b"", source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sock.sendall(first)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """One whole reply; '' when the server closed the connection."""
        line = self.file.readline().decode()
        if len(line) > 3 and line[3] == "-":
            while not self.file.readline().decode().startswith(line[:3] + " "):
                pass
        return line.rstrip("\r\n")

    def command(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def login(self, user: str = "alice") -> None:
        assert self.reply().startswith("220")
        assert self.command(f"USER {user}").startswith("331")
        assert self.command("PASS secret").startswith("230")

    def status(self) -> str:
        self.sock.sendall(b"STAT\r\n")
        lines = []
        while not (line := self.file.readline().decode()).startswith("211 "):
            lines.append(line)
        return "".join(lines)

    def pasv_port(self) -> int:
        reply = self.command("EPSV")
        assert reply.startswith("229"), reply
        return int(reply.split("|")[3])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def proxied(client: str) -> bytes:
    return encode_v2((client, 40000), ("127.0.0.1", 21))


@pytest.fixture
def behind_balancer(tmp_path: Path) -> Iterator[GatewayThread]:
    """Trusts 127.0.0.1 (the balancer) only; header required; short header timeout."""
    settings = gateway_settings(
        tmp_path,
        proxy_protocol={"trusted": ["127.0.0.1/32"], "required": True, "header_timeout": 0.5},
        timeouts={"data_connection": 2},
    )
    with running(settings) as gw:
        gw.add_user("alice")
        yield gw


def upload(session: Session, name: str, data: bytes, data_first: bytes) -> tuple[str, str]:
    """STOR through a data connection that starts with ``data_first``: (its final reply, the 150's)."""
    port = session.pasv_port()
    data_sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    data_sock.sendall(data_first)
    started = session.command(f"STOR {name}")
    if started.startswith("150"):
        try:
            data_sock.sendall(data)
        except OSError:
            pass
    data_sock.close()
    return (session.reply() if started.startswith("150") else started), started


@pytest.mark.parametrize("encode", [encode_v1, encode_v2], ids=["v1", "v2"])
def test_header_from_a_trusted_balancer_sets_the_client_address(behind_balancer: GatewayThread, encode: Any) -> None:
    session = Session(behind_balancer.port, encode(("127.0.0.5", 40000), ("127.0.0.1", 21)))
    session.login()
    assert "Connected from 127.0.0.5" in session.status()
    data = random_bytes(300_000)
    # The data connection comes through the balancer too, with the same client address: accepted.
    final, _ = upload(session, "ok.bin", data, encode(("127.0.0.5", 40001), ("127.0.0.1", 30000)))
    assert final.startswith("226"), final
    assert sha256((behind_balancer.root_of("alice") / "ok.bin").read_bytes()) == sha256(data)
    # One whose header names another client is refused: the passive IP check compares the proxied addresses.
    final, _ = upload(session, "other.bin", data, encode(("127.0.0.6", 40002), ("127.0.0.1", 30000)))
    assert final.startswith("425"), final
    assert not (behind_balancer.root_of("alice") / "other.bin").exists()
    # Active mode goes only to the proxied client's own address.
    assert session.command("PORT 127,0,0,1,200,10").startswith("504")
    assert session.command("PORT 127,0,0,5,200,10").startswith("200")
    session.close()


def test_trusted_connections_without_a_header_are_refused(behind_balancer: GatewayThread) -> None:
    session = Session(behind_balancer.port)
    assert session.reply().startswith("421")
    assert session.reply() == ""
    session.close()
    # A data connection without one is closed: the transfer gets 425, the session goes on.
    session = Session(behind_balancer.port, proxied("127.0.0.1"))
    session.login()
    final, _ = upload(session, "x.bin", b"data", b"")
    assert final.startswith("425"), final
    assert session.command("NOOP").startswith("200")
    session.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
        V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 65535) + b"\0" * 1000,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 127.0.0.5",  # then silence: the header timeout ends it
    ],
    ids=["v1-too-long", "v2-too-long", "http", "incomplete"],
)
def test_garbage_headers_are_refused_without_hanging(behind_balancer: GatewayThread, garbage: bytes) -> None:
    session = Session(behind_balancer.port, garbage)
    assert session.reply().startswith("421")
    session.close()
    good = Session(behind_balancer.port, proxied("127.0.0.7"))
    good.login()
    good.close()


def test_local_command_counts_as_the_balancer_itself(behind_balancer: GatewayThread) -> None:
    session = Session(behind_balancer.port, V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]))
    session.login()
    assert "Connected from 127.0.0.1" in session.status()
    session.close()


@pytest.mark.parametrize("first", [encode_v1, encode_v2], ids=["v1", "v2"])
def test_headers_from_untrusted_addresses_are_refused(tmp_path: Path, first: Any) -> None:
    settings = gateway_settings(tmp_path, proxy_protocol={"trusted": ["127.0.0.99/32"]})
    with running(settings) as gw:
        gw.add_user("alice")
        session = Session(gw.port, first(("127.0.0.5", 40000), ("127.0.0.1", 21)))
        replies = []
        while len(replies) < 6 and (reply := session.reply()):
            replies.append(reply[:3])
        assert replies[0] == "220" and replies[-1] == "421", replies  # then closed
        assert "230" not in replies
        session.close()
        # Without a header the same address logs in as itself.
        session = Session(gw.port)
        session.login()
        assert "Connected from 127.0.0.1" in session.status()
        session.close()


def test_optional_header(tmp_path: Path) -> None:
    """``required = false``: a trusted peer may send a header or not."""
    settings = gateway_settings(tmp_path, proxy_protocol={"trusted": ["127.0.0.1/32"], "required": False})
    with running(settings) as gw:
        gw.add_user("alice")
        with_header = Session(gw.port, proxied("127.0.0.8"))
        with_header.login()
        assert "Connected from 127.0.0.8" in with_header.status()
        with_header.close()
        without = Session(gw.port)
        without.login()
        assert "Connected from 127.0.0.1" in without.status()
        without.close()
