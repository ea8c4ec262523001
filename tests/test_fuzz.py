"""Hostile input, proven (issue 13 item 7): hypothesis throws random and malformed command lines at one running
gateway: known verbs with path traversals (``../..``, ``%2e``, backslashes), NUL and CR bytes, lines over the
length limit, bytes that are not UTF-8, telnet escapes, pipelined bursts of commands in one write, wrong
passwords and random binary garbage, each script on a fresh connection. Every command line gets a valid reply;
a connection the server closes got ``421`` or ``221`` last; nothing outside alice's root changes (bob's tree,
the parent directory, the database's directory); and a normal client is served afterwards.

The run is bounded (``MAX_EXAMPLES``, and ``BUDGET`` seconds whatever happens) and derandomized, so CI sees the
same inputs every time; the number of scripts and lines thrown goes to the run's summary."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.clients import ftp_login
from tests.helpers import GatewayThread, gateway_settings, running

MAX_EXAMPLES = 300
BUDGET = 15.0  # seconds for all the scripts together
REPLY_TIMEOUT = 5.0
# aioftp's StreamReader limit (asyncio's default): a longer command line gets 500.
LINE_LIMIT = 2**16
REPLY = re.compile(rb"^(\d{3})([ -])")

VERBS = (
    "USER PASS ACCT CWD CDUP XCWD XCUP PWD XPWD MKD XMKD RMD XRMD DELE RNFR RNTO STOR APPE STOU RETR LIST NLST "
    "MLSD MLST SIZE MDTM MFMT SITE TYPE MODE STRU REST PASV EPSV PORT EPRT HELP FEAT OPTS NOOP SYST STAT ABOR "
    "ALLO HASH XSHA256 XSHA1 XMD5 XCRC CLNT AUTH PBSZ PROT CCC REIN SMNT QUIT"
).split()
# Verbs whose argument is a path: the traversals go there.
PATH_VERBS = set(
    "CWD XCWD MKD XMKD RMD XRMD DELE RNFR RNTO STOR APPE STOU RETR LIST NLST MLSD MLST SIZE MDTM HASH XSHA256 "
    "XSHA1 XMD5 XCRC STAT".split()
)
TRAVERSALS = (
    "..", "../..", "../../bob", "../bob/secret.txt", "/../bob", "/../../outside.txt", "../outside.txt",
    "%2e%2e/%2e%2e", "%2e%2e%2fbob", "..%2f..%2fbob%2fsecret.txt", "....//....//bob", "..\\..\\bob",
    "\\..\\bob", "a/../../bob", "dir/../../../outside.txt", "./././../bob", "/", "//bob", "~bob", "~/../bob",
    "/etc/passwd", "bob/../../outside.txt", "-la ../..", "-R /", "..;bob", "..\x00bob", "..\rbob", "\u202e..",
    "\u2025/bob", "\uff0e\uff0e/bob", "x" * 300, "d/" * 200, "*", "?", "[a-z]*", "dir", "file.txt", "new.txt",
)  # fmt: skip
PASSWORDS = ("secret", "wrong", "", "secret\x00", "' OR 1=1 --", "x" * 5000)
NAMES = ("alice", "bob", "root", "anonymous", "alice\x00", "../bob", "", "ALICE")
NOT_UTF8 = (b"\xc3\x28", b"\xff\xfe\xfd", b"\xed\xa0\x80", b"\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf")
TELNET = (b"\xff\xf4\xff\xf2", b"\xff\xff", b"\xff", b"\xff\xfb\x01")
ENDINGS = (b"\r\n", b"\n", b"\r\r\n", b" \r\n")

text_arg = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
path_arg = st.one_of(
    st.sampled_from(TRAVERSALS), text_arg, st.lists(st.sampled_from(TRAVERSALS), max_size=4).map("/".join)
)


@st.composite
def command_line(draw: st.DrawFn) -> bytes:
    """One line: a known verb (any case) with a random, hostile or missing argument, or garbage."""
    kind = draw(st.sampled_from(("verb", "verb", "verb", "verb", "binary", "not-utf8", "telnet", "long", "empty")))
    ending = draw(st.sampled_from(ENDINGS))
    if kind == "binary":
        return draw(st.binary(max_size=200)).replace(b"\n", b"") + ending
    if kind == "long":
        return (
            draw(st.sampled_from((b"NOOP ", b"CWD ", b"A", b"USER ")))
            + b"x" * draw(st.integers(LINE_LIMIT - 10, LINE_LIMIT * 3))
            + ending
        )
    if kind == "empty":
        return ending
    verb = draw(st.sampled_from(VERBS))
    verb = draw(st.sampled_from((verb, verb.lower(), verb.capitalize())))
    if verb.upper() in PATH_VERBS:
        argument = draw(path_arg)
    elif verb.upper() == "USER":
        argument = draw(st.one_of(st.sampled_from(NAMES), text_arg))
    elif verb.upper() == "PASS":
        argument = draw(st.one_of(st.sampled_from(PASSWORDS), text_arg))
    else:
        argument = draw(st.one_of(text_arg, st.sampled_from(("", " ", "ALL", "I", "A", "0", "-1", "99999999999"))))
    line = (verb + (" " + argument if argument or draw(st.booleans()) else "")).encode()
    if kind == "not-utf8":
        line += draw(st.sampled_from(NOT_UTF8))
    elif kind == "telnet":
        line = draw(st.sampled_from(TELNET)) + line
    return line.replace(b"\n", b"") + ending


class Script:
    """What one connection sends: an optional login, then writes (one line each, or a burst of several)."""

    def __init__(self, login: list[tuple[str, str]], writes: list[list[bytes]]) -> None:
        self.login = login
        self.writes = writes

    def __repr__(self) -> str:
        # Over-long lines shortened: hypothesis prints a failing script (and warns about reprs over 30 kB).
        def short(line: bytes) -> str:
            return repr(line) if len(line) < 200 else f"{line[:20]!r} + b'x' * {len(line) - 22} + {line[-2:]!r}"

        writes = ", ".join("[" + ", ".join(short(line) for line in write) + "]" for write in self.writes)
        return f"Script(login={self.login!r}, writes=[{writes}])"


scripts = st.builds(
    Script,
    # Mostly alice's own login (the traversals need one); else none, or wrong ones (each costs argon2id's time).
    login=st.one_of(
        st.just([("alice", "secret")]),
        st.just([("alice", "secret")]),
        st.just([]),
        st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(PASSWORDS)), min_size=1, max_size=3),
    ),
    # One line per write, a pipelined burst of many in one write, or a blob of random bytes (its newlines too).
    writes=st.lists(
        st.one_of(
            st.lists(command_line(), min_size=1, max_size=1),
            st.lists(command_line(), min_size=2, max_size=40),
            st.binary(min_size=1, max_size=2000).map(lambda blob: [blob + b"\r\n"]),
        ),
        min_size=1,
        max_size=8,
    ),
)


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


def tree_digest(root: Path, skip: Path) -> dict[str, str]:
    """Every file and directory under ``root`` but ``skip``: path -> content hash (or mode for directories)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents or path.name.startswith("users.db"):
            continue
        if path.is_dir():
            found[str(path)] = f"dir {path.stat().st_mode:o}"
        else:
            found[str(path)] = f"{path.stat().st_mode:o} " + hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    settings = gateway_settings(
        tmp_path,
        limits={"failed_login_delay": 0.001, "max_login_failures": 3},
        timeouts={"data_connection": 0.3, "login": 30},
        # Not banned nor slowed for its wrong passwords (tests/test_bans.py has those): every script gets a session.
        bans={"max_failures": 1_000_000, "name_delay_max": 0},
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


class DataSink:
    """Opens the data connection a PASV/EPSV reply offers, sends a few bytes (for a STOR) and reads what comes (a
    RETR, a listing), in a thread: transfers then run to their end instead of waiting for a connection."""

    PASV = re.compile(rb"\((\d+),(\d+),(\d+),(\d+),(\d+),(\d+)\)")
    EPSV = re.compile(rb"\(\|\|\|(\d+)\|\)")

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def offer(self, reply: bytes) -> None:
        port = None
        if reply.startswith(b"227") and (m := self.PASV.search(reply)):
            port = int(m[5]) * 256 + int(m[6])
        elif reply.startswith(b"229") and (m := self.EPSV.search(reply)):
            port = int(m[1])
        if port is not None:
            thread = threading.Thread(target=self._run, args=(port,), daemon=True)
            thread.start()
            self.threads.append(thread)

    @staticmethod
    def _run(port: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"fuzzed upload\n")
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        except OSError:
            pass

    def join(self) -> None:
        for thread in self.threads:
            thread.join(5)


def run_script(gateway: GatewayThread, script: Script) -> int:
    """Play one script on a new connection; return the command lines sent. Asserts the reply rules."""
    sent = 0
    sink = DataSink()
    with socket.create_connection((gateway.host, gateway.port), timeout=REPLY_TIMEOUT) as sock:
        replies = Replies(sock)
        greeting = replies.final()
        assert greeting is not None and greeting.startswith(b"220"), greeting
        lines = [[f"USER {name}\r\n".encode(), f"PASS {password}\r\n".encode()] for name, password in script.login]
        writes = [line for pair in lines for line in ([pair[0]], [pair[1]])] + script.writes + [[b"QUIT\r\n"]]
        for write in writes:
            data = b"".join(write)
            expected = data.count(b"\n")
            try:
                sock.sendall(data)
            except OSError:
                break  # the server closed: checked below
            sent += expected
            for _ in range(expected):
                reply = replies.final()
                if reply is None:
                    break
                sink.offer(reply)
            if replies.closed or (replies.last or b"")[:3] in (b"221", b"421"):
                break
        # Whatever else comes, up to the end: still replies, and the server's last word is 421 or 221.
        sock.settimeout(REPLY_TIMEOUT)
        while replies.final() is not None:
            pass
        assert replies.last is not None and replies.last[:3] in (b"221", b"421"), (
            f"connection closed after {replies.last!r}"
        )
        replies.file.close()
    sink.join()
    return sent


def test_hostile_input_gets_replies_and_changes_nothing_outside_the_root(
    fuzz_gateway: GatewayThread, fault_counts: Counter[str]
) -> None:
    gateway = fuzz_gateway
    alice = gateway.root_of("alice")
    parent = alice.parent.parent  # the test's directory: the roots, the database, a file beside them
    before = tree_digest(parent, skip=alice)
    deadline = time.monotonic() + BUDGET
    thrown = Counter[str]()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(scripts)
    def fuzz(script: Script) -> None:
        if time.monotonic() > deadline:
            return
        thrown["fuzz scripts (connections)"] += 1
        thrown["fuzz command lines"] += run_script(gateway, script)
        assert tree_digest(parent, skip=alice) == before, "something outside alice's root changed"

    fuzz()
    fault_counts.update(thrown)
    print(f"fuzz: {dict(thrown)}")
    assert thrown["fuzz scripts (connections)"] >= 50, thrown
    # A normal client is served afterwards.
    client = ftp_login(gateway.host, gateway.port, "alice")
    client.stor("after-the-fuzz.txt", b"still serving")
    assert client.retr("after-the-fuzz.txt") == b"still serving"
    client.quit()
    assert tree_digest(parent, skip=alice) == before


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


def test_unknown_verbs_are_answered_in_their_turn(fuzz_gateway: GatewayThread) -> None:
    """aioftp's dispatcher answered an unknown verb at once: ahead of the replies to the commands before it, and
    even after the 221 of a QUIT before it."""
    sock, replies = session(fuzz_gateway, login=False)
    with sock, replies.file:
        sock.sendall(b"USER alice\r\nPASS secret\r\nPASV\r\nFOO\r\nQUIT\r\nBAR\r\n")
        codes = []
        while (reply := replies.final()) is not None:
            codes.append(reply[:3].decode())
    assert codes == ["331", "230", "227", "502", "221"]
