"""Sharded extraction: `--shard I/N` + `--merge`, and torchrun ranks, give exactly what one process gives."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from marlin import Marlin, get_config
from marlin.cli import main as cli
from marlin.data.sources import collect_inputs
from marlin.video.extract import ExtractOptions, extract_many
from marlin.video.shard import Shard, find_shard_indexes, merge_shards
from videogen import write_video

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CFG = get_config("marlin_vit_tiny_test")  # 32x32 crops, 4-frame clips
LENGTHS = {"a/v0.mp4": 9, "a/v1.mp4": 40, "b/v2.mp4": 20, "b/c/v3.mp4": 5, "v4.mp4": 33, "v5.mp4": 12}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Marlin(CFG).eval()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, model):
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Six face-crop videos in a small tree, and one broken file (it must fail the same way in every layout)."""
    root = tmp_path_factory.mktemp("in")
    for rel, n in LENGTHS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(root / rel, n, CFG.img_size, CFG.img_size)
    (root / "b" / "broken.mp4").write_text("not a video\n")
    return root


@pytest.fixture(scope="module")
def single(src, model_path, tmp_path_factory) -> Path:
    """The reference: one process over every input."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert cli(["extract", str(src), "-o", str(out), *_common(model_path)]) == 1  # the broken file fails
    return out


def _common(model_path: Path) -> list[str]:
    # fp32: bf16 (what --dtype auto picks on CPUs with bf16 units) may round a clip's features differently in another
    # batch, and shards batch differently from one process
    return ["--model", str(model_path), "--workers", "0", "--batch-size", "3", "--stride", "2", "--no-progress",
            "--dtype", "fp32"]  # fmt: skip


def _statuses(index: Path) -> dict[str, str]:
    with open(index, newline="") as f:
        return {Path(r["input"]).name: r["status"] for r in csv.DictReader(f)}


def _rows(index: Path, resumed: bool = False) -> list[dict[str, str]]:
    """The index rows with the output made relative to the extraction folder and without timings (and, for a resumed
    run, ``skipped`` read as ``ok``: done by an earlier run)."""
    with open(index, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("seconds")
        r["output"] = str(Path(r["output"]).relative_to(index.parent))
        if resumed and r["status"] == "skipped":
            r["status"] = "ok"
    return rows


def assert_same_extraction(got: Path, ref: Path, resumed: bool = False) -> None:
    """Same feature files with equal arrays, same index rows (in the same order) except timings."""
    files = sorted(p.relative_to(ref) for p in ref.rglob("*.npy"))
    assert files and sorted(p.relative_to(got) for p in got.rglob("*.npy")) == files
    for f in files:
        a, b = np.load(ref / f), np.load(got / f)
        assert a.shape == b.shape and np.array_equal(a, b), f
    assert _rows(got / "index.csv", resumed) == _rows(ref / "index.csv")


def test_shard_selection_is_a_deterministic_split_of_the_sorted_inputs() -> None:
    inputs = [Path(f"/d/{n}.mp4") for n in "edcbafg"]
    parts = [Shard(i, 3).select(inputs) for i in range(3)]
    assert parts[0] == [Path("/d/a.mp4"), Path("/d/d.mp4"), Path("/d/g.mp4")]
    assert sorted(sum(parts, [])) == sorted(inputs) and Shard(1, 3).select(reversed(inputs)) == parts[1]
    assert Shard.parse(" 2 / 4 ") == Shard(2, 4)
    assert Shard(2, 4).index_path(Path("o")) == Path("o/index.shard2-of-4.csv")
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_two_shards_then_merge_equal_one_process(src, single, model_path, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    for i in range(2):
        assert cli(["extract", str(src), "-o", str(out), "--shard", f"{i}/2", *_common(model_path)]) in (0, 1)
    assert set(find_shard_indexes(out)) == {Shard(0, 2), Shard(1, 2)} and not (out / "index.csv").exists()
    mine = [_statuses(out / f"index.shard{i}-of-2.csv") for i in range(2)]
    assert list(mine[0]) == ["v0.mp4", "broken.mp4", "v2.mp4", "v5.mp4"]  # 7 sorted inputs, dealt in turn
    assert list(mine[1]) == ["v1.mp4", "v3.mp4", "v4.mp4"]
    assert not list(out.glob(".marlin-tmp*"))
    capsys.readouterr()
    assert cli(["extract", "--merge", str(out), "--combined", str(tmp_path / "all.npz")]) == 1  # broken.mp4 failed
    printed = capsys.readouterr()
    assert "merged 2 shard indexes: 7 inputs: 1 failed, 6 ok" in printed.out and "broken.mp4" in printed.err
    assert_same_extraction(out, single)
    combined = np.load(tmp_path / "all.npz")
    assert sorted(combined.files) == sorted(str(Path(r).with_suffix("")) for r in LENGTHS)
    # given the inputs, the merge lists them in their order, as one process does: the same index
    merge_shards(out, collect_inputs([src]))
    assert _rows(out / "index.csv") == _rows(single / "index.csv")


def test_a_shard_rerun_redoes_only_its_missing_video(src, model_path, tmp_path) -> None:
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), *_common(model_path)]
    for i in range(2):
        cli(["extract", *args, "--shard", f"{i}/2"])
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")}
    lost = out / "b" / "v2.npy"  # sorted inputs: a/v0, a/v1, b/broken, b/c/v3, b/v2, v4, v5 -> b/v2 is shard 0's
    lost.unlink()
    assert cli(["extract", "--merge", str(out)]) == 1
    assert cli(["extract", *args, "--shard", "1/2"]) == 0  # the other shard: nothing to do
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npy")} == {p: t for p, t in mtimes.items() if p != lost}
    assert cli(["extract", *args, "--shard", "0/2"]) == 1  # broken.mp4 is retried and fails again
    redone = {p for p in out.rglob("*.npy") if mtimes.get(p) != p.stat().st_mtime_ns}
    assert redone == {lost}
    status = _statuses(out / "index.shard0-of-2.csv")
    assert status == {"v0.mp4": "skipped", "broken.mp4": "failed", "v2.mp4": "ok", "v5.mp4": "skipped"}


class _StopAfter:
    """A model that stops the run (as a kill would) after encoding `n` batches."""

    def __init__(self, model: Marlin, n: int) -> None:
        self.model, self.n, self.config, self.device = model, n, model.config, model.device

    def extract_features(self, x, keep_seq=False):  # noqa: ANN001, ANN201
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        return self.model.extract_features(x, keep_seq=keep_seq)


def test_a_stopped_shard_leaves_pending_rows_that_the_merge_names_and_a_rerun_finishes(src, model, single,
                                                                                       tmp_path) -> None:  # fmt: skip
    out = tmp_path / "out"
    inputs = collect_inputs([src])
    opts = ExtractOptions(workers=0, batch_size=3, stride=2, progress=False)
    extract_many(model, inputs, out, replace(opts, shard=Shard(0, 2)))
    with pytest.raises(KeyboardInterrupt):  # shard 1: v1 (8 windows), v3 (1), v4 (7); stopped in the 4th batch
        extract_many(_StopAfter(model, 3), inputs, out, replace(opts, shard=Shard(1, 2)))
    assert _statuses(out / "index.shard1-of-2.csv") == {"v1.mp4": "ok", "v3.mp4": "ok", "v4.mp4": "pending"}
    assert not list(out.glob(".marlin-tmp*"))
    merged = merge_shards(out, inputs)
    assert [(Path(r.input).name, r.error) for r in merged.pending] == [
        ("v4.mp4", f"{src / 'v4.mp4'}: not extracted yet (shard 1/2 stopped before it): rerun that shard")
    ]
    assert not merged.complete and not merged.missing
    again = extract_many(model, inputs, out, replace(opts, shard=Shard(1, 2)))
    assert [(Path(r.input).name, r.status) for r in again.results] == [("v1.mp4", "skipped"), ("v3.mp4", "skipped"),
                                                                        ("v4.mp4", "ok")]  # fmt: skip
    merge_shards(out, inputs)
    assert_same_extraction(out, single, resumed=True)


def test_merge_names_a_shard_that_wrote_no_index(src, model_path, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    cli(["extract", str(src), "-o", str(out), "--shard", "1/3", *_common(model_path)])
    assert cli(["extract", "--merge", str(out)]) == 1
    err = capsys.readouterr().err
    assert "shard 0/3 wrote no index" in err and "shard 2/3 wrote no index" in err
    assert cli(["extract", "--merge", str(out), str(src)]) == 1  # given the inputs: their rows, pending
    rows = {Path(r["input"]).name: r for r in csv.DictReader(open(out / "index.csv"))}
    assert len(rows) == 7 and [r["status"] for r in rows.values()].count("pending") == 5
    assert "shard 0/3 wrote none" in rows["v0.mp4"]["error"]
    with pytest.raises(ValueError, match="no shard index"):
        merge_shards(tmp_path / "empty")
    assert cli(["extract", str(src), "-o", str(out), "--shard", "3/3", *_common(model_path)]) == 2
    assert cli(["extract", str(src), "-o", str(out), "--shard", "0/2", "--combined", "x.npz"]) == 2
    assert "--merge" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_launchers(launchers: list[list[str]]) -> list[tuple[str, str]]:
    """Run torchrun launchers side by side; each must exit 0 (a failed input is in the index, not the exit code)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in launchers]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err[-3000:]
    return outputs


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found beside the interpreter")
def test_two_gloo_ranks_under_torchrun_equal_one_process(src, single, model_path, tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), "-m", "marlin.cli", "extract", str(src), "-o", str(out),
           *_common(model_path)]  # fmt: skip
    ((printed, err),) = _run_launchers([cmd])
    assert "merged every rank: 7 inputs: 1 failed, 6 ok" in printed and "failed: " in err
    assert "rank 0 (shard 0/2): 4 inputs" in printed and "rank 1 (shard 1/2): 3 inputs" in printed
    assert set(find_shard_indexes(out)) == {Shard(0, 2), Shard(1, 2)}
    assert_same_extraction(out, single)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found beside the interpreter")
def test_two_nodes_through_the_c10d_rendezvous_equal_one_process(src, single, model_path, tmp_path) -> None:
    out = tmp_path / "out"
    node = [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            f"127.0.0.1:{_free_port()}", "--rdzv_id", "marlin-extract-test", "-m", "marlin.cli", "extract", str(src),
            "-o", str(out), *_common(model_path)]  # fmt: skip
    outputs = _run_launchers([node, node])
    assert sum("merged every rank: 7 inputs: 1 failed, 6 ok" in text for text, _ in outputs) == 1
    assert_same_extraction(out, single)
