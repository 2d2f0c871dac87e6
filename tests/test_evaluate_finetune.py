"""`marlin finetune`: clip sampling, sharding, layer decay, and end-to-end runs on tiny synthetic video sets."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from marlin.commands import finetune as finetune_cmd
from marlin.data.clips import clip_indices, fit_sample_rate, random_start, read_clip, spread_starts
from marlin.data.datasets import VideoClips
from marlin.data.sampling import ShardedBatchSampler
from marlin.evaluate.manifest import LabelSet, read_labels
from marlin.models.registry import get_config
from marlin.train.finetune import (
    FinetuneConfig,
    FinetuneModel,
    _Run,
    evaluate,
    finetune,
    layer_decay_groups,
    load_finetuned,
    resolve_splits,
)
from marlin.utils.distributed import DistInfo
from videogen import frame_index, write_video

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def _noisy(rgb: tuple[int, int, int], seed: int, n_frames_noise: float = 30.0):
    """A frame function: a flat colour plus per-pixel noise (a new noise field per frame)."""

    def fn(index: int, height: int, width: int) -> np.ndarray:
        rng = np.random.default_rng([seed, index])
        return np.clip(np.array(rgb)[None, None] + rng.normal(0, n_frames_noise, (height, width, 3)), 0, 255).astype(
            np.uint8
        )

    return fn


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory) -> Path:
    """24 non-square videos of 10 frames in 3 colours, 8 each, with 2 videos per 'person' group, and a CSV."""
    root = tmp_path_factory.mktemp("colours")
    (root / "videos").mkdir()
    rows = []
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(8):
            write_video(root / "videos" / f"{name}_{i}.mp4", n_frames=10, height=32, width=40,
                        frame_fn=_noisy(rgb, 100 * c + i))  # fmt: skip
            brightness = float(np.mean(rgb)) / 255 + 0.01 * i
            rows.append({"path": f"videos/{name}_{i}.mp4", "colour": name, "person": f"{name}{i // 2}",
                         "is_red": int(name == "red"), "is_blue": int(name == "blue"),
                         "brightness": round(brightness, 4), "redness": round(rgb[0] / 255 + 0.01 * i, 4)})  # fmt: skip
    _write_csv(root / "labels.csv", rows)
    return root


def _cfg(tmp: Path, labels: Path, label: tuple[str, ...], **kw) -> FinetuneConfig:
    base = dict(model="marlin_vit_tiny_test", random_init=True, labels=str(labels), label=label,
                split=(0.5, 0.25, 0.25), epochs=4, batch_size=4, lr=3e-3, weight_decay=0.0, workers=0, out=str(tmp),
                log_every=2)  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


# ---- clip sampling and reading ---------------------------------------------------------------------------------------
def test_clip_indices_lower_the_sample_rate_then_pad() -> None:
    assert fit_sample_rate(100, 16, 2) == 2
    assert fit_sample_rate(20, 16, 2) == 1  # 31 frames needed at rate 2
    assert fit_sample_rate(31, 16, 2) == 2
    assert fit_sample_rate(25, 4, 4) == 4 and fit_sample_rate(9, 4, 4) == 2
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = clip_indices(20, 4, 3, random_start(20, 4, 3, rng))
        assert np.all(np.diff(idx) == 3) and 0 <= idx[0] and idx[-1] <= 19
        starts.add(int(idx[0]))
    assert starts == set(range(11))  # every start 0..(20 - 10) is drawn
    rate = fit_sample_rate(3, 4, 2)
    assert clip_indices(3, 4, rate, random_start(3, 4, rate, rng)).tolist() == [0, 1, 2, 2]  # too short: repeat
    clips = [clip_indices(40, 4, 2, s).tolist() for s in spread_starts(40, 4, 2, 4)]
    assert [c[0] for c in clips] == [0, 11, 22, 33] and clips[-1] == [33, 35, 37, 39]
    assert spread_starts(40, 4, 2, 1) == [16]  # one clip: the middle
    assert [clip_indices(5, 4, 1, s).tolist() for s in spread_starts(5, 4, 1, 2)] == [[0, 1, 2, 3], [1, 2, 3, 4]]


def test_read_clip_selects_crops_and_pads(tmp_path) -> None:
    path = write_video(tmp_path / "barcode.mp4", n_frames=12, height=64, width=64, codec="libx264rgb",
                       pix_fmt="rgb24", codec_options={"qp": "0"})  # fmt: skip
    clip = read_clip(path, [1, 3, 5, 11, 11, 14], 64)
    assert clip.shape == (3, 6, 64, 64) and clip.dtype == torch.uint8
    got = [frame_index(clip[:, t].permute(1, 2, 0).numpy()) for t in range(6)]
    assert got == [1, 3, 5, 11, 11, 11]  # index 14 is past the end: the last frame repeats

    # non-square: the centre square is kept, then resized
    def thirds(index: int, height: int, width: int) -> np.ndarray:
        f = np.zeros((height, width, 3), np.uint8)
        f[:, : width // 4] = (255, 0, 0)
        f[:, width // 4 : 3 * width // 4] = (0, 255, 0)
        f[:, 3 * width // 4 :] = (0, 0, 255)
        return f

    wide = write_video(tmp_path / "wide.mp4", n_frames=4, height=32, width=64, frame_fn=thirds)
    clip = read_clip(wide, [0, 2], 16).float()
    assert clip.shape == (3, 2, 16, 16)
    assert clip[1].mean() > 200 and clip[0].mean() < 40 and clip[2].mean() < 40  # all green
    with pytest.raises(ValueError, match="no such file"):
        read_clip(tmp_path / "absent.mp4", [0], 16)


def test_training_clip_is_random_or_always_the_centred_one(tmp_path) -> None:
    path = write_video(tmp_path / "barcode.mp4", n_frames=30, height=64, width=64, codec="libx264rgb",
                       pix_fmt="rgb24", codec_options={"qp": "0"})  # fmt: skip

    def first_frames(jitter: bool) -> set[int]:
        data = VideoClips([path], np.zeros(1), clip_frames=4, img_size=64, sample_rate=2, jitter=jitter)
        firsts = set()
        for epoch in range(8):
            data.set_epoch(epoch)
            firsts.add(frame_index(data[0]["video"][:, 0].permute(1, 2, 0).numpy()))
        return firsts

    held_out = VideoClips([path], np.zeros(1), clip_frames=4, img_size=64, sample_rate=2, train=False, n_clips=1)
    centre = frame_index(held_out[0]["video"][0, :, 0].permute(1, 2, 0).numpy())
    assert first_frames(jitter=False) == {centre} == {11}  # a span of 7 of 30 frames: starts 0..23, the centred 11
    assert len(first_frames(jitter=True)) > 3


def test_sharded_sampler_uses_every_video_once_and_matches_one_process() -> None:
    n, b = 11, 2
    one = ShardedBatchSampler(n, 2 * b, 0, 1, seed=3, epoch=1)
    ranks = [ShardedBatchSampler(n, b, r, 2, seed=3, epoch=1) for r in range(2)]
    assert one.steps == ranks[0].steps == ranks[1].steps == 3
    for step in range(one.steps):
        assert ranks[0].batch(step) + ranks[1].batch(step) == one.batch(step)  # same global batches
        assert one.global_count(step) == ranks[0].global_count(step) == len(one.batch(step))
    used = [i for s in ranks for batch in s for i in batch]
    assert sorted(used) == list(range(n))
    assert len(ranks[0]) == 3 and len(ranks[1]) == 3  # 11 = 4 + 4 + 3: rank 1 gets 1 in the last step
    assert ShardedBatchSampler(5, 2, 1, 2).batch(1) == []  # 5 = 4 + 1: rank 1 sits the last step out
    assert one.perm != ShardedBatchSampler(n, 4, seed=3, epoch=2).perm  # a fresh order per epoch


# ---- splits ----------------------------------------------------------------------------------------------------------
def test_resolve_splits_groups_fixed_splits_and_low_data(colour_set) -> None:
    labels = read_labels(colour_set / "labels.csv", ["colour"], group_col="person")
    idx = resolve_splits(labels, (0.5, 0.25, 0.25), seed=1)
    assert sorted(np.concatenate(list(idx.values())).tolist()) == list(range(24))
    groups = {k: {labels.groups[i] for i in v} for k, v in idx.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    small = resolve_splits(labels, (0.5, 0.25, 0.25), train_fraction=0.5, seed=1)
    assert set(small["train"]) < set(idx["train"]) and len(small["train"]) == len(idx["train"]) // 2
    assert set(labels.targets[small["train"]]) == {0, 1, 2}  # stratified: every class kept
    fixed = LabelSet(labels.paths, labels.targets, "multiclass", labels.names,
                     splits=["train"] * 20 + ["test"] * 4)  # fmt: skip
    got = resolve_splits(fixed, seed=0)
    assert got["test"].tolist() == [20, 21, 22, 23] and len(got["val"]) == 2 and len(got["train"]) == 18


# ---- optimiser -------------------------------------------------------------------------------------------------------
def test_layer_decay_param_groups_have_the_right_lrs() -> None:
    cfg = get_config("marlin_vit_tiny_test")  # depth 2
    model = FinetuneModel(cfg, "multiclass", ["a", "b", "c"], 3)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    expect = {"head.": 1.0, "encoder.norm.": 1.0, "encoder.blocks.1.": 0.5, "encoder.blocks.0.": 0.25,
              "encoder.patch_embedding.": 0.125}  # fmt: skip
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in lr_of  # the fixed sin-cos table is not optimised
            continue
        prefix = next(k for k in expect if name.startswith(k))
        assert lr_of[id(p)] == pytest.approx(expect[prefix]), name
        assert wd_of[id(p)] == (0.05 if p.ndim > 1 else 0.0), name
        seen.add(prefix)
    assert seen == set(expect)
    flat = layer_decay_groups(model, lr=0.1)
    assert {g["lr"] for g in flat} == {0.1}


def test_training_sets_scaled_lrs_every_step(colour_set, tmp_path) -> None:
    labels = read_labels(colour_set / "labels.csv", ["colour"])
    cfg = _cfg(tmp_path, colour_set / "labels.csv", ("colour",), layer_decay=0.5, epochs=2, warmup_epochs=0.5)
    splits = resolve_splits(labels, cfg.split, seed=0)
    model = FinetuneModel(get_config("marlin_vit_tiny_test"), labels.task, labels.names, 3)
    run = _Run(cfg, labels, model, splits, DistInfo())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = run.train_epoch(0)
    assert run.step == run.sampler.steps == 3 and math.isfinite(stats["train_loss"])
    lr = run.schedule(run.step - 1)
    assert stats["lr"] == pytest.approx(lr)
    for g in run.optimizer.param_groups:
        assert g["lr"] == pytest.approx(lr * 0.5 ** (3 - g["layer"]))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.blocks.0.") for k in changed) and "head.weight" in changed


# ---- end to end ------------------------------------------------------------------------------------------------------
def test_multiclass_csv_run_learns_and_best_checkpoint_reproduces(colour_set, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="marlin")
    out = tmp_path / "run"
    cfg = _cfg(out, colour_set / "labels.csv", ("colour",), epochs=5, test_clips=2)
    result = finetune(cfg)
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "multiclass" and doc["names"] == ["blue", "green", "red"]
    assert doc["primary_metric"] == "accuracy" and doc["n"] == {"train": 12, "val": 6, "test": 6}
    assert len(doc["history"]) == 5 and [h["epoch"] for h in doc["history"]] == [1, 2, 3, 4, 5]
    losses = [h["train_loss"] for h in doc["history"]]
    assert losses[-1] < 0.75 * losses[0]  # it learns
    assert doc["metrics"]["val"]["accuracy"] >= 0.99 and doc["metrics"]["test"]["accuracy"] >= 0.99
    test = doc["metrics"]["test"]  # 95% bootstrap interval over the test videos, as the probes report it
    assert test["ci95_low"] <= test["accuracy"] <= test["ci95_high"] and "ci95_low" not in doc["metrics"]["val"]
    assert doc["metrics"]["val"]["loss"] < 0.8 * math.log(3)  # well past the chance-level loss of the prior init
    assert set(doc["metrics"]) == {"train", "val", "test"}
    best = doc["best_epoch"]
    assert doc["metrics"]["val"] == doc["history"][best - 1]["val"]
    assert json.loads((out / "splits.json").read_text())["test"] == [
        result.labels.ids[i] for i in result.splits["test"]
    ]
    # the checkpoint alone reproduces the reported test metrics
    model = load_finetuned(out / "best.pt")
    assert model.task == "multiclass" and model.names == ["blue", "green", "red"] and model.meta["epoch"] == best
    test = evaluate(model, result.labels.subset(result.splits["test"]), batch_size=3)
    for k, v in doc["metrics"]["test"].items():
        if k not in ("loss", "neg_loss", "ci95_low", "ci95_high"):
            assert test[k] == pytest.approx(v, abs=1e-6), k
    import marlin

    enc = marlin.load(out / "best.pt")  # the encoder part loads as a plain marlin model
    assert torch.equal(enc.encoder.blocks[0].attn.q_bias, model.encoder.blocks[0].attn.q_bias)
    # console progress: per-epoch lines with an ETA, and in-epoch lines
    text = caplog.text
    assert "epoch 1/5: train loss" in text and "ETA" in text and "epoch 1 step 2/3" in text
    assert "test (best epoch" in text


def test_multilabel_and_regression_run_end_to_end(colour_set, tmp_path) -> None:
    ml = finetune(_cfg(tmp_path / "ml", colour_set / "labels.csv", ("is_red", "is_blue"), epochs=2,
                       eval_train=False))  # fmt: skip
    assert ml.labels.task == "multilabel" and ml.model.num_outputs == 2
    assert set(ml.metrics) == {"val", "test"} and "flat_auc" in ml.metrics["test"]
    assert json.loads((tmp_path / "ml" / "results.json").read_text())["primary_metric"] == "flat_auc"
    reg = finetune(_cfg(tmp_path / "reg", colour_set / "labels.csv", ("brightness", "redness"), epochs=2, test_clips=2,
                        eval_train=False, task="regression", freeze_encoder=True))  # fmt: skip
    assert reg.labels.task == "regression" and reg.model.num_outputs == 2
    m = reg.metrics["test"]
    assert {"mse", "mae", "r2", "neg_mse"} <= set(m) and math.isfinite(m["mse"])
    # outputs are in the targets' units: means near the training targets' means
    tr = reg.splits["train"]
    assert torch.allclose(reg.model.target_mean, torch.tensor(reg.labels.targets[tr].mean(0)), atol=1e-5)
    assert m["mse"] < 0.1  # targets lie in [0.15, 0.9]; a model off in scale would be far worse
    loaded = load_finetuned(tmp_path / "reg" / "best.pt")
    assert torch.equal(loaded.target_std, reg.model.target_std)
    with pytest.raises(ValueError, match="layer decay"):
        _cfg(tmp_path, colour_set / "labels.csv", ("colour",), layer_decay=1.5)


def _order_videos(tmp_path: Path, per_class: int) -> Path:
    """Two classes with the same colours in opposite order (red then blue, blue then red), 4 frames each: the
    labels CSV (column ``order``)."""
    rows = []
    for order in ("red_blue", "blue_red"):
        first, second = (COLOURS[c] for c in order.split("_"))
        for i in range(per_class):
            path = tmp_path / f"{order}_{i}.mp4"
            write_video(path, n_frames=4, height=32, width=32, frame_fn=lambda k, h, w, a=first, b=second, s=i: _noisy(
                a if k < 2 else b, s)(k, h, w))  # fmt: skip
            rows.append({"path": str(path), "order": order})
    return _write_csv(tmp_path / "labels.csv", rows)


def test_time_pool_tells_order_that_the_clip_mean_cannot(tmp_path) -> None:
    """Two classes with the same colours in opposite order (red then blue, blue then red): the mean over a clip is
    the same for both, the time-kept head input is not."""
    labels = _order_videos(tmp_path, 10)
    acc = {}
    for pool in ("mean", "time"):
        r = finetune(_cfg(tmp_path / pool, labels, ("order",), pool=pool, epochs=6, sample_rate=1, test_clips=1,
                          split=(0.6, 0.2, 0.2), freeze_encoder=True, lr=3e-2, eval_train=False))  # fmt: skip
        acc[pool] = r.metrics["test"]["accuracy"]
        assert r.model.head.in_features == (2 if pool == "time" else 1) * r.model.config.encoder_embed_dim
    assert acc["time"] == 1.0 and acc["mean"] <= 0.75
    normed = finetune(_cfg(tmp_path / "norm", labels, ("order",), pool="time", head_norm=True, epochs=2, batch_size=13,
                           sample_rate=1, test_clips=1, split=(0.65, 0.15, 0.2), eval_train=False))  # fmt: skip
    assert len(normed.splits["train"]) == 14  # batches of 13 + 1: a one-clip batch cannot be standardised by itself
    assert normed.model.head_norm is not None and normed.model.head_norm.num_batches_tracked == 2
    back = load_finetuned(tmp_path / "norm" / "best.pt")
    assert back.head_norm is not None and torch.equal(back.head_norm.running_var, normed.model.head_norm.running_var)
    assert load_finetuned(tmp_path / "time" / "best.pt").pool == "time"
    with pytest.raises(ValueError, match="pool must be one of mean, time"):
        _cfg(tmp_path, labels, ("order",), pool="max")


def test_centred_time_head_reads_what_changes_within_the_clip(tmp_path) -> None:
    """``centre``: the head input is each time step minus the clip's mean over its steps (exactly that, on the same
    encoder), saved with the model; order (red then blue vs blue then red) survives it."""
    labels = _order_videos(tmp_path, 8)
    cfg = _cfg(tmp_path / "c", labels, ("order",), pool="time", centre=True, epochs=6, sample_rate=1, test_clips=1,
               split=(0.5, 0.25, 0.25), freeze_encoder=True, lr=3e-2, eval_train=False)  # fmt: skip
    run = finetune(cfg)
    assert run.metrics["test"]["accuracy"] == 1.0
    model = load_finetuned(tmp_path / "c" / "best.pt")
    plain = FinetuneModel(model.config, model.task, model.names, model.num_outputs, encoder=model.encoder,
                          pool="time").eval()  # fmt: skip
    assert model.centre and not plain.centre
    seen = []
    for m in (model, plain):
        m.head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].view(3, 2, -1)))  # [B, T', D]
    x = torch.rand(3, 3, 4, 32, 32)
    with torch.no_grad():
        model(x), plain(x)
    centred, raw = seen
    assert torch.allclose(centred, raw - raw.mean(1, keepdim=True), atol=1e-6)
    assert torch.allclose(centred.mean(1), torch.zeros(()), atol=1e-6) and centred.abs().max() > 1e-3
    with pytest.raises(ValueError, match="centre needs the time-kept head input"):
        _cfg(tmp_path, labels, ("order",), centre=True)
    with pytest.raises(ValueError, match="centre needs the time-kept head input"):
        FinetuneModel(model.config, model.task, model.names, model.num_outputs, centre=True)


def test_binary_low_data_groups_and_early_stopping(colour_set, tmp_path) -> None:
    # lr 1e-12 cannot move float32 weights: validation never improves, so patience 2 stops after epoch 3
    cfg = _cfg(tmp_path, colour_set / "labels.csv", ("is_red",), epochs=10, patience=2, lr=1e-12, min_lr=0.0,
               group_col="person", train_fraction=0.5, split=(0.5, 0.25, 0.25), eval_train=False)  # fmt: skip
    result = finetune(cfg)
    assert result.labels.task == "binary" and result.model.num_outputs == 1
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 1
    assert result.history[0]["val"] == result.history[2]["val"]
    full = resolve_splits(result.labels, cfg.split, seed=cfg.seed)
    assert set(result.splits["train"]) < set(full["train"]) and len(result.splits["train"]) == len(full["train"]) // 2
    assert set(result.labels.targets[result.splits["train"]]) == {0, 1}
    train_groups = {result.labels.groups[i] for i in full["train"]}
    assert not train_groups & {result.labels.groups[i] for i in result.splits["test"]}
    # this seed's group split leaves one class in validation, where AUC is undefined: selection falls back to the loss
    assert len(set(result.labels.targets[result.splits["val"]])) == 1 and result.selection_metric == "neg_loss"
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["stopped_early"] and doc["epochs_run"] == 3 and doc["primary_metric"] == "auc"
    assert doc["metrics"]["val"]["auc"] is None  # NaN is written as null


def test_celebvhq_layout(tmp_path) -> None:
    root = tmp_path / "celebvhq"
    (root / "cropped").mkdir(parents=True)
    clips, names = {}, {"train": [], "val": [], "test": []}
    for i in range(12):
        red = i % 2 == 0
        name = f"clip{i:02d}"
        write_video(root / "cropped" / f"{name}.mp4", n_frames=6, height=32, width=32,
                    frame_fn=_noisy(COLOURS["red" if red else "blue"], i))  # fmt: skip
        clips[name] = {"ytb_id": f"yt{i // 2}", "attributes": {"appearance": [int(red), int(not red), i % 3 == 0],
                                                              "action": [int(red), 0]}}  # fmt: skip
        names["train" if i < 8 else "val" if i < 10 else "test"].append(name)
    meta = {"appearance_mapping": ["red", "blue", "third"], "action_mapping": ["talk", "smile"]}
    (root / "celebvhq_info.json").write_text(json.dumps({"meta_info": meta, "clips": clips}))
    for split, lst in names.items():
        (root / f"{split}.txt").write_text("\n".join(lst) + "\n")
    p = argparse.ArgumentParser()
    finetune_cmd.add_arguments(p)
    out = tmp_path / "run"
    args = p.parse_args(["--model", "marlin_vit_tiny_test", "--random-init", "--labels", str(root), "--out", str(out),
                         "--epochs", "2", "--batch-size", "4", "--lr", "3e-3", "--workers", "1", "--sample-rate", "1",
                         "--layer-decay", "0.75", "--no-train-eval", "--hflip"])  # fmt: skip
    assert finetune_cmd.run(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "multilabel" and doc["label"] == "appearance" and doc["names"] == meta["appearance_mapping"]
    assert doc["n"] == {"train": 8, "val": 2, "test": 2} and doc["config"]["layer_decay"] == 0.75
    assert json.loads((out / "splits.json").read_text())["val"] == ["clip08", "clip09"]
    assert load_finetuned(out / "best.pt").names == ["red", "blue", "third"]


def test_missing_video_is_one_clear_line(colour_set, tmp_path, capsys) -> None:
    rows = [{"path": f"videos/{c}_{i}.mp4", "y": c} for c in ("red", "blue") for i in range(4)]
    rows.append({"path": "videos/nowhere.mp4", "y": "red"})
    manifest = _write_csv(colour_set / "with_missing.csv", rows)
    p = argparse.ArgumentParser()
    finetune_cmd.add_arguments(p)
    args = p.parse_args(["--model", "marlin_vit_tiny_test", "--random-init", "--labels", str(manifest), "--label",
                         "y", "--out", str(tmp_path / "x"), "--workers", "0"])  # fmt: skip
    assert finetune_cmd.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere.mp4: no such video file" in err and "with_missing.csv" in err
    args = p.parse_args(["--model", "marlin_vit_tiny_test", "--random-init", "--labels", str(manifest), "--label",
                         "nope", "--out", str(tmp_path / "x")])  # fmt: skip
    assert finetune_cmd.run(args) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "best.pt").exists()
    # a file that is not a video fails inside a DataLoader worker: still one line, naming the file
    (colour_set / "videos" / "garbage.mp4").write_text("not a video")
    rows[-1]["path"] = "videos/garbage.mp4"
    _write_csv(manifest, rows)
    args = p.parse_args(["--model", "marlin_vit_tiny_test", "--random-init", "--labels", str(manifest), "--label",
                         "y", "--out", str(tmp_path / "x"), "--workers", "1", "--split", "0.6,0.2,0.2"])  # fmt: skip
    assert finetune_cmd.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "garbage.mp4: not a video file" in err, err


def test_worker_errors_are_reported_in_one_line() -> None:
    wrapped = RuntimeError(
        "Caught VideoError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1\nmarlin.video.VideoError: /d/a.mp4: not a video file'
    )
    assert finetune_cmd.one_line(wrapped) == "/d/a.mp4: not a video file"
    assert finetune_cmd.one_line(ValueError("a: b\nmore")) == "a: b"


# ---- torchrun --------------------------------------------------------------------------------------------------------
SCRIPT = """
import logging, sys
from marlin.train.finetune import FinetuneConfig, finetune
logging.basicConfig(level=logging.INFO, format="%(message)s")
finetune(FinetuneConfig(**{cfg!r}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not found beside the interpreter")
def test_two_process_torchrun_follows_one_process_with_the_same_global_batch(colour_set, tmp_path) -> None:
    common = dict(model="marlin_vit_tiny_test", random_init=True, labels=str(colour_set / "labels.csv"),
                  label=("colour",), split=(0.5, 0.25, 0.25), epochs=2, lr=3e-3, workers=0, eval_train=False,
                  device="cpu", test_clips=2)  # fmt: skip
    # 12 training videos in global batches of 10 = 5 x 2 ranks: in the second step rank 0 takes the last 2 videos
    # and rank 1 none (an empty step that keeps the collectives in line)
    single = finetune(FinetuneConfig(**common, batch_size=10, out=str(tmp_path / "one")))
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(cfg={**common, "batch_size": 5, "out": str(tmp_path / "two")}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(_free_port()), str(script)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "global batch 10 = 5 x 2 ranks" in proc.stderr
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["n"]["train"] == 12
    assert len(two["history"]) == len(single.history) == 2
    for a, b in zip(single.history, two["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val"]["loss"] == pytest.approx(a["val"]["loss"], rel=1e-4)
    assert single.history[0]["train_loss"] != pytest.approx(single.history[1]["train_loss"], rel=1e-3)  # it trains
    assert (tmp_path / "two" / "best.pt").is_file()
