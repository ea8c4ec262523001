"""PROXY protocol v1 and v2 (haproxy's proxy-protocol.txt): the header a load balancer puts before a connection's
first byte, carrying the client's address.

Read only from connections whose peer is trusted (``proxy_protocol.trusted``, or another replica of the cluster):
anyone else could claim any address. The reader is strict and bounded, so a trusted peer gone wrong cannot hang
or flood a listener:

* it reads exactly the header, never a byte of what follows (the rest stays in the StreamReader for the
  session or the transfer);
* a v1 line is at most 107 bytes with its CRLF; a v2 header at most :data:`MAX_V2_LENGTH` bytes (TLVs are
  skipped, not kept);
* the whole header must arrive within the caller's timeout (``asyncio.timeout`` around :func:`read_header`).

PyPI's ``proxy-protocol`` (0.11.3, last released April 2024) was looked at: it brings its own server wrappers
around asyncio and is little used; this module is the part the gateway needs, and nothing else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from gateway import aioftp_compat

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
# Addresses (36 bytes for IPv6) plus TLVs; load balancers send a few dozen bytes of TLVs (AWS NLB: the VPC
# endpoint id). A longer header is refused rather than read.
MAX_V2_LENGTH = 16 + 1024

_V2_HEAD = struct.Struct("!12sBBH")
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")

# With ``required = false``: how long a trusted peer's connection is watched for a header before it counts as
# having none (a balancer sends its header at once; an FTP client waits for the server's 220).
OPTIONAL_HEADER_WAIT = 0.2

Address = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyHeaderError(Exception):
    """The connection did not start with a valid PROXY header; the message says why, for the log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """``source`` is the client's address as the balancer saw it; None for ``LOCAL`` (the balancer's own health
    check) and for ``UNKNOWN``/``AF_UNSPEC``: the connection's real peer counts then."""

    version: Literal[1, 2]
    source: Address | None
    destination: Address | None


async def read_header(reader: asyncio.StreamReader) -> ProxyHeader:
    """Read one PROXY header (v1 or v2) from the start of ``reader``; :class:`ProxyHeaderError` if what comes is
    not one (the connection closing early included). Bound it with ``asyncio.timeout``."""
    try:
        start = await reader.readexactly(len(V2_SIGNATURE))
        if start == V2_SIGNATURE:
            rest = await reader.readexactly(4)
            length = struct.unpack("!H", rest[2:])[0]
            if length + 16 > MAX_V2_LENGTH:
                raise ProxyHeaderError(f"PROXY v2 header of {length + 16} bytes, above {MAX_V2_LENGTH}")
            return parse_v2(start + rest + await reader.readexactly(length))
        if not start.startswith(V1_PREFIX):
            raise ProxyHeaderError(f"no PROXY header: the connection starts with {start[:12]!r}")
        line = start
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
            # One byte at a time past the first 12: never a byte of the payload, and at most 95 calls, each
            # served from the reader's buffer.
            line += await reader.readexactly(1)
        return parse_v1(line)
    except asyncio.IncompleteReadError as exc:
        raise ProxyHeaderError(f"connection closed within the PROXY header after {len(exc.partial)} bytes") from None


def parse_v1(line: bytes) -> ProxyHeader:
    """``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``."""
    if len(line) > V1_MAX_LENGTH or not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, None, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line: {text[:60]!r}")
    _, protocol, src, dst, sport, dport = fields
    version = 4 if protocol == "TCP4" else 6
    return ProxyHeader(1, (_v1_ip(src, version), _v1_port(sport)), (_v1_ip(dst, version), _v1_port(dport)))


def _v1_ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1: {text[:45]!r} is not an IP address") from None
    if ip.version != version:
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not an IPv{version} address")
    return str(ip)


def _v1_port(text: str) -> int:
    # The spec: decimal, no leading zero, 0 to 65535.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"PROXY v1: {text[:10]!r} is not a port")
    return int(text)


def parse_v2(header: bytes) -> ProxyHeader:
    """The binary header: signature, version and command, family and transport, length, addresses, TLVs."""
    if len(header) < 16 or len(header) > MAX_V2_LENGTH:
        raise ProxyHeaderError("PROXY v2 header of a wrong size")
    signature, version_command, family_transport, length = _V2_HEAD.unpack_from(header)
    if signature != V2_SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    if len(header) != 16 + length:
        raise ProxyHeaderError("PROXY v2 length does not match")
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header of version {version_command >> 4}")
    command = version_command & 0x0F
    if command == 0:  # LOCAL: the balancer's own connection (a health check); the addresses are to be ignored
        return ProxyHeader(2, None, None)
    if command != 1:
        raise ProxyHeaderError(f"PROXY v2 command {command} is neither LOCAL nor PROXY")
    family, transport = family_transport >> 4, family_transport & 0x0F
    body = header[16:]
    if family == 0:  # AF_UNSPEC: the receiver uses the real connection's addresses
        return ProxyHeader(2, None, None)
    if transport != 1:
        raise ProxyHeaderError(f"PROXY v2 transport {transport} is not a stream")
    if family == 1:
        layout, inet = _INET, socket.AF_INET
    elif family == 2:
        layout, inet = _INET6, socket.AF_INET6
    else:
        raise ProxyHeaderError(f"PROXY v2 address family {family} is not IPv4 or IPv6")
    if length < layout.size:
        raise ProxyHeaderError("PROXY v2 addresses cut short")
    src, dst, sport, dport = layout.unpack_from(body)
    # What follows the addresses (TLVs) is skipped: nothing the gateway uses is carried there.
    return ProxyHeader(2, (socket.inet_ntop(inet, src), sport), (socket.inet_ntop(inet, dst), dport))


def encode_v2(source: Address, destination: Address) -> bytes:
    """A v2 PROXY header (command PROXY, TCP over IPv4 or IPv6) for a relayed connection. Both addresses must be of
    one family; an IPv4 address mapped into IPv6 is sent as IPv4."""
    src, dst = _plain(source[0]), _plain(destination[0])
    if src.version != dst.version:
        dst = ipaddress.ip_address("::") if src.version == 6 else ipaddress.ip_address("0.0.0.0")  # noqa: S104
    layout, family = (_INET, 0x11) if src.version == 4 else (_INET6, 0x21)
    body = layout.pack(src.packed, dst.packed, source[1], destination[1])
    return _V2_HEAD.pack(V2_SIGNATURE, 0x21, family, len(body)) + body


def encode_v1(source: Address, destination: Address) -> bytes:
    """A v1 PROXY line (for tests and the test balancer)."""
    src, dst = _plain(source[0]), _plain(destination[0])
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyPolicy:
    """Which peers may send a PROXY header, and the client address of a connection from one of them.

    ``also_trusted``: a further, asynchronous check (the cluster's live replicas, which relay data connections
    to each other with a header); it is asked only for peers outside ``networks``, and a peer it vouches for
    must send a header whatever ``required`` says."""

    def __init__(
        self,
        networks: Sequence[IPNetwork],
        *,
        required: bool,
        timeout: float,
        also_trusted: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self.networks = tuple(networks)
        self.required = required
        self.timeout = timeout
        self.also_trusted = also_trusted

    def trusts(self, host: str) -> bool:
        """``host`` lies in a trusted network (a load balancer)."""
        if not self.networks:
            return False
        ip = _plain(host)
        return any(ip in network for network in self.networks)

    async def client_of(self, reader: asyncio.StreamReader, peer: Address) -> Address:
        """The client's address of a connection from ``peer``: the header's source when ``peer`` is trusted, else
        ``peer`` itself (no byte is read then). :class:`ProxyHeaderError` when a header is due and none came."""
        if self.trusts(peer[0]):
            required = self.required
        elif self.also_trusted is not None and await self.also_trusted(peer[0]):
            required = True
        else:
            return peer
        if not required and not await _header_follows(reader):
            return peer
        try:
            async with asyncio.timeout(self.timeout):
                header = await read_header(reader)
        except TimeoutError:
            raise ProxyHeaderError(f"no complete PROXY header within {self.timeout:g} s") from None
        return header.source or peer


async def _header_follows(reader: asyncio.StreamReader) -> bool:
    """Do the connection's first bytes, if any come within :data:`OPTIONAL_HEADER_WAIT`, start a PROXY header?"""
    try:
        async with asyncio.timeout(OPTIONAL_HEADER_WAIT):
            await aioftp_compat.wait_for_data(reader)
    except TimeoutError:
        return False
    first = bytes(aioftp_compat.buffered(reader)[: len(V2_SIGNATURE)])
    return bool(first) and (
        V2_SIGNATURE.startswith(first) or V1_PREFIX.startswith(first[:6]) or first.startswith(V1_PREFIX)
    )
