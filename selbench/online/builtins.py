"""The built-in online selection strategies.

Every one of them returns the chosen indices in increasing super-batch order (a CPU
LongTensor), so that a choice is a set and training on it does not depend on the order
the strategy found it in.

- ``uniform``: a uniformly random ``keep`` (the control);
- ``hard-learner``: the ``keep`` highest learner losses;
- ``easy-reference``: the ``keep`` lowest reference losses;
- ``learnability``: the ``keep`` highest learner-minus-reference losses, each example
  scored on its own;
- ``jest``: Joint Example Selection, which samples the sub-batch block by block by its
  *joint* learnability (Evans et al., NeurIPS 2024, Algorithm 1).

The per-example losses are CLIP's symmetric softmax loss within the whole super-batch
(:meth:`SuperBatch.learner_losses`). ``docs/online.md`` documents each with its source.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, Field

from selbench.errors import ConfigError
from selbench.online.contract import OnlineParams, OnlineStrategy, SuperBatch
from selbench.online.losses import LossKind, conditional_gain, softmax_losses

_RATIO = (
    "super-batch size / batch size; selbench's default, shared by every online built-in "
    "so that they compare at one scoring cost (JEST, Evans et al. 2024, compares these "
    "scores at filtering ratios 50%, 80% and 90%, i.e. ratios 2, 5 and 10)"
)


def _sorted(indices: torch.Tensor) -> torch.Tensor:
    return torch.sort(indices.reshape(-1)).values.to(device="cpu", dtype=torch.long)


def top_k(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """The ``k`` highest (``largest``) or lowest scores' indices, ties to the earlier
    index, in increasing index order."""
    order = torch.sort(scores, descending=largest, stable=True).indices
    return _sorted(order[:k])


def gumbel(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` standard Gumbel draws (float64, on the generator's device) from ``generator``."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    u = u.clamp_min(torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(u))


def sample_block(
    scores: torch.Tensor,
    size: int,
    available: torch.Tensor,
    temperature: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``size`` distinct indices among ``available`` (a bool mask), drawn without
    replacement with probabilities ``softmax(scores / temperature)``, renormalised after
    each draw: the Gumbel-top-k trick (Kool et al., ICML 2019), which draws all ``N``
    noises from ``generator`` at once. ``temperature = 0`` takes the top ``size``
    (ties to the earlier index) and draws nothing. Indices in the order drawn."""
    keys = scores.to(torch.float64)
    if temperature > 0:
        keys = keys / temperature + gumbel(len(keys), generator).to(keys.device)
    keys = keys.masked_fill(~available.to(keys.device), -torch.inf)
    return torch.sort(keys, descending=True, stable=True).indices[:size]


def block_sizes(keep: int, n_chunks: int) -> list[int]:
    """JEST's block sizes: ``keep // n`` each, the last taking the remainder, with
    ``n = min(n_chunks, keep)`` blocks (no block is empty)."""
    n = max(1, min(int(n_chunks), int(keep)))
    size = keep // n
    return [size] * (n - 1) + [keep - size * (n - 1)]


def jest_select(
    learner_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    keep: int,
    generator: torch.Generator,
    n_chunks: int = 16,
    temperature: float = 1.0,
    loss: LossKind = "softmax",
) -> torch.Tensor:
    """JEST's joint selection (Evans et al. 2024, Algorithm 1) of ``keep`` examples from
    two N x N logit matrices; the indices in increasing order.

    Block 1 is sampled from each example's own learnability: with ``loss="sigmoid"`` the
    paper's diagonal (batch-of-one) terms, with ``loss="softmax"`` the per-example CLIP
    loss within the whole super-batch (a batch of one has no softmax loss, so its
    batch-of-one learnability is 0 for every example). Every later block is sampled from
    the conditional learnability of adding each remaining example ``i`` to the chosen set
    ``C``: ``[L_learner(C+{i}) - L_learner(C)] - [L_ref(C+{i}) - L_ref(C)]``, exact for
    either loss (:class:`~selbench.online.losses.SoftmaxGain`,
    :class:`~selbench.online.losses.SigmoidGain`)."""
    learner_logits = torch.as_tensor(learner_logits)
    reference_logits = torch.as_tensor(reference_logits).to(learner_logits.device)
    n = learner_logits.shape[0]
    learner = conditional_gain(learner_logits, loss)
    reference = conditional_gain(reference_logits, loss)
    available = torch.ones(n, dtype=torch.bool, device=learner_logits.device)
    chosen = []
    for number, size in enumerate(block_sizes(keep, n_chunks)):
        if number == 0 and loss == "softmax":
            scores = softmax_losses(learner_logits) - softmax_losses(reference_logits)
        else:  # sigmoid block 1: the chosen set is empty, so the gains are the diagonal
            scores = learner.gains() - reference.gains()
        block = sample_block(scores, size, available, temperature, generator)
        block = block.to(learner_logits.device)
        learner.add(block)
        reference.add(block)
        available[block] = False
        chosen.append(block)
    return _sorted(torch.cat(chosen))


class Uniform(OnlineStrategy):
    """A uniformly random ``keep`` of the super-batch: the control every online method
    must beat at the same ratio. It scores nothing; a uniform keep of a uniform
    super-batch is distributed as plain training, so it isolates what the scoring buys.
    With ``ratio = 1`` (``N == keep``) it returns ``arange(N)`` without drawing, so that
    training with it is bit-identical to plain training."""

    name = "uniform"
    summary = "Uniformly random keep of the super-batch (control)"
    reference = (
        "Evans et al., 'Data curation via joint example selection further accelerates "
        "multimodal learning' (JEST, NeurIPS 2024), Sec. 3: the uniform baseline"
    )
    needs_reference = False
    stochastic = True
    Params: ClassVar[type[BaseModel]] = OnlineParams

    def is_stochastic(self) -> bool:
        return self.ratio > 1

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        n = len(batch)
        if n == batch.keep:
            return torch.arange(n)
        gen = batch.generator
        return _sorted(torch.randperm(n, generator=gen, device=gen.device)[: batch.keep])


class HardLearner(OnlineStrategy):
    """The ``keep`` examples the learner finds hardest: highest per-example learner loss
    within the super-batch, ``s_i = l(x_i | theta)`` (hard example mining)."""

    name = "hard-learner"
    summary = "Top-keep learner loss: the examples the learner finds hardest"
    reference = (
        "Loshchilov & Hutter, 'Online batch selection for faster training of neural "
        "networks' (arXiv 1511.06343, 2015): prioritise high-loss examples; JEST (Evans et "
        "al., NeurIPS 2024) Sec. 2.1 'hard learner', s_hard = l(B | theta), scored per example"
    )
    needs_reference = False
    stochastic = False
    Params: ClassVar[type[BaseModel]] = OnlineParams

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        return top_k(batch.learner_losses(), batch.keep, largest=True)


class EasyReference(OnlineStrategy):
    """The ``keep`` examples the reference model finds easiest: lowest per-example
    reference loss within the super-batch, ``s_i = -l(x_i | theta*)``."""

    name = "easy-reference"
    summary = "Lowest-keep reference loss: the examples a reference model finds easiest"
    reference = (
        "JEST (Evans et al., NeurIPS 2024) Sec. 2.1 'easy reference', s_easy = "
        "-l(B | theta*), scored per example; the irreducible-loss control of RHO-LOSS "
        "(Mindermann et al., 'Prioritized training on points that are learnable, worth "
        "learning, and not yet learnt', ICML 2022)"
    )
    needs_reference = True
    stochastic = False
    Params: ClassVar[type[BaseModel]] = OnlineParams

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        return top_k(batch.reference_losses(), batch.keep, largest=False)


class LearnabilityParams(OnlineParams):
    ratio: int = Field(
        default=4,
        ge=1,
        description=_RATIO + "; RHO-LOSS (Mindermann et al. 2022, Sec. 4) selects 10% of "
        "each large batch, ratio 10",
    )


class Learnability(OnlineStrategy):
    """The ``keep`` most learnable examples, each scored on its own:
    ``s_i = l(x_i | theta) - l(x_i | theta*)``, learner minus reference per-example loss
    within the super-batch (independent selection; JEST's ``jest`` chooses jointly)."""

    name = "learnability"
    summary = "Top-keep learner-minus-reference loss, per example (RHO-LOSS-style)"
    reference = (
        "JEST (Evans et al., NeurIPS 2024) Sec. 2.1, learnability s_learn = l(B | theta) - "
        "l(B | theta*) (Eq. 3), scored per example; the reducible holdout loss of RHO-LOSS "
        "(Mindermann et al., ICML 2022)"
    )
    needs_reference = True
    stochastic = False
    Params: ClassVar[type[BaseModel]] = LearnabilityParams

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        scores = batch.learner_losses() - batch.reference_losses().to(batch.learner_losses())
        return top_k(scores, batch.keep, largest=True)


class JestParams(OnlineParams):
    ratio: int = Field(
        default=4,
        ge=1,
        description="super-batch size / batch size; selbench's default (shared by the "
        "online built-ins); JEST's main results use 80-90% filtering (ratios 5-10), its "
        "sweeps 50%, 80% and 90%",
    )
    n_chunks: int = Field(
        default=16,
        ge=1,
        description="blocks the sub-batch is sampled in (JEST, Evans et al. 2024, Sec. 2.2: "
        "16 iterations); capped at keep, the last block takes the remainder",
    )
    temperature: float = Field(
        default=1.0,
        ge=0.0,
        description="blocks are sampled with probabilities softmax(gain / temperature); "
        "JEST samples proportionally to exp(learnability), i.e. 1; 0 takes the top gains "
        "(greedy, deterministic)",
    )
    loss: Literal["softmax", "sigmoid"] = Field(
        default="softmax",
        description="contrastive loss the learnability is measured with: softmax is CLIP's "
        "loss, the one selbench's recipe trains with; sigmoid is SigLIP's pairwise loss, "
        "the one JEST trains and scores with (Evans et al. 2024, Sec. 2.2)",
    )


class Jest(OnlineStrategy):
    """Joint Example Selection: sample the sub-batch, block by block, by its joint
    learnability ``L_learner(S) - L_reference(S)`` (the contrastive loss of ``S`` alone).

    Block 1 comes from each example's own learnability; every later block is drawn
    without replacement with probabilities ``softmax(gain / temperature)``, ``gain`` the
    conditional learnability of adding each remaining example to the chosen set
    (:func:`jest_select`). The paper's SigLIP loss is a sum of pair terms, so the gain is
    a row and column sum (``loss="sigmoid"``, the paper's Algorithm 1). selbench's models
    train with CLIP's softmax loss (the default), where adding an example also changes
    the softmax denominators of every chosen example; the gain is still exact, from
    running log-sum-exps per chosen example, O(N |C|) per block. For the softmax loss a
    batch of one has no loss, so block 1 uses the per-example loss within the whole
    super-batch (the ``learnability`` score) instead of the paper's diagonal terms.
    """

    name = "jest"
    summary = "Joint Example Selection: sample sub-batches by joint learnability"
    reference = (
        "Evans et al., 'Data curation via joint example selection further accelerates "
        "multimodal learning' (NeurIPS 2024), Sec. 2.2 and Algorithm 1 (blocked sampling "
        "by conditional learnability; 16 iterations)"
    )
    needs_reference = True
    stochastic = True
    Params: ClassVar[type[BaseModel]] = JestParams

    def is_stochastic(self) -> bool:
        return float(self.params.temperature) > 0

    def choose(self, batch: SuperBatch) -> torch.Tensor:
        return jest_select(
            batch.learner_logits(),
            batch.reference_logits(),
            batch.keep,
            batch.generator,
            n_chunks=int(self.params.n_chunks),
            temperature=float(self.params.temperature),
            loss=self.params.loss,
        )


BUILTIN_ONLINE: dict[str, type[OnlineStrategy]] = {
    cls.name: cls for cls in (Uniform, HardLearner, EasyReference, Learnability, Jest)
}


def make_online(name: str, params: BaseModel | dict[str, Any] | None = None) -> OnlineStrategy:
    """The built-in online strategy ``name`` with ``params``; ConfigError for an unknown name."""
    if name not in BUILTIN_ONLINE:
        raise ConfigError(
            f"unknown online method {name!r}; built-in: {', '.join(sorted(BUILTIN_ONLINE))}"
        )
    return BUILTIN_ONLINE[name](params)


__all__ = [
    "BUILTIN_ONLINE",
    "EasyReference",
    "HardLearner",
    "Jest",
    "Learnability",
    "Uniform",
    "block_sizes",
    "gumbel",
    "jest_select",
    "make_online",
    "sample_block",
    "top_k",
]
