"""Correct logins remembered for a few minutes, so that a client logging in again and again (a scanner, a cron job
with curl) pays argon2id's tens of milliseconds and 19 MiB once per ``ttl`` instead of every time.

What is kept is a keyed hash (HMAC-SHA256) of (name, password) under a key drawn at start and never written
anywhere, mapped to what the password was verified against: the user's row id, its ``revision`` and a keyed
hash of the password hash. Never the password, nor a plain hash of it. The price, as with any such cache:
someone who can read the process's memory finds the key next to the entries and can test guesses against
them at HMAC speed instead of argon2id's; but they could as well read passwords off the connections as
clients log in.

The traps it avoids:

* A change to a user must count at its next login, in every server on the database. The row is read at
  every login anyway (it says whether the user is enabled, and where its files are); an entry only counts
  while the row has the same id, revision and password hash. Every change through the store bumps the
  revision; the password hash catches the rest: SQLite reuses the id of a deleted row for the next user
  added, whose revision starts at 1 again, but whose hash has a fresh salt.
* A wrong password must cost the full argon2id price, so that guessing stays slow and a reply's timing tells
  nothing: failures are never remembered, and a miss goes to argon2id.
* Memory: at most ``size`` entries (the least recently used go first), each about 300 bytes.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from gateway.users.store import UserRecord


@dataclass(frozen=True, slots=True)
class _Verified:
    user_id: int
    revision: int
    hash_tag: bytes
    expires: float


class PasswordCache:
    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _tag(self, *parts: str) -> bytes:
        # Each part with its length in front, so that ("ab", "c") and ("a", "bc") differ.
        message = b"".join(
            len(encoded).to_bytes(4, "big") + encoded for encoded in (p.encode("utf-8", "surrogatepass") for p in parts)
        )
        return hmac.digest(self._key, message, "sha256")

    def check(self, name: str, password: str, row: UserRecord) -> bool:
        """True if ``password`` was verified for this very row (same id, revision and hash) less than ``ttl`` ago."""
        key = self._tag("login", name, password)
        entry = self._entries.get(key)
        if entry is None:
            return False
        if (
            entry.expires <= time.monotonic()
            or entry.user_id != row.id
            or entry.revision != row.revision
            or not hmac.compare_digest(entry.hash_tag, self._tag("hash", row.password_hash))
        ):
            del self._entries[key]
            return False
        self._entries.move_to_end(key)
        return True

    def remember(self, name: str, password: str, row: UserRecord, password_hash: str | None = None) -> None:
        """Remember that ``password`` is right for ``row``, whose hash is or is about to be ``password_hash``
        (a rehash with newer parameters, written with the login's stamp)."""
        key = self._tag("login", name, password)
        hash_tag = self._tag("hash", password_hash or row.password_hash)
        self._entries[key] = _Verified(row.id, row.revision, hash_tag, time.monotonic() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
