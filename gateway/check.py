"""``ftp-gateway check``: is this configuration usable, from here? What an operator and the Helm chart's pre-install
Job run before ``serve``.

One line per item on stdout, ``ok  `` or ``FAIL``, the item, what it is (database URLs without their password),
and what was found or why it failed: the configuration (it loaded, or ``cli.py`` has already stopped with exit 2),
the certificate and key when TLS is configured, the database (reachable, schema at the head revision), the default
storage and each distinct storage of a user in the database (``pathio_backends.probe``: reachable and writable).
Every probe is bounded by the settings' timeouts, so a firewall that drops packets makes a FAIL line, not a hang.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Settings
from gateway.users.db import (
    DatabaseError,
    create_engine,
    describe_error,
    display_url,
    is_sqlite,
    normalize_url,
    schema_revisions,
)
from gateway.users.store import UserStore
from pathio_backends.probe import StorageUnavailable, probe_storage, template_root
from pathio_backends.resources import BackendResources

# Storages probed at once.
PROBES_AT_ONCE = 8


@dataclass(frozen=True)
class Outcome:
    ok: bool
    item: str
    subject: str
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.item:<9} {self.subject}: {self.detail}"


async def run_checks(settings: Settings, config_file: Path | None, report: Callable[[str], None]) -> bool:
    """Check everything, calling ``report`` with each line as soon as it is known; True if all passed."""
    if config_file is None:
        outcomes = [Outcome(True, "config", "no config file", "defaults and FTP_GATEWAY_* variables")]
    else:
        outcomes = [Outcome(True, "config", str(config_file), "loaded")]
    report(outcomes[-1].line())
    if settings.tls.enabled:
        outcomes.append(_check_tls(settings))
        report(outcomes[-1].line())
    database, storages = await _check_database(settings)
    outcomes.append(database)
    report(database.line())
    resources = BackendResources(s3=settings.s3)
    try:
        default = settings.storage.default_uri
        outcomes.append(await _check_default_storage(default, resources, settings.timeouts.path))
        report(outcomes[-1].line())
        limit = asyncio.Semaphore(PROBES_AT_ONCE)

        async def one(uri: str, users: list[str]) -> Outcome:
            async with limit:
                return await _probe(uri, _whose(users), resources, settings.timeouts.path)

        for outcome in await asyncio.gather(*(one(uri, users) for uri, users in sorted(storages.items()))):
            outcomes.append(outcome)
            report(outcome.line())
    finally:
        await resources.aclose()
    return all(outcome.ok for outcome in outcomes)


def _check_tls(settings: Settings) -> Outcome:
    """The certificate and key load as ``serve`` loads them (``gateway.tls``)."""
    from gateway.tls import TLSError, make_context

    subject = str(settings.tls.cert_file)
    try:
        make_context(settings.tls)
    except TLSError as exc:
        return Outcome(False, "tls", subject, str(exc))
    return Outcome(True, "tls", subject, f"certificate and key {settings.tls.key_file} load")


async def storage_warning(settings: Settings, uri: str) -> str | None:
    """Why a user's new storage cannot be used from here, in one line, or None (``user add``/``user set``: the
    user is kept all the same, since the admin's machine may not reach the S3 the servers reach)."""
    resources = BackendResources(s3=settings.s3)
    try:
        await probe_storage(uri, resources, write=True, seconds=settings.timeouts.path)
    except StorageUnavailable as exc:
        return f"storage {uri} is not usable from here: {exc}"
    finally:
        await resources.aclose()
    return None


async def _check_database(settings: Settings) -> tuple[Outcome, dict[str, list[str]]]:
    """The database's outcome, and the users' own storages (URI -> user names) when it could be read."""
    try:
        url = normalize_url(settings.database.url)
    except DatabaseError as exc:
        return Outcome(False, "database", display_url(settings.database.url), str(exc)), {}
    shown = display_url(settings.database.url)
    if is_sqlite(url) and not await asyncio.to_thread(_sqlite_file_exists, url.database or ""):
        return Outcome(True, "database", shown, "does not exist yet: serve creates it"), {}
    seconds = settings.database.timeout
    engine = create_engine(settings.database)
    try:
        async with asyncio.timeout(seconds):
            current, head = await schema_revisions(engine)
            if current != head and not is_sqlite(url):
                state = "no ftp-gateway schema" if current is None else f"schema at revision {current}"
                return Outcome(
                    False, "database", shown, f"{state}, this version needs {head}: run 'ftp-gateway db upgrade'"
                ), {}
            if current is None:
                return Outcome(True, "database", shown, "no schema yet: serve creates it"), {}
            users = await UserStore(engine).list()
    except TimeoutError:
        return Outcome(False, "database", shown, f"no answer within {seconds:g} s"), {}
    except Exception as exc:  # noqa: BLE001 - any failure to reach or read it is one line
        return Outcome(False, "database", shown, describe_error(exc)), {}
    finally:
        await engine.dispose()
    storages: dict[str, list[str]] = {}
    for user in users:
        if user.storage_uri:
            storages.setdefault(user.storage_uri, []).append(user.name)
    if current != head:
        detail = f"reachable, schema at revision {current}: serve upgrades it to {head}"
    else:
        detail = f"reachable, schema at revision {head} (current)"
    return Outcome(True, "database", shown, f"{detail}; users: {len(users)}, own storages: {len(storages)}"), storages


async def _check_default_storage(template: str, resources: BackendResources, seconds: float) -> Outcome:
    """The default storage is a template (``{username}``): what is probed is the directory or prefix above the
    users' ones, which must exist (S3) or be creatable (local disk) for any user's first login to succeed."""
    subject = f"{template} (default)"
    root = template_root(template)
    if root is None:
        return Outcome(True, "storage", subject, "not checked: the bucket's name depends on the user")
    outcome = await _probe(root, "(default)", resources, seconds)
    if root == template:
        return outcome
    return Outcome(outcome.ok, "storage", subject, f"{root}: {outcome.detail}")


async def _probe(uri: str, whose: str, resources: BackendResources, seconds: float) -> Outcome:
    try:
        detail = await probe_storage(uri, resources, write=True, seconds=seconds)
    except StorageUnavailable as exc:
        return Outcome(False, "storage", f"{uri} {whose}", str(exc))
    return Outcome(True, "storage", f"{uri} {whose}", detail)


def _sqlite_file_exists(database: str) -> bool:
    return os.path.exists(os.path.expanduser(database))


def _whose(users: list[str]) -> str:
    if len(users) == 1:
        return f"(user {users[0]})"
    if len(users) <= 3:
        return f"(users {', '.join(users)})"
    return f"(users {', '.join(users[:3])} and {len(users) - 3} more)"
