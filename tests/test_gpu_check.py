"""benchmarks/gpu_check.sh at toy sizes on the CPU: one table with every row, and a part
that fails is a FAILED row while the others still run (docs/gpu-check.md)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROWS = (
    "embedding: encoder only",
    "embedding: end to end (cache)",
    "embedding: ratio end-to-end / encoder-only",
    "k-means (torch)",
    "kNN (torch, exact IP)",
    "open_clip_train (torchrun, 1 process)",
)


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1] in ROWS:
            rows[cells[1]] = cells
    return rows


@pytest.mark.slow
def test_the_cpu_gpu_check_reports_every_row_and_a_failed_part_as_a_failed_row(tmp_path):
    # The k-means/kNN part fails on purpose: its rows say so, the others are measured.
    bin_dir = str(Path(sys.executable).parent)  # this environment's python and torchrun
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--device", "cpu",
         "--out", str(tmp_path / "out"), "--fail", "cluster"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    rows = _rows(table)
    assert set(rows) == set(ROWS), table
    for part, _, figure, _, status, detail in rows.values():
        if part == "cluster":
            assert (figure, status) == ("-", "FAILED"), table
            assert "failed on purpose" in detail
        else:
            assert status == "ok", table
            assert re.fullmatch(r"[\d,]+(\.\d+)?", figure) and float(figure.replace(",", "")) > 0
    raw = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert raw["train"]["checkpoint_written"] and raw["train"]["steps"] >= 4
    assert 0 < raw["embed"]["ratio"] and raw["embed"]["pool_samples"] == 300
    assert "error" in raw["cluster"]


def test_the_torch_kmeans_and_knn_agree_with_brute_force():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    x = gpu_check._mixture(500, 8, 5, torch.device("cpu"), seed=0)
    centroids, assign, inertia = gpu_check.torch_kmeans(x, 5, niter=10, seed=0, block=128)
    assert inertia[-1] <= inertia[0]
    assert torch.equal(assign, torch.cdist(x, centroids).argmin(dim=1))
    idx, done = gpu_check.torch_knn(x, x, 3, block=64, budget_s=60.0)
    assert done == 500 and torch.equal(idx, torch.topk(x @ x.T, 3, dim=1).indices)
