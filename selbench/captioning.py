"""Captioning with open_clip's CoCa: the caption loss, caption generation, BLEU@4 and CIDEr.

CoCa (Yu et al., "CoCa: Contrastive Captioners are Image-Text Foundation Models", 2022)
trains one model with two losses, ``L = lambda_Con * L_Con + lambda_Cap * L_Cap`` (its
Eq. 4): the contrastive loss of CLIP on the pooled embeddings and an autoregressive
captioning loss of a decoder that cross-attends to the image tokens. The paper sets
``lambda_Cap = 2`` and ``lambda_Con = 1`` (Section 4.1), which are also open_clip_train's
defaults (``--coca-caption-loss-weight 2.0 --coca-contrastive-loss-weight 1.0``).

Evaluation follows CLIP_benchmark's ``captioning`` task
(``clip_benchmark/metrics/captioning.py``): generate one caption per image with
open_clip's CoCa defaults (beam search, 6 beams in 3 groups, at least 5 tokens, at most
30), decode it with open_clip's tokenizer, tokenize candidates and references with
pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP, needs Java) and score them with its
``Bleu(4)`` and ``Cider`` (CIDEr-D). Metric names: ``{set}/bleu4``, ``{set}/cider``
(and ``{set}/bleu1`` .. ``bleu3``).

Only a model that can generate is evaluated; :func:`can_caption` says which.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from selbench.errors import SelbenchError

if TYPE_CHECKING:
    from selbench.progress import Tracker

# CoCa's loss weights: the paper's Section 4.1 (lambda_Cap = 2, lambda_Con = 1), also
# open_clip_train's --coca-caption-loss-weight / --coca-contrastive-loss-weight defaults.
CAPTION_LOSS_WEIGHT = 2.0
CONTRASTIVE_LOSS_WEIGHT = 1.0

# open_clip's SimpleTokenizer: <start_of_text>, <end_of_text>; padding is 0 (CoCa.pad_id).
SOT_TOKEN = 49406
EOT_TOKEN = 49407

#: Bumped whenever the tokens a given seed draws change (2: the draw covers only the
#: top-k candidates, :func:`_nucleus_candidates`). Caches of sampled captions (SIEVE's)
#: put it in their key, so captions drawn by an earlier sampler are not served as this one's.
SAMPLER_VERSION = 2


@dataclass(frozen=True)
class DecodeSettings:
    """How captions are generated. The defaults are those CLIP_benchmark's captioning task
    uses: it calls ``CoCa.generate(images)`` with open_clip's defaults, i.e. beam search
    with ``num_beams=6``, ``num_beam_groups=3``, ``min_seq_len=5``, ``seq_len=30``,
    repetition penalty 1 (none), length penalty 1 and no early stopping (transformers'
    ``BeamSearchScorer`` defaults). ``method="greedy"`` takes the most likely token at
    each step instead (open_clip's ``top_k`` generation with ``top_k=1``).
    ``method="nucleus"`` samples each token (transformers' ``generate(do_sample=True)``
    order: repetition penalty, then top-k, then top-p), from a seeded generator."""

    method: str = "beam"  # "beam", "greedy" or "nucleus"
    num_beams: int = 6
    num_beam_groups: int = 3
    min_seq_len: int = 5
    seq_len: int = 30
    top_p: float = 0.9  # nucleus only: the smallest set of tokens with this much mass
    top_k: int = 0  # nucleus only: first keep the k most likely tokens (0: all)
    repetition_penalty: float = 1.0  # nucleus only: CTRL's penalty on tokens already out

    def __post_init__(self) -> None:
        if self.method not in ("beam", "greedy", "nucleus"):
            raise ValueError(
                f"decoding method {self.method!r}: choose 'beam', 'greedy' or 'nucleus'"
            )
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError("need 0 < top_p <= 1, top_k >= 0 and repetition_penalty > 0")
        if self.num_beams % self.num_beam_groups:
            raise ValueError("num_beams must be a multiple of num_beam_groups")
        if self.seq_len <= self.min_seq_len:
            raise ValueError("seq_len must be larger than min_seq_len")


def can_caption(model: Any) -> bool:
    """Whether ``model`` can generate captions (an open_clip ``CoCa``)."""
    from open_clip import CoCa

    return isinstance(model, CoCa)


def context_length(model: Any) -> int:
    """The longest token sequence the model's text tower and decoder accept."""
    return int(min(model.context_length, model.text.context_length))


def init_decoder(model: Any) -> None:
    """Initialise a freshly built CoCa's captioning decoder as open_clip means to.

    open_clip 3.3's ``MultimodalTransformer`` allocates its vocabulary projection with
    ``torch.empty`` and defines ``init_parameters`` but never calls it (and that method
    reads ``self.transformer``, which the class does not have, so it cannot be called).
    The projection is therefore whatever memory it got: zeros for a large block, leftover
    values (up to 1e21 seen) for a small one, different from run to run. This does what
    that method intends, with its standard deviations: attention inputs ``width**-0.5``,
    output projections ``width**-0.5 * (2 * layers)**-0.5``, MLP inputs
    ``(2 * width)**-0.5`` (self- and cross-attention blocks alike), the vocabulary
    projection ``width**-0.5``.
    """
    decoder = model.text_decoder
    width, layers = decoder.width, decoder.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        torch.nn.init.normal_(decoder.text_projection, std=width**-0.5)


# -- the caption loss ----------------------------------------------------------------
def decoder_states(model: Any, image_embs: torch.Tensor, token_embs: torch.Tensor) -> torch.Tensor:
    """The CoCa decoder's final hidden states (after ``ln_final``), one per text position.

    The same modules in the same order as open_clip's ``MultimodalTransformer.forward``,
    stopping before its last line, the projection onto the 49,408-token vocabulary. Written
    out here because that projection is almost all of a tiny CoCa's cost on CPU, and the
    caller needs it only at some positions (the labels that are not padding while
    training, the last position while generating): :func:`vocab_logits` projects those.
    """
    decoder = model.text_decoder
    seq_len = token_embs.shape[1]
    if not decoder.batch_first:
        image_embs = image_embs.permute(1, 0, 2)
        token_embs = token_embs.permute(1, 0, 2)
    mask = decoder.attn_mask[:seq_len, :seq_len]
    for resblock, cross_attn in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        token_embs = resblock(token_embs, attn_mask=mask)
        token_embs = cross_attn(token_embs, k_x=image_embs, v_x=image_embs)
    if not decoder.batch_first:
        token_embs = token_embs.permute(1, 0, 2)
    return decoder.ln_final(token_embs)


def vocab_logits(model: Any, states: torch.Tensor) -> torch.Tensor:
    """Next-token logits over the vocabulary from :func:`decoder_states` output."""
    return states @ model.text_decoder.text_projection


def coca_losses(
    model: Any,
    images: torch.Tensor,
    tokens: torch.Tensor,
    loss_fn: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CoCa's two weighted losses for a batch, ``(contrastive, caption)``, as open_clip's
    ``CoCa.forward`` + ``CoCaLoss`` compute them (teacher forcing: the decoder reads
    ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]``; padding labels are ignored).

    ``loss_fn`` is an ``open_clip.loss.CoCaLoss``. The caption term is its own
    cross-entropy (``ignore_index=pad``), given only the non-padding positions' logits:
    the same mean over the same labels, without projecting the padding onto the vocabulary.
    """
    from open_clip.loss import ClipLoss

    image_latent, image_embs = model._encode_image(images)
    text_latent, token_embs = model._encode_text(tokens)
    labels = tokens[:, 1:]
    states = decoder_states(model, image_embs, token_embs[:, :-1])
    keep = labels != model.pad_id
    logits = vocab_logits(model, states[keep])
    caption = loss_fn.caption_loss_weight * loss_fn.caption_loss(logits, labels[keep])
    contrastive = loss_fn.clip_loss_weight * ClipLoss.forward(
        loss_fn, image_latent, text_latent, model.logit_scale.exp()
    )
    return contrastive, caption


# -- generation ----------------------------------------------------------------------
def _next_logits(
    model: Any, image_embs: torch.Tensor, prefix: torch.Tensor, min_seq_len: int
) -> torch.Tensor:
    """Raw next-token logits after ``prefix`` (end of text barred while the prefix is
    shorter than ``min_seq_len``, transformers' ``MinLengthLogitsProcessor``)."""
    _, token_embs = model._encode_text(prefix)
    logits = vocab_logits(model, decoder_states(model, image_embs, token_embs)[:, -1])
    if prefix.shape[1] < min_seq_len:
        logits[:, EOT_TOKEN] = -math.inf
    return logits


class _Hypotheses:
    """Finished beams of one image (transformers' ``BeamHypotheses``: keep the best
    ``size`` by score / length, length penalty 1)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: torch.Tensor, sum_score: float, length: int) -> None:
        score = sum_score / length
        if len(self.beams) < self.size or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                worst = min(range(len(self.beams)), key=lambda i: self.beams[i][0])
                del self.beams[worst]
                self.worst = min(beam[0] for beam in self.beams)
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_score: float, length: int) -> bool:
        return len(self.beams) >= self.size and self.worst >= best_sum_score / length

    def best(self) -> torch.Tensor:
        return max(self.beams, key=lambda beam: beam[0])[1]


def _beam_search(
    model: Any, image_embs: torch.Tensor, settings: DecodeSettings, seq_len: int
) -> list[list[int]]:
    """open_clip's ``CoCa._generate_beamsearch`` with transformers' ``BeamSearchScorer``.

    Written by hand because open_clip imports ``BeamSearchScorer`` from transformers,
    which transformers 5 no longer ships (the venv's CLIP_benchmark needs transformers;
    pinning it below 4.56 would hold back everything else that uses it).

    What it reproduces: beams are scored by the running sum of the decoder's raw logits
    (open_clip does not take a log-softmax), a beam that ends with end-of-text while
    ranked among the group's best is stored as a finished hypothesis scored by sum /
    length (length counts the prefix plus the end token), a group stops once its worst
    finished hypothesis beats the best score still reachable, and what is unfinished at
    ``seq_len`` joins the hypotheses. open_clip passes no diversity penalty, so its
    ``num_beam_groups`` groups start alike and search alike: one group of
    ``num_beams // num_beam_groups`` beams gives the same captions at a third of the cost.
    """
    width = settings.num_beams // settings.num_beam_groups
    n = image_embs.shape[0]
    device = image_embs.device
    image_embs = image_embs.repeat_interleave(width, dim=0)
    prefix = torch.full((n * width, 1), SOT_TOKEN, dtype=torch.long, device=device)
    beam_scores = torch.full((n, width), -1e9, device=device)
    beam_scores[:, 0] = 0.0
    hypotheses = [_Hypotheses(width) for _ in range(n)]
    done = [False] * n
    while True:
        logits = _next_logits(model, image_embs, prefix, settings.min_seq_len)
        vocab = logits.shape[-1]
        scores = (logits + beam_scores.view(-1, 1)).view(n, width * vocab)
        top_scores, top = torch.topk(scores, 2 * width, dim=1)
        top_scores, top = top_scores.cpu(), top.cpu()
        next_scores = torch.zeros(n, width)
        next_tokens = torch.zeros(n, width, dtype=torch.long)
        next_rows = torch.zeros(n, width, dtype=torch.long)
        length = prefix.shape[1] + 1  # the prefix plus the token chosen now
        for i in range(n):
            if done[i]:
                next_rows[i] = i * width  # finished images keep a placeholder beam
                continue
            kept = 0
            for rank in range(2 * width):
                token = int(top[i, rank]) % vocab
                row = i * width + int(top[i, rank]) // vocab
                score = float(top_scores[i, rank])
                if token == EOT_TOKEN:
                    if rank < width:
                        hypotheses[i].add(prefix[row].cpu(), score, length)
                    continue
                next_scores[i, kept], next_tokens[i, kept], next_rows[i, kept] = score, token, row
                kept += 1
                if kept == width:
                    break
            done[i] = hypotheses[i].is_done(float(top_scores[i, 0]), length)
        beam_scores = next_scores.to(device)
        prefix = torch.cat(
            [prefix[next_rows.view(-1).to(device)], next_tokens.view(-1, 1).to(device)], dim=1
        )
        if all(done) or prefix.shape[1] >= seq_len:
            break
    captions = []
    for i in range(n):
        if not done[i]:
            for k in range(width):
                hypotheses[i].add(prefix[i * width + k].cpu(), float(beam_scores[i, k]), seq_len)
        captions.append(hypotheses[i].best().tolist())
    return captions


def _greedy(
    model: Any, image_embs: torch.Tensor, settings: DecodeSettings, seq_len: int
) -> list[list[int]]:
    """The most likely next token until end of text or ``seq_len`` tokens (open_clip's
    ``CoCa.generate(generation_type="top_k", top_k=1)``: end of text at the last slot)."""
    n = image_embs.shape[0]
    prefix = torch.full((n, 1), SOT_TOKEN, dtype=torch.long, device=image_embs.device)
    finished = torch.zeros(n, dtype=torch.bool, device=image_embs.device)
    while prefix.shape[1] < seq_len and not bool(finished.all()):
        token = _next_logits(model, image_embs, prefix, settings.min_seq_len).argmax(dim=-1)
        if prefix.shape[1] + 1 == seq_len:  # open_clip ends a sequence at its last slot
            token = torch.full_like(token, EOT_TOKEN)
        token = torch.where(finished, torch.zeros_like(token), token)
        finished |= token == EOT_TOKEN
        prefix = torch.cat([prefix, token.view(-1, 1)], dim=1)
    return [row.tolist() for row in prefix.cpu()]


def _nucleus_candidates(
    logits: torch.Tensor, prefix: torch.Tensor, settings: DecodeSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' sampling processors in its order, as ``(token ids, probabilities)``
    over the tokens they keep, each row's in descending order of logit: the repetition
    penalty (CTRL's: a seen token's logit divided by it when positive, multiplied when
    negative), then top-k, then top-p (drop every token whose more likely tokens already
    hold ``top_p`` of the probability; the most likely one always stays). With ``top_k``
    only the k most likely tokens (and any tied with the k-th) are candidates, so top-p's
    sort and the draw cover k tokens, not the whole vocabulary (49,408 for open_clip's
    tokenizer), which made sampling most of a caption's time (SIEVE captions every pool
    image K times). The same probabilities as filtering the whole vocabulary (tested
    against that form); the draw maps a uniform number onto k tokens, so the tokens drawn
    for a seed differ from a draw over all of them."""
    if settings.repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, prefix)
        penalty = settings.repetition_penalty
        logits = logits.scatter(1, prefix, torch.where(seen < 0, seen * penalty, seen / penalty))
    if settings.top_k and settings.top_k < logits.shape[-1]:
        ordered, order = torch.topk(logits, settings.top_k, dim=-1)
        kth = ordered[:, -1:]
        width = int((logits >= kth).sum(dim=-1).max())  # ties with the k-th stay, as there
        if width > settings.top_k:
            ordered, order = torch.topk(logits, width, dim=-1)
            ordered = ordered.masked_fill(ordered < kth, -math.inf)
    else:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
    if settings.top_p < 1.0:
        probs = ordered.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= settings.top_p  # mass of the more likely ones
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, -math.inf)
    return order, ordered.softmax(dim=-1)


def _nucleus(
    model: Any,
    image_embs: torch.Tensor,
    settings: DecodeSettings,
    seq_len: int,
    generator: torch.Generator,
) -> list[list[int]]:
    """Sampled tokens until end of text or ``seq_len`` (end of text at the last slot, as
    :func:`_greedy`), each drawn from :func:`_nucleus_candidates`' distribution."""
    n = image_embs.shape[0]
    prefix = torch.full((n, 1), SOT_TOKEN, dtype=torch.long, device=image_embs.device)
    finished = torch.zeros(n, dtype=torch.bool, device=image_embs.device)
    while prefix.shape[1] < seq_len and not bool(finished.all()):
        # Only the unfinished rows are decoded: a finished row's next token is padding
        # whatever its logits, and the decoder's cost is per row.
        live = (~finished).nonzero().view(-1)
        logits = _next_logits(model, image_embs[live], prefix[live], settings.min_seq_len)
        candidates, probs = _nucleus_candidates(logits.float(), prefix[live], settings)
        choice = torch.multinomial(probs, 1, generator=generator)
        token = torch.zeros(n, dtype=torch.long, device=prefix.device)
        token[live] = candidates.gather(1, choice).view(-1)
        if prefix.shape[1] + 1 == seq_len:
            token = torch.full_like(token, EOT_TOKEN)
        token = torch.where(finished, torch.zeros_like(token), token)
        finished |= token == EOT_TOKEN
        prefix = torch.cat([prefix, token.view(-1, 1)], dim=1)
    return [row.tolist() for row in prefix.cpu()]


def generate_captions(
    model: Any,
    images: torch.Tensor,
    settings: DecodeSettings | None = None,
    seed: int = 0,
) -> list[str]:
    """One caption per image, decoded as CLIP_benchmark decodes ``CoCa.generate``'s output:
    open_clip's tokenizer, cut at end of text, start token removed, stripped.

    Sequences are at most ``settings.seq_len`` tokens (start token included), shortened to
    what the model's text tower takes (its context length + 1) when that is less.
    ``seed`` seeds nucleus sampling (the same images, settings and seed give the same
    captions); beam search and greedy decoding do not draw.
    """
    from open_clip.tokenizer import _tokenizer

    settings = settings or DecodeSettings()
    seq_len = min(settings.seq_len, context_length(model) + 1)
    if seq_len <= settings.min_seq_len:
        raise ValueError(
            f"the model's context length ({context_length(model)}) leaves no room for "
            f"captions of at least {settings.min_seq_len} tokens"
        )
    model.eval()
    with torch.no_grad():
        _, image_embs = model._encode_image(images)
        if settings.method == "nucleus":
            generator = torch.Generator(device=image_embs.device).manual_seed(seed)
            sequences = _nucleus(model, image_embs, settings, seq_len, generator)
        else:
            decode = _beam_search if settings.method == "beam" else _greedy
            sequences = decode(model, image_embs, settings, seq_len)
    texts = []
    for tokens in sequences:
        text = _tokenizer.decode(tokens)
        texts.append(text.split("<end_of_text>")[0].replace("<start_of_text>", "").strip())
    return texts


# -- metrics -------------------------------------------------------------------------
@contextlib.contextmanager
def _stderr_captured() -> Iterator[Any]:
    """File descriptor 2 (the Java subprocess writes there) into a temporary file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr(-D) of one candidate caption per image against its references,
    computed as CLIP_benchmark's captioning task computes them (its ``COCOEvalCap``, after
    pycocoevalcap's ``eval.py``): both sides through ``PTBTokenizer`` (lower-cased, PTB
    tokens, punctuation dropped), then ``Bleu(4)`` and ``Cider()`` over the corpus.

    Returns ``{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": .., "cider": ..}``.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": c}] for i, c in enumerate(candidates)}
    tokenizer = PTBTokenizer()
    # pycocoevalcap prints its progress and BLEU's internals on stdout, and Java prints the
    # tokenizer's counts on stderr; keep both off the CLI (Java's shown if it fails).
    with contextlib.redirect_stdout(io.StringIO()), _stderr_captured() as java_log:
        try:
            gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        except FileNotFoundError as exc:
            raise SelbenchError(
                "captioning metrics need Java on PATH: pycocoevalcap's PTBTokenizer runs "
                f"Stanford CoreNLP ({exc})"
            ) from None
    if len(gts) != len(references) or len(res) != len(candidates):
        java_log.seek(0)
        raise SelbenchError(
            "pycocoevalcap's PTBTokenizer (Java) returned fewer captions than it was given: "
            + java_log.read().decode(errors="replace").strip()[-500:]
        )
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"bleu{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["cider"] = float(cider)
    return scores


def evaluate_captioning(
    model: Any,
    loader: Any,
    name: str,
    device: str,
    settings: DecodeSettings | None = None,
    progress: Tracker | None = None,
) -> dict[str, float]:
    """Caption every image of ``loader`` (batches of ``(images, list of reference lists)``,
    CLIP_benchmark's retrieval/captioning collate) and score the captions."""
    candidates: list[str] = []
    references: list[list[str]] = []
    for images, captions in loader:
        candidates += generate_captions(model, images.to(device), settings)
        references += [list(refs) for refs in captions]
    scores = caption_scores(candidates, references)
    metrics = {f"{name}/{key}": value for key, value in scores.items()}
    metrics[f"{name}/n_images"] = float(len(candidates))
    return metrics
