"""EL2N pruning (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important
Examples Early in Training", NeurIPS 2021), adapted to image-text pairs.

The paper scores a training example ``(x, y)`` by the expected L2 norm of its error vector,

    EL2N(x, y) = E_w || p(w, x) - y ||_2,

where ``p(w, x)`` is the softmax output of a network with weights ``w`` taken early in
training and ``y`` the one-hot label; the expectation is an average over independently
initialised runs. It keeps the highest-scoring ("hardest") examples and, on noisy data,
first skips a slice of the very highest, which are often mislabelled.

A contrastive model has no class softmax, so here ``p`` is the softmax over a pair's
contrastive logits against a fixed set of negatives: image ``i`` against its own caption
and the captions of ``M`` reference pool samples (image->text), and caption ``i`` against
its own image and theirs (text->image). ``y`` is the one-hot of its own partner. The score
averages both directions and all runs. See ``docs/strategies/el2n.md``.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from selbench import flops
from selbench.toolbox import (
    Selection,
    SelectionContext,
    Strategy,
    TrainingData,
    build_model,
    hookimpl,
    load_scale,
    load_training_data,
    rank,
    train_clip,
)

SEED_STRIDE = 1000  # run r of a selection with seed s trains with seed s * 1000 + r


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row maximum for numerical stability."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def el2n_from_logits(logits: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """Per-row EL2N of one network: ``|| softmax(logits) - onehot(target) ||_2``.

    Paul et al. (2021), the EL2N score ``E_w || p(w, x) - y ||_2`` before the
    expectation over runs ``w`` (average the result of this function over runs for that).
    ``logits``: (n, K); ``target_index``: (n,) integer column of each row's label.
    Values lie in [0, sqrt(2)]: 0 for a confident correct prediction, sqrt(2) for a
    confident wrong one.
    """
    p = softmax(logits)
    rows = np.arange(p.shape[0])
    error = p.copy()
    error[rows, np.asarray(target_index, dtype=np.int64)] -= 1.0
    return np.linalg.norm(error, axis=1)


def window_indices(scores: np.ndarray, budget: int, offset: float) -> np.ndarray:
    """Indices (ascending) of ranks ``[start, start + budget)`` of ``scores`` sorted descending.

    ``start = round(offset * N)``: the ``offset`` fraction of highest scores is skipped
    first (Paul et al. 2021 keep the highest EL2N scores, and under label noise keep a
    window that skips the very highest, which are often mislabelled). If the window runs
    past the end it is shifted back, ``start = N - budget``, so exactly ``budget`` indices
    come back. Ties go to the earlier pool position.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if not 0 < budget <= n:
        raise ValueError(f"budget must be in [1, {n}], got {budget}")
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be in [0, 1), got {offset}")
    order = rank(scores)
    start = min(int(round(offset * n)), n - budget)
    return np.sort(order[start : start + budget])


def pair_logits(
    query: torch.Tensor,
    own: torch.Tensor,
    reference: torch.Tensor,
    drop: torch.Tensor,
    logit_scale: float,
) -> torch.Tensor:
    """Contrastive logits of each query against its own partner and ``M`` fixed negatives.

    ``query``, ``own``: (B, D) normalised features of the batch and of each row's partner;
    ``reference``: (M + 1, D) normalised features of the reference samples; ``drop``: (B,)
    the reference column each row leaves out (the row itself when it is a reference
    sample, else the last one). Returns (B, M + 1) logits, the partner in column 0.
    """
    own_logit = (query * own).sum(dim=1, keepdim=True)
    ref_logits = query @ reference.T  # (B, M + 1)
    keep = torch.ones_like(ref_logits, dtype=torch.bool)
    keep[torch.arange(len(drop)), drop] = False
    negatives = ref_logits[keep].view(len(drop), reference.shape[0] - 1)
    return logit_scale * torch.cat([own_logit, negatives], dim=1)


class El2nParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runs: int = Field(
        default=3,
        ge=1,
        description="independent short proxy runs averaged (the E_w of the score); paper: "
        "averaged over 10 runs (its code: 'we recommend at least 10 runs'); default 3 for CPU",
    )
    scoring_epochs: float = Field(
        default=1.0,
        gt=0,
        description="training of each proxy before scoring, in epochs of the pool (samples "
        "seen = epochs x pool size); the paper scores early in training, 'a few epochs' in "
        "(CIFAR-10: epoch 20 of a 200-epoch run, per the authors' scripts and Kirsch 2023's "
        "reproduction); 1.0 is half the proxy recipe's 2 epochs",
    )
    negatives: int = Field(
        default=255,
        ge=1,
        description="M fixed reference negatives per pair (adaptation, not in the paper): "
        "255 plus the partner makes the proxy recipe's batch of 256; clipped to pool size - 1",
    )
    offset: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="fraction of the highest scores skipped before keeping the budget; "
        "paper: keep the hardest (0.0) on clean data, skip the very hardest under label "
        "noise (its sliding-window experiments), where they are often mislabelled",
    )
    model: str = Field(
        default="selbench-tiny",
        description="proxy architecture (configs/models/); the paper scores with the "
        "network it trains (ResNet18 on CIFAR-10), here the pool's tiny proxy CLIP",
    )
    recipe: str = Field(
        default="proxy",
        description="scale config whose optimiser, batch size and crop the proxies train "
        "with (configs/scales/); 'proxy' is the pool-proxy recipe (TL;DR and EL2N train "
        "their scorers on the source data)",
    )


class El2n(Strategy):
    """Keep the pairs a briefly trained contrastive model finds hardest (EL2N)."""

    name = "el2n"
    summary = "EL2N: keep the pairs with the largest early-training contrastive error"
    reference = (
        "Paul, Ganguli, Dziugaite, Deep Learning on a Data Diet (NeurIPS 2021): the EL2N "
        "score E_w||p(w,x) - y||_2, adapted to image-text contrastive logits"
    )
    stochastic = True  # the proxies' seeds and the reference negatives come from ctx.seed
    needs = frozenset({"pool_images"})  # its proxies train on the pool's images
    Params = El2nParams

    def score(self, ctx: SelectionContext) -> np.ndarray:
        """The EL2N score of every pair (Paul et al. 2021,
        ``EL2N(x, y) = E_w || p(w, x) - y ||_2``), averaged over ``runs`` proxies trained
        for ``scoring_epochs`` and over the image->text and text->image directions, with
        ``p`` the softmax over the pair's contrastive logits against ``M`` fixed reference
        negatives (:func:`el2n_from_logits`, :func:`pair_logits`). Float64 in
        ``[0, sqrt(2)]``; higher means keep (the hardest pairs). The proxies' seeds and the
        negatives follow ``ctx.seed``. :meth:`select` keeps the top ``budget`` when
        ``offset=0`` (the default); a positive ``offset`` first skips the
        ``round(offset * N)`` highest (:func:`window_indices`), so its selection is then a
        window of ranks, not the top of the score."""
        p = self.params
        uids = list(ctx.pool.uids)
        n = len(uids)
        scale = load_scale(p.recipe)
        # Every seed of one architecture has the same preprocess and tokenizer: load the
        # pool once with run 0's and reuse the tensors for every run.
        model, preprocess, tokenizer = build_model(p.model, ctx.seed * SEED_STRIDE, ctx.device)
        data = load_training_data(
            ctx.pool, preprocess, tokenizer, ctx.progress, "EL2N: loading pool"
        )
        # Fixed negatives: M + 1 distinct pool samples drawn once, shared by all runs.
        # Each sample drops itself if it is among them, else the last one, leaving M.
        m = min(p.negatives, n - 1)
        reference = ctx.rng.choice(n, size=m + 1, replace=False)
        drop = np.full(n, m, dtype=np.int64)
        drop[reference] = np.arange(m + 1)
        total = np.zeros(n, dtype=np.float64)
        for r in range(p.runs):
            seed = ctx.seed * SEED_STRIDE + r
            if r > 0:
                model, _, _ = build_model(p.model, seed, ctx.device)
            samples = max(1, int(round(p.scoring_epochs * n)))
            train_clip(
                model, data, scale, samples, seed, ctx.device, ctx.progress,
                description=f"EL2N: training proxy {r + 1}/{p.runs}",
            )  # fmt: skip
            with flops.counted("scoring/el2n"):  # its forwards and logits, as they run
                total += self._score(model, data, reference, drop, scale.eval_batch_size, ctx, r)
        return total / p.runs

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        uids = list(ctx.pool.uids)
        n = len(uids)
        scores = self.score(ctx)
        chosen = window_indices(scores, ctx.budget_count, p.offset)
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={uids[i]: float(scores[i]) for i in range(n)},
        )

    def _score(
        self,
        model: torch.nn.Module,
        data: TrainingData,
        reference: np.ndarray,
        drop: np.ndarray,
        batch_size: int,
        ctx: SelectionContext,
        run: int,
    ) -> np.ndarray:
        """One run's EL2N, mean of the image->text and text->image directions."""
        device = ctx.device
        model.eval()
        out = np.empty(len(data), dtype=np.float64)
        with torch.no_grad():
            ref = torch.from_numpy(reference)
            ref_img = model.encode_image(data.images[ref].to(device), normalize=True).float()
            ref_txt = model.encode_text(data.tokens[ref].to(device), normalize=True).float()
            scale = float(model.logit_scale.exp())
            starts = range(0, len(data), batch_size)
            desc = f"EL2N: scoring run {run + 1}/{self.params.runs}"
            for s in ctx.progress.track(starts, desc, total=len(starts)):
                img = model.encode_image(data.images[s : s + batch_size].to(device), normalize=True)
                txt = model.encode_text(data.tokens[s : s + batch_size].to(device), normalize=True)
                img, txt = img.float(), txt.float()
                d = torch.from_numpy(drop[s : s + batch_size]).to(device)
                i2t = pair_logits(img, txt, ref_txt, d, scale).cpu().numpy()
                t2i = pair_logits(txt, img, ref_img, d, scale).cpu().numpy()
                target = np.zeros(len(i2t), dtype=np.int64)
                out[s : s + batch_size] = 0.5 * (
                    el2n_from_logits(i2t, target) + el2n_from_logits(t2i, target)
                )
        return out


@hookimpl
def register_strategies(register):
    register(El2n)
