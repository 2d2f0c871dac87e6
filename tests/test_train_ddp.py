"""DDP: a 2-process torchrun job (gloo, CPU) gives the losses of one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_data import make_store
from test_train_checkpoint import wait_for_lines

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Adam eps 1e-6: see test_train_step.test_accumulation_equals_one_large_batch (the critic's output bias has an
# exactly-zero gradient whose round-off Adam would otherwise amplify into the logged adversarial loss).
# fp32: the runs are compared to 1e-5 (the default, auto, is bf16 on CPUs with bf16 units)
ARGS = ["--config", "marlin_vit_tiny_test", "--data", "synthetic", "--max-steps", "5", "mask.ratio=0.5",
        "mask.strategy=fasking", "data.num_workers=0", "data.synthetic_size=12", "optim.warmup_steps=2",
        "optim.lr=0.1", "optim.eps=1e-6", "loss.gp_weight=1.0", "loss.adv_weight=0.1", "log.tensorboard=false",
        "ckpt.export=false", "log.every=1", "--precision", "fp32"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out: Path, keep) -> list[dict[str, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    picked = [{k: v for k, v in r.items() if keep(k)} for r in records]
    return [r for r in picked if r]


def _single_process_cmd(args: list[str], out: Path) -> list[str]:
    """The reference: one process with the global batch (4) that the torchrun jobs split over two ranks."""
    return [sys.executable, "-m", "marlin.cli", "pretrain", *args, "--out", str(out), "--batch-size", "4"]


def _losses(out: Path) -> list[dict[str, float]]:
    return _records(out, lambda k: k.startswith("loss/") or k == "lr")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found beside the interpreter")
def test_two_process_torchrun_equals_one_process_with_the_same_global_batch(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    # Held-out error on 3 clips: rank 0 evaluates two, rank 1 one; the all-reduced means must equal one process's.
    val = make_store(tmp_path / "val", {"a": 12, "b": 20, "c": 9})
    args = [*ARGS, "--val-data", str(val), "val.every=3"]
    single = _single_process_cmd(args, tmp_path / "one")
    ddp = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "marlin.cli", "pretrain", *args,
           "--out", str(tmp_path / "two"), "--batch-size", "2"]  # fmt: skip
    for cmd in (single, ddp):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 5
    assert "global batch 4 = 2 x 1 accum x 2 ranks" in proc.stderr
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        assert a.keys() == b.keys() == {"loss/rec", "loss/adv", "loss/gen", "loss/critic", "loss/gp", "lr"}
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key, a[key], b[key])
    assert one[0]["loss/rec"] != one[-1]["loss/rec"]  # the weights did change over the 5 steps
    held_one, held_two = (_records(tmp_path / d, lambda k: k.startswith("val/")) for d in ("one", "two"))
    assert len(held_one) == len(held_two) == 2  # steps 3 and 5
    for a, b in zip(held_one, held_two, strict=True):
        assert a["val/clips"] == b["val/clips"] == 3
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a[key], b[key])


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found beside the interpreter")
def test_two_nodes_through_the_c10d_rendezvous_equal_one_process(tmp_path) -> None:
    """Multi-node as torchrun runs it: one launcher per node meeting at a c10d rendezvous (here both on 127.0.0.1)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(_single_process_cmd(ARGS, tmp_path / "one"), env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    endpoint = f"127.0.0.1:{_free_port()}"
    node = [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
            endpoint, "--rdzv_id", "marlin-test", "-m", "marlin.cli", "pretrain", *ARGS, "--out",
            str(tmp_path / "nodes"), "--batch-size", "2"]  # fmt: skip
    launchers = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=300) for p in launchers]
    for p, (_, err) in zip(launchers, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert any("global batch 4 = 2 x 1 accum x 2 ranks" in err for _, err in outputs)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "nodes")
    assert len(one) == len(two) == 5
    for step, (a, b) in enumerate(zip(one, two, strict=True), start=1):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (step, key, a[key], b[key])


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found beside the interpreter")
@pytest.mark.parametrize("how", ["sigterm-to-torchrun", "ctrl-c-to-the-process-group"])
def test_a_signal_to_torchrun_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, how) -> None:
    """SIGTERM to torchrun (a scheduler; torchrun forwards it), or Ctrl-C in its terminal (SIGINT reaches torchrun,
    both ranks and their DataLoader workers at once, and torchrun forwards it again)."""
    import signal

    from marlin.train.state import load_training_checkpoint

    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    args = [a for a in ARGS if a not in ("--max-steps", "5")]
    cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), "-m", "marlin.cli", "pretrain", *args, "--max-steps", "500", "ckpt.every=1000",
           "data.num_workers=1", "--out", str(out), "--batch-size", "2"]  # fmt: skip
    group = how.startswith("ctrl-c")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)  # fmt: skip
    wait_for_lines(out / "metrics.jsonl", 4, timeout=120)
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # torchrun's own exit status on a signal is torchrun's business
    stopped_at = len(_losses(out))
    assert 4 <= stopped_at < 500, err[-3000:]
    assert load_training_checkpoint(out / "checkpoints/last.pt")["step"] == stopped_at, err[-3000:]
    name = "SIGINT" if group else "SIGTERM"
    assert f"stopped by {name} at step {stopped_at}/500" in err, err[-3000:]
