"""Method labels as a page shows them.

A run logs its label as :class:`selbench.run.spec.MethodSpec` formats it,
``name(k=v,k2=v2)``; the page reads it back with the same codec
(:meth:`MethodSpec.parse`) and shows ``name (k=v, k2=v2)``, with the parameters that tell
apart runs of one label that do not share a configuration.
"""

from __future__ import annotations

import itertools

import pandas as pd

from selbench.run.spec import MethodSpec, MethodSpecError, split_train_label, train_label

UNSET = "unset"  # a parameter the run did not log (its version did not have it)
SYNTHESIZED_MARK = " [synthesized]"


def method_parts(label: str) -> tuple[str, dict[str, str]]:
    """A logged label as ``(name, params)`` by :meth:`MethodSpec.parse`; a label the codec
    does not read (none that selbench writes) is a name without parameters."""
    try:
        spec = MethodSpec.parse(label)
    except MethodSpecError:
        return label, {}
    return spec.name, dict(spec.params)


def base_label(label: str) -> tuple[str, float]:
    """A page's method label as ``(label at 1x, training length)``: the ``[train 2x]``
    mark taken off by :func:`~selbench.run.spec.split_train_label`, a ``[synthesized]``
    mark kept on the label. ``clip_score [train 2x]`` -> ``("clip_score", 2.0)``."""
    synthesized = label.endswith(SYNTHESIZED_MARK)
    base, times = split_train_label(label.removesuffix(SYNTHESIZED_MARK))
    return base + (SYNTHESIZED_MARK if synthesized else ""), times


def _readable_value(value: str) -> str:
    """``10.0`` -> ``10``; anything else as logged."""
    try:
        number = float(value)
    except ValueError:
        return value
    if "." in value and "e" not in value.lower() and number.is_integer():
        return str(int(number))
    return value


def readable_label(name: str, params: dict[str, str]) -> str:
    """``tldr (captioner_epochs=10, refine=False)``: the method name and the parameters
    that tell its rows apart; a parameter the run never logged reads ``k not logged``."""
    if not params:
        return name
    parts = [
        f"{k} not logged" if v == UNSET else f"{k}={_readable_value(v)}"
        for k, v in sorted(params.items())
    ]
    return f"{name} (" + ", ".join(parts) + ")"


def _fewest_separating(values: pd.DataFrame) -> list[str]:
    """The fewest columns of ``values`` whose values still tell every distinct row apart,
    preferring columns every run logged, then by name."""
    distinct = len(values.drop_duplicates())
    order = sorted(values.columns, key=lambda c: ((values[c] == UNSET).any(), c))
    for size in range(1, len(order) + 1):
        for columns in itertools.combinations(order, size):
            if len(values[list(columns)].drop_duplicates()) == distinct:
                return list(columns)
    return order  # not reached: all columns together separate the distinct rows


def split_mixed_parameters(runs: pd.DataFrame) -> pd.DataFrame:
    """Give every run a readable method label that no other configuration shares.

    A run's label names only the parameters that differ from the defaults *of its own
    version*, ``tldr(refine=False)``; it reads ``tldr (refine=False)`` here. When a
    default changes (``tldr-release``'s ``match_embedder`` did), runs from before and
    after carry the same label without sharing a configuration, and would be averaged
    as one method. Every run logs all its parameters (``param.*``), so where the runs of
    one label differ, the label gains the fewest of the differing parameters that tell
    them apart, ``tldr-release (match_embedder=proxy)`` and ``tldr-release
    (match_embedder=proxy:scorer)``. A parameter a run did not log (added later) is
    ``unset`` and reads ``k not logged``; a parameter every run logged is preferred. A
    training-length mark stays last: ``clip(k=3) [train 2x]`` reads ``clip (k=3) [train
    2x]``, so the label at 1x (:func:`base_label`) is the same at every length.
    """
    label_column = "params.method_label"
    if runs.empty or label_column not in runs.columns:
        return runs
    runs = runs.copy()
    columns = sorted(c for c in runs.columns if c.startswith("params.param."))
    has_label = runs[label_column].notna()
    # ``clip(k=3) [train 2x]``: the label at 1x read by the codec, the training length kept
    lengths = {
        index: split_train_label(str(label))
        for index, label in runs.loc[has_label, label_column].items()
    }
    parsed = {index: method_parts(base) for index, (base, _) in lengths.items()}
    labels = pd.Series(
        {
            index: train_label(readable_label(name, params), lengths[index][1])
            for index, (name, params) in parsed.items()
        },
        dtype=object,
    )
    if columns:
        logged = runs[columns].astype(object).where(runs[columns].notna(), UNSET).astype(str)
        for _label, group in logged[has_label].groupby(labels):
            varying = group.loc[:, group.nunique() > 1]
            if varying.empty:
                continue
            varying = varying.rename(columns=lambda c: c.removeprefix("params.param."))
            chosen = _fewest_separating(varying)
            for index, row in varying.iterrows():
                name, params = parsed[index]
                readable = readable_label(name, {**{k: row[k] for k in chosen}, **params})
                labels[index] = train_label(readable, lengths[index][1])
    runs.loc[labels.index, label_column] = labels
    return runs


def mark_synthesized(runs: pd.DataFrame) -> pd.DataFrame:
    """Label the runs that trained on pairs a strategy synthesized (their ``synthesized``
    param is true: dataset distillation) ``<label> [synthesized]``, so a table never shows
    them as a subset of the pool."""
    label_column, flag_column = "params.method_label", "params.synthesized"
    if runs.empty or label_column not in runs.columns or flag_column not in runs.columns:
        return runs
    runs = runs.copy()
    made = runs[flag_column].astype(str).str.lower().eq("true") & runs[label_column].notna()
    runs.loc[made, label_column] = runs.loc[made, label_column].astype(str) + SYNTHESIZED_MARK
    return runs
