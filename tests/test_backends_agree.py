"""Random sequences of FTP commands against the local-disk and the S3 backend side by side: the client must
not be able to tell them apart (replies, listings, file contents)."""

from __future__ import annotations

import ftplib
import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.clients import FtplibClient, ftp_login
from tests.helpers import GatewayThread, MiB, gateway_settings, running

NAMES = ["a", "b c", "ü", "d.txt"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
payloads = st.binary(max_size=64)
times = st.sampled_from(["20200102030405", "19991231235959", "20260101000000.5"])
algorithms = st.sampled_from(["SHA-256", "SHA-1", "MD5", "CRC32"])
Outcome = tuple[str, Any]


def outcome(action: Callable[[], Any]) -> Outcome:
    """("ok", result) or ("error", reply code): what a client can observe of a command."""
    try:
        return "ok", action()
    except ftplib.Error as exc:
        return "error", str(exc)[:3]


def listing(client: FtplibClient, path: str) -> Any:
    lines: list[str] = []
    client.ftp.retrlines(f"LIST {path}".rstrip(), lines.append)
    return sorted((line.split(None, 8)[8], line[0], line.split()[4] if line[0] == "-" else "") for line in lines)


def retrieve(client: FtplibClient, path: str, offset: int | None = None) -> bytes:
    buffer = io.BytesIO()
    client.ftp.retrbinary(f"RETR {path}", buffer.write, rest=offset)
    return buffer.getvalue()


def listed_modify(client: FtplibClient, path: str) -> str | None:
    """The modify fact of ``path`` as MLSD of its directory shows it."""
    parent, _, name = path.rpartition("/")
    return dict(client.ftp.mlsd(parent, facts=["modify"])).get(name, {}).get("modify")


class BackendsAgree(RuleBasedStateMachine):
    users = itertools.count()

    def __init__(self, local: GatewayThread, s3: GatewayThread) -> None:
        super().__init__()
        self.gateways = {"local": local, "s3": s3}
        self.clients: dict[str, FtplibClient] = {}

    @initialize()
    def login(self) -> None:
        user = f"user{next(self.users)}"
        for name, gateway in self.gateways.items():
            gateway.add_user(user)
            self.clients[name] = ftp_login(gateway.host, gateway.port, user)

    def both(self, action: Callable[[FtplibClient], Any]) -> Outcome:
        results = {name: outcome(lambda client=client: action(client)) for name, client in self.clients.items()}
        assert results["local"] == results["s3"], results
        return results["local"]

    @rule(path=paths)
    def mkd(self, path: str) -> None:
        self.both(lambda c: c.ftp.mkd(path))

    @rule(path=paths, data=payloads)
    def stor(self, path: str, data: bytes) -> None:
        self.both(lambda c: c.ftp.storbinary(f"STOR {path}", io.BytesIO(data)))

    @rule(path=paths, data=payloads)
    def appe(self, path: str, data: bytes) -> None:
        self.both(lambda c: c.ftp.storbinary(f"APPE {path}", io.BytesIO(data)))

    @rule(path=paths, offset=st.integers(min_value=0, max_value=70), data=payloads)
    def rest_stor(self, path: str, offset: int, data: bytes) -> None:
        self.both(lambda c: c.ftp.storbinary(f"STOR {path}", io.BytesIO(data), rest=offset))

    @rule(path=paths, offset=st.none() | st.integers(min_value=0, max_value=70))
    def retr(self, path: str, offset: int | None) -> None:
        self.both(lambda c: retrieve(c, path, offset))

    @rule(source=paths, destination=paths)
    def rename(self, source: str, destination: str) -> None:
        self.both(lambda c: c.ftp.rename(source, destination))

    @rule(path=paths)
    def dele(self, path: str) -> None:
        self.both(lambda c: c.ftp.delete(path))

    @rule(path=paths)
    def rmd(self, path: str) -> None:
        self.both(lambda c: c.ftp.rmd(path))

    @rule(path=paths, when=times)
    def mfmt(self, path: str, when: str) -> None:
        found = outcome(lambda: self.clients["local"].ftp.sendcmd(f"MLST {path}"))
        if found[0] == "ok" and "type=dir;" in found[1].lower():
            return  # S3 keeps no time for a directory (550 there): a difference by design
        if self.both(lambda c: c.ftp.sendcmd(f"MFMT {when} {path}"))[0] == "ok":
            self.both(lambda c: c.ftp.sendcmd(f"MDTM {path}"))
            self.both(lambda c: listed_modify(c, path))

    @rule(path=paths, algorithm=algorithms)
    def hash(self, path: str, algorithm: str) -> None:
        self.both(lambda c: (c.ftp.sendcmd(f"OPTS HASH {algorithm}"), c.ftp.sendcmd(f"HASH {path}")))

    @rule(path=st.just("") | paths)
    def list(self, path: str) -> None:
        self.both(lambda c: listing(c, path))

    @invariant()
    def same_tree(self) -> None:
        if self.clients:
            self.both(
                lambda c: [
                    (name, facts["type"], facts.get("size"))
                    for name, facts in sorted(c.ftp.mlsd(facts=["type", "size"]))
                ]
            )

    def teardown(self) -> None:
        for client in self.clients.values():
            client.quit()


@pytest.fixture
def two_gateways(tmp_path: Path, s3_endpoint: str) -> Iterator[tuple[GatewayThread, GatewayThread]]:
    (tmp_path / "local").mkdir()
    (tmp_path / "s3").mkdir()
    with (
        running(gateway_settings(tmp_path / "local")) as local,
        running(gateway_settings(tmp_path / "s3", s3_endpoint=s3_endpoint, s3={"part_size": 5 * MiB})) as s3,
    ):
        yield local, s3


def test_local_and_s3_backends_agree(two_gateways: tuple[GatewayThread, GatewayThread]) -> None:
    local, s3 = two_gateways
    run_state_machine_as_test(
        lambda: BackendsAgree(local, s3),
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
