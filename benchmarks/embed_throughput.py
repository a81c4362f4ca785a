"""Embedding-cache throughput vs. the encoder alone, measured side by side.

End to end: read shards, decode, preprocess, encode, normalise, write the fp16 cache
entry (``EmbeddingService.embeddings`` into a fresh cache). Encoder only: the same
embedder's ``encode`` call the cache makes (tokenise the captions, ``encode_image``,
``encode_text``) on the same images, already decoded and preprocessed in memory, in the
same batch size. So the ratio is what the cache's reading, decoding, preprocessing and
writing cost on top of the model. Both are repeated, interleaved; each repeat gives one
ratio from two passes run back to back, so a slow spell of a shared machine hits both
sides of it. One end-to-end warm-up pass comes first, like the encoder's: it starts the
decoding helper processes, which then serve every later pass of the process, as they
serve every embedding pass of a `selbench run` (SELBENCH_DECODE_HELPERS=0 measures the
in-process decoding instead). The last line is the median of those paired ratios
(goal >= 0.9). The line before the ratios gives the seconds a pass spends outside
``encode`` -- the overhead itself, steadier than the ratio, which also moves with the
encoder's speed.

    python benchmarks/embed_throughput.py                 # default SynthWeb, tiny model
    python benchmarks/embed_throughput.py --pool DIR --repeats 5
    python benchmarks/embed_throughput.py --device cuda --json figures.json   # also as JSON

``--json`` writes the figures to a file as well (benchmarks/gpu_check.sh reads them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selbench.cache import EmbeddingCache
from selbench.decoding import helpers_enabled
from selbench.embedders import (
    ENCODE_BATCH,
    EmbeddingService,
    decode_helper_count,
    decode_workers,
    pool_batches,
)
from selbench.pools import resolve_pool
from selbench.registry import get_registry
from selbench.train import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default="synthweb", help="pool spec (as for selbench run)")
    parser.add_argument("--model", default="selbench-tiny", help="open_clip architecture")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    pool = resolve_pool(args.pool).pool.strategy_view()
    n = len(pool)
    with tempfile.TemporaryDirectory() as tmp:
        model, _, _ = build_model(args.model, seed=0)
        weights = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), weights)
        spec = f"open_clip:{args.model}:{weights}"
        registry = get_registry()

        embedder = registry.make_embedder(spec)
        embedder.prepare(pool, args.device, None)
        batches = list(pool_batches(pool, embedder.preprocess, 0, ENCODE_BATCH))

        def encoder_only() -> float:
            start = time.perf_counter()
            for images, texts in batches:
                embedder.encode(images, texts)
            return time.perf_counter() - start

        encode = embedder.encode
        in_encoder: list[float] = []

        def timed_encode(images, texts):
            start = time.perf_counter()
            try:
                return encode(images, texts)
            finally:
                in_encoder.append(time.perf_counter() - start)

        def end_to_end(i: int) -> float:
            service = EmbeddingService(
                pool,
                args.device,
                registry.make_embedder,
                cache=EmbeddingCache(Path(tmp) / f"cache-{i}"),
            )
            service._embedders[spec] = embedder  # same prepared model, not a reload
            in_encoder.clear()
            embedder.encode = timed_encode  # what the pass spends outside encode() is overhead
            start = time.perf_counter()
            try:
                service.embeddings(spec)
                elapsed = time.perf_counter() - start
            finally:
                del embedder.encode
            outside.append(elapsed - sum(in_encoder))
            return elapsed

        enc, e2e, outside = [], [], []
        encoder_only()  # warm-up; the end-to-end warm-up also starts the decoding helpers,
        end_to_end(-1)  # which live as long as the process, as in a `selbench run`
        outside.clear()
        for i in range(args.repeats):
            if i % 2:  # alternate which side goes first
                t_e2e, t_enc = end_to_end(i), encoder_only()
            else:
                t_enc, t_e2e = encoder_only(), end_to_end(i)
            enc.append(t_enc)
            e2e.append(t_e2e)
    enc_rate, e2e_rate = n / statistics.median(enc), n / statistics.median(e2e)
    paired = [a / b for a, b in zip(enc, e2e, strict=True)]
    helpers = decode_helper_count(args.device)
    decoding = (
        f"{helpers} helper process{'es' if helpers > 1 else ''}"
        if helpers_enabled()
        else f"{decode_workers()} thread(s) in-process"
    )
    print(
        f"pool: {args.pool} ({n} samples), model: {args.model}, device: {args.device}, "
        f"threads: {torch.get_num_threads()}, batch: {ENCODE_BATCH}, decoding: {decoding}"
    )
    print(f"encoder only : {enc_rate:10.0f} samples/s  (median of {args.repeats})")
    print(f"end to end   : {e2e_rate:10.0f} samples/s  (read, decode, preprocess, encode, write)")
    print(
        f"outside the encoder: {statistics.median(outside):.3f} s per pass "
        "(reading, decoding, preprocessing, cache writes; median)"
    )
    print("paired ratios: " + " ".join(f"{r:.3f}" for r in paired))
    print(f"ratio end-to-end / encoder-only: {statistics.median(paired):.3f}")
    if args.json:
        figures = {
            "pool": args.pool,
            "pool_samples": n,
            "model": args.model,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": ENCODE_BATCH,
            "decoding": decoding,
            "repeats": args.repeats,
            "encoder_only_per_s": enc_rate,
            "end_to_end_per_s": e2e_rate,
            "outside_encoder_s": statistics.median(outside),
            "paired_ratios": paired,
            "ratio": statistics.median(paired),
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
