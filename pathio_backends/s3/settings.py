"""How to reach S3: a section of the gateway's settings (``[s3]``), kept beside the backend that uses it."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

KiB = 1024
MiB = 1024 * KiB
Seconds = Annotated[float, Field(gt=0)]


class S3Settings(BaseModel):
    """How to reach S3 for ``s3://bucket/prefix`` storage (one client and connection pool per server)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # None: botocore's own lookup (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, then AWS).
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # None: the standard AWS chain (environment, profile, web identity for IRSA, instance role).
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    storage_class: str | None = None
    # Uploads: parts of this size (grows for very long uploads), this many sent at once.
    part_size: Annotated[int, Field(ge=5 * MiB, le=5 * 1024 * MiB)] = 8 * MiB
    parts_in_flight: Annotated[int, Field(ge=1, le=64)] = 4
    # Downloads: ranged GetObjects of this size, this many in flight (1: one GetObject streamed, no read-ahead).
    download_range_size: Annotated[int, Field(ge=64 * KiB, le=1024 * MiB)] = 8 * MiB
    download_ranges_in_flight: Annotated[int, Field(ge=1, le=64)] = 4
    # Objects copied at once when a directory is renamed.
    copy_concurrency: Annotated[int, Field(ge=1, le=256)] = 16
    max_pool_connections: Annotated[int, Field(ge=1, le=1024)] = 64
    connect_timeout: Seconds = 10.0
    read_timeout: Seconds = 60.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5
    # SHA-256 of every request body in the signature. botocore does it over http; it costs ~20 ms of the event
    # loop per 8 MiB part, so it is off unless asked for (TLS or S3 checksums protect the data instead).
    payload_signing: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        if self.kms_key_id and self.server_side_encryption != "aws:kms":
            raise ValueError('kms_key_id needs server_side_encryption = "aws:kms"')
        return self
