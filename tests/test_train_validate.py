"""Held-out reconstruction error during pretraining (marlin.train.validate and the loop's use of it)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from marlin import Marlin
from marlin.data.synthetic import SyntheticClips
from marlin.mae.losses import masked_targets
from marlin.train import Pretrainer, load_config
from marlin.train.inputs import build_val_sets, val_indices
from marlin.train.validate import validate
from test_data import make_store

ARGS = ["mask.ratio=0.5", "data.num_workers=0", "batch_size=2", "ckpt.export=false", "optim.warmup_steps=1",
        "log.tensorboard=false", "optim.lr=0.05"]  # fmt: skip


class _Oracle(nn.Module):
    """Predicts the hidden patches from the full clip: exactly (`mode="truth"`) or as the clip's mean colour."""

    def __init__(self, config, mode: str, normalize: bool = False) -> None:
        super().__init__()
        self.config, self.mode, self.normalize = config, mode, normalize
        self.dummy = nn.Parameter(torch.zeros(1))  # validate() reads the device from the parameters

    def forward(self, video: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        c = self.config
        target = masked_targets(video, visible, c.tubelet_size, c.patch_size, normalize=self.normalize)
        if self.mode == "truth":
            return target
        if self.mode == "zero":
            return torch.zeros_like(target)
        mean = video.mean(dim=(2, 3, 4))  # [B, C]
        return mean.repeat_interleave(target.shape[-1] // c.in_chans, dim=1)[:, None].expand_as(target)


def test_metrics_score_the_perfect_and_the_mean_predictor() -> None:
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, "mask.strategy=fasking"])
    data = SyntheticClips(5, cfg.model, seed=0)
    idx = list(range(5))
    perfect = validate(_Oracle(cfg.model, "truth"), data, idx, cfg)
    assert perfect["val/clips"] == 5 and perfect["val/mse"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["val/clip_mean_mse"] > 0.01
    mean = validate(_Oracle(cfg.model, "mean"), data, idx, cfg)
    assert mean["val/mse"] == pytest.approx(mean["val/clip_mean_mse"], rel=1e-6)
    assert mean["val/clip_mean_mse"] == perfect["val/clip_mean_mse"]  # baselines do not depend on the model
    # Two ranks' shards together are the whole set (the all-reduce adds sums and counts).
    halves = [validate(_Oracle(cfg.model, "mean"), data, idx, cfg, rank=r, world_size=2) for r in (0, 1)]
    assert [h["val/clips"] for h in halves] == [3, 2]
    whole = (halves[0]["val/mse"] * 3 + halves[1]["val/mse"] * 2) / 5
    assert whole == pytest.approx(mean["val/mse"], rel=1e-9)

    norm = load_config("marlin_vit_tiny_test", [*ARGS, "mask.strategy=tube", "loss.norm_target=true"])
    zero = validate(_Oracle(norm.model, "zero", normalize=True), data, idx, norm)
    assert set(zero) == {"val/rec", "val/patch_mean_rec", "val/clips"}
    assert zero["val/rec"] == pytest.approx(zero["val/patch_mean_rec"], rel=1e-6)
    assert 0.5 < zero["val/patch_mean_rec"] < 1.0  # unit-variance patches, unbiased std + eps
    assert validate(_Oracle(norm.model, "truth", normalize=True), data, idx, norm)["val/rec"] < 1e-12


def test_masks_and_clips_are_fixed_across_evaluations() -> None:
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, "mask.strategy=fasking"])
    data = SyntheticClips(4, cfg.model, seed=0)
    model = Marlin(cfg.model, as_feature_extractor=False)
    a = validate(model, data, [0, 1, 2, 3], cfg)
    torch.manual_seed(99)  # the global RNG must not matter
    b = validate(model, data, [0, 1, 2, 3], cfg)
    assert a == b
    assert model.training  # train mode restored


def test_val_indices_spread_evenly() -> None:
    assert val_indices(3, 64) == [0, 1, 2]
    assert val_indices(100, 5) == [0, 25, 50, 74, 99]
    assert val_indices(10, 1) == [0]


def test_val_source_auto_explicit_and_none(tmp_path) -> None:
    store = make_store(tmp_path / "s", {"a": 20, "b": 20, "c": 20}, splits={"b": "val"})
    other = make_store(tmp_path / "o", {"x": 20, "y": 20}, splits={"x": "val", "y": "val"})
    base = [*ARGS, f"data.source={store}"]
    auto = build_val_sets(load_config("marlin_vit_tiny_test", base))
    assert list(auto) == ["s"] and [it.id for it in auto["s"].items] == ["b"] and auto["s"].mode == "eval"
    both = build_val_sets(load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={store},{other}"]))
    assert {k: [it.id for it in v.items] for k, v in both.items()} == {"s": ["b"], "o": ["x", "y"]}
    explicit = build_val_sets(load_config("marlin_vit_tiny_test", [*base, f"val.source={store}"]))
    assert [it.id for it in explicit["s"].items] == ["a", "b", "c"]
    # STORE#val: one store's held-out split only; the other training store's val split stays out of everything
    one = build_val_sets(load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={store},{other}",
                                                               f"val.source={store}#val"]))  # fmt: skip
    assert {k: [it.id for it in v.items] for k, v in one.items()} == {"s": ["b"]}
    assert build_val_sets(load_config("marlin_vit_tiny_test", [*base, "val.source=none"])) == {}
    assert build_val_sets(load_config("marlin_vit_tiny_test", [*ARGS, "data.source=synthetic"])) == {}
    no_val = make_store(tmp_path / "t", {"a": 20})
    assert build_val_sets(load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={no_val}"])) == {}
    twins = [make_store(tmp_path / d / "store", {"a": 20, "b": 20}, splits={"b": "val"}) for d in ("p", "q")]
    named = build_val_sets(load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={twins[0]},{twins[1]}"]))
    assert list(named) == ["store", "store_2"]  # same folder name, two sets


def test_fit_logs_the_heldout_error(tmp_path, caplog) -> None:
    store = make_store(tmp_path / "s", {"a": 20, "b": 20, "c": 30}, splits={"c": "val"})
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={store}", f"out_dir={tmp_path / 'run'}",
                                               "max_steps=5", "val.every=2", "mask.strategy=fasking"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="marlin"):
        result = Pretrainer(cfg).fit()
    assert [v["step"] for v in result.val] == [2, 4, 5]  # every 2 steps and at the end
    assert all(v["val/clips"] == 1 for v in result.val)
    assert len({v["val/clip_mean_mse"] for v in result.val}) == 1  # same clip and masks each time
    assert len({v["val/mse"] for v in result.val}) == 3  # the model changed between evaluations
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "val/mse" in r]
    assert [r["step"] for r in logged] == [2, 4, 5] and logged[-1]["val/mse"] == result.val[-1]["val/mse"]
    images = sorted(p.name for p in (tmp_path / "run/images").glob("heldout_*.png"))
    assert images == [f"heldout_s_step_000000{k}.png" for k in (2, 4, 5)]  # the held-out clip, at each evaluation
    grid = np.asarray(Image.open(tmp_path / "run/images" / images[0]))
    assert grid.shape == (3 * 32 + 2 * 2, 2 * 32 + 2, 3) and (grid[34:66] == 128).any()  # masked row: grey patches
    lines = [r.message for r in caplog.records if r.message.startswith("held-out step")]
    assert len(lines) == 3 and lines[0].startswith("held-out step 2, s: hidden-patch MSE")
    assert "clip's mean colour" in lines[0]
    assert any("every 2 steps on 1 of 1 clips of s" in r.message for r in caplog.records)


def test_several_held_out_sets_are_scored_apart(tmp_path) -> None:
    grid = make_store(tmp_path / "grid", {"a": 20, "b": 20}, splits={"b": "val"})
    heads = make_store(tmp_path / "heads", {"x": 20, "y": 30}, splits={"y": "val"})
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={grid},{heads}", f"out_dir={tmp_path / 'run'}",
                                               "max_steps=2", "val.every=2", "mask.strategy=tube"])  # fmt: skip
    result = Pretrainer(cfg).fit()
    (last,) = result.val
    assert last["val/grid/clips"] == last["val/heads/clips"] == 1
    assert {"val/grid/mse", "val/heads/mse", "val/grid/clip_mean_mse"} <= set(last) and "val/mse" not in last
    assert last["val/grid/clip_mean_mse"] != last["val/heads/clip_mean_mse"]  # different clips (20 vs 30 frames)


def test_a_failing_held_out_set_does_not_end_the_run(tmp_path, caplog, monkeypatch) -> None:
    store = make_store(tmp_path / "s", {"a": 20, "b": 20}, splits={"b": "val"})
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"data.source={store}", f"out_dir={tmp_path / 'run'}",
                                               "max_steps=4", "val.every=2", "mask.strategy=tube"])  # fmt: skip

    from marlin.data.store import ClipStore

    real = ClipStore.read_video

    def read_video(self, item, frames):  # the held-out item "b" is corrupt
        if item.id == "b":
            raise OSError(f"{item.id}: truncated JPEG stream")
        return real(self, item, frames)

    monkeypatch.setattr(ClipStore, "read_video", read_video)
    with caplog.at_level(logging.WARNING, logger="marlin"):
        result = Pretrainer(cfg).fit()
    assert result.steps == 4 and result.val == [] and result.checkpoint.is_file()
    (warning,) = [r.message for r in caplog.records if "held-out evaluation" in r.message]
    assert warning.startswith("held-out evaluation at step 2 failed (OSError: b: truncated JPEG stream)")
