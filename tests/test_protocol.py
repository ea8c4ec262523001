"""The control connection as clients use it: pipelined commands, odd input, replies per RFC 959."""

from __future__ import annotations

import ftplib
import socket
from pathlib import Path

from tests.clients import assert_refused, ftp_login
from tests.helpers import GatewayThread, gateway_settings, running


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


def test_active_mode_is_refused_towards_anyone_but_the_client(gateway: GatewayThread) -> None:
    gateway.add_user("alice")
    with RawControl(gateway) as control:
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


def test_epsv_all_allows_only_epsv(gateway: GatewayThread) -> None:
    gateway.add_user("alice")
    with RawControl(gateway) as control:
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
        first.ftp.sendcmd("PASV")
        assert_refused("425", lambda: second.ftp.sendcmd("PASV"))
        assert second.ftp.sendcmd("NOOP").startswith("200")
        # The port comes back when the first session's transfer is over.
        lines: list[str] = []
        first.ftp.retrlines("LIST", lines.append)
        assert second.list() == {}
        first.quit()
        second.quit()


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


def test_passive_port_refuses_a_data_connection_from_another_host(gateway: GatewayThread) -> None:
    gateway.add_user("alice")
    gateway.files.put("alice", "secret.txt", b"for alice only")
    client = ftp_login(gateway.host, gateway.port, "alice")
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
