"""The control connection as clients use it: pipelined commands, odd input, replies per RFC 959."""

from __future__ import annotations

import ftplib
import io
import socket
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from gateway.datachannel import AsciiConverter
from tests.clients import assert_refused, ftp_login
from tests.helpers import GatewayThread, MiB, gateway_settings, random_bytes, running


class RawControl:
    """A control connection driven byte by byte, to send what real clients send (several commands at once)."""

    def __init__(self, gateway: GatewayThread) -> None:
        self.sock = socket.create_connection((gateway.host, gateway.port), timeout=10)
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith("220")

    def send(self, *commands: str) -> None:
        self.sock.sendall("".join(command + "\r\n" for command in commands).encode())

    def reply(self) -> str:
        """One whole reply, multi-line ones included (RFC 959 4.2)."""
        line = self.file.readline().decode()
        if line[3:4] == "-":
            code = line[:3]
            while True:
                more = self.file.readline().decode()
                line += more
                if more.startswith(code + " "):
                    break
        return line

    def codes(self, count: int) -> list[str]:
        return [self.reply()[:3] for _ in range(count)]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawControl:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def test_pipelined_commands_are_answered_in_order(backend_gateway: GatewayThread) -> None:
    backend_gateway.add_user("alice")
    backend_gateway.files.put("alice", "x", b"12345")
    with RawControl(backend_gateway) as control:
        # One packet: PASV has to open a port, SIZE asks the storage; the replies must still be in order.
        control.send("USER alice", "PASS secret", "TYPE I", "PASV", "SIZE x", "SIZE missing", "NOOP")
        replies = [control.reply() for _ in range(7)]
        assert [reply[:3] for reply in replies] == ["331", "230", "200", "227", "213", "550", "200"]
        assert replies[4].strip() == "213 5"
        control.send("QUIT")
        assert control.reply().startswith("221")


def test_active_mode_is_refused_towards_anyone_but_the_client(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    with RawControl(local_gateway) as control:
        control.send("USER alice", "PASS secret")
        assert control.codes(2) == ["331", "230"]
        control.send(
            "PORT 127,0,0,2,200,10",  # another host: an FTP bounce
            "PORT 127,0,0,1,0,21",  # a privileged port
            "PORT 127,0,0,1,300,1",  # malformed
            "EPRT |1|127.0.0.2|51210|",
            "EPRT |3|127.0.0.1|51210|",  # unknown network protocol
            "EPRT |1|::1|51210|",  # protocol and address disagree
            "EPRT nonsense",
            "PORT 127,0,0,1,200,10",
            "EPRT |1|127.0.0.1|51210|",
        )
        assert control.codes(9) == ["504", "504", "501", "504", "522", "522", "501", "200", "200"]


def test_epsv_all_allows_only_epsv(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    with RawControl(local_gateway) as control:
        control.send("USER alice", "PASS secret", "EPSV 2", "EPSV x", "EPSV ALL", "PASV", "PORT 127,0,0,1,200,10")
        assert control.codes(7) == ["331", "230", "522", "501", "200", "522", "522"]
        control.send("EPRT |1|127.0.0.1|51210|", "EPSV 1", "EPSV")
        assert control.codes(3) == ["522", "229", "229"]


def test_no_free_passive_port_is_a_425_not_a_hang_up(tmp_path: Path) -> None:
    settings = gateway_settings(tmp_path)
    port = settings.passive.port_min
    settings = gateway_settings(tmp_path, passive={"port_min": port, "port_max": port})
    with running(settings) as gateway:
        gateway.add_user("alice")
        first = ftp_login(gateway.host, gateway.port, "alice")
        second = ftp_login(gateway.host, gateway.port, "alice")
        try:
            first.ftp.sendcmd("PASV")
            assert_refused("425", lambda: second.ftp.sendcmd("PASV"))
            assert second.ftp.sendcmd("NOOP").startswith("200")
            # The port comes back when the first session's transfer is over.
            lines: list[str] = []
            first.ftp.retrlines("LIST", lines.append)
            assert second.list() == {}
        finally:
            first.ftp.close()
            second.ftp.close()


def test_a_hundred_sessions_share_twenty_passive_ports(tmp_path: Path) -> None:
    low = gateway_settings(tmp_path).passive.port_min
    with running(gateway_settings(tmp_path, passive={"port_min": low, "port_max": low + 19})) as gateway:
        gateway.add_user("alice")
        gateway.files.put("alice", "hello.txt", b"hello")
        sessions = [ftp_login(gateway.host, gateway.port, "alice") for _ in range(100)]
        try:
            for session in sessions:
                assert session.retr("hello.txt") == b"hello"
        finally:
            for session in sessions:
                session.quit()


def test_passive_port_refuses_a_data_connection_from_another_host(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    local_gateway.files.put("alice", "secret.txt", b"for alice only")
    client = ftp_login(local_gateway.host, local_gateway.port, "alice")
    host, port = ftplib.parse227(client.ftp.sendcmd("PASV"))
    # Someone else (here 127.0.0.2, another loopback address) is quicker to the announced port ...
    intruder = socket.create_connection((host, port), timeout=5, source_address=("127.0.0.2", 0))
    intruder.settimeout(5)
    assert intruder.recv(100) == b""  # ... and is hung up on.
    intruder.close()
    data = socket.create_connection((host, port), timeout=5)
    client.ftp.sendcmd("RETR secret.txt")
    received = b""
    while chunk := data.recv(1024):
        received += chunk
    data.close()
    assert client.ftp.voidresp().startswith("226")
    assert received == b"for alice only"
    client.quit()


def test_commands_before_login_get_530_and_unknown_ones_502(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    with RawControl(local_gateway) as control:
        control.send("PWD", "CWD /", "LIST", "SIZE x", "MKD x", "SITE HELP", "TYPE I", "PASV", "FROB", "XPWD")
        assert control.codes(10) == ["530"] * 8 + ["502", "530"]
        control.send("HELP", "FEAT", "SYST", "NOOP", "USER", "OPTS")
        assert control.codes(6) == ["214", "211", "215", "200", "501", "501"]
        control.send("USER alice", "PASS secret", "PWD")
        assert control.codes(3) == ["331", "230", "257"]


def test_arguments_and_the_small_commands(backend_gateway: GatewayThread) -> None:
    backend_gateway.add_user("alice")
    backend_gateway.files.put("alice", "f.txt", b"data")
    with RawControl(backend_gateway) as control:
        control.send("USER alice", "PASS secret")
        assert control.codes(2) == ["331", "230"]
        control.send("MKD", "RETR   ", "TYPE X", "TYPE E", "TYPE L 8", "TYPE A N", "TYPE I")
        assert control.codes(7) == ["501", "501", "501", "504", "200", "200", "200"]
        control.send("MODE S", "MODE B", "MODE Z", "STRU F", "STRU R", "ALLO 100")
        assert control.codes(6) == ["200", "504", "501", "200", "504", "202"]
        control.send("HELP RETR", "HELP FROB", "SITE HELP", "SITE CHMOD 644 f.txt", "SITE CHMOD 99 f.txt")
        assert control.codes(5) == ["214", "502", "214", "200", "501"]
        control.send("SITE CHMOD 600 missing", "SITE FROB", "MKD a\x00b", "DELE a\rb")
        assert control.codes(4) == ["550", "500", "501", "501"]
        control.send("XMKD d", "XCWD d", "XPWD", "XCUP", "XRMD d", "XPWD")
        replies = [control.reply() for _ in range(6)]
        assert [r[:3] for r in replies] == ["257", "250", "257", "250", "250", "257"]
        assert replies[2].startswith('257 "/d"') and replies[5].startswith('257 "/"')


def test_multi_line_replies_are_well_formed(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    with RawControl(local_gateway) as control:
        for command in ("HELP", "FEAT"):
            control.send(command)
            lines = control.reply().splitlines()
            code = lines[0][:3]
            assert lines[0].startswith(code + "-")
            assert lines[-1].startswith(code + " ")
            # RFC 959 4.2: inner lines must not look like the end of the reply.
            assert not any(line.startswith(code + " ") for line in lines[1:-1])


def test_ascii_mode_converts_line_endings(backend_gateway: GatewayThread) -> None:
    backend_gateway.add_user("alice")
    client = ftp_login(backend_gateway.host, backend_gateway.port, "alice")
    # storlines sends TYPE A and CRLF line ends, as RFC 959 says text goes on the wire.
    client.ftp.storlines("STOR notes.txt", io.BytesIO(b"first\nsecond\n\nfourth\n"))
    assert backend_gateway.files.files("alice") == {"notes.txt": b"first\nsecond\n\nfourth\n"}
    lines: list[str] = []
    client.ftp.retrlines("RETR notes.txt", lines.append)
    assert lines == ["first", "second", "", "fourth"]
    assert_refused("550", lambda: client.ftp.sendcmd("SIZE notes.txt"))
    client.ftp.sendcmd("TYPE A")
    data = client.ftp.transfercmd("RETR notes.txt")
    received = b""
    while chunk := data.recv(1024):
        received += chunk
    data.close()
    client.ftp.voidresp()
    assert received == b"first\r\nsecond\r\n\r\nfourth\r\n"
    assert client.retr("notes.txt") == b"first\nsecond\n\nfourth\n"  # TYPE I: byte for byte
    client.quit()


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_ascii_conversion_does_not_depend_on_block_boundaries(data: bytes, cuts: list[int]) -> None:
    edges = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    blocks = [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    whole = AsciiConverter()
    expected_storage = whole.to_storage(data) + whole.flush()
    pieces = AsciiConverter()
    assert b"".join(pieces.to_storage(block) for block in blocks) + pieces.flush() == expected_storage
    assert b"\r\n" not in expected_storage
    expected_network = AsciiConverter().to_network(data)
    sender = AsciiConverter()
    assert b"".join(sender.to_network(block) for block in blocks) == expected_network
    assert expected_network.replace(b"\r\n", b"").count(b"\n") == 0


def test_nlst_and_list_expand_wildcards(backend_gateway: GatewayThread) -> None:
    backend_gateway.add_user("alice")
    for name in ("a.txt", "b.txt", "c.log", "sub/d.txt"):
        backend_gateway.files.put("alice", name, b"x")
    client = ftp_login(backend_gateway.host, backend_gateway.port, "alice")
    assert sorted(client.ftp.nlst("*.txt")) == ["a.txt", "b.txt"]
    assert sorted(client.ftp.nlst("sub/*")) == ["sub/d.txt"]
    assert sorted(client.ftp.nlst()) == ["a.txt", "b.txt", "c.log", "sub"]
    assert set(client.list("*.log")) == {"c.log"}
    assert client.ftp.nlst("*.none") == []
    client.quit()


def test_stat_and_stou(backend_gateway: GatewayThread) -> None:
    backend_gateway.add_user("alice")
    backend_gateway.files.put("alice", "report.txt", b"1")
    client = ftp_login(backend_gateway.host, backend_gateway.port, "alice")
    status = client.ftp.sendcmd("STAT")
    assert status.startswith("211-") and "Logged in as alice" in status and status.splitlines()[-1].startswith("211 ")
    listing = client.ftp.sendcmd("STAT /")
    assert listing.startswith("213-") and "report.txt" in listing
    assert_refused("550", lambda: client.ftp.sendcmd("STAT /missing"))
    replies = []
    for _ in range(2):
        data = client.ftp.transfercmd("STOU report.txt")
        replies.append(client.ftp.lastresp)
        data.sendall(b"unique")
        data.close()
        client.ftp.voidresp()
    files = backend_gateway.files.files("alice")
    assert files == {"report.txt": b"1", "report.txt.1": b"unique", "report.txt.2": b"unique"}
    client.quit()


def test_ftplib_abort_with_urgent_data(backend_gateway: GatewayThread) -> None:
    """ftplib sends ABOR as TCP urgent data; the session must see the whole line and go on."""
    backend_gateway.add_user("alice")
    backend_gateway.files.put("alice", "big.bin", random_bytes(32 * MiB))
    client = ftp_login(backend_gateway.host, backend_gateway.port, "alice")
    data = client.ftp.transfercmd("RETR big.bin")
    data.recv(65536)
    reply = client.ftp.abort()
    assert reply[:3] in ("426", "225", "226")
    data.close()
    # What is left of the abort's replies comes before the next one (RFC 959: 426 for RETR, 226 for ABOR).
    while not client.ftp.getline().startswith("226"):
        pass
    assert client.ftp.sendcmd("NOOP").startswith("200")
    client.quit()


def test_telnet_interrupt_before_abor_is_ignored(local_gateway: GatewayThread) -> None:
    local_gateway.add_user("alice")
    with RawControl(local_gateway) as control:
        control.send("USER alice", "PASS secret")
        assert control.codes(2) == ["331", "230"]
        control.sock.sendall(b"\xff\xf4\xff\xf2ABOR\r\n")  # IAC IP, IAC DM, as BSD ftp sends them
        control.send("NOOP")
        assert control.codes(2) == ["226", "200"]


def test_names_round_trip_and_overlong_names_get_553(backend_gateway: GatewayThread) -> None:
    backend_gateway.add_user("alice")
    client = ftp_login(backend_gateway.host, backend_gateway.port, "alice")
    names = ["-leading dash", "hash #1", "50% off", "what?", "a+b", "[draft]", "ünïcødé 名前", " spaced"]
    for name in names:
        client.ftp.storbinary(f"STOR {name}", io.BytesIO(name.encode()))
    assert set(client.ftp.nlst()) == set(names)
    for name in names:
        buffer = io.BytesIO()
        client.ftp.retrbinary(f"RETR {name}", buffer.write)
        assert buffer.getvalue() == name.encode(), name
    assert backend_gateway.files.files("alice") == {name: name.encode() for name in names}
    # Longer than a file name may be on disk (255 bytes) and than an S3 key (1024 bytes).
    assert_refused("553", lambda: client.ftp.storbinary("STOR " + "x" * 1100, io.BytesIO(b"x")))
    assert_refused("553", lambda: client.ftp.mkd("d" * 1100))
    assert client.ftp.sendcmd("NOOP").startswith("200")
    client.quit()
