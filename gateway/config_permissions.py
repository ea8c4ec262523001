"""A config file that holds a secret must not be readable by other users of the machine.

The trap this avoids: a TOML file written with the usual umask (0644) hands the S3 secret key or the database
password to every local account, and nothing says so. Only keys that really hold a secret count (a database
URL without a password does not), so a harmless config readable by all is not nagged about.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config import ConfigError, read_config_file

# Keys whose value is a secret as such; and keys holding a URL, a secret when it carries a password.
SECRET_KEYS = (("s3", "secret_access_key"), ("s3", "session_token"))
URL_KEYS = (("database", "url"), ("cluster", "redis_url"), ("bans", "redis_url"))


def secrets_in(data: dict[str, Any]) -> list[str]:
    """The dotted names of the keys in a parsed config file that hold a secret."""
    found = []
    for section, key in SECRET_KEYS + URL_KEYS:
        table = data.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if not isinstance(value, str) or not value:
            continue
        if (section, key) in URL_KEYS:
            try:
                if not urlsplit(value).password:
                    continue
            except ValueError:
                continue  # not a URL: the settings' validation says so
        found.append(f"{section}.{key}")
    return found


def exposed_secrets(path: Path | None, *, strict: bool) -> str | None:
    """One line saying the config file ``path`` holds secrets and is readable by group or others, or None when it
    is not both (or there is no file). With ``strict`` that line is a :class:`ConfigError` instead."""
    if path is None:
        return None
    warning = _exposed(path)
    if warning is not None and strict:
        raise ConfigError(warning)
    return warning


def _exposed(path: Path) -> str | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # it was just read; gone since is no business of this check
    if not mode & (stat.S_IRGRP | stat.S_IROTH):
        return None
    names = secrets_in(read_config_file(path))
    if not names:
        return None
    readers = " and ".join(who for who, bit in (("group", stat.S_IRGRP), ("others", stat.S_IROTH)) if mode & bit)
    return (
        f"config file {str(path)!r} holds secrets ({', '.join(names)}) and is readable by {readers}"
        f" (mode {mode:04o}); chmod 600 it"
    )


def exposed_key(path: Path | None, *, strict: bool) -> str | None:
    """One line saying the TLS private key ``path`` is readable by others, or by a group that is not this process's
    own (a Kubernetes Secret mounted with the pod's fsGroup is group-readable by the gateway's own group, and fine).
    With ``strict`` that line is a :class:`ConfigError`. A missing file is ``serve``'s to report."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    mode = stat.S_IMODE(status.st_mode)
    own_group = status.st_gid == os.getegid() or status.st_gid in os.getgroups()
    readers = [
        who
        for who, readable in (("group", mode & stat.S_IRGRP and not own_group), ("others", mode & stat.S_IROTH))
        if readable
    ]
    if not readers:
        return None
    warning = f"TLS key file {str(path)!r} is readable by {' and '.join(readers)} (mode {mode:04o}); chmod 600 it"
    if strict:
        raise ConfigError(warning)
    return warning
