"""DataComp CommonPool's precomputed CLIP features, imported as an embedding-cache entry.

DataComp ships, beside its pool, a metadata folder of file pairs ``NAME.parquet`` and
``NAME.npz`` with the same rows in the same order (Gadre et al., DataComp, NeurIPS 2023,
Sec. 3.2 and its ``download_upstream.py --download_npz``). The parquet holds ``uid``,
``text`` and the precomputed ``clip_b32_similarity_score`` / ``clip_l14_similarity_score``;
the npz holds OpenAI CLIP features of every pair: ``b32_img``, ``b32_txt`` (ViT-B/32) and
``l14_img``, ``l14_txt`` (ViT-L/14). DataComp's CLIP-score baselines threshold those
scores, which are the cosine similarities of these features.

The ``datacomp`` embedder (spec ``datacomp:l14:/path/to/metadata`` or ``datacomp:b32:...``)
hands these features to the embedding cache in the pool's order instead of running a
model, so ``clip_score -p embedder=datacomp:l14:PATH`` scores every pool pair with
DataComp's own L/14 features, and every other strategy that takes an embedder (SemDeDup,
prototypes, ...) can use them too. Nothing is recomputed and no weights are needed for
the pool. The features cover the pool's pairs only: a strategy that embeds other images
(a target set) needs the model that computed them, which a ``datacomp-metadata`` pool's
YAML names as ``features_model`` (a local open_clip checkpoint of OpenAI's model, e.g.
``open_clip:ViT-L-14-quickgelu:/path/to/openai-vit-l-14.pt``). The embedder loads it on
the first such request (:meth:`DataCompFeaturesEmbedder.image_embedder`), so a run that
embeds no target never loads it, and the pool's embedder id, cache entry and selections
are the same with or without it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from selbench.embedders import Embedder
from selbench.errors import ConfigError, PoolError
from selbench.paths import selbench_home

if TYPE_CHECKING:
    from selbench.progress import Tracker
    from selbench.strategy import PoolView

MODELS = {"b32": "OpenAI CLIP ViT-B/32", "l14": "OpenAI CLIP ViT-L/14"}


class MetadataDir:
    """A DataComp metadata folder: ``NAME.parquet`` + ``NAME.npz`` pairs, rows aligned."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"DataComp metadata folder {self.root} does not exist")
        self.parquets = sorted(p for p in self.root.glob("*.parquet") if not p.name.startswith("."))
        if not self.parquets:
            raise ConfigError(
                f"DataComp metadata folder {self.root} holds no .parquet files (expected "
                "NAME.parquet + NAME.npz pairs, as download_upstream.py --download_npz writes)"
            )

    def npz(self, parquet: Path) -> Path:
        path = parquet.with_suffix(".npz")
        if not path.is_file():
            raise ConfigError(
                f"{parquet.name} in {self.root} has no {path.name} beside it: DataComp's "
                "features come with download_upstream.py --download_npz"
            )
        return path

    def digest(self, model: str) -> str:
        """sha256 over the model key and every file's name and size: names are DataComp's
        content hashes, so this identifies the features without reading terabytes."""
        h = hashlib.sha256(model.encode())
        for parquet in self.parquets:
            for path in (parquet, self.npz(parquet)):
                h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        return h.hexdigest()

    def fill(
        self, pool_uids: Sequence[str], model: str, image: np.ndarray, text: np.ndarray
    ) -> None:
        """Write the ``model`` features of every pool uid into row ``i`` of ``image`` and
        ``text`` (``pool_uids[i]``); every pool uid must be in the metadata."""
        if self._fill_in_order(pool_uids, model, image, text):
            return
        import pyarrow.parquet as pq  # here: the embedders plugin imports this module

        index = pd.Index(pool_uids)
        if not index.is_unique:
            first = index[index.duplicated()][0]
            raise PoolError(f"pool uid {first!r} appears more than once; uids must be unique")
        found = np.zeros(len(index), dtype=bool)
        for parquet in self.parquets:
            uids = pq.read_table(parquet, columns=["uid"]).column("uid").to_pylist()
            rows = index.get_indexer(uids)
            mine = rows >= 0
            if not mine.any():
                continue
            with np.load(self.npz(parquet)) as arrays:  # allow_pickle stays False
                for kind, out in (("img", image), ("txt", text)):
                    values = self._features(arrays, parquet, f"{model}_{kind}", len(uids))
                    out[rows[mine]] = values[mine]
            found[rows[mine]] = True
        if not found.all():
            missing = int((~found).sum())
            raise PoolError(
                f"{missing} pool uid(s) have no DataComp features in {self.root}, e.g. "
                f"{index[np.flatnonzero(~found)[0]]!r}: is this the metadata of the same pool?"
            )

    def _features(self, arrays: Any, parquet: Path, key: str, rows: int) -> np.ndarray:
        """The ``key`` array of ``parquet``'s npz, checked to have its ``rows`` rows."""
        if key not in arrays.files:
            raise PoolError(f"{self.npz(parquet)} has no {key!r} array")
        values = arrays[key]
        if len(values) != rows:
            raise PoolError(
                f"{self.npz(parquet).name} has {len(values)} rows of {key!r} but "
                f"{parquet.name} has {rows} uids; the pair must align"
            )
        return np.asarray(values)

    def _fill_in_order(
        self, pool_uids: Sequence[str], model: str, image: np.ndarray, text: np.ndarray
    ) -> bool:
        """When the pool lists exactly the metadata's rows in file order (a pool of kind
        ``datacomp-metadata``, whose uids are an Arrow array), copy each file's features
        to its block of rows with no uid lookup; False (nothing written) otherwise."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = getattr(pool_uids, "arrow", None)
        if not isinstance(arrow, pa.ChunkedArray):
            return False
        blocks, offset = [], 0
        for parquet in self.parquets:
            uids = pq.read_table(parquet, columns=["uid"]).column("uid").cast(pa.string())
            n = len(uids)
            if offset + n > len(arrow) or not arrow.slice(offset, n).equals(uids):
                return False
            blocks.append((parquet, offset, n))
            offset += n
        if offset != len(arrow):
            return False
        for parquet, first, n in blocks:
            with np.load(self.npz(parquet)) as arrays:  # allow_pickle stays False
                for kind, out in (("img", image), ("txt", text)):
                    out[first : first + n] = self._features(arrays, parquet, f"{model}_{kind}", n)
        return True

    def dim(self, model: str) -> int:
        with np.load(self.npz(self.parquets[0])) as arrays:
            key = f"{model}_img"
            if key not in arrays.files:
                raise PoolError(f"{self.npz(self.parquets[0])} has no {key!r} array")
            return int(arrays[key].shape[1])


class DataCompFeaturesEmbedder(Embedder):
    """DataComp's precomputed OpenAI CLIP features of the pool (module docstring).

    Spec: ``datacomp:l14:/path/to/metadata`` or ``datacomp:b32:/path/to/metadata``.
    """

    name = "datacomp"
    summary = "DataComp CommonPool's precomputed CLIP features: datacomp:l14|b32:/path/to/metadata"
    reference = "Gadre et al., DataComp (NeurIPS 2023), Sec. 3.2: metadata with CLIP features"
    #: the features' model's learned temperature, 1/exp(logit_scale): OpenAI CLIP's logit
    #: scale trained to its cap of 100 (Radford et al. 2021, Sec. 2.5), for both sets
    temperature = 0.01

    def __init__(self, args: str = "") -> None:
        super().__init__(args)
        model, _, folder = args.partition(":")
        if model not in MODELS or not folder:
            raise ConfigError(
                f"embedder 'datacomp:{args}' needs a feature set ({' or '.join(MODELS)}) and "
                "the metadata folder: datacomp:l14:/path/to/metadata"
            )
        self.key = model
        self.metadata = MetadataDir(folder)
        self._pool: Any = None  # set by prepare(): the pool whose YAML names the model
        self._progress: Any = None
        self._image_embedder: Embedder | None = None

    @property
    def architecture(self) -> str:
        return self.key

    def prepare(self, pool: PoolView, device: str, progress: Tracker) -> None:
        self.device = device
        self.weights_digest = self.metadata.digest(self.key)
        self.details = {"features": MODELS[self.key], "metadata": str(self.metadata.root)}
        # What embeds images that are not the pool's: kept apart from the pool's identity
        # (self.model stays None, so the embedder id and the temperature stay the features').
        self._pool, self._progress = pool, progress
        self._image_embedder = None

    def features_model(self) -> str | None:
        """The embedder spec of the model that computed these features, as the pool's
        YAML names it (``features_model``), or None."""
        models = getattr(self._pool, "features_models", None) or {}
        return models.get(self.key)

    def image_embedder(self) -> Embedder:
        """The prepared model that computed these features (loaded on first use), to embed
        images that are not the pool's, e.g. a target set, into the features' space;
        ConfigError naming the YAML key when the pool names none."""
        if self._image_embedder is not None:
            return self._image_embedder
        spec = self.features_model()
        name = getattr(self._pool, "name", "?")
        from selbench.pools.metadata import (
            FEATURES_EXAMPLES,
            FEATURES_KEY,
            missing_features_model,
        )
        from selbench.registry import get_registry

        if spec is None and getattr(self._pool, "kind", None) != "datacomp-metadata":
            raise ConfigError(
                f"embedder datacomp:{self.key} holds DataComp's features of pool {name!r}'s "
                "own pairs and no model, so it cannot embed other images (a target set's); "
                "this pool has images: embed it and the target with the model itself, e.g. "
                f"{FEATURES_EXAMPLES[self.key]}"
            )
        if spec is None:
            raise ConfigError(missing_features_model(name, self.key))
        embedder = get_registry().make_embedder(spec)
        embedder.prepare(self._pool, self.device, self._progress)
        if embedder.model is None:
            raise ConfigError(
                f"pool {name!r}: {FEATURES_KEY} {spec!r} has no model to embed images with; "
                f"name the local checkpoint of the {MODELS[self.key]} model"
            )
        # A model of another width cannot be the one that computed the features.
        width = getattr(getattr(embedder.model, "visual", None), "output_dim", None)
        dim = self.metadata.dim(self.key)
        if isinstance(width, int) and width != dim:
            raise ConfigError(
                f"pool {name!r}: {FEATURES_KEY} {spec!r} embeds images in {width} dimensions, "
                f"but DataComp's {self.key} features in {self.metadata.root} have {dim}: name "
                f"the checkpoint of the model that computed them ({MODELS[self.key]})"
            )
        self._image_embedder = embedder
        return embedder

    def encode(self, images: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        raise ConfigError(
            "the datacomp embedder holds DataComp's features of the pool's own pairs and "
            "encodes nothing itself; images that are not the pool's (a target set) are "
            "embedded by the pool YAML's features_model (docs/real-data.md)"
        )

    def precomputed_batches(
        self, pool: PoolView, start: int, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The pool's features from row ``start`` on, in pool order, ``batch_size`` rows at
        a time. The metadata files are not in pool order, so the features are gathered
        once into a scratch memory map under the selbench home (removed afterwards)."""
        n, dim = len(pool), self.metadata.dim(self.key)
        scratch = Path(tempfile.mkdtemp(prefix=".datacomp-import-", dir=_scratch_root()))
        try:
            image = np.lib.format.open_memmap(scratch / "img.npy", "w+", np.float16, (n, dim))
            text = np.lib.format.open_memmap(scratch / "txt.npy", "w+", np.float16, (n, dim))
            self.metadata.fill(pool.uids, self.key, image, text)
            for first in range(start, n, batch_size):
                last = min(first + batch_size, n)
                yield np.asarray(image[first:last]), np.asarray(text[first:last])
            del image, text
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _scratch_root() -> Path:
    root = selbench_home() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root
