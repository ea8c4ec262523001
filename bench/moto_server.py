#!/usr/bin/env python3
"""moto's S3 server with one change for the benchmarks: a ranged GET costs its range, as on S3.

moto answers every GetObject by reading the whole object out of its spooled file (under a per-object lock) and
then cutting the range out of it, so a download in 8 MiB ranges of a 256 MiB object reads 8 GiB, one range at
a time: moto, not the client, sets the pace (about 55 MB/s here for aiobotocore's own ranged GETs, against
300 MB/s for one GetObject). Here an object's bytes are read once and kept (until they are replaced), so a
range is a slice and a whole GET no read at all, for the gateway and the direct client alike.

    python bench/moto_server.py -H 127.0.0.1 -p PORT     # the arguments of moto_server
"""

from __future__ import annotations

import sys
from typing import Any

from moto.s3.models import FakeKey
from moto.server import main

_stock = FakeKey.value


def _kept_value(key: Any) -> bytes:
    kept: bytes | None = key.__dict__.get("_bench_value")
    if kept is None:
        kept = _stock.fget(key)
        key.__dict__["_bench_value"] = kept
    return kept


def _set_value(key: Any, new_value: bytes) -> None:
    key.__dict__.pop("_bench_value", None)
    _stock.fset(key, new_value)


FakeKey.value = property(_kept_value, _set_value)  # type: ignore[assignment, method-assign]

if __name__ == "__main__":
    sys.exit(main())
