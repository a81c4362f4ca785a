"""MetaCLIP curation (Xu et al., "Demystifying CLIP Data", ICLR 2024, arXiv 2309.16671;
Chuang et al., "Meta CLIP 2: A Worldwide Scaling Recipe", 2025, arXiv 2507.22062).

1. **Substring matching** (Xu et al., Sec. 3.2): every caption is matched against a list
   of metadata entries. Semantics of the released code (``metaclip/metaclip1/
   substr_matching.py`` and its Aho-Corasick twin): case-sensitive; an entry matches when
   ``" entry "`` occurs in the caption padded with one space at each end, with
   ``, . ; : ? ! `` wrapped in spaces and tabs/newlines turned into spaces. So entries
   match whole words and phrases ("square" does not match "squares", but does match
   "square."); overlapping entries all match ("red circle", "red" and "circle").
   A text matching an entry several times counts once for it.
2. **Balancing** (Xu et al., Sec. 3.4 and Algorithm 1 of Sec. 3.5): ``c_e`` is the number
   of texts matching entry ``e``; each entry is sampled with probability
   ``p_e = min(1, t / c_e)`` and a text is kept when at least one of its matched entries
   is sampled, i.e. with probability ``P_i(t) = 1 - prod_{e in M_i} (1 - p_e)``; a text
   matching nothing is dropped. A head entry (``c_e > t``) keeps about ``t`` texts, a tail
   entry all of its texts.

**The threshold t at this pool's scale.** t = 20k is the paper's value at 400M pairs
(Sec. 3.4: the ~16k entries matched more than 20k times hold 5.35B of the 5.67B matches,
so the tail below t holds ``p = 0.32 / 5.67 = 5.6%`` of all matches). Meta CLIP 2
carries t to pools of another size (its languages) by keeping that tail proportion
constant (Chuang et al., Sec. 3, Algorithm 1: ``p = t_to_p(counts_en, t_en)``, then
``t_lang = p_to_t(counts_lang, p)``). The same rule carries t to this pool:
:func:`threshold_for_tail_proportion` with :data:`PAPER_TAIL_PROPORTION`. (Scaling t
linearly with the pool instead, 20k x N / 400M, gives t = 0.4 at N = 8,000, less than
one text per entry.)

**Meeting the budget exactly.** Algorithm 1 keeps a random number of texts. With
``threshold="budget"`` (the default) t is the one whose expected kept count
``K(t) = sum_i P_i(t)`` equals the budget: ``K`` is continuous and non-decreasing in t,
so t is found by bisection (:func:`threshold_for_budget`). Then exactly ``budget`` texts
are drawn with inclusion probabilities ``P_i(t)`` (:func:`exact_size_sample`: texts with
``P_i = 1`` always, the rest by randomized systematic sampling, Madow 1949 / Goodman &
Kish 1950): each text's chance of being kept is Algorithm 1's at that t (up to a factor
``1 - 1e-3 / budget`` of numerical margin), while the count is exact.
With ``threshold="paper"`` t comes from the tail-proportion rule (or ``t``), Algorithm 1
runs as released (one independent draw per matched (text, entry) pair, as
``metaclip/metaclip1/indexing/balance_sampling.py``), and the budget then cuts a uniform
random subset of what it kept, or fills with a uniform random sample of the matched texts
it dropped. Either way, a budget larger than the number of matched texts keeps them all and
fills the rest with unmatched texts at random (``unmatched="random"``) or refuses
(``unmatched="error"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import ahocorasick  # pyahocorasick, the released code's matcher (C, maintained)
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from selbench.errors import ConfigError
from selbench.toolbox import Selection, SelectionContext, Strategy, hookimpl

log = logging.getLogger(__name__)

#: Xu et al. (2024), Sec. 3.4 and Algorithm 1: the "magic" 20k at 400M pairs.
PAPER_T = 20_000
#: Share of all matches held by entries matched fewer than t = 20k times at 400M:
#: (5.67B - 5.35B) / 5.67B (Xu et al., Sec. 3.4; entry_counts_400m.json in the release).
PAPER_TAIL_PROPORTION = (5.67 - 5.35) / 5.67
#: Characters the released ``spacing()`` wraps in spaces, and those it turns into one.
PUNCTUATION_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
WHITESPACE_TO_SPACE = ("\t", "\n", "\r")
#: The bisection aims ``K(t)`` this far above the budget so that the systematic draw's step
#: ``K / budget`` is at least 1 in floating point (no text drawn twice).
BUDGET_MARGIN = 1e-3
BISECTION_STEPS = 100
#: ``metadata`` values that are not paths.
FROM_POOL, SYNTHWEB = "pool", "synthweb"


def spaced(text: str) -> str:
    """``text`` as the released ``spacing()`` prepares it for matching: one space at each
    end, :data:`PUNCTUATION_TO_WRAP` wrapped in spaces, tabs and newlines as spaces."""
    text = f" {text} "
    for mark in PUNCTUATION_TO_WRAP:
        text = text.replace(mark, f" {mark} ")
    for char in WHITESPACE_TO_SPACE:
        text = text.replace(char, " ")
    return text


@dataclass(frozen=True)
class Matches:
    """Which entries each text matched, in CSR form: text ``i`` matched
    ``entry_ids[text_ptr[i]:text_ptr[i + 1]]`` (each entry once, ascending)."""

    text_ptr: np.ndarray  # int64, len(texts) + 1
    entry_ids: np.ndarray  # int64
    n_entries: int

    def __len__(self) -> int:
        return len(self.text_ptr) - 1

    def counts(self) -> np.ndarray:
        """``c_e``: the number of texts matching each entry."""
        return np.bincount(self.entry_ids, minlength=self.n_entries).astype(np.int64)

    def matched(self) -> np.ndarray:
        """True for the texts that match at least one entry."""
        return np.diff(self.text_ptr) > 0

    def text_of_pair(self) -> np.ndarray:
        """The text of every (text, entry) pair, aligned with ``entry_ids``."""
        return np.repeat(np.arange(len(self)), np.diff(self.text_ptr))

    def entries_of(self, i: int) -> list[int]:
        return self.entry_ids[self.text_ptr[i] : self.text_ptr[i + 1]].tolist()


def build_automaton(entries: Sequence[str], lowercase: bool = False) -> Any:
    """An Aho-Corasick automaton of the space-padded entries (``" entry "``), whose value
    is the entry's index. A repeated entry keeps its first index."""
    automaton = ahocorasick.Automaton()
    for index, entry in enumerate(entries):
        key = f" {entry.lower() if lowercase else entry} "
        if key not in automaton:
            automaton.add_word(key, index)
    automaton.make_automaton()
    return automaton


def match_captions(
    captions: Sequence[str],
    entries: Sequence[str],
    lowercase: bool = False,
    track: Any = None,
) -> Matches:
    """Substring-match every caption against ``entries`` (module docstring, step 1) with
    one Aho-Corasick pass per caption. ``lowercase``: match case-insensitively (the
    release does not). ``track``: an optional ``progress.track``-like wrapper."""
    automaton = build_automaton(entries, lowercase)
    ptr = np.zeros(len(captions) + 1, dtype=np.int64)
    found: list[int] = []
    iterable = track(captions) if track is not None else captions
    for i, caption in enumerate(iterable):
        text = spaced(caption.lower() if lowercase else caption)
        ids = sorted({index for _, index in automaton.iter(text)}) if len(automaton) else []
        found.extend(ids)
        ptr[i + 1] = len(found)
    return Matches(ptr, np.asarray(found, dtype=np.int64), len(entries))


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """``p_e = min(1, t / c_e)`` (Algorithm 1; 1 for an entry nothing matched)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.minimum(1.0, t / np.maximum(counts, 1.0))


def keep_probabilities(matches: Matches, t: float, counts: np.ndarray | None = None) -> np.ndarray:
    """``P_i(t) = 1 - prod_{e in M_i} (1 - p_e)``: the chance that Algorithm 1 keeps text
    ``i`` at threshold ``t`` (0 for a text matching nothing)."""
    counts = matches.counts() if counts is None else counts
    keep = np.zeros(len(matches), dtype=np.float64)
    nonempty = matches.matched()
    if not nonempty.any():
        return keep
    missed = 1.0 - entry_probabilities(counts, t)[matches.entry_ids]
    starts = matches.text_ptr[:-1][nonempty]
    keep[nonempty] = 1.0 - np.multiply.reduceat(missed, starts)
    return np.clip(keep, 0.0, 1.0)


def tail_proportion(counts: np.ndarray, t: float) -> float:
    """Share of all matches held by tail entries (``c_e < t``): Meta CLIP 2's ``p`` for a
    threshold ``t`` (Chuang et al., Algorithm 1, ``t_to_p``)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts[counts < t].sum() / total) if total > 0 else 0.0


def threshold_for_tail_proportion(counts: np.ndarray, proportion: float) -> float:
    """The t whose tail proportion (:func:`tail_proportion`) is nearest ``proportion``:
    Meta CLIP 2's rule for carrying t to another pool (Chuang et al., Sec. 3, Algorithm 1,
    ``p_to_t``). Candidates are the observed counts and one past the largest (everything
    tail); ties go to the smaller t. The release picks the count at which the cumulative
    share of the sorted counts is nearest ``p``; this is the same up to one count step,
    and consistent with :func:`tail_proportion`."""
    counts = np.asarray(counts, dtype=np.int64)
    counts = counts[counts > 0]
    if len(counts) == 0:
        return 1.0
    values, totals = np.unique(counts, return_counts=True)
    below = np.concatenate([[0.0], np.cumsum(values * totals, dtype=np.float64)])
    shares = below / below[-1]  # share of matches in entries with c < candidate
    candidates = np.concatenate([values, [values[-1] + 1]]).astype(np.float64)
    return float(candidates[int(np.argmin(np.abs(shares - proportion)))])


def threshold_for_budget(
    matches: Matches, budget: float, counts: np.ndarray | None = None
) -> float:
    """The smallest t (to bisection precision) with ``K(t) = sum_i P_i(t) >= budget``.

    ``K`` is continuous and non-decreasing in t, from 0 at t = 0 to the number of matched
    texts at t = max c_e. ``budget`` must lie in ``(0, number of matched texts]``."""
    counts = matches.counts() if counts is None else counts
    n_matched = int(matches.matched().sum())
    if not 0 < budget <= n_matched:
        raise ValueError(f"budget must be in (0, {n_matched}] (the matched texts), got {budget}")
    low, high = 0.0, float(max(int(counts.max()), 1))
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if keep_probabilities(matches, middle, counts).sum() >= budget:
            high = middle
        else:
            low = middle
    return high


def exact_size_sample(probabilities: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of exactly ``size`` items, item ``i`` drawn with probability
    ``probabilities[i]`` (rescaled to sum to ``size`` when they sum to more).

    Items with probability 1 are taken; the others by randomized systematic sampling
    (Madow 1949; Goodman & Kish 1950): in a random order, lay the probabilities end to end
    and take the items under the points ``(u + j) * step``, ``j < size - taken``,
    ``u ~ U[0, 1)``, ``step = remaining sum / remaining size >= 1``. Each item is drawn
    with probability ``p_i / step`` and at most once. Needs ``sum >= size``."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    certain = np.flatnonzero(probabilities >= 1.0)
    if len(certain) >= size:
        return np.sort(rng.permutation(certain)[:size])
    rest = size - len(certain)
    candidates = np.flatnonzero((probabilities > 0.0) & (probabilities < 1.0))
    order = candidates[rng.permutation(len(candidates))]
    ends = np.cumsum(probabilities[order])
    if len(ends) == 0 or ends[-1] < rest:
        raise ValueError(
            f"probabilities sum to {len(certain) + (ends[-1] if len(ends) else 0.0):.6g}, "
            f"less than the {size} items asked for"
        )
    step = ends[-1] / rest
    points = (rng.random() + np.arange(rest)) * step
    picked = order[np.minimum(np.searchsorted(ends, points, side="right"), len(order) - 1)]
    chosen = np.concatenate([certain, picked])
    if len(np.unique(chosen)) != size:  # pragma: no cover - guarded by step >= 1
        raise RuntimeError("systematic sampling drew an item twice")
    return np.sort(chosen)


def algorithm1_sample(
    matches: Matches, t: float, rng: np.random.Generator, counts: np.ndarray | None = None
) -> np.ndarray:
    """Algorithm 1 as released: one independent draw per matched (text, entry) pair,
    entry ``e`` sampled with ``p_e``; a text is kept when any of its draws succeeds.
    Returns the kept texts' indices (sorted); their number is random."""
    counts = matches.counts() if counts is None else counts
    drawn = rng.random(len(matches.entry_ids)) < entry_probabilities(counts, t)[matches.entry_ids]
    return np.unique(matches.text_of_pair()[drawn])


def load_metadata(path: str | Path, pool: str) -> list[str]:
    """Entries of a metadata file: one per line, surrounding whitespace stripped, empty
    lines skipped, repeats dropped (first kept). ConfigError names the file and the pool."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"metaclip: metadata file {file} of pool {pool!r} does not exist (the pool "
            "YAML's `metadata`, or -p metadata=PATH: a text file, one entry per line)"
        )
    entries = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    entries = list(dict.fromkeys(e for e in entries if e))
    if not entries:
        raise ConfigError(f"metaclip: metadata file {file} of pool {pool!r} holds no entries")
    return entries


def pool_metadata(pool: Any, metadata: str) -> tuple[list[str], str]:
    """The entries to match and where they came from (for the log and the docs).

    ``metadata="pool"``: the file the pool YAML names (``metadata``), else, on a SynthWeb
    pool, its concept vocabulary (:func:`selbench.synthweb.vocabulary.concept_entries`);
    a web pool (``kind`` "shards") without a file is refused. A pool view that declares no
    ``kind`` at all is an in-memory one built by hand (the conformance kit's, whose
    captions use SynthWeb's words), never a run's pool: it gets the vocabulary too.
    ``"synthweb"``: that vocabulary on any pool; anything else: a file path."""
    name = str(getattr(pool, "name", "?"))
    if metadata == FROM_POOL:
        path = getattr(pool, "metadata", None)
        if path:
            return load_metadata(path, name), str(path)
        if getattr(pool, "kind", None) not in ("synthweb", None):
            raise ConfigError(
                f"metaclip: pool {name!r} names no metadata file; add `metadata: PATH` (a "
                "text file, one entry per line) to its pool YAML, or pass -p metadata=PATH "
                "(-p metadata=synthweb: SynthWeb's concept vocabulary)"
            )
        metadata = SYNTHWEB
    if metadata == SYNTHWEB:
        from selbench.synthweb.vocabulary import concept_entries

        return concept_entries(), "SynthWeb concept vocabulary"
    return load_metadata(metadata, name), metadata


def fill_unmatched(
    chosen: np.ndarray, matched: np.ndarray, budget: int, rng: np.random.Generator
) -> np.ndarray:
    """``chosen`` plus a uniform random sample of the unmatched texts up to ``budget``."""
    unmatched = np.flatnonzero(~matched)
    extra = rng.choice(unmatched, size=budget - len(chosen), replace=False)
    return np.sort(np.concatenate([chosen, extra]))


class MetaCLIPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: str = Field(
        default=FROM_POOL,
        description="the metadata entries: 'pool' (the pool YAML's `metadata` file; on "
        "SynthWeb, its concept vocabulary), 'synthweb' (that vocabulary on any pool) or a "
        "text file, one entry per line (the paper's 500k entries: Xu et al. 2024, Sec. 3.1)",
    )
    threshold: Literal["budget", "paper"] = Field(
        default="budget",
        description="'budget': t such that Algorithm 1's expected kept count is the budget, "
        "then an exact-size draw with Algorithm 1's probabilities; 'paper': t from the "
        "tail-proportion rule (Meta CLIP 2, Algorithm 1) or `t`, Algorithm 1 as released, "
        "the budget then cut or filled at random (docs/strategies/metaclip.md)",
    )
    t: float = Field(
        default=0.0,
        ge=0.0,
        description="threshold='paper' only: a fixed t (20000 at 400M pairs: Xu et al. "
        "2024, Sec. 3.4); 0: from the tail-proportion rule",
    )
    tail_proportion: float = Field(
        default=PAPER_TAIL_PROPORTION,
        gt=0.0,
        lt=1.0,
        description="threshold='paper': share of matches left in tail entries (c_e < t); "
        "0.0564 = (5.67B - 5.35B) / 5.67B, what t = 20k leaves at 400M (Xu et al. 2024, "
        "Sec. 3.4), kept constant across pools as Meta CLIP 2 does across languages",
    )
    unmatched: Literal["random", "error"] = Field(
        default="random",
        description="a budget above the matched texts: keep them all and fill with a "
        "uniform random sample of the unmatched ('random'), or refuse ('error'); the "
        "paper drops unmatched texts and has no budget",
    )
    lowercase: bool = Field(
        default=False,
        description="match case-insensitively; the released substr_matching.py is case-sensitive",
    )


class MetaCLIP(Strategy):
    """MetaCLIP's metadata curation, at an exact budget (module docstring).

    ``Selection.scores``: every text's chance of being kept by Algorithm 1 at the t used;
    ``Selection.metrics``: ``t_used``, ``tail_proportion`` (at that t), ``entries``,
    ``entries_matched``, ``head_entries`` (``c_e > t``), ``matched_texts``,
    ``expected_kept`` (``K(t)``), ``algorithm1_kept`` (threshold='paper': what the draw
    kept before the cut or fill) and ``filled_unmatched``.
    """

    name = "metaclip"
    summary = "MetaCLIP: substring-match captions to metadata, cap each entry at t, balance"
    reference = (
        "Xu et al., Demystifying CLIP Data (ICLR 2024, arXiv 2309.16671), Sec. 3.2-3.5, "
        "Algorithm 1 (t = 20k at 400M); Chuang et al., Meta CLIP 2 (arXiv 2507.22062), "
        "Algorithm 1 (t carried by the tail proportion of matches)"
    )
    stochastic = True  # Algorithm 1 samples; the draw uses ctx.rng
    Params = MetaCLIPParams

    def select(self, ctx: SelectionContext) -> Selection:
        p = cast(MetaCLIPParams, self.params)
        entries, source = pool_metadata(ctx.pool, p.metadata)
        captions = list(ctx.pool.captions)

        def track(items: Sequence[str]) -> Any:
            return ctx.progress.track(items, "metaclip: substring matching", total=len(items))

        matches = match_captions(captions, entries, p.lowercase, track)
        counts = matches.counts()
        matched = matches.matched()
        n_matched, budget = int(matched.sum()), ctx.budget_count
        if budget > n_matched and p.unmatched == "error":
            raise ConfigError(
                f"metaclip: the budget asks for {budget} samples, and only {n_matched} of "
                f"pool {getattr(ctx.pool, 'name', '?')!r}'s {len(captions)} captions match "
                f"an entry of {source}; lower the budget, add entries, or pass "
                "-p unmatched=random to fill with unmatched samples"
            )
        chosen, t, metrics = self._choose(matches, counts, min(budget, n_matched), ctx.rng)
        filled = budget - len(chosen)
        if filled > 0:
            chosen = fill_unmatched(chosen, matched, budget, ctx.rng)
            log.warning(
                "metaclip: %d captions match an entry of %s, below the budget %d; "
                "filled with %d unmatched samples at random",
                n_matched,
                source,
                budget,
                filled,
            )
        probabilities = keep_probabilities(matches, t, counts)
        log.info("metaclip: t=%.6g over %d entries (%s)", t, len(entries), source)
        uids = list(ctx.pool.uids)
        metrics.update(
            t_used=float(t),
            tail_proportion=tail_proportion(counts, t),
            entries=float(len(entries)),
            entries_matched=float(np.count_nonzero(counts)),
            head_entries=float(np.count_nonzero(counts > t)),
            matched_texts=float(n_matched),
            expected_kept=float(probabilities.sum()),
            filled_unmatched=float(max(filled, 0)),
        )
        return Selection(
            uids=[uids[i] for i in chosen],
            scores={uid: float(s) for uid, s in zip(uids, probabilities, strict=True)},
            metrics=metrics,
        )

    def _choose(
        self, matches: Matches, counts: np.ndarray, size: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, float, dict[str, float]]:
        """``size`` matched texts (sorted indices), the t used and metrics of the draw."""
        p = cast(MetaCLIPParams, self.params)
        if size == 0:
            return np.zeros(0, dtype=np.int64), float(max(counts.max(initial=0), 1)), {}
        if p.threshold == "budget":
            if size == int(matches.matched().sum()):  # every matched text: t = max c_e
                return np.flatnonzero(matches.matched()), float(counts.max()), {}
            # size < matched texts (integers), so K(t) reaches size + BUDGET_MARGIN
            t = threshold_for_budget(matches, size + BUDGET_MARGIN, counts)
            chosen = exact_size_sample(keep_probabilities(matches, t, counts), size, rng)
            return chosen, t, {}
        t = p.t if p.t > 0 else threshold_for_tail_proportion(counts, p.tail_proportion)
        kept = algorithm1_sample(matches, t, rng, counts)
        metrics = {"algorithm1_kept": float(len(kept))}
        if len(kept) >= size:  # cut: a uniform random subset of what Algorithm 1 kept
            return np.sort(rng.choice(kept, size=size, replace=False)), t, metrics
        dropped = np.setdiff1d(np.flatnonzero(matches.matched()), kept)
        extra = rng.choice(dropped, size=size - len(kept), replace=False)
        return np.sort(np.concatenate([kept, extra])), t, metrics


@hookimpl
def register_strategies(register):
    register(MetaCLIP)
