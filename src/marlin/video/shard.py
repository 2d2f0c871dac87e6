"""Sharded extraction: which inputs a shard extracts, where it writes its index, and how the shard indexes merge.

A run of ``marlin extract`` split over N processes (the ranks of a torchrun job, or the N tasks of a Slurm / LSF job
array with ``--shard I/N``) gives shard I the inputs I, I + N, I + 2N, ... of the *sorted* input list, so every
process computes the same split from the same arguments and no two extract one video. Each shard writes the same
outputs a single process would (the output tree is planned from the whole input list) and its own index,
``index.shardI-of-N.csv``; a rank of a torchrun job and the ``--shard I/N`` task of the same I and N are the same
shard, so a dead rank can be rerun alone. :func:`merge_shards` combines the shard indexes into the ``index.csv`` a
single process would have written; inputs that no shard finished stay ``pending`` and say which shard to rerun.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from .extract import ExtractSummary, VideoResult, output_paths, write_index
from .pipeline import Timings

__all__ = ["MergeSummary", "Shard", "find_shard_indexes", "merge_shards"]

_INDEX_NAME = re.compile(r"index\.shard(\d+)-of-(\d+)\.csv")


@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` of ``count``: the inputs at positions index, index + count, ... of the sorted input list."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard {self.index}/{self.count}: expected I/N with 0 <= I < N, e.g. 0/4 ... 3/4")

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """``"I/N"`` (a job array's task I of N, counted from 0) -> Shard(I, N)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if m is None:
            raise ValueError(f"--shard {spec!r}: expected I/N, e.g. --shard 0/4 (task 0 of 4; Slurm: "
                             "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")  # fmt: skip
        return cls(int(m[1]), int(m[2]))

    @property
    def tag(self) -> str:
        return f"shard{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, inputs: Iterable[Path]) -> list[Path]:
        """This shard's inputs, in sorted order (the same on every process given the same inputs in any order)."""
        return sorted(inputs)[self.index :: self.count]

    def of(self, position: int) -> Shard:
        """The shard of the same count that owns the input at ``position`` of the sorted input list."""
        return Shard(position % self.count, self.count)

    def index_path(self, out_dir: Path) -> Path:
        return Path(out_dir) / f"index.{self.tag}.csv"


def find_shard_indexes(out_dir: Path) -> dict[Shard, Path]:
    """The shard indexes in ``out_dir`` (``index.shardI-of-N.csv``), of any shard count."""
    found = {}
    for f in Path(out_dir).glob("index.shard*-of-*.csv"):
        m = _INDEX_NAME.fullmatch(f.name)
        if m is not None and int(m[1]) < int(m[2]):
            found[Shard(int(m[1]), int(m[2]))] = f
    return found


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of an index file (``index.csv`` or a shard index), as strings."""
    try:
        with open(path, newline="") as f:
            return [row for row in csv.DictReader(f) if row.get("input")]
    except (OSError, csv.Error) as e:
        raise OSError(f"{path}: cannot read this index ({e}); delete it and rerun its shard") from e


@dataclass
class MergeSummary(ExtractSummary):
    """The merged ``index.csv``: every row, the shard indexes it came from, the shards that wrote none."""

    sources: list[Path] = field(default_factory=list)
    missing: list[Shard] = field(default_factory=list)  # shards of the newest count without an index

    @property
    def pending(self) -> list[VideoResult]:
        return [r for r in self.results if r.status == "pending"]

    @property
    def complete(self) -> bool:
        """Every input done, and no shard missing (without the inputs, a missing shard's are not even listed)."""
        return not self.pending and not self.failed and not self.missing


def merge_shards(
    out_dir: Path,
    inputs: Sequence[Path] | None = None,
    rows: dict[Shard, list[dict[str, str]]] | None = None,
) -> MergeSummary:
    """Write ``out_dir/index.csv`` from the shard indexes (or from ``rows`` gathered from the ranks of a job).

    Given the run's ``inputs``, the index lists exactly them, in their order, as a single process would; an input no
    shard index has is ``pending`` (its shard never wrote an index). Without them, the index lists the inputs of the
    shard indexes found, sorted. An input in several shard indexes (shards of an earlier run with another count) keeps
    the row of the newest index that finished it.

    Raises ValueError when there is nothing to merge.
    """
    out_dir = Path(out_dir)
    sources = find_shard_indexes(out_dir) if rows is None else {}
    if rows is None:
        by_age = sorted(sources, key=lambda s: (sources[s].stat().st_mtime_ns, s))
        rows = {s: read_rows(sources[s]) for s in by_age}
    if not rows:
        raise ValueError(f"{out_dir}: no shard index (index.shardI-of-N.csv) to merge; run the shards first "
                         "(marlin extract ... --shard I/N, or under torchrun)")  # fmt: skip
    count = list(rows)[-1].count  # the newest index's shard count says which shards a complete run has
    missing = [s for s in (Shard(i, count) for i in range(count)) if s not in rows]
    merged: dict[str, tuple[Shard, dict[str, str]]] = {}
    for shard, shard_rows in rows.items():  # oldest first: a newer finished row wins, a newer pending one does not
        for row in shard_rows:
            old = merged.get(row["input"])
            if old is None or row.get("status") != "pending" or old[1].get("status") == "pending":
                merged[row["input"]] = (shard, row)
    results = _ordered_results(out_dir, merged, inputs, count)
    index_path = out_dir / "index.csv"
    write_index(index_path, results)
    return MergeSummary(results, Timings(), 0.0, index_path, [sources[s] for s in sources], missing)


def _ordered_results(
    out_dir: Path, merged: dict[str, tuple[Shard, dict[str, str]]], inputs: Sequence[Path] | None, count: int
) -> list[VideoResult]:
    """One result per input (the given inputs in their order, else the merged inputs sorted), pending ones explained."""
    if inputs is None:
        keys = sorted(merged, key=Path)
        owner = {k: merged[k][0] for k in keys}
        planned: dict[str, str] = {}
    else:
        keys = [str(p) for p in inputs]
        position = {p: i for i, p in enumerate(sorted(inputs))}
        owner = {str(p): Shard(0, count).of(position[p]) for p in inputs}
        planned = {str(p): str(o) for p, o in output_paths(inputs, out_dir).items()}
    results = []
    for key in keys:
        if key not in merged:
            results.append(VideoResult(key, planned[key], error=f"{key}: no shard index lists it (shard "
                                       f"{owner[key]} wrote none): rerun that shard"))  # fmt: skip
            continue
        r = _result(merged[key][1])
        if r.status == "pending" and not r.error:
            r.error = f"{key}: not extracted yet (shard {owner[key]} stopped before it): rerun that shard"
        results.append(r)
    return results


def _result(row: dict[str, str]) -> VideoResult:
    """A row of an index file as a VideoResult (numbers parsed; a malformed number reads as 0)."""
    values: dict[str, object] = {}
    for f in fields(VideoResult):
        raw = row.get(f.name) or ""
        if f.type in ("int", "float"):
            try:
                values[f.name] = int(raw) if f.type == "int" else float(raw)
            except ValueError:
                values[f.name] = 0
        else:
            values[f.name] = raw
    return VideoResult(**values)  # type: ignore[arg-type]
