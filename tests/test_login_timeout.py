"""Sessions the server ends before a login get 421 with a reason, then the close (issue 13, item 3)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.helpers import gateway_settings, running
from tests.test_protocol import RawControl


def _closed(control: RawControl) -> bool:
    return control.file.readline() == b""


def test_third_wrong_password_gets_421_then_eof(tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path)) as gateway:
        gateway.add_user("alice")
        with RawControl(gateway) as control:
            for _ in range(2):
                control.send("USER alice", "PASS wrong")
                assert control.codes(2) == ["331", "530"]
            control.send("USER alice", "PASS wrong")
            assert control.reply()[:3] == "331"
            reply = control.reply()
            assert reply.startswith("421 Too many failed logins"), reply
            assert _closed(control)


def test_no_login_within_the_login_timeout_gets_421_then_eof(tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path, timeouts={"login": 1})) as gateway:
        gateway.add_user("alice")
        with RawControl(gateway) as silent, RawControl(gateway) as named:
            named.send("USER alice")
            assert named.reply()[:3] == "331"
            for control in (silent, named):
                reply = control.reply()  # blocks until the gateway speaks (the socket's own timeout is 10 s)
                assert reply.startswith("421 Login timed out"), reply
                assert _closed(control)


def test_a_session_logged_in_in_time_outlives_the_login_timeout(tmp_path: Path) -> None:
    with running(gateway_settings(tmp_path, timeouts={"login": 1})) as gateway:
        gateway.add_user("alice")
        with RawControl(gateway) as control:
            control.send("USER alice", "PASS secret")
            assert control.codes(2) == ["331", "230"]
            time.sleep(1.5)  # past the login's deadline: nothing may arrive meanwhile
            control.send("NOOP")
            assert control.reply()[:3] == "200"


def test_a_password_being_checked_at_the_deadline_gets_its_answer_first(tmp_path: Path) -> None:
    """The wrong password's delay (2 s) runs past the login's deadline (1 s): PASS still answers, then 421."""
    settings = gateway_settings(tmp_path, timeouts={"login": 1}, limits={"failed_login_delay": 2})
    with running(settings) as gateway:
        gateway.add_user("alice")
        with RawControl(gateway) as control:
            control.send("USER alice", "PASS wrong")
            assert control.codes(2) == ["331", "530"]
            reply = control.reply()
            assert reply.startswith("421 Login timed out"), reply
            assert _closed(control)
