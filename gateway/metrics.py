"""Prometheus metrics of one server (``/metrics`` on the admin endpoint), in a registry of its own.

One :class:`Metrics` per server, never prometheus-client's global registry: two servers in one process (the tests)
or two replicas count apart. Label values come from small fixed sets (verbs the server knows, reply classes,
directions, backends, results, S3 operations): never a user name, a path or an address.

Handlers call the intent-named methods (:meth:`Metrics.login`, :meth:`Metrics.transfer` ...), never the metric
objects. The S3 backend reports through :meth:`Metrics.s3_request`, :meth:`Metrics.multipart_started` and
:meth:`Metrics.multipart_ended`: the observer it is given (``pathio_backends.observer.StorageObserver``), so
``pathio_backends`` never imports the gateway.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# Transfers last from milliseconds (small files) to hours (large files over slow links).
TRANSFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
S3_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_open = Gauge("ftp_gateway_sessions_open", "Control connections open.", registry=r)
        self.logins = Counter(
            "ftp_gateway_logins", "Login attempts (PASS) by result.", ["result"], registry=r
        )  # result: success, failure, refused (disabled user, storage unavailable, limit)
        self.commands = Counter(
            "ftp_gateway_commands",
            "Commands answered, by verb (a verb the server does not know counts as 'other') and reply class.",
            ["verb", "reply_class"],
            registry=r,
        )
        self.transfer_bytes = Counter(
            "ftp_gateway_transfer_bytes",
            "Bytes moved on data connections (file transfers), by direction, backend and result.",
            ["direction", "backend", "result"],
            registry=r,
        )  # direction: upload, download; backend: file, s3; result: ok, aborted, failed
        self.transfers = Counter(
            "ftp_gateway_transfers",
            "File transfers, by direction, backend and result.",
            ["direction", "backend", "result"],
            registry=r,
        )
        self.transfer_duration = Histogram(
            "ftp_gateway_transfer_duration_seconds",
            "Duration of file transfers, from the 150 reply to the final one.",
            ["direction", "backend"],
            buckets=TRANSFER_BUCKETS,
            registry=r,
        )
        self.s3_requests = Counter(
            "ftp_gateway_s3_requests",
            "Requests to S3, by operation (PutObject, GetObject, ...) and outcome (ok or the error code class).",
            ["operation", "outcome"],
            registry=r,
        )
        self.s3_request_duration = Histogram(
            "ftp_gateway_s3_request_duration_seconds",
            "Latency of requests to S3, retries included, by operation.",
            ["operation"],
            buckets=S3_BUCKETS,
            registry=r,
        )
        self.s3_multipart_uploads = Gauge(
            "ftp_gateway_s3_multipart_uploads_in_flight",
            "S3 multipart uploads started and not yet completed or aborted.",
            registry=r,
        )
        self.passive_ports_in_use = Gauge(
            "ftp_gateway_passive_ports_in_use",
            "Passive ports handed out by this replica and not yet given back.",
            registry=r,
        )
        self.relayed_data_connections = Counter(
            "ftp_gateway_relayed_data_connections",
            "Data connections spliced between replicas: 'sent' (accepted here, relayed to the replica holding the "
            "session) or 'received' (relayed here by another replica).",
            ["role"],
            registry=r,
        )
        self.relayed_bytes = Counter(
            "ftp_gateway_relayed_bytes", "Bytes relayed to or from other replicas, by role.", ["role"], registry=r
        )
        self.draining = Gauge(
            "ftp_gateway_draining", "1 while the server drains before it stops (SIGTERM).", registry=r
        )
        self.connections_refused = Counter(
            "ftp_gateway_connections_refused",
            "Control connections answered 421 and closed before a session began, by reason.",
            ["reason"],
            registry=r,
        )  # reason: one of REFUSAL_REASONS
        self.bans = Counter("ftp_gateway_bans", "Client IPs banned by this replica for failed logins.", registry=r)
        # CPU, memory and open files of this process (process_*): read from /proc at each scrape.
        ProcessCollector(registry=r)
        for result in LOGIN_RESULTS:
            self.logins.labels(result)
        for reason in REFUSAL_REASONS:
            self.connections_refused.labels(reason)
        for direction in DIRECTIONS:
            for backend in BACKENDS:
                self.transfer_duration.labels(direction, backend)
                for result in TRANSFER_RESULTS:
                    self.transfers.labels(direction, backend, result)
                    self.transfer_bytes.labels(direction, backend, result)

    # -- what handlers call ------------------------------------------------------------------------------

    def session_opened(self) -> None:
        self.sessions_open.inc()

    def session_closed(self) -> None:
        self.sessions_open.dec()

    def login(self, result: str) -> None:
        """``result``: one of :data:`LOGIN_RESULTS`."""
        self.logins.labels(result).inc()

    def connection_refused(self, reason: str) -> None:
        """``reason``: one of :data:`REFUSAL_REASONS`."""
        self.connections_refused.labels(reason).inc()

    def ip_banned(self) -> None:
        self.bans.inc()

    def command(self, verb: str, code: str) -> None:
        """A command answered with ``code``; ``verb`` is one the server knows or ``other``."""
        self.commands.labels(verb.upper() if verb != OTHER_VERB else OTHER_VERB, code[:1] + "xx").inc()

    def transfer(self, direction: str, backend: str, result: str, nbytes: int, seconds: float) -> None:
        self.transfers.labels(direction, backend, result).inc()
        self.transfer_bytes.labels(direction, backend, result).inc(nbytes)
        self.transfer_duration.labels(direction, backend).observe(seconds)

    def passive_port_taken(self) -> None:
        self.passive_ports_in_use.inc()

    def passive_port_given_back(self) -> None:
        self.passive_ports_in_use.dec()

    # -- pathio_backends.observer.StorageObserver ----------------------------------------------------------

    def s3_request(self, operation: str, outcome: str, seconds: float) -> None:
        self.s3_requests.labels(operation, outcome).inc()
        self.s3_request_duration.labels(operation).observe(seconds)

    def multipart_started(self) -> None:
        self.s3_multipart_uploads.inc()

    def multipart_ended(self) -> None:
        self.s3_multipart_uploads.dec()


LOGIN_RESULTS = ("success", "failure", "refused")
# banned: the client IP is banned; per_ip_limit: limits.max_connections_per_ip; max_connections: the server's
# limits.max_connections; proxy_header: no valid PROXY header from a trusted network; draining: SIGTERM.
REFUSAL_REASONS = ("banned", "per_ip_limit", "max_connections", "proxy_header", "draining")
DIRECTIONS = ("upload", "download")
BACKENDS = ("file", "s3")
TRANSFER_RESULTS = ("ok", "aborted", "failed")
OTHER_VERB = "other"
