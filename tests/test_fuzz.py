"""Hostile input, proven (issue 13 item 7): hypothesis throws random and malformed command lines at one running
gateway: known verbs with path traversals (``../..``, ``%2e``, backslashes), NUL and CR bytes, lines over the
length limit, bytes that are not UTF-8, telnet escapes, pipelined bursts of commands in one write, wrong
passwords and random binary garbage, each script on a fresh connection. Every command line gets a valid reply;
a connection the server closes got ``421`` or ``221`` last; nothing outside alice's root changes (bob's tree,
the parent directory, the database's directory); and a normal client is served afterwards.

The run is bounded (``MAX_EXAMPLES``, and ``BUDGET`` seconds whatever happens) and derandomized, so CI sees the
same inputs every time; the number of scripts and lines thrown goes to the run's summary."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.helpers import GatewayThread, gateway_settings, running

REPLY_TIMEOUT = 5.0
# aioftp's StreamReader limit (asyncio's default): a longer command line gets 500.
LINE_LIMIT = 2**16
REPLY = re.compile(rb"^(\d{3})([ -])")


class Replies:
    """Reads a control connection's replies: each line must be ``ddd `` / ``ddd-`` or inside a multi-line reply."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")
        self.last: bytes | None = None  # the last reply line (final or not)
        self.finals: list[bytes] = []
        self.closed = False

    def final(self) -> bytes | None:
        """The next final reply line; None when the server closed the connection."""
        multi: bytes | None = None
        while True:
            line = self.file.readline()
            if not line:
                self.closed = True
                return None
            assert line.endswith(b"\r\n"), f"reply line without CRLF: {line!r}"
            match = REPLY.match(line)
            if multi is not None:
                if match and match[1] == multi and match[2] == b" ":
                    multi = None
                else:
                    continue  # a line inside a multi-line reply
            elif match is None:
                raise AssertionError(f"not a reply line: {line!r}")
            elif match[2] == b"-":
                multi = match[1]
                continue
            self.last = line
            if not line.startswith(b"1"):
                self.finals.append(line)
                return line


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    settings = gateway_settings(
        tmp_path,
        limits={"failed_login_delay": 0.001, "max_login_failures": 3},
        timeouts={"data_connection": 0.3, "login": 30},
    )
    with running(settings) as gateway:
        gateway.add_user("alice")
        gateway.add_user("bob")
        files = gateway.files
        for user in ("alice", "bob"):
            files.put(user, "file.txt", f"{user}'s file".encode())
            files.put(user, "secret.txt", f"{user}'s secret".encode())
            files.put(user, "dir/nested.txt", b"nested")
        (tmp_path / "outside.txt").write_bytes(b"outside every root")
        (tmp_path / "data" / "outside.txt").write_bytes(b"beside the roots")
        yield gateway


# -- what the fuzz found, pinned down --------------------------------------------------------------------------


def session(gateway: GatewayThread, login: bool = True) -> tuple[socket.socket, Replies]:
    sock = socket.create_connection((gateway.host, gateway.port), timeout=REPLY_TIMEOUT)
    replies = Replies(sock)
    assert (replies.final() or b"")[:3] == b"220"
    if login:
        sock.sendall(b"USER alice\r\nPASS secret\r\n")
        assert [replies.final(), replies.final()] == [b"331 Password required.\r\n", b"230 Login successful.\r\n"]
    return sock, replies


def test_the_rest_of_an_overlong_line_is_no_command(fuzz_gateway: GatewayThread) -> None:
    """asyncio's readline drops only the part of an over-long line it holds: what came after a pause ran as a
    command of its own."""
    fuzz_gateway.files.put("alice", "victim.txt", b"keep me")
    sock, replies = session(fuzz_gateway)
    with sock, replies.file:
        sock.sendall(b"NOOP " + b"x" * (LINE_LIMIT + 100))
        time.sleep(0.2)  # the server has read (and dropped) the first part
        sock.sendall(b"DELE victim.txt\r\nNOOP\r\n")
        assert replies.final() == b"500 Command line too long.\r\n"
        assert replies.final() == b"200 NOOP ok.\r\n"
    assert fuzz_gateway.files.files("alice")["victim.txt"] == b"keep me"


@pytest.mark.parametrize(
    "ending", [b"QUIT\r\n", b"USER x\r\nPASS a\r\nUSER x\r\nPASS b\r\nUSER x\r\nPASS c\r\n"], ids=["quit", "3 wrong"]
)
def test_the_last_reply_survives_input_pipelined_past_the_end(fuzz_gateway: GatewayThread, ending: bytes) -> None:
    """A session the server ends with unread input used to be closed with RST, and the client lost its 221 or 421."""
    sock, replies = session(fuzz_gateway, login=False)
    with sock, replies.file:
        sock.sendall(ending + b"NOOP\r\n" * 40_000)  # more than the server reads ahead
        while replies.final() is not None:
            pass
        assert replies.last is not None and replies.last[:3] == (b"221" if ending.startswith(b"QUIT") else b"421")
