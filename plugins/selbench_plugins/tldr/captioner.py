"""TL;DR's codebook-based captioner (Wang et al., "Too Large; Data Reduction for
Vision-Language Pre-Training", ICCV 2023, Sec. 3.1), built from open_clip parts.

A visual encoder (open_clip ``VisionTransformer``) turns an image into L tokens; each
token is replaced by its nearest entry of a learned K-entry codebook
(``vector_quantize_pytorch.VectorQuantize``: nearest-code search and the straight-through
estimator); a text decoder (open_clip's ``MultimodalTransformer``, causal self-attention
plus cross-attention) reads the quantised tokens and generates a caption. Training
minimises the autoregressive caption loss plus the two VQ terms

    ||sg(z_q) - z||^2 * commitment_weight + ||z_q - sg(z)||^2 * codebook_weight

with the released code's weights (1 and 0.25; taming-transformers' ``legacy`` form, which
puts beta = 0.25 on the codebook term). The code index of every token -- the paper's
"index vector" -- is what TL;DR clusters.

Decoding (greedy or beam search) is written here because open_clip's ``CoCa.generate``
needs the ``transformers`` package, which selbench does not depend on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from selbench import flops
from selbench.progress import NullProgress
from selbench.toolbox import cached_directory, model_config, selbench_home, training_loop

PAD = 0  # compact id of padding (open_clip pads with token id 0)
SOT = 1  # compact id of the start-of-text token
EOT = 2  # compact id of the end-of-text token
FORMAT_VERSION = 1


class CaptionerConfig(BaseModel):
    """Everything that determines a trained captioner (its cache key, with the pool)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # open_clip architecture whose vision tower and context length are used
    codebook_size: int
    codebook_init: Literal["keywords", "uniform"]
    quantize_cls: bool
    decoder_layers: int
    epochs: float
    lr: float
    weight_decay: float
    batch_size: int
    warmup_fraction: float
    commitment_weight: float
    codebook_weight: float
    visual_init: Literal["proxy", "random"]
    seed: int
    dead_code_threshold: float = 0.0
    # "projected": tokens pass a Linear layer into the codebook's space and are
    # L2-normalised (selbench, so that keyword text embeddings can seed the codebook);
    # "raw": the encoder's LayerNormed tokens are quantised as they are (the release,
    # blip_pretrain_vq_compress.py:105-108).
    token_space: Literal["projected", "raw"] = "projected"
    prompt: str = ""  # text put before every caption in training and generation

    def digest(self) -> str:
        # Fields added after the first checkpoints enter the key only when they differ
        # from their default, so the captioners cached before them stay valid.
        data = self.model_dump()
        for name in ("token_space", "prompt"):
            if data[name] == type(self).model_fields[name].default:
                del data[name]
        return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()[:12]


class CaptionVocab:
    """The token ids of open_clip's tokenizer that occur in the pool's captions, in a
    compact numbering (0 = pad, 1 = start, 2 = end, then the rest in id order).

    The decoder predicts over this vocabulary instead of all 49,408 BPE tokens: a token
    that never occurs in the training captions gets no positive signal, and the full
    output layer would cost most of the decoder's compute on a CPU.
    """

    def __init__(self, token_ids: Sequence[int], tokenizer: Any, prompt: str = "") -> None:
        self.tokenizer = tokenizer
        special = [tokenizer.sot_token_id, tokenizer.eot_token_id]
        prompt_tokens = tokenizer.encode(prompt) if prompt.strip() else []
        tokens = set(int(t) for t in token_ids) | set(prompt_tokens)
        rest = sorted(tokens - set(special) - {0})
        self.ids = np.array([0, *special, *rest], dtype=np.int64)
        self.lookup = {int(t): i for i, t in enumerate(self.ids)}
        # The prompt's compact ids: put after the start token of every caption, excluded
        # from the loss, and the start of every generated caption (BLIP's BLIP_Decoder,
        # release blip.py:94-95, 103-108, 130-133).
        self.prompt_ids = [self.lookup[int(t)] for t in prompt_tokens]

    @classmethod
    def from_captions(
        cls, captions: Sequence[str], tokenizer: Any, prompt: str = ""
    ) -> CaptionVocab:
        seen: set[int] = set()
        for caption in captions:
            seen.update(tokenizer.encode(caption))
        return cls(sorted(seen), tokenizer, prompt)

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, captions: Sequence[str], context_length: int) -> torch.Tensor:
        """``(N, context_length)`` compact ids: start, prompt, caption tokens (truncated),
        end, pad."""
        out = torch.full((len(captions), context_length), PAD, dtype=torch.long)
        room = context_length - 2 - len(self.prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt leaves no room in a context of {context_length}")
        for row, caption in enumerate(captions):
            tokens = [self.lookup[t] for t in self.tokenizer.encode(caption) if t in self.lookup]
            tokens = [SOT, *self.prompt_ids, *tokens[:room], EOT]
            out[row, : len(tokens)] = torch.tensor(tokens)
        return out

    def decode(self, compact: Sequence[int]) -> str:
        """Text of compact ids (special tokens dropped; stops at the first end token)."""
        words = []
        for c in compact:
            c = int(c)
            if c == EOT:
                break
            if c in (PAD, SOT):
                continue
            words.append(int(self.ids[c]))
        return self.tokenizer.decode(words).strip()


class CodebookCaptioner(nn.Module):
    """Visual encoder -> codebook look-up -> caption decoder (TL;DR Fig. 2, stage 1)."""

    def __init__(
        self,
        vision_cfg: dict,
        code_dim: int,
        codebook_size: int,
        vocab_size: int,
        context_length: int,
        decoder_layers: int,
        decoder_heads: int,
        quantize_cls: bool,
        dead_code_threshold: float = 0.0,
        token_space: str = "projected",
    ) -> None:
        # Imported here, not at the top: every selbench command loads this plugin, and
        # open_clip and vector_quantize_pytorch take seconds to import (docs/design.md).
        from open_clip.coca_model import MultimodalCfg, _build_text_decoder_tower
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
        from vector_quantize_pytorch import VectorQuantize

        super().__init__()
        cfg = CLIPVisionCfg(**vision_cfg)
        self.visual = _build_vision_tower(code_dim, cfg)
        width = cfg.width
        self.quantize_cls = quantize_cls
        self.context_length = context_length
        self.token_space = token_space
        if token_space == "projected":
            # Tokens enter the codebook's space through a projection (initialised from
            # the proxy CLIP's image projection, so keyword text embeddings and image
            # tokens start in the same joint space), are L2-normalised, and leave it
            # through another projection into the decoder's width.
            self.to_code = nn.Linear(width, code_dim, bias=False)
            self.from_code = nn.Linear(code_dim, width)
        elif token_space == "raw":
            # The release quantises the ViT's LayerNormed output tokens as they are, and
            # the decoder cross-attends to the quantised tokens directly
            # (blip_pretrain_vq_compress.py:96-97, 105-112).
            code_dim = width
            self.to_code = nn.Identity()
            self.from_code = nn.Identity()
        else:
            raise ValueError(f"unknown token_space {token_space!r}")
        self.code_dim = code_dim
        self.vq = VectorQuantize(
            dim=code_dim,
            codebook_size=codebook_size,
            learnable_codebook=True,  # trained by the codebook loss below, not by EMA
            ema_update=False,
            rotation_trick=False,  # plain straight-through estimator, as the paper
            commitment_weight=0.0,  # both VQ terms are computed in vq_losses()
            # > 0: a code whose EMA usage per batch falls below this is re-seeded with a
            # random token of the batch (the library's dead-code replacement; neither the
            # paper nor the release does this). 0 disables it.
            threshold_ema_dead_code=dead_code_threshold,
        )
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.decoder = _build_text_decoder_tower(
            vocab_size,
            MultimodalCfg(
                width=width,
                layers=decoder_layers,
                heads=decoder_heads,
                context_length=context_length,
                mlp_ratio=2,
            ),
        )
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.decoder.text_projection, std=width**-0.5)

    @property
    def codebook(self) -> torch.Tensor:
        return self.vq.codebook

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's final-layer tokens (after its final norm): patches, plus the class
        token first when ``quantize_cls`` (as the released code quantises all 197)."""
        out = self.visual.forward_intermediates(
            images,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        patches = out["image_intermediates"][-1]
        if self.quantize_cls:
            return torch.cat([out["image_intermediates_prefix"][-1], patches], dim=1)
        return patches

    def quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, z_q, indices)``: the token features that are quantised (projected and
        unit-norm, or the raw tokens), their straight-through quantised values (in
        training) and the code index of every token, ``(B, L)``."""
        z = self.to_code(self.image_tokens(images))
        if self.token_space == "projected":
            z = F.normalize(z, dim=-1)
        z_q, indices, _ = self.vq(z)
        return z, z_q, indices

    def vq_losses(
        self, z: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||sg(z_q) - z||^2, ||z_q - sg(z)||^2)``, means over tokens and dimensions."""
        codes = self.vq.get_codes_from_indices(indices)
        commitment = F.mse_loss(z, codes.detach())
        codebook = F.mse_loss(codes, z.detach())
        return commitment, codebook

    def decode_logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for compact ``tokens`` given quantised memory."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.decoder(self.from_code(memory), x)

    def caption_loss(
        self,
        memory: torch.Tensor,
        tokens: torch.Tensor,
        reduction: str = "mean",
        prompt_length: int = 0,
    ) -> torch.Tensor:
        """Teacher-forced autoregressive cross-entropy of ``tokens`` (padding and the
        ``prompt_length`` prompt tokens after the start token ignored, as BLIP's decoder
        masks its prompt, release blip.py:108). ``reduction="none"`` gives the mean per
        sample."""
        logits = self.decode_logits(memory, tokens[:, :-1])
        labels = tokens[:, 1:]
        if prompt_length:
            labels = labels.clone()
            labels[:, :prompt_length] = PAD
        loss = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=PAD, reduction="none"
        )  # (B, T-1)
        if reduction == "none":
            return loss.sum(1) / (labels != PAD).sum(1).clamp(min=1)
        return loss.sum() / (labels != PAD).sum().clamp(min=1)

    @torch.inference_mode()
    def generate(
        self,
        images: torch.Tensor,
        beams: int = 1,
        max_length: int | None = None,
        min_length: int = 0,
        prompt: Sequence[int] = (),
    ) -> list[list[int]]:
        """Captions (compact ids after the prompt, no start/end) for ``images`` by beam
        search over the quantised tokens; ``beams=1`` is greedy decoding.

        Lengths count the whole sequence, start token and ``prompt`` included, as
        Hugging Face ``generate`` does for BLIP (release blip.py:130-156): no sequence
        grows past ``max_length`` tokens (the end token included; None: the context
        length), and the end token is forbidden while the sequence is shorter than
        ``min_length``. A hypothesis that reaches ``max_length`` ends there. Finished
        hypotheses stay in the beam with their score frozen; the best final hypothesis is
        chosen by log-probability divided by its length (length penalty 1.0, the usual
        default).
        """
        self.eval()
        prompt = [int(t) for t in prompt]
        start = 1 + len(prompt)
        max_length = min(max_length or self.context_length, self.context_length)
        _, memory, _ = self.quantize(images)
        batch = memory.shape[0]
        memory = memory.repeat_interleave(beams, dim=0)
        seqs = torch.tensor([[SOT, *prompt]], dtype=torch.long, device=memory.device)
        seqs = seqs.repeat(batch * beams, 1)
        scores = torch.zeros(batch, beams, device=memory.device)
        scores[:, 1:] = -math.inf  # all beams start identical: expand only the first
        finished = torch.zeros(batch * beams, dtype=torch.bool, device=memory.device)
        lengths = torch.zeros(batch * beams, device=memory.device)
        for length in range(start, max_length):  # tokens in the sequence before this step
            logp = torch.log_softmax(self.decode_logits(memory, seqs)[:, -1].float(), dim=-1)
            logp[:, PAD] = -math.inf
            logp[:, SOT] = -math.inf
            if length < min_length:
                logp[:, EOT] = -math.inf
            logp[finished] = -math.inf
            logp[finished, PAD] = 0.0  # a finished hypothesis only pads, at no cost
            vocab = logp.shape[1]
            total = (scores.view(-1, 1) + logp).view(batch, beams * vocab)
            scores, flat = total.topk(beams, dim=1)
            source = (flat // vocab) + torch.arange(batch, device=flat.device).view(-1, 1) * beams
            source = source.view(-1)
            token = (flat % vocab).view(-1)
            seqs = torch.cat([seqs[source], token.view(-1, 1)], dim=1)
            was_finished = finished[source]
            lengths = lengths[source] + (~was_finished).float()
            finished = was_finished | (token == EOT)
            if bool(finished.all()):
                break
        normalised = scores.view(-1) / lengths.clamp(min=1)
        best = normalised.view(batch, beams).argmax(dim=1)
        rows = best + torch.arange(batch, device=best.device) * beams
        out = []
        for row in rows.tolist():
            ids = []
            for c in seqs[row, start:].tolist():
                if c in (EOT, PAD):
                    break
                ids.append(c)
            out.append(ids)
        return out


def build_captioner(
    config: CaptionerConfig, vocab_size: int, code_dim: int
) -> tuple[CodebookCaptioner, int]:
    """A captioner for ``config`` (random weights) and its context length."""
    spec = model_config(config.model)
    text = spec.get("text_cfg", {})
    context_length = int(text.get("context_length", 77))
    heads = max(1, int(text.get("heads", 8)))
    torch.manual_seed(config.seed)
    model = CodebookCaptioner(
        vision_cfg=spec["vision_cfg"],
        code_dim=code_dim,
        codebook_size=config.codebook_size,
        vocab_size=vocab_size,
        context_length=context_length,
        decoder_layers=config.decoder_layers,
        decoder_heads=heads,
        quantize_cls=config.quantize_cls,
        dead_code_threshold=config.dead_code_threshold,
        token_space=config.token_space,
    )
    return model, context_length


def init_from_proxy(model: CodebookCaptioner, proxy_model: Any) -> None:
    """Start from the proxy CLIP's image encoder, and project tokens with its image
    projection (the offline stand-in for the paper's pretrained ViT-B/16)."""
    model.visual.load_state_dict(proxy_model.visual.state_dict())
    proj = getattr(proxy_model.visual, "proj", None)
    to_code = getattr(model.to_code, "weight", None)  # none with raw tokens
    if proj is not None and to_code is not None and tuple(proj.shape) == tuple(to_code.T.shape):
        with torch.no_grad():
            model.to_code.weight.copy_(proj.detach().T)


def init_codebook(model: CodebookCaptioner, vectors: torch.Tensor | None, seed: int) -> None:
    """Fill the codebook: with ``vectors`` (e.g. keyword text embeddings, unit rows), or
    uniformly in ``[-1/K, 1/K]`` as the released code does when ``vectors`` is None."""
    k = model.codebook.shape[0]
    with torch.no_grad():
        if vectors is None:
            generator = torch.Generator().manual_seed(seed)
            values = torch.rand(model.codebook.shape, generator=generator) * (2.0 / k) - 1.0 / k
        else:
            if vectors.shape != model.codebook.shape:
                raise ValueError(
                    f"codebook init vectors have shape {tuple(vectors.shape)}, "
                    f"expected {tuple(model.codebook.shape)}"
                )
            values = vectors.float()
        model.vq.codebook = values


def train_captioner(
    model: CodebookCaptioner,
    images: torch.Tensor,
    tokens: torch.Tensor,
    config: CaptionerConfig,
    device: str = "cpu",
    progress: Any = None,
    prompt_length: int = 0,
) -> dict[str, Any]:
    """Caption loss + VQ losses with AdamW and warmup + cosine decay (open_clip's
    schedule); the ``prompt_length`` prompt tokens of ``tokens`` are not in the loss.
    Returns the loss record (final running averages and a curve)."""
    progress = progress or NullProgress()
    with deterministic_algorithms():
        return _train(model, images, tokens, config, device, progress, prompt_length)


@contextlib.contextmanager
def deterministic_algorithms():
    """Deterministic kernels while the captioner trains: on CPU the backward of the
    codebook look-up (an accumulating index_put) otherwise differs in the last bits
    between runs, and the same seed must give the same captioner. Restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def captioner_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """The captioner's weight-decay exemptions: gains and biases (``ndim < 2``), token
    embeddings, the codebook and LayerNorms."""
    return param.ndim < 2 or "embedding" in name or "codebook" in name or "ln" in name


def _train(model, images, tokens, config, device, progress, prompt_length) -> dict[str, Any]:
    n = len(images)
    batch_size = min(config.batch_size, n)
    steps = max(1, math.ceil(n * config.epochs / batch_size))

    def batch_loss(index: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        z, z_q, codes = model.quantize(images[index].to(device))
        caption = model.caption_loss(z_q, tokens[index].to(device), prompt_length=prompt_length)
        commitment, codebook = model.vq_losses(z, codes)
        loss = caption + config.commitment_weight * commitment + config.codebook_weight * codebook
        return loss, {
            "caption_loss": float(caption.detach()),
            "commitment_loss": float(commitment.detach()),
            "codebook_loss": float(codebook.detach()),
        }

    result = training_loop(
        model,
        batch_loss,
        n,
        batch_size,
        steps,
        config.seed,
        lr=config.lr,
        warmup_steps=int(config.warmup_fraction * steps),
        weight_decay=config.weight_decay,
        no_decay=captioner_no_decay,
        device=device,
        progress=progress,
        description="TL;DR: training captioner",
        curve_key="caption_loss",
    )
    flops.charge_training(  # measured on batch_loss's own forward (encoder, VQ, decoder)
        model, "TL;DR: training captioner", steps * batch_size, steps, batch_size,
        example=lambda b: batch_loss(torch.arange(b) % n),
    )  # fmt: skip
    return {
        "steps": steps,
        "seconds": result.seconds,
        "final": result.running,
        "caption_loss_curve": result.curve,
    }


@torch.inference_mode()
def extract_codes(
    model: CodebookCaptioner,
    images: torch.Tensor,
    tokens: torch.Tensor | None = None,
    batch_size: int = 512,
    device: str = "cpu",
    progress: Any = None,
    prompt_length: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The index vector of every image, ``(N, L)`` int64 (the paper's Sec. 3.2 input to
    k-means), and, when ``tokens`` are given, each sample's mean caption loss (prompt
    tokens excluded)."""
    progress = progress or NullProgress()
    model.eval()
    codes, losses = [], []
    batches = range(0, len(images), batch_size)
    for start in progress.track(batches, "TL;DR: extracting codes", total=len(batches)):
        batch = images[start : start + batch_size].to(device)
        _, z_q, index = model.quantize(batch)
        codes.append(index.cpu())
        if tokens is not None:
            batch_tokens = tokens[start : start + batch_size].to(device)
            loss = model.caption_loss(z_q, batch_tokens, "none", prompt_length)
            losses.append(loss.cpu())
    stacked = torch.cat(codes).numpy().astype(np.int64)
    return stacked, (torch.cat(losses).numpy() if losses else None)


def checkpoint_dir(pool_fingerprint: str, key: str) -> Path:
    return selbench_home() / "captioners" / f"{pool_fingerprint}-{key}"


def load_checkpoint(folder: Path, model: CodebookCaptioner) -> dict[str, Any] | None:
    """Load weights into ``model`` and return the meta, or None if the entry is missing
    or damaged (it is then retrained)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    return meta


def cached_captioner(
    folder: Path, model: CodebookCaptioner, train: Any
) -> tuple[dict[str, Any], bool]:
    """Load the checkpoint in ``folder`` into ``model``, or call ``train()`` (which
    returns the meta to store) and save, through selbench's directory cache (a file lock
    keeps two processes from training the same captioner). Returns ``(meta, hit)``."""

    def build(tmp: Path) -> None:
        meta = {"format_version": FORMAT_VERSION, **train()}
        torch.save(model.state_dict(), tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    return cached_directory(folder, lambda entry: load_checkpoint(entry, model), build)
