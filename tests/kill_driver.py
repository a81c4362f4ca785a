"""Run the selbench CLI in this process and SIGKILL it at a chosen point (tests only).

    python kill_driver.py select|materialize|train|evaluate selbench-args...

``materialize``: killed after the first subset shard is written; ``train``: killed after
the in-memory trainer's third step; ``select``: killed while the embedding cache entry
is assembled (its temporary directory half-written); ``evaluate``: killed as evaluation
starts. ``kill -9`` leaves no chance to clean up, which is what the resume tests need.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, args = sys.argv[1], sys.argv[2:]
    if point == "materialize":
        import selbench.materialize as materialize

        real_write = materialize.write_shard
        written = []

        def write_then_die(*a, **kw):
            if written:
                _die()
            written.append(real_write(*a, **kw))
            return written[-1]

        materialize.write_shard = write_then_die
        materialize.default_workers = lambda n: 1  # in-process, so the patch applies
    elif point == "train":
        import selbench.run.stages as runner
        from selbench.progress import NullProgress

        real_train = runner.train_model

        class DyingProgress(NullProgress):
            def track(self, iterable, description, total=None):
                for step, item in enumerate(iterable):
                    if step == 3:
                        _die()
                    yield item

        def train_then_die(
            model, data, scale, samples_seen, seed, device="cpu", progress=None, online=None
        ):
            return real_train(
                model, data, scale, samples_seen, seed, device, DyingProgress(), online
            )

        runner.train_model = train_then_die
    elif point == "select":
        import selbench.cache.entries as cache

        real_reserve = cache._reserve

        def reserve_then_die(path):
            real_reserve(path)
            _die()

        cache._reserve = reserve_then_die
    elif point == "evaluate":
        import selbench.run.stages as runner

        runner.evaluate = lambda *a, **kw: _die()
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    from selbench.cli import main as cli

    cli(args)


if __name__ == "__main__":
    main()
