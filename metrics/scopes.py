"""Scopes of DESIGN.md section 6 — category, defect, overall, mean — over per-(category, defect) states.

The accumulator keeps one :class:`~metrics.state.MetricState` per (category, defect type), ``good`` included;
each image is added once. Scope states are sums of those: a category is all its defect types, a ``defect``
scope is that defect type plus the category's ``good`` images, ``overall`` is every category.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from metrics.errors import MetricInputError, StateFormatError
from metrics.state import MetricState

GOOD = "good"
ALL = "ALL"
METRIC_COLUMNS = ("iAUROC", "pAUROC", "PRO", "PRO_hard", "F1_max")
# The one column list of every metrics CSV READAR writes (`readar run`, `metrics`, `eval`).
CSV_COLUMNS = (
    "scope", "category", *METRIC_COLUMNS, "num_images", "num_anom_images",
    "defect_type", "num_regions", "num_skipped", "num_failed", "f1_threshold_logit",
)
_ACCUMULATOR_FORMAT_VERSION = 1


def scope_row(
    scope: str, category: str, state: MetricState, *, defect_type: str = "", pro_hard: bool = True,
    num_skipped: int = 0, num_failed: int = 0,
) -> dict[str, Any]:
    """One result row (keys: :data:`CSV_COLUMNS`) for a scope's state."""
    values = state.finalize(pro_hard=pro_hard)
    row: dict[str, Any] = {"scope": scope, "category": category, "defect_type": defect_type,
                           "num_skipped": num_skipped, "num_failed": num_failed}
    row.update(values)
    return {column: row[column] for column in CSV_COLUMNS}


def mean_row(category_rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``mean`` row: each metric averaged over the category rows (NaN if any category is NaN); counts summed.

    f1_threshold_logit is NaN: averaging per-category thresholds gives no usable threshold.
    """
    rows = [r for r in category_rows if r["scope"] == "category"]
    row: dict[str, Any] = {"scope": "mean", "category": ALL, "defect_type": "", "f1_threshold_logit": math.nan}
    for column in METRIC_COLUMNS:
        values = [float(r[column]) for r in rows]
        row[column] = float(np.mean(values)) if values else math.nan
    for column in ("num_images", "num_anom_images", "num_regions", "num_skipped", "num_failed"):
        row[column] = int(sum(int(r[column]) for r in rows))
    return {column: row[column] for column in CSV_COLUMNS}


def image_count(row: Mapping[str, Any], counts: Mapping[tuple[str, str], int]) -> int:
    """How many of ``counts`` (images per (category, defect type), e.g. failed ones) fall in ``row``'s scope.

    A ``defect`` row counts the images of its own (category, defect type); a ``category`` row every image of
    its category (``good`` included); ``overall`` and ``mean`` rows every image of the run.
    """
    scope = row["scope"]
    if scope == "defect":
        return int(counts.get((row["category"], row["defect_type"]), 0))
    if scope == "category":
        return int(sum(n for (category, _), n in counts.items() if category == row["category"]))
    if scope in ("overall", "mean"):
        return int(sum(counts.values()))
    raise MetricInputError(f"unknown metric row scope {scope!r}; expected category, defect, overall or mean")


def set_image_counts(
    rows: Iterable[dict[str, Any]], column: str, counts: Mapping[tuple[str, str], int],
) -> None:
    """Write :func:`image_count` of ``counts`` into ``column`` of every row, in place."""
    for row in rows:
        row[column] = image_count(row, counts)


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name or name == ALL or "/" in name:
        raise MetricInputError(f"{kind} must be a non-empty name without '/', other than {ALL!r}; got {name!r}")
    return name


class ScopedAccumulator:
    """Per-(category, defect type) metric states; produces category, defect, overall and mean rows.

    binning: passed to every :class:`MetricState` ("float16" for the pipeline, "float32" for legacy maps).
    """

    def __init__(self, binning: str = "float16") -> None:
        MetricState(binning)  # validates the name
        self.binning = binning
        self._states: dict[tuple[str, str], MetricState] = {}

    def add(self, category: str, defect: str, logits: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add one image: logits (H, W) float16 (or float32), mask bool (H, W) or None for ``good`` images.

        The label is anomalous iff ``defect != "good"``.
        """
        key = (_check_name("category", category), _check_name("defect type", defect))
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = MetricState(self.binning)
        state.add_image(logits, mask, anomalous=defect != GOOD)

    def merge(self, other: ScopedAccumulator) -> ScopedAccumulator:
        """Add another accumulator's states (other images) into this one; returns self."""
        if other.binning != self.binning:
            raise MetricInputError(f"cannot merge {other.binning}-binned scopes into {self.binning}-binned ones")
        for key, state in other._states.items():
            if key in self._states:
                self._states[key].merge(state)
            else:
                self._states[key] = state.copy()
        return self

    def __iadd__(self, other: ScopedAccumulator) -> ScopedAccumulator:
        return self.merge(other)

    def categories(self) -> list[str]:
        return sorted({category for category, _ in self._states})

    def defect_types(self, category: str) -> list[str]:
        """Defect types of a category, ``good`` excluded, sorted."""
        return sorted(d for c, d in self._states if c == category and d != GOOD)

    def category_state(self, category: str) -> MetricState:
        """A new state: every image of the category."""
        merged = MetricState(self.binning)
        for (c, _), state in self._states.items():
            if c == category:
                merged.merge(state)
        return merged

    def defect_state(self, category: str, defect: str) -> MetricState:
        """A new state: the images of one defect type plus the category's good images."""
        merged = MetricState(self.binning)
        for key in ((category, GOOD), (category, defect)):
            if key in self._states:
                merged.merge(self._states[key])
        return merged

    def category_rows(self, category: str, *, pro_hard: bool = True, num_skipped: int = 0) -> list[dict[str, Any]]:
        """The category row followed by its defect rows (sorted by defect type)."""
        rows = [scope_row("category", category, self.category_state(category), pro_hard=pro_hard,
                          num_skipped=num_skipped)]
        for defect in self.defect_types(category):
            rows.append(scope_row("defect", category, self.defect_state(category, defect), defect_type=defect,
                                  pro_hard=pro_hard))
        return rows

    def rows(
        self, *, include_summary: bool = True, pro_hard: bool = True, skipped: Mapping[str, int] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows of every category (category row, then its defect rows), then ``overall`` and ``mean``.

        skipped: images skipped per category, reported in the num_skipped column.
        """
        skipped = skipped or {}
        rows: list[dict[str, Any]] = []
        overall = MetricState(self.binning)
        for category in self.categories():
            rows.extend(self.category_rows(category, pro_hard=pro_hard, num_skipped=skipped.get(category, 0)))
            if include_summary:
                overall.merge(self.category_state(category))
        if include_summary:
            category_rows = [r for r in rows if r["scope"] == "category"]
            rows.append(scope_row("overall", ALL, overall, pro_hard=pro_hard,
                                  num_skipped=sum(skipped.values())))
            rows.append(mean_row(category_rows))
        return rows

    def to_bytes(self) -> bytes:
        """``.npz`` bytes: names plus each state's own bytes as uint8 arrays; no pickle."""
        keys = sorted(self._states)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(_ACCUMULATOR_FORMAT_VERSION, dtype=np.int64),
            "binning": np.array(self.binning),
            "categories": np.array([c for c, _ in keys], dtype=str),
            "defects": np.array([d for _, d in keys], dtype=str),
        }
        for position, key in enumerate(keys):
            arrays[f"state_{position}"] = np.frombuffer(self._states[key].to_bytes(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "scoped metric state") -> ScopedAccumulator:
        """Inverse of :meth:`to_bytes`."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except Exception as exc:  # noqa: BLE001 - any parse failure means malformed bytes
            raise StateFormatError(f"{source} is not a serialised ScopedAccumulator: {exc}") from exc
        if {"format_version", "binning", "categories", "defects"} - arrays.keys():
            raise StateFormatError(f"{source} lacks the accumulator header arrays")
        if int(arrays["format_version"]) != _ACCUMULATOR_FORMAT_VERSION:
            raise StateFormatError(f"{source} has accumulator format {int(arrays['format_version'])}")
        categories, defects = arrays["categories"], arrays["defects"]
        if categories.shape != defects.shape or categories.ndim != 1:
            raise StateFormatError(f"{source}: category and defect name arrays differ in shape")
        try:
            accumulator = cls(str(arrays["binning"]))
        except MetricInputError as exc:
            raise StateFormatError(f"{source}: {exc}") from exc
        for position, (category, defect) in enumerate(zip(categories, defects, strict=True)):
            name = f"state_{position}"
            if name not in arrays:
                raise StateFormatError(f"{source} lacks {name} for {category}/{defect}")
            state = MetricState.from_bytes(arrays[name].tobytes(), source=f"{source} {category}/{defect}")
            if state.binning != accumulator.binning:
                raise StateFormatError(f"{source}: {category}/{defect} uses {state.binning} bins")
            accumulator._states[(str(category), str(defect))] = state
        return accumulator
