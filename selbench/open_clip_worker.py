"""One torchrun worker of the ``open_clip`` engine: open_clip_train's ``main``, unchanged.

Two things are added around it:

- the arguments come as a JSON list in ``$SELBENCH_OPEN_CLIP_ARGS`` when set, not on
  the command line: torchrun's own parser (Python 3.11 argparse) rejects open_clip's
  ``--logs`` as an ambiguous abbreviation of its ``--logs-specs`` even after the script
  name;
- on Linux the worker asks for SIGKILL when its launcher dies (``prctl``): torchrun
  starts workers in sessions of their own, so a ``kill -9`` of the run would otherwise
  leave them training into the run directory while ``selbench run --resume`` starts a
  second training there;
- on the CPU (the gloo backend), DDP gets no ``device_ids``: open_clip_train passes
  ``device_ids=[device]``, which torch accepts only for GPU modules, so multi-process
  training on CPU (the CI test of this engine) would fail. GPU runs are untouched.
"""

from __future__ import annotations

import json
import os
import signal
import sys

ARGS_VARIABLE = "SELBENCH_OPEN_CLIP_ARGS"


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def allow_cpu_ddp() -> None:
    """Make ``DistributedDataParallel(module, device_ids=[cpu])`` mean what it says."""
    import torch
    from torch.nn.parallel import DistributedDataParallel  # the patched one on a 2nd call

    if getattr(DistributedDataParallel, "_selbench_cpu_friendly", False):
        return

    class CpuFriendlyDDP(DistributedDataParallel):
        _selbench_cpu_friendly = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    # Replacing torch's class is the point (open_clip_train builds its model with it).
    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP


def main() -> int:
    die_with_parent()
    allow_cpu_ddp()
    from open_clip_train.main import main as open_clip_main

    packed = os.environ.get(ARGS_VARIABLE)
    args = json.loads(packed) if packed else sys.argv[1:]
    return open_clip_main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
