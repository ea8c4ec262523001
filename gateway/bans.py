"""Bans (``[bans]``): failed logins counted per client IP and per user name within ``bans.window`` seconds.

* An IP with ``bans.max_failures`` failed logins in the window is banned for ``bans.duration``: its new control
  connections get ``421`` and are closed before a session exists (``GatewayServer.dispatcher``), and a session it
  still holds is closed at its next PASS. Logins from other IPs are never affected.
* A user name with as many failures is slowed, never locked out: every PASS for it first waits
  ``limits.failed_login_delay``, doubled with each further failure, at most ``bans.name_delay_max`` seconds. The
  wait comes *before* the password is checked, for right and wrong passwords alike. A wait only after a wrong
  password would not slow a guesser at all: a right password answers at once, so a guesser gives up on every
  answer slower than that and reconnects. The owner's own logins are slowed by at most the cap, never refused.
* The counts live in this server's memory, or in Redis (``bans.redis_url``, else ``cluster.redis_url``), shared by
  every replica and by ``ftp-gateway ban list|delete``. Each failure is one Lua script (sorted sets of failure
  times, the ban a key with an expiry, Redis' own clock), so replicas counting at once never lose a failure. When
  Redis does not answer, the gateway logs it once and counts in memory (a ban made then holds on this replica), and
  asks Redis again every :data:`RETRY_AFTER` seconds; bans made in either place are honoured.

* One client IP's PASS take turns in a server (:meth:`Bans.login_turn`), from the ban check until its failure is
  counted: else N parallel connections would all pass the check before the first failure is counted. An IPv6 client
  is counted per network (``bans.ipv6_prefix``, /64), as its addresses rotate within it (:func:`client_key`). Only
  names a user can have are counted per name (:func:`counted_name`).

Traps avoided: no module-level state (each server its own store); a black-holed Redis costs a new connection at most
``bans.redis_timeout`` once per :data:`RETRY_AFTER`, not on every connection; names an attacker makes up expire
(memory is swept, Redis keys carry the window as expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gateway.config import BanSettings, Settings
from gateway.users.store import NAME_PATTERN

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Seconds between attempts to reach a Redis that did not answer; meanwhile the memory store counts.
RETRY_AFTER = 5.0
# The memory store drops expired entries after this many new ones.
SWEEP_EVERY = 1000

# Failures kept per IP or name at most (beyond max_failures): a name under a long attack from many addresses costs
# no more memory than this, and the delay has long reached its cap.
KEPT_BEYOND_MAX = 64

# KEYS: the IP's ban, the IP's failures, the name's failures (absent: a name no user can have, not counted).
# ARGV: window ms, max failures, ban ms, a unique id, failures kept.
# Returns {state, ip failures, name failures}: state 0 not banned, 1 banned before, 2 banned by this failure.
FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local counts = {0, 0}
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], now, now .. ':' .. ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -tonumber(ARGV[5]) - 1)
  redis.call('PEXPIRE', KEYS[i], window)
  counts[i - 1] = redis.call('ZCARD', KEYS[i])
end
local state = 0
if redis.call('PTTL', KEYS[1]) > 0 then
  state = 1
elseif counts[1] >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], counts[1], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  state = 2
end
return {state, counts[1], counts[2]}
"""
# KEYS: the IP's ban, the name's failures. ARGV: window ms. Returns {ban ms left (<= 0: none), name failures}.
CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('PTTL', KEYS[1]), redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[1]), '+inf')}
"""


class BanStoreError(Exception):
    """The ban store (Redis) cannot be reached: one line for the operator."""


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed login left: the IP is banned (``newly``: by this very failure), the failures counted."""

    banned: bool
    newly: bool
    ip_failures: int
    name_failures: int


@dataclass(frozen=True, slots=True, order=True)
class BannedIP:
    ip: str
    remaining: float
    failures: int


@dataclass(frozen=True, slots=True, order=True)
class NameFailures:
    name: str
    failures: int


class BanStore(Protocol):
    async def banned(self, ip: str) -> float | None:
        """Seconds the IP stays banned, or None."""

    async def check(self, ip: str, name: str | None) -> tuple[float | None, int]:
        """Before a login: the IP's ban (as :meth:`banned`) and the name's failures in the window (0 for None)."""

    async def failure(self, ip: str, name: str | None) -> Failure:
        """Count a failed login for the IP and the name (None: not counted per name, see :func:`counted_name`)."""

    async def bans(self) -> list[BannedIP]: ...

    async def names(self) -> list[NameFailures]:
        """User names with failures in the window."""

    async def delete(self, ip: str) -> bool:
        """Lift the IP's ban and forget its failures; False when it was not banned."""

    async def aclose(self) -> None: ...


def client_key(host: str, ipv6_prefix: int) -> str:
    """What a client's failures, ban and connections are counted under: an IPv4 address (an IPv4-mapped IPv6
    address as IPv4), an IPv6 address's ``/ipv6_prefix`` network (``2001:db8:1:2::/64``: one client's addresses
    rotate within it), the IPv6 address itself at 128. ValueError for what is not an address."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def ban_key(text: str, ipv6_prefix: int) -> str:
    """The key of what ``ban delete`` was given: an address, or the network ``ban list`` shows (its /ipv6_prefix);
    ValueError otherwise, with one line for the operator."""
    if "/" not in text:
        return client_key(text, ipv6_prefix)
    network = ipaddress.ip_network(text, strict=False)
    if network.prefixlen == network.max_prefixlen or (network.version == 6 and network.prefixlen == ipv6_prefix):
        return client_key(str(network.network_address), ipv6_prefix)
    raise ValueError(
        f"{text} is not what bans are kept for: an IPv4 address, or an IPv6 address or its /{ipv6_prefix} network "
        "(bans.ipv6_prefix)"
    )


def counted_name(name: str) -> str | None:
    """The name failures are counted under, or None: a name no user can have (``users.store.NAME_PATTERN``, at
    most 64 characters) is not counted per name. Only an IP's count bans, and slowing a name nobody owns protects
    nobody, while keeping every made-up name (up to the 64 KiB line limit) as a key in memory or Redis for a whole
    window would let a botnet fill them."""
    return name if NAME_PATTERN.fullmatch(name) else None


class MemoryStore:
    """The counts in this process (monotonic clock), for one server."""

    def __init__(self, policy: BanSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._ip_failures: dict[str, deque[float]] = {}
        self._name_failures: dict[str, deque[float]] = {}
        self._bans: dict[str, tuple[float, int]] = {}
        self._added = 0

    def _count(self, table: dict[str, deque[float]], key: str, now: float, add: bool) -> int:
        times = table.get(key)
        if times is None:
            if not add:
                return 0
            times = table[key] = deque(maxlen=self._policy.max_failures + KEPT_BEYOND_MAX)
        while times and times[0] <= now - self._policy.window:
            times.popleft()
        if add:
            times.append(now)
        elif not times:
            del table[key]
        return len(times)

    async def banned(self, ip: str) -> float | None:
        entry = self._bans.get(ip)
        if entry is None:
            return None
        remaining = entry[0] - self._clock()
        if remaining <= 0:
            del self._bans[ip]
            return None
        return remaining

    async def check(self, ip: str, name: str | None) -> tuple[float | None, int]:
        if name is None:
            return await self.banned(ip), 0
        return await self.banned(ip), self._count(self._name_failures, name, self._clock(), add=False)

    async def failure(self, ip: str, name: str | None) -> Failure:
        now = self._clock()
        self._added += 1
        if self._added % SWEEP_EVERY == 0:
            self._sweep(now)
        ip_failures = self._count(self._ip_failures, ip, now, add=True)
        name_failures = 0 if name is None else self._count(self._name_failures, name, now, add=True)
        if await self.banned(ip) is not None:
            return Failure(True, False, ip_failures, name_failures)
        if ip_failures < self._policy.max_failures:
            return Failure(False, False, ip_failures, name_failures)
        self._bans[ip] = (now + self._policy.duration, ip_failures)
        del self._ip_failures[ip]
        return Failure(True, True, ip_failures, name_failures)

    def _sweep(self, now: float) -> None:
        for table in (self._ip_failures, self._name_failures):
            for key in [key for key, times in table.items() if not times or times[-1] <= now - self._policy.window]:
                del table[key]
        for ip in [ip for ip, (until, _) in self._bans.items() if until <= now]:
            del self._bans[ip]

    async def bans(self) -> list[BannedIP]:
        now = self._clock()
        return sorted(BannedIP(ip, until - now, n) for ip, (until, n) in self._bans.items() if until > now)

    async def names(self) -> list[NameFailures]:
        now = self._clock()
        counted = ((name, self._count(self._name_failures, name, now, add=False)) for name in list(self._name_failures))
        return sorted(NameFailures(name, n) for name, n in counted if n)

    async def delete(self, ip: str) -> bool:
        banned = await self.banned(ip) is not None
        self._ip_failures.pop(ip, None)
        self._bans.pop(ip, None)
        return banned

    async def aclose(self) -> None:
        pass


class RedisStore:
    """The counts in Redis, shared by the replicas (and read by ``ftp-gateway ban``). Every request is bounded by
    ``bans.redis_timeout``; failures raise :class:`BanStoreError`. redis is imported here only, so a gateway
    without Redis never imports it."""

    def __init__(self, policy: BanSettings, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._policy = policy
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._redis: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=policy.redis_timeout,
            socket_connect_timeout=policy.redis_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._failure = self._redis.register_script(FAILURE)
        self._check = self._redis.register_script(CHECK)
        # Every key of the bans starts with it (``ban list`` scans under it).
        self.prefix = f"{prefix}:bans:"

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def _call(self, request: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._policy.redis_timeout):
                return await request
        except self._errors as exc:
            raise BanStoreError(f"Redis unreachable: {exc or type(exc).__name__}") from exc

    async def banned(self, ip: str) -> float | None:
        left = await self._call(self._redis.pttl(self._key("ip", ip)))
        return left / 1000 if left > 0 else None

    async def check(self, ip: str, name: str | None) -> tuple[float | None, int]:
        if name is None:
            return await self.banned(ip), 0
        keys = [self._key("ip", ip), self._key("name", name)]
        left, failures = await self._call(self._check(keys=keys, args=[int(self._policy.window * 1000)]))
        return (left / 1000 if left > 0 else None), int(failures)

    async def failure(self, ip: str, name: str | None) -> Failure:
        policy = self._policy
        keys = [self._key("ip", ip), self._key("failures", ip)]
        if name is not None:
            keys.append(self._key("name", name))
        args: list[int | str] = [
            int(policy.window * 1000),
            policy.max_failures,
            int(policy.duration * 1000),
            secrets.token_hex(4),
            policy.max_failures + KEPT_BEYOND_MAX,
        ]
        state, ip_failures, name_failures = await self._call(self._failure(keys=keys, args=args))
        return Failure(state > 0, state == 2, int(ip_failures), int(name_failures))

    async def _scan(self, kind: str) -> list[str]:
        async def keys() -> list[str]:
            return [key.decode() async for key in self._redis.scan_iter(match=self._key(kind, "*"), count=500)]

        return [key.removeprefix(self._key(kind, "")) for key in await self._call(keys())]

    async def bans(self) -> list[BannedIP]:
        ips = await self._scan("ip")
        pipe = self._redis.pipeline(transaction=False)
        for ip in ips:
            pipe.get(self._key("ip", ip))
            pipe.pttl(self._key("ip", ip))
        results: list[Any] = await self._call(pipe.execute()) if ips else []
        found = []
        for ip, failures, left in zip(ips, results[::2], results[1::2], strict=True):
            if failures is not None and left > 0:
                found.append(BannedIP(ip, left / 1000, int(failures)))
        return sorted(found)

    async def names(self) -> list[NameFailures]:
        names = await self._scan("name")
        since = (time.time() - self._policy.window) * 1000
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.zcount(self._key("name", name), since, "+inf")
        counts: list[int] = await self._call(pipe.execute()) if names else []
        return sorted(NameFailures(name, n) for name, n in zip(names, counts, strict=True) if n)

    async def delete(self, ip: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._key("ip", ip))
        pipe.delete(self._key("failures", ip))
        removed, _ = await self._call(pipe.execute())
        return bool(removed)

    async def aclose(self) -> None:
        await self._redis.aclose()


class FallbackStore:
    """Redis, and this process's memory while Redis does not answer (logged once per outage; Redis is asked again
    every ``retry_after`` seconds). A ban made in memory during an outage still holds on this replica after it."""

    def __init__(self, shared: BanStore, memory: MemoryStore, retry_after: float = RETRY_AFTER) -> None:
        self.shared = shared
        self.memory = memory
        self._retry_after = retry_after
        # Until when Redis is not asked (monotonic time); None while it answers.
        self._down_until: float | None = None

    @property
    def down(self) -> bool:
        return self._down_until is not None

    async def _either(self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]) -> T:
        now = time.monotonic()
        if self._down_until is not None and now < self._down_until:
            return await local()
        try:
            result = await shared()
        except BanStoreError as exc:
            if self._down_until is None:
                logger.error(
                    "ban store: %s; counting failed logins in this process's memory, asking Redis again every %g s",
                    exc,
                    self._retry_after,
                )
            self._down_until = now + self._retry_after
            return await local()
        if self._down_until is not None:
            self._down_until = None
            logger.warning("ban store: Redis reachable again")
        return result

    async def banned(self, ip: str) -> float | None:
        local = await self.memory.banned(ip)
        if local is not None:
            return local
        return await self._either(lambda: self.shared.banned(ip), lambda: self.memory.banned(ip))

    async def check(self, ip: str, name: str | None) -> tuple[float | None, int]:
        local = await self.memory.check(ip, name)
        if local[0] is not None:
            return local
        return await self._either(lambda: self.shared.check(ip, name), lambda: self.memory.check(ip, name))

    async def failure(self, ip: str, name: str | None) -> Failure:
        return await self._either(lambda: self.shared.failure(ip, name), lambda: self.memory.failure(ip, name))

    async def bans(self) -> list[BannedIP]:
        return sorted([*await self.memory.bans(), *await self._either(self.shared.bans, _nothing)])

    async def names(self) -> list[NameFailures]:
        return sorted([*await self.memory.names(), *await self._either(self.shared.names, _nothing)])

    async def delete(self, ip: str) -> bool:
        local = await self.memory.delete(ip)
        return await self._either(lambda: self.shared.delete(ip), _false) or local

    async def aclose(self) -> None:
        await self.shared.aclose()


async def _nothing() -> list[Any]:
    return []


async def _false() -> bool:
    return False


def redis_store(settings: Settings) -> RedisStore | None:
    """The bans' Redis: ``bans.redis_url``, else the cluster's (keys under ``bans.key_prefix``, else the cluster's);
    None: memory."""
    url = settings.bans.redis_url or settings.cluster.redis_url
    if url is None:
        return None
    return RedisStore(settings.bans, url, settings.bans.key_prefix or settings.cluster.key_prefix)


class Events(Protocol):
    """Where a ban is reported (``gateway.metrics.Metrics``, ``gateway.audit.AuditLog``)."""

    def ip_banned(self) -> None: ...


class Audit(Protocol):
    def event(self, event: str, **fields: Any) -> None: ...


@dataclass(slots=True)
class _Turn:
    """The lock of one client IP's logins, and how many PASS hold it or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Bans:
    """What the server asks of the bans, with its per-IP connection counts: one per server (never shared)."""

    def __init__(self, settings: Settings, events: Events, audit: Audit, store: BanStore | None = None) -> None:
        self._settings = settings
        self._events = events
        self._audit = audit
        self.store: BanStore = store or MemoryStore(settings.bans)
        # Control connections open per client IP (only counted when limits.max_connections_per_ip is set).
        self._open: Counter[str] = Counter()
        # The login turns of client IPs with a PASS under way: deleted when the last one is done.
        self._turns: dict[str, _Turn] = {}

    def key(self, host: str) -> str:
        """What ``host``'s failures, ban, connections and login turns are counted under (:func:`client_key`)."""
        try:
            return client_key(host, self._settings.bans.ipv6_prefix)
        except ValueError:
            return host  # a unix socket or a test's odd peer: counted under what it is

    @contextlib.asynccontextmanager
    async def login_turn(self, host: str) -> AsyncIterator[None]:
        """One PASS at a time per client IP in this server, held from :meth:`before_login` until its failure is
        counted (:meth:`failed`): else N parallel connections would all pass the ban check before the first
        failure is counted, and an IP would get N guesses in place of ``bans.max_failures``. Other IPs never
        wait; a user name is not serialized (its owner would queue behind a guesser's attempts)."""
        ip = self.key(host)
        turn = self._turns.get(ip)
        if turn is None:
            turn = self._turns[ip] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[ip]

    async def refusal(self, host: str) -> tuple[str, str] | None:
        """Why a new control connection from ``host`` is refused, as (reason, the 421's text), or None: then it
        is counted as one of ``host``'s connections until :meth:`closed`."""
        ip = self.key(host)
        left = await self.store.banned(ip)
        if left is not None:
            return "banned", f"Too many failed logins from your address; try again in {int(left) + 1} seconds."
        limit = self._settings.limits.max_connections_per_ip
        if limit:
            if self._open[ip] >= limit:
                return "per_ip_limit", f"Too many connections from your address (at most {limit}); closing."
            self._open[ip] += 1
        return None

    def closed(self, host: str) -> None:
        """A connection :meth:`refusal` let in has ended."""
        if not self._settings.limits.max_connections_per_ip:
            return
        ip = self.key(host)
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]

    async def before_login(self, host: str, name: str) -> tuple[bool, float]:
        """At PASS, before the password is checked: is the IP banned, and how long this name's logins wait."""
        left, failures = await self.store.check(self.key(host), counted_name(name))
        return left is not None, self.name_delay(failures)

    def name_delay(self, failures: int) -> float:
        """From ``max_failures`` failures on: ``limits.failed_login_delay``, doubled with each further failure, at
        most ``bans.name_delay_max``."""
        policy = self._settings.bans
        over = failures - policy.max_failures
        if over < 0:
            return 0.0
        return min(policy.name_delay_max, self._settings.limits.failed_login_delay * 2.0 ** min(over, 32))

    async def failed(self, host: str, name: str) -> bool:
        """Count a failed login; True when the IP is banned (now or before)."""
        policy = self._settings.bans
        ip = self.key(host)
        failure = await self.store.failure(ip, counted_name(name))
        if failure.newly:
            logger.warning(
                "client %s banned for %g seconds: %d failed logins within %g seconds",
                host if ip == host else f"{host} ({ip})",
                policy.duration,
                failure.ip_failures,
                policy.window,
            )
            self._events.ip_banned()
            self._audit.event("ban", failures=failure.ip_failures, duration=policy.duration)
        if failure.name_failures == policy.max_failures and policy.name_delay_max:
            logger.warning(
                "user name %r slowed: %d failed logins within %g seconds", name, failure.name_failures, policy.window
            )
        return failure.banned


def make_store(settings: Settings) -> FallbackStore | None:
    """The Redis-backed store when one is configured (see :func:`redis_store`), else None (memory)."""
    shared = redis_store(settings)
    return None if shared is None else FallbackStore(shared, MemoryStore(settings.bans))
