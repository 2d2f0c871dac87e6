"""Checkpoints: exact resume (in process and after kill -9), atomic files, loadable as models, exports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import marlin
from marlin.train import Pretrainer, load_config
from marlin.train.state import find_resume_checkpoint, load_training_checkpoint, prune_checkpoints
from marlin.utils.fileio import save_atomic

REPO = Path(__file__).resolve().parents[1]
ARGS = ["mask.ratio=0.5", "data.num_workers=0", "log.tensorboard=false", "data.synthetic_size=10", "batch_size=2",
        "optim.warmup_steps=2", "optim.lr=0.05", "loss.gp_weight=1.0", "mask.strategy=fasking"]  # fmt: skip


def _metrics(path: Path) -> dict[int, dict]:
    """Last record per step (a resumed run re-logs the steps it repeats)."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "event" not in rec:
            out[rec["step"]] = rec
    return out


def _losses(rec: dict) -> dict[str, float]:
    return {k: v for k, v in rec.items() if k.startswith("loss/") or k == "lr"}


def test_resume_in_process_continues_exactly(tmp_path) -> None:
    full = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path / 'a'}", "max_steps=4", "ckpt.every=2",
                                                "ckpt.keep=5", "ckpt.export=false"])  # fmt: skip
    result = Pretrainer(full).fit()
    assert result.steps == 4 and (tmp_path / "a/checkpoints/step_2.pt").is_file()
    resumed_cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path / 'b'}", "max_steps=4",
                                                       "ckpt.export=false"])  # fmt: skip
    (tmp_path / "b/checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a/checkpoints/step_2.pt", tmp_path / "b/checkpoints/last.pt")
    trainer = Pretrainer(resumed_cfg)
    again = trainer.fit(resume="auto")
    assert [h["step"] for h in again.history] == [3, 4]
    for got, want in zip(again.history, result.history[2:], strict=True):
        assert _losses(got) == _losses(want)
    final = load_training_checkpoint(tmp_path / "a/checkpoints/last.pt")["state_dict"]
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, final[k]), k


def test_stop_at_ends_the_session_on_the_full_schedule_and_resume_finishes_it_exactly(tmp_path) -> None:
    common = [*ARGS, "max_steps=4", "ckpt.every=10", "ckpt.export=false"]
    full = Pretrainer(load_config("marlin_vit_tiny_test", [*common, f"out_dir={tmp_path / 'a'}"]))
    whole = full.fit()
    part_cfg = load_config("marlin_vit_tiny_test", [*common, f"out_dir={tmp_path / 'b'}", "stop_at=2"])
    first = Pretrainer(part_cfg).fit()
    assert first.steps == 2 and not first.stopped_by and not first.exports
    assert load_training_checkpoint(tmp_path / "b/checkpoints/last.pt")["step"] == 2  # saved although not a ckpt step
    for got, want in zip(first.history, whole.history[:2], strict=True):
        assert _losses(got) == _losses(want)  # same schedule (lr), not one squeezed into 2 steps
    rest_cfg = load_config("marlin_vit_tiny_test", [*common, f"out_dir={tmp_path / 'b'}"])
    trainer = Pretrainer(rest_cfg)
    rest = trainer.fit(resume="auto")
    assert [h["step"] for h in rest.history] == [3, 4]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, trainer.model.state_dict()[k]), k


def test_checkpoint_contents_and_loading_as_a_model(tmp_path) -> None:
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=2", "ckpt.every=1"])
    trainer = Pretrainer(cfg)
    result = trainer.fit()
    ckpt = load_training_checkpoint(result.checkpoint)
    assert ckpt["step"] == 2 and ckpt["train_config"] == cfg.to_dict()
    assert ckpt["g_opt"]["state"] and ckpt["d_opt"]["state"] and len(ckpt["rng"]) == 1
    assert any(k.startswith("discriminator.") for k in ckpt["state_dict"])
    model = marlin.load(result.checkpoint)  # a training checkpoint is also a model file
    assert not model.as_feature_extractor and model.config == cfg.model
    torch.testing.assert_close(model.encoder.norm.weight, trainer.model.encoder.norm.weight)
    # Exports: official encoder / full layouts and a save_pretrained directory, all loadable.
    enc = marlin.load(result.exports["encoder_official"])
    full = marlin.load(result.exports["full_official"])
    ours = marlin.load(result.exports["marlin"])
    assert enc.as_feature_extractor and not full.as_feature_extractor and not ours.as_feature_extractor
    sd = torch.load(result.exports["encoder_official"], weights_only=True)
    assert all(k.startswith("encoder.") for k in sd)
    torch.testing.assert_close(ours.decoder.head.weight, trainer.model.decoder.head.weight)


def test_atomic_save_keeps_the_previous_file_on_failure(tmp_path) -> None:
    path = save_atomic({"a": torch.ones(2)}, tmp_path / "last.pt")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_find_and_prune_checkpoints(tmp_path) -> None:
    assert find_resume_checkpoint(tmp_path) is None
    for step in (5, 10, 15):
        save_atomic({"step": step}, tmp_path / f"step_{step}.pt")
    assert find_resume_checkpoint(tmp_path).name == "step_15.pt"
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_15.pt"]
    save_atomic({"step": 15}, tmp_path / "last.pt")
    assert find_resume_checkpoint(tmp_path).name == "last.pt"
    with pytest.raises(ValueError, match="expected a marlin-pretrain-v1 training checkpoint"):
        load_training_checkpoint(tmp_path / "last.pt")


def wait_for_lines(path: Path, n: int, timeout: float) -> None:
    """Poll until the file `path` has at least `n` lines (a run in another process got that far) or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (path.exists() and len(path.read_text().splitlines()) >= n):
        time.sleep(0.005)


def _pretrain_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "marlin.cli", "pretrain", "--config", "marlin_vit_tiny_test", "--data", "synthetic",
            "--out", str(out), "--max-steps", "40", *ARGS, "ckpt.every=4", "ckpt.export=false", *extra]  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_pretrain_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr[-2000:]
    want = _metrics(tmp_path / "ref/metrics.jsonl")
    assert sorted(want) == list(range(1, 41))

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_cmd(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    wait_for_lines(metrics, 10, timeout=60)  # kill once it is past the second checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_metrics(metrics))
    start = load_training_checkpoint(run_dir / "checkpoints/last.pt")["step"]
    assert 4 <= start <= killed_at < 40, (start, killed_at)  # interrupted mid-run, resumable

    resumed = subprocess.run(_pretrain_cmd(run_dir, "--resume"), env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {run_dir / 'checkpoints/last.pt'} at step {start}" in resumed.stderr
    got = _metrics(metrics)
    assert sorted(got) == list(range(1, 41))
    for step in range(start + 1, 41):
        assert _losses(got[step]) == _losses(want[step]), step


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "group", "workers"), [(signal.SIGTERM, False, 0), (signal.SIGINT, True, 1)],
                         ids=["sigterm", "ctrl-c-with-loader-workers"])  # fmt: skip
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, sig, group, workers) -> None:
    """SIGTERM (a scheduler's warning) or Ctrl-C (SIGINT to the whole process group, DataLoader workers included):
    the run finishes its step, saves last.pt although no periodic checkpoint is due, and exits with 128 + signal."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_pretrain_cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=120)
    assert reference.returncode == 0, reference.stderr[-2000:]
    want = _metrics(tmp_path / "ref/metrics.jsonl")

    run_dir = tmp_path / "run"
    cmd = _pretrain_cmd(run_dir, "ckpt.every=1000", f"data.num_workers={workers}", "ckpt.export=true")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    wait_for_lines(metrics, 6, timeout=60)
    if group:
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: every process of the group
    else:
        os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    stopped_at = max(_metrics(metrics))
    assert 6 <= stopped_at < 40
    assert load_training_checkpoint(run_dir / "checkpoints/last.pt")["step"] == stopped_at  # no step lost
    assert f"stopped by {signal.Signals(sig).name} at step {stopped_at}/40" in err
    assert not (run_dir / "export").exists()  # an unfinished run exports nothing

    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "export/marlin_vit_tiny_test.full.pt").is_file()
    got = _metrics(metrics)
    assert sorted(got) == list(range(1, 41))
    for step in range(stopped_at + 1, 41):
        assert _losses(got[step]) == _losses(want[step]), step


def test_the_readme_resume_form_reuses_the_runs_config(tmp_path) -> None:
    """`marlin pretrain --out RUN --resume` after a run with overrides (model.img_size=64) used to fail with "checkpoint
    model differs from the run's" (it rebuilt the default config); it now continues with RUN/config.yaml."""
    from marlin.cli import main

    run = tmp_path / "run"
    first = ["pretrain", "--config", "marlin_vit_tiny_test", "--data", "synthetic", "--out", str(run), "--max-steps",
             "2", *ARGS, "model.img_size=64", "ckpt.export=false"]  # fmt: skip
    assert main(first) == 0
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "3"]) == 0
    ckpt = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["img_size"] == 64


def test_a_mismatched_resume_says_what_differs(tmp_path) -> None:
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=1", "ckpt.export=false"])
    Pretrainer(cfg).fit()
    other = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=2", "model.img_size=64"])
    with pytest.raises(ValueError, match="img_size: checkpoint 32, run 64"):
        Pretrainer(other).fit(resume="auto")


def test_a_checkpoint_older_than_a_model_field_resumes_with_its_default(tmp_path) -> None:
    """A run checkpointed before `MarlinConfig.num_registers` existed has no such key; it was refused as "checkpoint
    None, run 0". A field the checkpoint predates is the default it was built with: the run resumes."""
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=1", "ckpt.export=false"])
    Pretrainer(cfg).fit()
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["train_config"]["model"]["num_registers"]  # as written before the field was added
    torch.save(ckpt, path)
    more = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=2", "ckpt.export=false"])
    trainer = Pretrainer(more)
    trainer.fit(resume="auto")
    assert trainer.step == 2
    registered = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=3",
                                                      "model.num_registers=2"])  # fmt: skip
    with pytest.raises(ValueError, match="num_registers: checkpoint 0, run 2"):
        Pretrainer(registered).fit(resume="auto")  # a real difference is still refused
