"""The parts of benchmarks/gpu_check.sh that have no benchmark of their own, and its table.

    python benchmarks/gpu_check.py pool --out DIR --n-samples 8000 --image-size 64
    python benchmarks/gpu_check.py cluster --device cuda --n 1000000 --dim 256 --json F
    python benchmarks/gpu_check.py train --device cuda --pool DIR --json F
    python benchmarks/gpu_check.py table --parts DIR --out gpu_check.md

``pool``: a SynthWeb dataset by selbench's generator (``selbench datasets make synthweb
--out DIR`` does the same, but its command imports selbench.pools, whose pyarrow and
opencv the GPU machine may lack). ``cluster``: k-means (Lloyd) and exact inner-product kNN
in torch on the chosen device.
selbench's own k-means and kNN (selbench/neighbours.py) are faiss's; faiss-gpu's wheel is
larger than everything the GPU machine may be given, so on the GPU they are torch here.
``train``: open_clip_train under torchrun (selbench's ``open_clip`` engine,
selbench/train_open_clip.py) on the shards of a SynthWeb pool, one process. ``table``:
every part's JSON in one markdown table (a part without a JSON, or with an ``error``,
is a failed row).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# -- pool ------------------------------------------------------------------------------


def cmd_pool(args: argparse.Namespace) -> dict:
    from selbench.synthweb import SynthWebConfig, generate_synthweb

    settings = dict(item.split("=", 1) for item in args.set)
    config = SynthWebConfig(n_samples=args.n_samples, image_size=args.image_size, **settings)
    started = time.perf_counter()
    generate_synthweb(Path(args.out), config)
    return {"n_samples": args.n_samples, "image_size": args.image_size,
            "seconds": time.perf_counter() - started}  # fmt: skip


# -- cluster -----------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mixture(n: int, dim: int, components: int, device, seed: int):
    """n unit rows of a seeded Gaussian mixture (as benchmarks/cluster_scale.py makes)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(components, dim, generator=g), dim=1)
    labels = torch.randint(0, components, (n,), generator=g)
    x = torch.empty(n, dim, device=device)
    for lo in range(0, n, 262144):
        hi = min(n, lo + 262144)
        block = centres[labels[lo:hi]] + torch.randn(hi - lo, dim, generator=g) * (0.5 / dim**0.5)
        x[lo:hi] = torch.nn.functional.normalize(block, dim=1).to(device)
    return x


def _nearest(x, centroids, block: int):
    """(index, squared L2 distance) of each row's nearest centroid, in row blocks."""
    import torch

    c_sq = (centroids * centroids).sum(1)
    index = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), device=x.device)
    for lo in range(0, len(x), block):
        rows = x[lo : lo + block]
        d = (rows * rows).sum(1, keepdim=True) - 2.0 * rows @ centroids.T + c_sq
        dist[lo : lo + block], index[lo : lo + block] = d.min(dim=1)
    return index, dist


def torch_kmeans(x, k: int, niter: int, seed: int, block: int = 65536):
    """Lloyd's k-means on ``x`` (any torch device): seeded random initial centres, an
    empty cluster keeps its centre. Returns (centroids, assignment, inertia per iteration)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    centroids = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()
    inertia = []
    for _ in range(niter):
        assign, dist = _nearest(x, centroids, block)
        inertia.append(float(dist.sum()))
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
    assign, dist = _nearest(x, centroids, block)
    inertia.append(float(dist.sum()))
    return centroids, assign, inertia


def torch_knn(queries, base, k: int, block: int, budget_s: float):
    """Exact inner-product top-k of ``queries`` among ``base`` in query blocks, until done
    or ``budget_s`` has passed. Returns (indices of the blocks done, queries done)."""
    import torch

    out = []
    started = time.perf_counter()
    done = 0
    for lo in range(0, len(queries), block):
        scores = queries[lo : lo + block] @ base.T
        out.append(torch.topk(scores, k, dim=1).indices)
        done = min(len(queries), lo + block)
        if time.perf_counter() - started > budget_s:
            _sync(queries.device)
            break
    return torch.cat(out), done


def cmd_cluster(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products, as faiss's
    torch.manual_seed(0)
    x = _mixture(args.n, args.dim, args.components, device, seed=0)
    _sync(device)
    torch_kmeans(x[: min(len(x), 4 * args.k)], args.k, 1, seed=1)  # warm-up (kernels)
    _sync(device)
    started = time.perf_counter()
    _, assign, inertia = torch_kmeans(x, args.k, args.niter, seed=0)
    _sync(device)
    kmeans_s = time.perf_counter() - started
    used = int(torch.unique(assign).numel())

    block = args.knn_block or max(1, min(8192, (256 * 2**20) // max(1, args.n)))
    torch_knn(x[:block], x, args.knn_k, block, budget_s=0.0)  # warm-up
    _sync(device)
    started = time.perf_counter()
    idx, done = torch_knn(x, x, args.knn_k, block, budget_s=args.knn_budget_s)
    _sync(device)
    knn_s = time.perf_counter() - started
    self_first = float((idx[:, 0] == torch.arange(done, device=device)).float().mean())
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "n": args.n,
        "dim": args.dim,
        "kmeans": {
            "k": args.k,
            "niter": args.niter,
            "seconds": kmeans_s,
            "seconds_per_iteration": kmeans_s / args.niter,
            "inertia_first": inertia[0],
            "inertia_last": inertia[-1],
            "clusters_used": used,
        },
        "knn": {
            "k": args.knn_k,
            "queries_done": done,
            "block": block,
            "seconds": knn_s,
            "queries_per_second": done / knn_s,
            "projected_seconds_all": knn_s * args.n / done,
            "self_first": self_first,
        },
    }


# -- train -------------------------------------------------------------------------------

#: The architecture trained (open_clip config), per size: a ViT at the pool's 64 px.
MODELS = {
    "gpu": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 6, "width": 384, "head_width": 64,
                       "mlp_ratio": 4.0, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4,
                     "layers": 4, "mlp_ratio": 4.0},
    },
    "toy": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16,
                       "mlp_ratio": 2.0, "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1, "mlp_ratio": 2.0},
    },
}  # fmt: skip


def _pool_subset(pool_dir: Path):
    """The SynthWeb pool's own shards (webdataset layout: png, txt, json) as a Subset:
    what `selbench run` would materialize from a budget-1.0 selection, without the copy."""
    import tarfile

    from selbench.materialize import Subset

    shards = tuple(sorted((pool_dir / "pool").glob("[0-9]*.tar")))
    if not shards:
        raise SystemExit(f"no pool shards under {pool_dir / 'pool'}")
    sizes = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            sizes[shard.name] = sum(1 for m in tar.getnames() if m.endswith(".txt"))
    return Subset(pool_dir / "pool", shards, sizes, "gpu-check")


def _use_model(config: dict, out_dir: Path) -> None:
    """Make the open_clip engine train ``config`` (open_clip_train's ``local-dir:``)."""
    import selbench.train_open_clip as engine

    argument = engine.write_local_model(config, out_dir)
    engine.model_argument = lambda name, out: argument


def cmd_train(args: argparse.Namespace) -> dict:
    import torch

    from selbench.configs import ScaleConfig
    from selbench.train_open_clip import train_open_clip

    out_dir = Path(args.work) / "open_clip_train"
    subset = _pool_subset(Path(args.pool))
    config = MODELS[args.size]
    _use_model(config, out_dir)
    cuda = args.device.startswith("cuda")
    scale = ScaleConfig(
        name="gpu-check",
        model="gpu-check",  # replaced by the local-dir: model above
        engine="open_clip",
        batch_size=args.batch,
        epochs=1,
        lr=1e-3,
        weight_decay=0.1,
        warmup_fraction=0.1,
        precision="amp" if cuda else "fp32",
        num_checkpoints=1,
        workers=args.workers,
    )
    rates: list[float] = []
    result = train_open_clip(
        subset,
        scale,
        samples_seen=args.steps * args.batch,
        seed=0,
        out_dir=out_dir,
        device=args.device,
        nproc_per_node=1,
        on_log=lambda step, values: rates.append(values["samples_per_second"]),
    )
    steady = rates[1:] or rates  # the first logged step includes the start-up
    return {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch": torch.__version__,
        "pool_samples": subset.n_samples,
        "image_size": config["vision_cfg"]["image_size"],
        "batch": args.batch,
        "steps": result.steps,
        "samples_seen": result.samples_seen,
        "wall_seconds": result.seconds,
        "logged_steps": len(rates),
        "samples_per_second": statistics.median(steady) if steady else None,
        "samples_per_second_wall": result.samples_seen / result.seconds,
        "final_loss": result.final_loss,
        "checkpoint_written": bool(result.checkpoint and result.checkpoint.is_file()),
    }


# -- table -------------------------------------------------------------------------------

#: (part, row label, JSON key path, unit, format) per row; a part's rows fail together.
ROWS = [
    ("embed", "embedding: encoder only", ("encoder_only_per_s",), "samples/s", "{:,.0f}"),
    ("embed", "embedding: end to end (cache)", ("end_to_end_per_s",), "samples/s", "{:,.0f}"),
    ("embed", "embedding: ratio end-to-end / encoder-only", ("ratio",), "", "{:.3f}"),
    ("cluster", "k-means (torch)", ("kmeans", "seconds"), "s", "{:.2f}"),
    ("cluster", "kNN (torch, exact IP)", ("knn", "queries_per_second"), "queries/s", "{:,.0f}"),
    ("train", "open_clip_train (torchrun, 1 process)", ("samples_per_second",), "samples/s",
     "{:,.0f}"),
]  # fmt: skip


def _details(part: str, data: dict) -> dict[str, str]:
    """Row label -> what the figure was measured on."""
    if part == "embed":
        on = (
            f"{data['pool_samples']} samples, model {data['model']}, batch {data['batch']}, "
            f"{data['repeats']} repeats, decoding: {data['decoding']}"
        )
        return {
            "embedding: encoder only": on,
            "embedding: end to end (cache)": on
            + f"; {data['outside_encoder_s']:.3f} s/pass outside encode",
            "embedding: ratio end-to-end / encoder-only": "median of paired ratios "
            + " ".join(f"{r:.3f}" for r in data["paired_ratios"]),
        }
    if part == "cluster":
        km, nn = data["kmeans"], data["knn"]
        return {
            "k-means (torch)": f"{data['n']:,} x {data['dim']}, k={km['k']}, {km['niter']} "
            f"iterations ({km['seconds_per_iteration']:.3f} s each), inertia "
            f"{km['inertia_first']:.4g} -> {km['inertia_last']:.4g}, "
            f"{km['clusters_used']} clusters used",
            "kNN (torch, exact IP)": f"{nn['queries_done']:,} queries x {data['n']:,} base, "
            f"k={nn['k']}, {nn['seconds']:.2f} s (all {data['n']:,} queries: "
            f"{nn['projected_seconds_all']:.1f} s), self first {nn['self_first']:.3f}",
        }
    return {
        "open_clip_train (torchrun, 1 process)": f"SynthWeb {data['pool_samples']} samples at "
        f"{data['image_size']} px, batch {data['batch']}, {data['steps']} steps, median of "
        f"{data['logged_steps']} logged rates; wall {data['wall_seconds']:.1f} s with start-up "
        f"({data['samples_per_second_wall']:,.0f} samples/s), final loss "
        f"{data['final_loss']:.3f}, checkpoint "
        + ("written" if data["checkpoint_written"] else "MISSING"),
    }


def _lookup(data: dict, path: tuple[str, ...]):
    for key in path:
        data = data[key]
    return data


def cmd_table(args: argparse.Namespace) -> dict:
    parts_dir = Path(args.parts)
    found: dict[str, dict] = {}
    for part in dict.fromkeys(p for p, *_ in ROWS):
        path = parts_dir / f"{part}.json"
        try:
            found[part] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            found[part] = {"error": f"no result ({err.__class__.__name__})"}
    meta = (
        json.loads((parts_dir / "meta.json").read_text())
        if (parts_dir / "meta.json").is_file()
        else {}
    )
    lines = [
        "# GPU check",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| part | row | figure | unit | status | measured on |",
        "|---|---|---|---|---|---|",
    ]
    for part, label, path, unit, fmt in ROWS:
        data = found[part]
        if "error" in data:
            error = " ".join(str(data["error"]).split())[:300].replace("|", "\\|")
            lines.append(f"| {part} | {label} | - | {unit} | FAILED | {error} |")
            continue
        try:
            value = fmt.format(_lookup(data, path))
            detail = _details(part, data).get(label, "")
        except (KeyError, TypeError, ValueError) as err:
            lines.append(f"| {part} | {label} | - | {unit} | FAILED | bad result: {err!r} |")
            continue
        lines.append(f"| {part} | {label} | {value} | {unit} | ok | {detail} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    (Path(args.out).with_suffix(".json")).write_text(json.dumps({"meta": meta, **found}, indent=1))
    print(text)
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pool = sub.add_parser("pool", help="generate a SynthWeb dataset")
    pool.add_argument("--out", required=True)
    pool.add_argument("--n-samples", type=int, required=True)
    pool.add_argument("--image-size", type=int, default=64)
    pool.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    cluster = sub.add_parser("cluster", help="torch k-means and kNN")
    cluster.add_argument("--device", default="cuda")
    cluster.add_argument("--n", type=int, default=1_000_000)
    cluster.add_argument("--dim", type=int, default=256)
    cluster.add_argument("--components", type=int, default=1000, help="mixture components")
    cluster.add_argument("--k", type=int, default=1024, help="k-means clusters")
    cluster.add_argument("--niter", type=int, default=20)
    cluster.add_argument("--knn-k", type=int, default=10)
    cluster.add_argument("--knn-block", type=int, default=0, help="queries per block (0: auto)")
    cluster.add_argument("--knn-budget-s", type=float, default=60.0,
                         help="stop the kNN after this long and project the rest")  # fmt: skip
    train = sub.add_parser("train", help="open_clip_train under torchrun on a SynthWeb pool")
    train.add_argument("--device", default="cuda")
    train.add_argument("--pool", required=True, help="a SynthWeb directory (datasets make --out)")
    train.add_argument("--work", required=True, help="scratch directory")
    train.add_argument("--size", choices=sorted(MODELS), default="gpu")
    train.add_argument("--batch", type=int, default=512)
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--workers", type=int, default=8)
    table = sub.add_parser("table", help="the parts' JSON files as one markdown table")
    table.add_argument("--parts", required=True)
    table.add_argument("--out", required=True)
    for p in (pool, cluster, train):
        p.add_argument("--json", required=True, help="write the figures here")
    args = parser.parse_args()
    commands = {"pool": cmd_pool, "cluster": cmd_cluster, "train": cmd_train, "table": cmd_table}
    result = commands[args.command](args)
    if args.command != "table":
        text = json.dumps(result, indent=1)
        Path(args.json).write_text(text)
        print(text)


if __name__ == "__main__":
    main()
