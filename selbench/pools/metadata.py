"""A pool of DataComp metadata alone (``kind: datacomp-metadata``): uids, captions and
OpenAI CLIP features, no images.

DataComp's CommonPool ships a metadata folder of ``NAME.parquet`` (``uid``, ``url``,
``text``, the CLIP similarity scores, ...) + ``NAME.npz`` (``b32_img``, ``b32_txt``,
``l14_img``, ``l14_txt``) pairs, rows aligned, beside image shards a user may not have
downloaded (Gadre et al., DataComp, NeurIPS 2023). This pool lists the metadata's rows in
file order (the parquet files sorted by name, rows as stored): its uids and captions are
Arrow string arrays (:class:`ArrowStrings`), about 4 bytes of offset per sample beside the
characters, never one Python object per row. Its default ``reference`` is DataComp's own
L/14 features (``datacomp:l14:PATH``), so ``clip_score`` and every other strategy that
embeds with ``reference`` read the shipped features instead of a model.

The shipped features cover the pool's own pairs only. A target-aware strategy
(``knn_target``, ``normsim``, ...) must embed the target's images into the same space, so
the pool YAML names the local checkpoint of the model that computed them,
``features_model`` (:attr:`MetadataPool.features_models`): the ``datacomp`` embedder runs
that model on the target's images, never on the pool's rows, which still come from the
npz files (the cache entry of the pool's features does not depend on it). Without it a
strategy that would embed the target with the features is refused before selection,
naming the key (:func:`refuse_without_images`).

What needs pixels cannot run here: a strategy that declares ``pool_images`` in ``needs``
is refused before selection (:func:`refuse_without_images`), and a run that would train
without ``shards:`` is refused before it starts (:func:`refuse_training_without_shards`).
With ``shards:`` the materialize stage (and ``selbench export --format shards``) reads
the selected images from those shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selbench.errors import ConfigError, PoolError
from selbench.paths import index_home
from selbench.pools.arrow import ArrowStrings, mapped_strings, repeated_string
from selbench.pools.shards import ScanStats, ShardPool

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from selbench.pools.view import PoolForStrategies

#: The pool kind of a metadata folder (``configs/pools/*.yaml``'s ``kind``).
KIND = "datacomp-metadata"
#: The need a strategy declares when it reads the pool's pixels (selbench.strategy.NEEDS).
POOL_IMAGES = "pool_images"
#: The parquet column of the caption (DataComp's ``text``).
CAPTION_COLUMN = "text"
#: The pool YAML key that names the model of the shipped features, and an example value
#: per feature set: the open_clip architecture of OpenAI's checkpoints is the -quickgelu
#: one (OpenAI CLIP uses QuickGELU; DataComp computed the features with OpenAI's models).
FEATURES_KEY = "features_model"
FEATURES_EXAMPLES = {
    "l14": "open_clip:ViT-L-14-quickgelu:/path/to/openai-vit-l-14.pt",
    "b32": "open_clip:ViT-B-32-quickgelu:/path/to/openai-vit-b-32.pt",
}


def _string_bytes(column: pa.ChunkedArray) -> bytes:
    """The 32-bit offsets and the characters of ``column`` as one array from offset 0:
    the same strings give the same bytes, however the file was cut into row groups."""
    array = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], pa.string())
    _, offsets, chars = array.buffers()
    ends = np.frombuffer(offsets, dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)
    used = b"" if chars is None else chars.to_pybytes()[int(ends[0]) : int(ends[-1])]
    return (ends - ends[0]).tobytes() + used


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """``column`` as one array: its only chunk as it is (combine_chunks would copy it out
    of a memory map), else the chunks combined."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _features_models(value: str | Mapping[Any, str] | None, pool: str) -> dict[str, str]:
    """The YAML's ``features_model`` as ``{feature set: spec}``: a bare spec is the model
    of the L/14 features, the ones the pool's ``reference`` means."""
    models = {"l14": value} if isinstance(value, str) else dict(value or {})
    for key, spec in models.items():
        if key not in FEATURES_EXAMPLES or not spec:
            raise ConfigError(
                f"pool {pool!r}: {FEATURES_KEY} maps a feature set "
                f"({' or '.join(FEATURES_EXAMPLES)}) to the embedder of its model, e.g. "
                f"{{l14: {FEATURES_EXAMPLES['l14']}}}; got {key!r}: {spec!r}"
            )
        if spec.partition(":")[0] in ("datacomp", "reference"):
            raise ConfigError(
                f"pool {pool!r}: {FEATURES_KEY} {spec!r} names no model; give the local "
                f"checkpoint of the model that computed the features, e.g. "
                f"{FEATURES_EXAMPLES[key]}"
            )
    return models


def missing_features_model(pool_name: str, key: str) -> str:
    """What to write in the pool's YAML so its ``key`` features (``l14``, ``b32``) can
    embed a target set: the end of every refusal that lacks it."""
    example = FEATURES_EXAMPLES[key]
    value = example if key == "l14" else f"{{{key}: {example}}}"
    model = {"l14": "ViT-L/14", "b32": "ViT-B/32"}[key]
    return (
        f"DataComp's precomputed OpenAI CLIP {model} features ({key}) of pool {pool_name!r} "
        "cover its own pairs only, and embedding other images (the target set's) into "
        "their space needs the model that computed them: name its local checkpoint in the "
        "pool's YAML, "
        f"{FEATURES_KEY}: {value} (docs/real-data.md, section 2)"
    )


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ConfigError(f"DataComp metadata folder {root} does not exist")
    parquets = sorted(p for p in root.glob("*.parquet") if not p.name.startswith("."))
    if not parquets:
        raise ConfigError(
            f"DataComp metadata folder {root} holds no .parquet files (expected NAME.parquet "
            "+ NAME.npz pairs, as DataComp's download_upstream.py --download_npz writes)"
        )
    return parquets


class MetadataPool:
    """A pool read from a DataComp metadata folder (module docstring): uids and captions
    in file order, features in the npz files, images only through ``shards`` if given."""

    def __init__(
        self,
        root: Path | str,
        name: str | None = None,
        shards: str | None = None,
        features_model: str | Mapping[Any, str] | None = None,
    ):
        self.root = Path(root).expanduser()
        self.parquets = _files(self.root)
        self.name = name or self.root.name
        self.kind = KIND
        #: the features `reference` means here: DataComp's own OpenAI CLIP ViT-L/14
        self.reference: str | None = f"datacomp:l14:{self.root}"
        #: per feature set (``l14``, ``b32``), the embedder spec of the model that computed
        #: it, which embeds images that are not the pool's (a target set) into its space;
        #: the YAML's ``features_model``, a bare spec meaning the L/14 features
        self.features_models: dict[str, str] = _features_models(features_model, self.name)
        self.metadata: str | None = None
        self.shards_root = Path(shards).expanduser() if shards else None
        self.scan_stats = ScanStats()
        self.skipped_shards: list[str] = []
        self._columns: tuple[ArrowStrings, ArrowStrings] | None = None
        self._images: ShardPool | None = None
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """sha256 over each parquet's name and size and its ``uid`` column (the Arrow
        buffers, no Python strings), and each npz's name and size: the pool's rows, in
        order, and the features beside them; 16 hex digits like a shard pool's."""
        digest = hashlib.sha256(f"{KIND}\n".encode())
        for parquet in self.parquets:
            npz = parquet.with_suffix(".npz")
            npz_size = npz.stat().st_size if npz.is_file() else -1
            digest.update(f"{parquet.name}:{parquet.stat().st_size}:{npz_size}\n".encode())
            column = pq.read_table(parquet, columns=["uid"]).column("uid").cast(pa.string())
            digest.update(_string_bytes(column))
        pa.default_memory_pool().release_unused()  # the columns read: back to the system
        return digest.hexdigest()[:16]

    def _read(self) -> tuple[ArrowStrings, ArrowStrings]:
        if self._columns is None:
            uids, captions = [], []
            for parquet in self.parquets:
                names = set(pq.read_schema(parquet).names)
                missing = {"uid", CAPTION_COLUMN} - names
                if missing:
                    raise PoolError(
                        f"{parquet} has no {sorted(missing)} column; a DataComp metadata "
                        "parquet holds uid and text"
                    )
                table = self._columns_of(parquet)
                uids.append(table.column("uid").cast(pa.string()))
                text = table.column(CAPTION_COLUMN).cast(pa.string())
                captions.append(text.fill_null(""))
            # One chunk per file (each under 2 GiB of characters, as DataComp's are).
            uid_array = pa.chunked_array([_one_chunk(a) for a in uids], pa.string())
            self._check_uids(uid_array)
            # The uniqueness check's hash table is gone; mimalloc would keep its pages.
            pa.default_memory_pool().release_unused()
            text_array = pa.chunked_array([_one_chunk(a) for a in captions], pa.string())
            self._columns = ArrowStrings(uid_array), ArrowStrings(text_array)
        return self._columns

    def _columns_of(self, parquet: Path) -> pa.Table:
        """uid and caption of ``parquet``, memory-mapped from an Arrow copy of them in the
        pool index folder (no anonymous memory per row: issue 32), else read."""
        copy = index_home() / f"metadata-{self.fingerprint}" / f"{parquet.stem}.arrow"
        mapped = mapped_strings(parquet, copy, ["uid", CAPTION_COLUMN])
        if mapped is not None:
            return mapped
        return pq.read_table(parquet, columns=["uid", CAPTION_COLUMN])

    def _check_uids(self, uids: pa.ChunkedArray) -> None:
        if uids.null_count:
            raise PoolError(f"DataComp metadata {self.root} has {uids.null_count} empty uid(s)")
        repeated = repeated_string(uids)
        if repeated is not None:
            raise PoolError(
                f"uid {repeated!r} appears more than once in DataComp "
                f"metadata {self.root}; uids must be unique"
            )

    # -- what strategies see ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self._read()[0])

    @property
    def uids(self) -> ArrowStrings:
        return self._read()[0]

    @property
    def captions(self) -> ArrowStrings:
        return self._read()[1]

    def _no_images(self) -> PoolError:
        return PoolError(
            f"pool {self.name!r} is DataComp metadata without images (kind: {KIND}), and "
            "the strategy or its embedder asked for the pool's pixels: embed with DataComp's "
            f"features (reference, the pool's default, or datacomp:l14:{self.root} / "
            "datacomp:b32:...), not a model (proxy, open_clip:...), and choose a strategy "
            "that reads no images; or point a kind: shards pool at the downloaded shards "
            "(docs/real-data.md)"
        )

    def iter_image_bytes(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, bytes, str]]:
        raise self._no_images()

    def iter_images(
        self, uids: Iterable[str] | None = None, start: int = 0
    ) -> Iterator[tuple[str, Image.Image]]:
        raise self._no_images()

    def locate(self, uid: str) -> str:
        return f"a row of DataComp metadata {self.root}"

    def has_ground_truth(self) -> bool:
        return False

    def ground_truth(self) -> dict[str, dict]:
        return {}

    def strategy_view(self) -> PoolForStrategies:
        from selbench.pools.view import PoolForStrategies

        return PoolForStrategies(self)

    # -- images, for materialize ---------------------------------------------------------
    def images(self) -> ShardPool:
        """The pool of the ``shards:`` folder, whose samples materialize reads."""
        if self.shards_root is None:
            raise PoolError(
                f"pool {self.name!r} is DataComp metadata without shards: set 'shards:' in its "
                "config to the folder of its image shards, or run --stage select and write "
                "the uid file for DataComp's resharder with selbench export RUN_ID --format "
                "datacomp"
            )
        if self._images is None:
            self._images = ShardPool(self.shards_root, name=self.name, strict=False)
        return self._images

    @property
    def index(self) -> pd.DataFrame:
        """The ``shards:`` pool's index (what :func:`selbench.materialize.materialize` reads)."""
        return self.images().index

    @property
    def shards(self) -> list[Path]:
        return self.images().shards


def refuse_without_images(pool: Any, method: Any) -> None:
    """Refuse, before selection, a method (a :class:`selbench.run.plan.ResolvedMethod`)
    with a strategy that declares ``pool_images`` in its needs (any step of a pipeline)
    on a pool that has no images, naming the strategy, the pool, why and what to run; and
    one that would embed the target set with the shipped features while the pool names no
    model for them (:func:`_refuse_targets_without_model`)."""
    if getattr(pool, "kind", None) != KIND:
        return
    if POOL_IMAGES not in method.needs:
        _refuse_targets_without_model(pool, method)
        return
    from selbench.registry import get_registry
    from selbench.run.plan import steps_of

    infos = [step.info for _, step in steps_of(method.plan)] if method.plan else [method.info]
    readers = sorted({info.name for info in infos if POOL_IMAGES in info.cls.needs})
    within = f" (in method {method.label!r})" if method.plan else ""
    runnable = sorted(
        info.name
        for info in get_registry().infos()
        if not {POOL_IMAGES, "ground_truth"} & set(info.cls.needs)
    )
    raise ConfigError(
        f"strategy {', '.join(map(repr, readers))}{within} reads the pool's images (it "
        f"declares {POOL_IMAGES!r} in its needs), and pool {pool.name!r} is DataComp "
        f"metadata without images (kind: {KIND}). Point a kind: shards pool at the "
        f"downloaded shards (its 'reference:' can stay datacomp:l14:{pool.root}), or choose "
        f"a method that needs no pool images: {', '.join(runnable)} (docs/real-data.md)"
    )


def _features_of(pool: Any, spec: Any) -> str | None:
    """The DataComp feature set (``l14``, ``b32``) embedder ``spec`` reads on ``pool``
    (``reference`` meaning the pool's own), or None when it is not DataComp's features."""
    if not isinstance(spec, str):
        return None
    if spec.partition(":")[0] == "reference":
        spec = getattr(pool, "reference", None) or ""
    name, _, args = spec.partition(":")
    return args.partition(":")[0] if name == "datacomp" else None


def _refuse_targets_without_model(pool: Any, method: Any) -> None:
    """Refuse, before selection, a step that embeds the target set's images (it declares
    ``target``) with DataComp's features when the pool names no model for them
    (``features_model``), naming the step, the pool and the key to add."""
    from selbench.run.plan import steps_of

    steps = [(s.info, s.params) for _, s in steps_of(method.plan)] if method.plan else []
    missing: dict[str, list[str]] = {}
    for info, params in steps or [(method.info, method.params)]:
        if "target" not in info.cls.needs or POOL_IMAGES in info.cls.needs:
            continue
        key = _features_of(pool, getattr(params, "embedder", None))
        if key is not None and key not in pool.features_models:
            missing.setdefault(key, []).append(info.name)
    for key, names in sorted(missing.items()):
        within = f" (in method {method.label!r})" if method.plan else ""
        raise ConfigError(
            f"strategy {', '.join(map(repr, sorted(set(names))))}{within} embeds the target "
            f"set's images with the embedder that reads the pool's {key} features. "
            + missing_features_model(pool.name, key)
        )


def refuse_training_without_shards(pool: Any, stages: Sequence[str] | None) -> None:
    """Refuse, before a run starts, to go past ``select`` on a metadata pool that names no
    ``shards:``: materialize would have no images to read. ``stages`` None or empty: all."""
    if getattr(pool, "kind", None) != KIND or getattr(pool, "shards_root", None) is not None:
        return
    if stages and set(stages) <= {"select"}:
        return
    raise ConfigError(
        f"pool {pool.name!r} is DataComp metadata without images, so a run on it cannot "
        "train: run only the selection with --stage select, then write the uid file for "
        "DataComp's resharder with `selbench export RUN_ID --format datacomp`; or set "
        "'shards:' in the pool's config to the folder of its downloaded image shards"
    )
