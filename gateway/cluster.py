"""Several replicas behind one load balancer, sharing one passive range (``cluster.redis_url``).

A load balancer sends each new TCP connection to any replica, so a passive data connection often lands on a
replica that does not hold its session. Here:

* every replica listens on the whole passive range, all the time;
* a replica that hands out port P claims it in Redis first (``SET NX PX``: P -> this replica's node address and the
  client's IP, with an expiry renewed while the session keeps the port), and gives it back when the transfer ends
  (compare-and-delete: only a claim still its own);
* a data connection accepted on P goes to the local session waiting on P if there is one (IP check as with one
  replica); otherwise the claim names the owner, and the connection is spliced to the owner's port P with a
  PROXY v2 header carrying the client's address, so the owner's IP check still holds;
* each replica announces its node address in Redis with a heartbeat: the owner reads a PROXY header from another
  live replica (as from ``proxy_protocol.trusted`` networks), and from nobody else.

With Redis down (logged once, and once on recovery), ports come from the local pool: sessions whose data
connections land on their own replica still work, relayed ones fail with a log line. Claims made meanwhile are
written to Redis by the next heartbeat after it is back, without a restart.

Traps avoided: a relayed connection is never relayed again (two replicas that disagree about an owner would bounce
it forever); the relay binds its source to the node address (on a host with several addresses the kernel would
pick another, which the owner would not know as a replica's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, NamedTuple, Self

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway import aioftp_compat, relay
from gateway.config import Settings
from gateway.datachannel import Deliver, peer_of, plain_ip
from gateway.metrics import Metrics
from gateway.proxy_protocol import ProxyHeaderError, ProxyPolicy, encode_v2

logger = logging.getLogger(__name__)

# Delete a claim only if it is still this replica's (it may have expired and been taken by another meanwhile).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Renew this replica's claims; write back those Redis lost (a restart, or claims made while it was down).
RENEW = """
local n = 0
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1]); n = n + 1
  elseif not value then
    redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1]); n = n + 1
  end
end
return n
"""
# Threads for relays: two per relayed connection (one per direction), created as needed. Past 128 relays at once
# a direction waits for a thread; the data connection's timeouts bound that wait.
RELAY_THREADS = 256


class ClusterError(Exception):
    """Cluster mode cannot start as configured; the message is one line for the operator."""


class RegistryDown(Exception):
    pass


class Claim(NamedTuple):
    node: str
    client: str


class _NoListener:
    """The listeners of a cluster stay open; a session's port is given back through ``give_back`` alone."""

    def close(self) -> None:
        pass


NO_LISTENER = _NoListener()


def node_address(settings: Settings) -> str:
    address = settings.cluster.node_address or settings.listen_host
    if address in ("0.0.0.0", "::", ""):  # noqa: S104 - checking for it, not binding it
        raise ClusterError(
            f"cluster.node_address is needed: the control listener's host {address!r} is not an address other "
            "replicas can reach (set the pod IP, FTP_GATEWAY_CLUSTER__NODE_ADDRESS)"
        )
    return address


class ClusterPorts:
    """The passive range shared by the replicas through Redis (see the module's docstring); it replaces
    ``PassivePorts`` on the server, with the same interface, and is entered on ``running_gateway``'s stack."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        cluster = settings.cluster
        if cluster.redis_url is None:
            raise ClusterError("cluster mode needs cluster.redis_url")
        self.node = _canonical(node_address(settings))
        self._host = settings.listen_host
        self._ports = settings.passive.ports
        self._prefix = cluster.key_prefix
        self._ttl_ms = int(cluster.claim_ttl * 1000)
        self._timeout = cluster.redis_timeout
        self._connect_timeout = settings.timeouts.data_connection
        self._idle = settings.timeouts.socket
        self._metrics = metrics
        self._redis = aioredis.from_url(
            cluster.redis_url,
            socket_timeout=cluster.redis_timeout,
            socket_connect_timeout=cluster.redis_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._release = self._redis.register_script(RELEASE)
        self._renew = self._redis.register_script(RENEW)
        proxy = settings.proxy_protocol
        self.policy = ProxyPolicy(
            proxy.trusted, required=proxy.required, timeout=proxy.header_timeout, also_trusted=self.is_node
        )
        # Ports this replica handed out: port -> (the session's deliver, the claim's value in Redis).
        self._local: dict[int, tuple[Deliver, str]] = {}
        self._next = random.randrange(len(self._ports))  # noqa: S311 - spreads the replicas' first picks
        self._nodes: set[str] = set()
        self._down = False
        self._listeners: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        # Relays leave from the node address, which the owner knows as a replica's (a name is left to the kernel).
        self._bind_source = _is_ip(self.node)
        # Relays still running when the server stops may finish for as long as transfers may (``timeouts.drain``).
        self._drain = settings.timeouts.drain
        self._executor = ThreadPoolExecutor(max_workers=RELAY_THREADS, thread_name_prefix="ftp-relay")

    # -- life cycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            for port in self._ports:
                self._listeners.append(await asyncio.start_server(self._accepter(port), self._host, port))
            await self._beat()
            self._heartbeat = asyncio.create_task(self._beating())
        except BaseException:
            await self.aclose()
            raise
        logger.info(
            "cluster member %s: listening on passive ports %d-%d, registry %s",
            self.node,
            self._ports.start,
            self._ports.stop - 1,
            "reachable" if not self._down else "unreachable",
        )
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.wait({self._heartbeat})
        for listener in self._listeners:
            listener.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self._drain or None)
        for task in self._tasks:
            task.cancel()
        if not self._down:
            with contextlib.suppress(RegistryDown):
                pipe = self._redis.pipeline(transaction=False)
                pipe.zrem(self._key("nodes"), self.node)
                for port, (_, value) in self._local.items():
                    await self._release(keys=[self._key(f"port:{port}")], args=[value], client=pipe)
                await self._call(pipe.execute())
        self._local.clear()
        await self._redis.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- Redis -------------------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    async def _call(self, request: Any) -> Any:
        """One Redis request, bounded; :class:`RegistryDown` (logged once) when Redis does not answer."""
        try:
            async with asyncio.timeout(self._timeout):
                result = await request
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._down:
                self._down = True
                logger.error(
                    "cluster registry unreachable (%s): handing out passive ports from the local pool; data "
                    "connections landing on another replica fail until it is back",
                    exc or type(exc).__name__,
                )
            raise RegistryDown from exc
        if self._down:
            self._down = False
            logger.warning("cluster registry reachable again")
        return result

    async def _beat(self) -> None:
        """Announce this replica, learn the live ones, renew (or write back) this replica's claims."""
        now = int(time.time() * 1000)
        pipe = self._redis.pipeline(transaction=False)
        nodes = self._key("nodes")
        pipe.zadd(nodes, {self.node: now + self._ttl_ms})
        pipe.zremrangebyscore(nodes, "-inf", now)
        pipe.zrange(nodes, 0, -1)
        claims = list(self._local.items())
        if claims:
            keys = [self._key(f"port:{port}") for port, _ in claims]
            await self._renew(keys=keys, args=[self._ttl_ms, *(value for _, (_, value) in claims)], client=pipe)
        try:
            results = await self._call(pipe.execute())
        except RegistryDown:
            return
        self._nodes = {node.decode() for node in results[2]}

    async def _beating(self) -> None:
        """Every third of the claims' lifetime, for as long as the replica runs: an unexpected error is logged and
        the next beat comes all the same (a heartbeat that stopped would let this replica's claims expire)."""
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                await self._beat()
            except Exception:
                logger.exception("cluster heartbeat failed")

    async def is_node(self, host: str) -> bool:
        """``host`` is a live replica's node address (it relays data connections here, with a PROXY header). A
        peer seen through a dual-stack listener (``::ffff:10.0.0.5``) is the replica that registered 10.0.0.5."""
        host = _canonical(host)
        if host in self._nodes:
            return True
        if self._down:
            return False
        try:
            score = await self._call(self._redis.zscore(self._key("nodes"), host))
        except RegistryDown:
            return False
        if score is not None and score > time.time() * 1000:
            self._nodes.add(host)
            return True
        return False

    # -- handing out ports ---------------------------------------------------------------------------------

    @property
    def in_use(self) -> int:
        return len(self._local)

    async def open(self, host: str, client_ip: str, deliver: Deliver) -> tuple[int, _NoListener] | None:
        """Claim a free port of the range for a session of ``client_ip``; None when every port is taken."""
        value = json.dumps({"node": self.node, "client": client_ip})
        size = len(self._ports)
        for _ in range(size):
            port = self._ports[self._next % size]
            self._next += 1
            if port in self._local:
                continue
            if not self._down:
                try:
                    claimed = await self._call(
                        self._redis.set(self._key(f"port:{port}"), value, nx=True, px=self._ttl_ms)
                    )
                except RegistryDown:
                    claimed = True  # the local pool: only connections landing here can reach the session
                if not claimed or port in self._local:
                    continue
            self._local[port] = (deliver, value)
            return port, NO_LISTENER
        return None

    def give_back(self, port: int) -> None:
        entry = self._local.pop(port, None)
        if entry is None or self._down:
            return  # a claim Redis did not get expires by itself
        task = asyncio.get_running_loop().create_task(self._give_back(port, entry[1]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, port: int, value: str) -> None:
        with contextlib.suppress(RegistryDown):
            await self._call(self._release(keys=[self._key(f"port:{port}")], args=[value]))

    async def lookup(self, port: int) -> Claim | None:
        try:
            raw = await self._call(self._redis.get(self._key(f"port:{port}")))
        except RegistryDown:
            return None
        if raw is None:
            return None
        data = json.loads(raw)
        return Claim(str(data["node"]), str(data["client"]))

    # -- data connections -----------------------------------------------------------------------------------

    def _accepter(self, port: int) -> Any:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            try:
                await self._accept(port, reader, writer)
            except Exception:
                logger.exception("data connection on port %d failed", port)
                writer.close()
            finally:
                self._tasks.discard(task)

        return accept

    async def _accept(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer)
        try:
            client = await self.policy.client_of(reader, peer)
        except ProxyHeaderError as exc:
            logger.warning("data connection on port %d from %s refused: %s", port, peer[0], exc)
            writer.close()
            return
        from_replica = _canonical(peer[0]) in self._nodes and not self.policy.trusts(peer[0])
        local = self._local.get(port)
        if local is not None:
            if from_replica:
                self._metrics.relayed_data_connections.labels("received").inc()
            local[0](reader, writer, client[0])
            return
        if from_replica:
            logger.warning("data connection relayed by %s for port %d, which this replica does not hold", peer[0], port)
            writer.close()
            return
        claim = await self.lookup(port)
        if claim is None or claim.node == self.node:
            logger.warning(
                "data connection from %s on port %d closed: %s",
                client[0],
                port,
                "the registry is unreachable" if self._down else "no session waits on that port",
            )
            writer.close()
            return
        if plain_ip(client[0]) != plain_ip(claim.client):
            logger.warning(
                "data connection from %s on port %d refused: the session's client is %s", client[0], port, claim.client
            )
            writer.close()
            return
        await self._relay(port, reader, writer, client, claim.node)

    async def _relay(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: tuple[str, int], node: str
    ) -> None:
        """Splice the connection to ``node``'s port ``port``, after a PROXY v2 header with the client's address."""
        owner = socket.socket(socket.AF_INET6 if ":" in node else socket.AF_INET, socket.SOCK_STREAM)
        try:
            owner.setblocking(False)
            if self._bind_source:
                owner.bind((self.node, 0))
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._connect_timeout):
                await loop.sock_connect(owner, (node, port))
                await loop.sock_sendall(owner, encode_v2(client, (node, port)))
        except (OSError, TimeoutError) as exc:
            owner.close()
            logger.warning("data connection from %s on port %d: relay to %s failed: %r", client[0], port, node, exc)
            writer.close()
            return
        self._metrics.relayed_data_connections.labels("sent").inc()
        transport = writer.transport
        transport.pause_reading()  # type: ignore[attr-defined]
        # What asyncio read past the header goes first; a client that already sent its FIN reads as ended again.
        first, _ = aioftp_compat.take_buffered(reader)
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        try:
            owner.setblocking(True)
            sock.setblocking(True)
            moved = await relay.splice(self._executor, sock, first, owner, self._idle)
            self._metrics.relayed_bytes.labels("sent").inc(moved)
        finally:
            sock.setblocking(False)
            sock.close()
            owner.close()
            writer.close()


def _canonical(host: str) -> str:
    """An IP address in one spelling (IPv4-mapped IPv6 as IPv4); a host name as it is."""
    try:
        return str(plain_ip(host))
    except ValueError:
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
