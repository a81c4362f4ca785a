"""The behaviour a refactor must keep: every built-in's selection and the README run.

For every installed strategy this runs ``selbench run --method NAME --budget 0.25 --seed 0
--stage select`` on the default pool (SynthWeb), each in a run home of its own, and
records the selection's sha256 (sorted uids, as runs log it) and a sha256 of its training
captions (TL;DR and distill rewrite them). With ``--readme`` it also runs the README's
main command (``selbench run --method tldr --budget 0.25``, all four stages) and records
its R@1 and zero-shot accuracy.

It drives the ``selbench`` command line only, so the same script measures the code before
and after a change::

    python benchmarks/invariants.py --readme --out before.json      # on the old checkout
    python benchmarks/invariants.py --readme --out after.json       # on the new one
    python benchmarks/invariants.py --compare before.json after.json

``SELBENCH_HOME`` is shared by both (the pool, the reference model, proxies and caches
are reused, which also shows that a new version reads an old version's caches); each run
gets a fresh ``SELBENCH_RUN_HOME`` under ``--work``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def _methods() -> list[str]:
    code = "from selbench.registry import get_registry; print('\\n'.join(get_registry().names()))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return [line for line in out.stdout.split() if line]


def _run(args: list[str], run_home: Path) -> tuple[int, str, float]:
    env = {**os.environ, "SELBENCH_RUN_HOME": str(run_home)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "selbench.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return done.returncode, " | ".join(tail), time.perf_counter() - started


def _only(pattern: str, run_home: Path) -> Path:
    found = sorted((run_home / "work").glob(f"*/{pattern}"))
    if len(found) != 1:
        raise SystemExit(f"expected one {pattern} under {run_home}, found {len(found)}")
    return found[0]


def measure_selection(method: str, work: Path) -> dict[str, object]:
    run_home = Path(tempfile.mkdtemp(prefix=f"inv-{method}-", dir=work))
    args = ["run", "--method", method, "--budget", "0.25", "--seed", "0", "--stage", "select"]
    code, tail, seconds = _run(args, run_home)
    if code != 0:
        return {"error": tail, "seconds": round(seconds, 1)}
    # The file names are spelled out here, not imported: this script measures old code too.
    frame = pd.read_parquet(_only("selection.parquet", run_home))
    uids = frame["uid"].tolist()
    pairs = sorted(zip(uids, frame["train_caption"], strict=True))
    captions = "\n".join(f"{u}\t{c}" for u, c in pairs)
    return {
        "selection_sha256": hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest(),
        "captions_sha256": hashlib.sha256(captions.encode()).hexdigest(),
        "size": len(uids),
        "seconds": round(seconds, 1),
    }


def measure_readme(work: Path) -> dict[str, object]:
    run_home = Path(tempfile.mkdtemp(prefix="inv-readme-", dir=work))
    code, tail, seconds = _run(["run", "--method", "tldr", "--budget", "0.25"], run_home)
    if code != 0:
        return {"error": tail, "seconds": round(seconds, 1)}
    metrics = json.loads(_only("metrics.json", run_home).read_text())
    wanted = {k: v for k, v in metrics.items() if "seconds" not in k}
    return {"metrics": wanted, "seconds": round(seconds, 1)}


def compare(before_path: Path, after_path: Path) -> int:
    before = json.loads(before_path.read_text())
    after = json.loads(after_path.read_text())
    print(f"{'method':<14} {'before (selection / captions)':<32} {'after':<32} same")
    differ = 0
    for method in sorted(set(before["selections"]) | set(after["selections"])):
        old = before["selections"].get(method, {})
        new = after["selections"].get(method, {})

        def cell(entry: dict) -> str:
            if "error" in entry:
                return "error: " + str(entry["error"])[-24:]
            if not entry:
                return "absent"
            return f"{entry['selection_sha256'][:12]} / {entry['captions_sha256'][:12]}"

        keys = ("selection_sha256", "captions_sha256", "error")
        same = bool(old) and all(old.get(k) == new.get(k) for k in keys)
        differ += not same
        print(f"{method:<14} {cell(old):<32} {cell(new):<32} {'yes' if same else 'NO'}")
    if "readme" in before and "readme" in after:
        print("\nREADME run (selbench run --method tldr --budget 0.25):")
        old_m, new_m = before["readme"].get("metrics", {}), after["readme"].get("metrics", {})
        for key in sorted(set(old_m) | set(new_m)):
            same = old_m.get(key) == new_m.get(key)
            differ += not same
            verdict = "yes" if same else "NO"
            print(f"  {key:<40} {old_m.get(key)!s:<22} {new_m.get(key)!s:<22} {verdict}")
    print(f"\n{'all identical' if not differ else f'{differ} differ'}")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the measurements (JSON)")
    parser.add_argument("--readme", action="store_true", help="also run the README command")
    parser.add_argument("--methods", help="comma-separated methods (default: all installed)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("--out is required unless --compare is given")
    args.work.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",") if args.methods else _methods()
    result: dict[str, object] = {"selections": {}}
    for method in methods:
        result["selections"][method] = measure_selection(method, args.work)  # type: ignore[index]
        print(method, result["selections"][method], flush=True)  # type: ignore[index]
    if args.readme:
        result["readme"] = measure_readme(args.work)
        print("readme", result["readme"], flush=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
