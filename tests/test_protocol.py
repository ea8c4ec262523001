"""The control connection as clients use it: pipelined commands, odd input, replies per RFC 959."""

from __future__ import annotations

import socket

from tests.helpers import GatewayThread


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
