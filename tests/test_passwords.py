"""Password checks: argon2id in a pool of its own whose memory goes back to the system."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from gateway.users.passwords import Passwords
from tests.clients import ftp_login
from tests.helpers import GatewayThread, gateway_settings, running

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Eight verifications, four at a time, in a pool of four threads; prints how much the RSS grew (MiB).
RSS_AFTER_VERIFICATIONS = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.users.passwords import Passwords, unmap_large_blocks

    def rss_mib():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

    async def main():
        passwords = Passwords(concurrency=4)
        password_hash = passwords.hash_now("secret")
        if sys.argv[1] == "unmap":
            assert unmap_large_blocks()
        before = rss_mib()
        try:
            assert all(await asyncio.gather(*(passwords.verify(password_hash, "secret") for _ in range(8))))
        finally:
            passwords.close()
        print(rss_mib() - before)

    asyncio.run(main())
    """
)


def rss_growth(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", RSS_AFTER_VERIFICATIONS, mode], capture_output=True, text=True, check=True
    )
    return float(result.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc keeps freed blocks in per-thread arenas; others differ")
def test_argon2_memory_goes_back_to_the_system_after_each_verification() -> None:
    # Without the setting, each hashing thread keeps its 19 MiB (the case the setting exists for) ...
    assert rss_growth("keep") > 19 * 2
    # ... with it, every block is unmapped when freed.
    assert rss_growth("unmap") < 10


def password_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("ftp-password")]


def test_hashing_threads_are_the_servers_own_and_end_with_it(tmp_path: Path) -> None:
    assert password_threads() == []
    with running(gateway_settings(tmp_path)) as gateway:
        gateway.add_user("alice", "right")
        ftp_login(gateway.host, gateway.port, "alice", "right").quit()
        assert password_threads() != []
        assert len(password_threads()) <= server_passwords(gateway).concurrency
    assert password_threads() == []


def server_passwords(gateway: GatewayThread) -> Passwords:
    assert gateway.server is not None
    return gateway.server.user_manager.passwords
