"""Contrastive losses of a super-batch and of its sub-batches, from an N x N logit matrix.

``logits[i, j]`` is the score of image ``i`` against text ``j`` (``logit_scale * img_i .
txt_j`` plus the model's ``logit_bias`` when it has one): the diagonal holds the matching
pairs. Two losses are implemented:

- ``"softmax"``: CLIP's symmetric InfoNCE loss (Radford et al., ICML 2021, Fig. 3;
  open_clip's ``ClipLoss``), the loss selbench's recipe trains with. Example ``i`` of a
  batch ``S`` contributes ``(CE of row i over S + CE of column i over S) / 2``, i.e.
  ``((lse_{j in S} z_ij - z_ii) + (lse_{j in S} z_ji - z_ii)) / 2``; the batch loss CLIP
  reports is the mean of these over ``S``.
- ``"sigmoid"``: SigLIP's pairwise loss (Zhai et al., ICCV 2023, Eq. 1), the loss JEST
  scores with (Evans et al., NeurIPS 2024, Sec. 2.2): every pair ``(i, j)`` of ``S``
  contributes ``log(1 + exp(-y_ij z_ij))`` with ``y_ij = +1`` on the diagonal and ``-1``
  off it; SigLIP reports the sum divided by ``|S|``.

The *total* loss of a sub-batch (:func:`subset_loss`) is the sum of its examples' terms,
not the mean, so that the loss of a set grows by exactly the *conditional gain* of the
example added to it (:class:`SoftmaxGain`, :class:`SigmoidGain`); for sub-batches of one
size (JEST's) the sum and the mean rank them identically.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

LossKind = Literal["softmax", "sigmoid"]
LOSSES: tuple[str, ...] = ("softmax", "sigmoid")


def _as_logits(logits: Any) -> torch.Tensor:
    """``logits`` as a square floating tensor (half precision promoted to float32)."""
    z = torch.as_tensor(logits)
    if z.ndim != 2 or z.shape[0] != z.shape[1]:
        raise ValueError(f"expected a square N x N logit matrix, got shape {tuple(z.shape)}")
    if not torch.is_floating_point(z) or z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return z


def _index(indices: Any, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(indices, dtype=torch.long, device=device).reshape(-1)


def softmax_losses(logits: Any) -> torch.Tensor:
    """Per-example symmetric CLIP loss within the whole matrix: for example ``i``,
    ``(CE(row i, target i) + CE(column i, target i)) / 2``. Their mean is open_clip's
    ``ClipLoss`` of the batch."""
    z = _as_logits(logits)
    diag = z.diagonal()
    rows = torch.logsumexp(z, dim=1) - diag  # image i against every text
    cols = torch.logsumexp(z, dim=0) - diag  # text i against every image
    return (rows + cols) / 2


def sigmoid_pair_losses(logits: Any) -> torch.Tensor:
    """The N x N matrix of SigLIP's pair terms ``log(1 + exp(-y_ij z_ij))``, ``y = +1`` on
    the diagonal and ``-1`` off it (Zhai et al. 2023, Eq. 1, before the ``1/|B|``)."""
    z = _as_logits(logits)
    signs = 2 * torch.eye(z.shape[0], dtype=z.dtype, device=z.device) - 1
    return F.softplus(-signs * z)


def sigmoid_losses(logits: Any) -> torch.Tensor:
    """Per-example SigLIP loss within the whole matrix: example ``i``'s row and column
    terms, ``(sum_j p_ij + sum_j p_ji) / 2``; they sum to the matrix's total pair loss."""
    pairs = sigmoid_pair_losses(logits)
    return (pairs.sum(dim=1) + pairs.sum(dim=0)) / 2


def subset_loss(logits: Any, indices: Any, loss: LossKind = "softmax") -> torch.Tensor:
    """The total loss of the sub-batch ``indices`` *alone*: its examples' logits among
    themselves, summed over its examples (softmax) or pairs (sigmoid). A scalar tensor."""
    z = _as_logits(logits)
    idx = _index(indices, z.device)
    sub = z[idx][:, idx]
    if loss == "softmax":
        return softmax_losses(sub).sum()
    if loss == "sigmoid":
        return sigmoid_pair_losses(sub).sum()
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def subbatch_learnability(
    learner_logits: Any, reference_logits: Any, indices: Any, loss: LossKind = "softmax"
) -> float:
    """JEST's learnability of the sub-batch ``S = indices`` (Evans et al. 2024, Sec. 2.1):
    ``L_learner(S) - L_reference(S)``, each the total loss of ``S`` alone."""
    learner = subset_loss(learner_logits, indices, loss)
    reference = subset_loss(reference_logits, indices, loss)
    return float(learner - reference)


class SoftmaxGain:
    """Exact conditional gains of the softmax loss, updated incrementally.

    For a chosen set ``C`` and a candidate ``i`` not in it, :meth:`gains` returns
    ``L(C + {i}) - L(C)`` for every ``i`` at once, ``L`` the total loss of
    :func:`subset_loss`. Adding ``i`` brings its own term over ``C + {i}`` and enlarges the
    softmax denominators of every chosen example: row ``k`` gains column ``i`` and column
    ``k`` gains row ``i``. With running log-sum-exps over ``C`` for every example,
    ``R_k = lse_{j in C} z_kj`` and ``K_k = lse_{j in C} z_jk``::

        gain_i = ((logaddexp(R_i, z_ii) - z_ii) + (logaddexp(K_i, z_ii) - z_ii)) / 2
               + sum_{k in C} (softplus(z_ki - R_k) + softplus(z_ik - K_k)) / 2

    since ``logaddexp(R_k, z_ki) - R_k = softplus(z_ki - R_k)``. :meth:`gains` costs
    O(N |C|) and :meth:`add` O(N |block|). With ``C`` empty every gain is 0: a batch of
    one has no softmax loss.
    """

    def __init__(self, logits: Any) -> None:
        self.logits = _as_logits(logits)
        n = self.logits.shape[0]
        self.diag = self.logits.diagonal()
        self.row_lse = torch.full((n,), -torch.inf, dtype=self.logits.dtype, device=self.device)
        self.col_lse = torch.full_like(self.row_lse, -torch.inf)
        self.chosen = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def gains(self) -> torch.Tensor:
        """``L(C + {i}) - L(C)`` for every example ``i`` (meaningless for chosen ones)."""
        d = self.diag
        own = (torch.logaddexp(self.row_lse, d) - d) + (torch.logaddexp(self.col_lse, d) - d)
        if len(self.chosen) == 0:
            return own / 2
        c = self.chosen
        rows = F.softplus(self.logits[c, :] - self.row_lse[c, None]).sum(dim=0)
        cols = F.softplus(self.logits[:, c] - self.col_lse[None, c]).sum(dim=1)
        return (own + rows + cols) / 2

    def add(self, block: Any) -> None:
        """Add the examples ``block`` to the chosen set and update the running terms."""
        b = _index(block, self.device)
        if len(b) == 0:
            return
        self.row_lse = torch.logaddexp(self.row_lse, torch.logsumexp(self.logits[:, b], dim=1))
        self.col_lse = torch.logaddexp(self.col_lse, torch.logsumexp(self.logits[b, :], dim=0))
        self.chosen = torch.cat([self.chosen, b])


class SigmoidGain:
    """Exact conditional gains of the sigmoid loss: the loss is a sum over pairs, so adding
    ``i`` to ``C`` adds its own pair term and its pairs with ``C`` in both directions,
    ``gain_i = p_ii + sum_{k in C} (p_ik + p_ki)`` (JEST, Evans et al. 2024, Sec. 2.2 and
    Algorithm 1, with ``p`` from :func:`sigmoid_pair_losses`). The sums over ``C`` are
    kept per example and updated per block, O(N |block|)."""

    def __init__(self, logits: Any) -> None:
        self.pairs = sigmoid_pair_losses(logits)
        self.diag = self.pairs.diagonal()
        self.with_chosen = torch.zeros_like(self.diag)  # sum_{k in C} (p_ik + p_ki)
        self.chosen = torch.zeros(0, dtype=torch.long, device=self.pairs.device)

    def gains(self) -> torch.Tensor:
        """``L(C + {i}) - L(C)`` for every example ``i`` (meaningless for chosen ones)."""
        return self.diag + self.with_chosen

    def add(self, block: Any) -> None:
        """Add the examples ``block`` to the chosen set and update the running sums."""
        b = _index(block, self.pairs.device)
        if len(b) == 0:
            return
        self.with_chosen = (
            self.with_chosen + self.pairs[:, b].sum(dim=1) + self.pairs[b, :].sum(dim=0)
        )
        self.chosen = torch.cat([self.chosen, b])


def conditional_gain(logits: Any, loss: LossKind = "softmax") -> SoftmaxGain | SigmoidGain:
    """The incremental conditional-gain tracker for ``loss``."""
    if loss == "softmax":
        return SoftmaxGain(logits)
    if loss == "sigmoid":
        return SigmoidGain(logits)
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
