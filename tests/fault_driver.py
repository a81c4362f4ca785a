"""Run the selbench CLI in this process with a file size limit at a chosen write (tests only).

    python fault_driver.py cache|selection selbench-args...

The soft ``RLIMIT_FSIZE`` drops to 4 kB for the first embedding cache chunk (``cache``)
or the selection's parquet file (``selection``) and is restored afterwards, as a disk
that fills up and is freed again. SIGXFSZ is ignored, so the write fails with EFBIG as
it would with ENOSPC on a full disk, instead of killing the process.
"""

from __future__ import annotations

import resource
import signal
import sys
from contextlib import contextmanager

LIMIT_BYTES = 4096


@contextmanager
def disk_full():
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if point == "cache":
        import selbench.cache.chunks as cache

        real_write = cache._write_chunk

        def write_on_a_full_disk(*a, **kw):
            with disk_full():
                return real_write(*a, **kw)

        cache._write_chunk = write_on_a_full_disk
    elif point == "selection":
        import pandas as pd

        real_to_parquet = pd.DataFrame.to_parquet

        def to_parquet(self, path, *a, **kw):
            if "selection.parquet" not in str(path):
                return real_to_parquet(self, path, *a, **kw)
            with disk_full():
                return real_to_parquet(self, path, *a, **kw)

        pd.DataFrame.to_parquet = to_parquet
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    from selbench.cli import main as cli

    cli(args)


if __name__ == "__main__":
    main()
