"""Evaluation protocols beyond the linear probe: the attentive probe, layer-wise features, the clean GRID split and
bootstrap intervals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from marlin.evaluate.attentive import AttentiveConfig, AttentivePooler, AttentiveProbe
from marlin.evaluate.features import FeatureError, load_features
from marlin.evaluate.linear import LinearProbe
from marlin.evaluate.manifest import LabelSet, grid_protocol_splits, read_grid, read_labels
from marlin.evaluate.metrics import bootstrap_interval
from marlin.evaluate.probe import ProbeConfig, run_probe


def marker_tokens(n: int, length: int = 16, dim: int = 16, k: int = 4, seed: int = 0):
    """Tokens where one position per clip (a different one each time, flagged by a fixed marker direction) carries its
    class; every other token carries a random class's prototype. Mean pooling mixes the answer with 15 distractors,
    attending to the marked token recovers it."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(k, dim)).astype(np.float32) * 2
    marker = np.zeros(dim, np.float32)
    marker[0] = 6.0
    y = rng.integers(0, k, n)
    x = protos[rng.integers(0, k, (n, length))] + rng.normal(size=(n, length, dim)).astype(np.float32) * 0.3
    pos = rng.integers(0, length, n)
    x[np.arange(n), pos] = protos[y] + marker
    return x, y


def test_attentive_pooler_is_multihead_cross_attention_with_one_query():
    torch.manual_seed(0)
    dim, heads, b, length = 32, 4, 3, 11
    pooler = AttentivePooler(dim, 5, heads=heads)
    x = torch.randn(b, length, dim)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 7:] = False  # a shorter clip, padded
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pooler.q_proj.weight, pooler.k_proj.weight, pooler.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pooler.q_proj.bias, pooler.k_proj.bias, pooler.v_proj.bias]))
        mha.out_proj.load_state_dict(pooler.out_proj.state_dict())
        xn = pooler.norm_x(x)
        ref, ref_w = mha(pooler.query.expand(b, 1, dim), xn, xn, key_padding_mask=~mask, average_attn_weights=False)
        ours, attn = pooler.attend(x, mask)
    assert torch.allclose(ours[:, 0], ref[:, 0], atol=1e-5)
    assert torch.allclose(attn[:, 0].permute(0, 2, 1), ref_w[:, :, 0], atol=1e-6)  # [B, H, L]
    assert attn[1, 0, 7:].abs().max() == 0  # padded tokens get no weight
    assert pooler(x, mask).shape == (b, 5)


def test_attentive_probe_finds_the_token_that_mean_pooling_drowns():
    x, y = marker_tokens(500)
    cfg = AttentiveConfig(epochs=25, lr_grid=(3e-3,), batch_size=32)
    probe = AttentiveProbe("multiclass", 4, cfg).fit(x[:400], y[:400])
    att = (probe.scores(x[400:]).argmax(1) == y[400:]).mean()
    lin = LinearProbe("multiclass", 4, l2=1e-3).fit(x[:400].mean(1), y[:400])
    mean_pooled = (lin.scores(x[400:].mean(1)).argmax(1) == y[400:]).mean()
    assert att > 0.9 and att > mean_pooled + 0.2, (att, mean_pooled)
    assert probe.chosen["lr"] == 3e-3 and 1 <= probe.chosen["epochs"] <= 25 and "val_score" in probe.chosen
    # tokens that differ little between clips on top of a large shared part (a frozen encoder's) are standardised
    # on the training rows first: the same accuracy
    shifted = x * 0.01 + 5.0
    probe2 = AttentiveProbe("multiclass", 4, cfg).fit(shifted[:400], y[:400])
    assert (probe2.scores(shifted[400:]).argmax(1) == y[400:]).mean() > 0.9


def test_time_steps_pool_each_group_alone_and_keep_their_order():
    torch.manual_seed(0)
    dim, b, steps, per = 16, 4, 3, 5
    grouped = AttentivePooler(dim, 2, heads=2, time_steps=steps)
    single = AttentivePooler(dim, 2, heads=2)
    single.load_state_dict({k: v for k, v in grouped.state_dict().items() if not k.startswith("head.")}, strict=False)
    x = torch.randn(b, steps * per, dim)
    with torch.no_grad():
        out, attn = grouped.attend(x)
        for t in range(steps):  # each time step's tokens alone
            ref, ref_attn = single.attend(x[:, t * per : (t + 1) * per])
            assert torch.allclose(out[:, t], ref[:, 0], atol=1e-6) and torch.allclose(attn[:, t], ref_attn[:, 0])
    with pytest.raises(ValueError, match="do not divide into 3 time steps"):
        grouped(torch.randn(1, 7, dim))
    with pytest.raises(ValueError, match="time_steps must be >= 1"):
        AttentivePooler(dim, 2, heads=2, time_steps=0)
    # the label is the ORDER of two events (A then B, or B then A): one pool over the clip sees the same bag of tokens
    # either way (no position embedding), the per-time-step pool sees which came first
    rng = np.random.default_rng(0)
    a, bb = rng.normal(size=(2, dim)).astype(np.float32) * 3
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 2, per, dim)).astype(np.float32) * 0.3
    slot = rng.integers(0, per, (400, 2))
    for i in range(400):
        first, second = (a, bb) if y[i] else (bb, a)
        x[i, 0, slot[i, 0]] += first
        x[i, 1, slot[i, 1]] += second
    x = x.reshape(400, 2 * per, dim)
    accs = {}
    for t in (1, 2):
        cfg = AttentiveConfig(epochs=15, lr_grid=(3e-3,), positions=False, time_steps=t)
        probe = AttentiveProbe("multiclass", 2, cfg).fit(x[:300], y[:300], select=False)
        accs[t] = (probe.scores(x[300:]).argmax(1) == y[300:]).mean()
    assert accs[2] > 0.95 and accs[1] < 0.7, accs


def test_attentive_probe_regression_and_binary_shapes():
    x, y = marker_tokens(120, k=2)
    cfg = AttentiveConfig(epochs=3, lr_grid=(1e-3,))
    assert AttentiveProbe("binary", 1, cfg).fit(x, y).scores(x).shape == (120,)
    reg = AttentiveProbe("regression", 2, cfg).fit(x, np.stack([y * 10.0, -y * 10.0], 1), select=False)
    s = reg.scores(x)
    assert s.shape == (120, 2) and abs(s.mean()) < 10  # predictions come back in the targets' units
    with pytest.raises(ValueError, match=r"tokens \[N, L, D\]"):
        AttentiveProbe("binary", 1, cfg).fit(x.mean(1), y)


def test_attentive_probe_device_auto_trains_where_torch_sees_a_gpu_and_a_missing_gpu_is_refused():
    x, y = marker_tokens(80, k=2)
    cfg = AttentiveConfig(epochs=2, lr_grid=(1e-3,))
    cpu = AttentiveProbe("multiclass", 2, cfg).fit(x, y, select=False).scores(x)
    auto = AttentiveProbe("multiclass", 2, AttentiveConfig(epochs=2, lr_grid=(1e-3,), device="auto"))
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        np.testing.assert_array_equal(auto.fit(x, y, select=False).scores(x), cpu)  # same seed, same device
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            AttentiveProbe("multiclass", 2, AttentiveConfig(epochs=2, device="cuda")).fit(x, y)


def test_run_probe_attentive_head_on_a_fixed_split_with_interval():
    x, y = marker_tokens(300)
    splits = ["test" if i % 5 == 0 else "train" for i in range(300)]
    labels = LabelSet(paths=[Path(f"v{i}.mp4") for i in range(300)], targets=y, task="multiclass",
                      names=list("abcd"), splits=splits)  # fmt: skip
    cfg = ProbeConfig(head="attentive", folds=None,
                      attentive=AttentiveConfig(epochs=20, lr_grid=(1e-2,), batch_size=16))  # fmt: skip
    res = run_probe(x, labels, cfg)
    entry = res["by_fraction"]["1"]
    acc = entry["metrics"]["accuracy"]["mean"]
    assert res["head"] == "attentive" and entry["ci95"]["n_test"] == 60 and acc > 0.8
    assert entry["ci95"]["low"] <= acc <= entry["ci95"]["high"] and entry["chosen"][0]["lr"] == 1e-2
    with pytest.raises(ValueError, match="needs tokens"):
        run_probe(x.mean(1), labels, cfg)
    with pytest.raises(ValueError, match="head must be one of"):
        run_probe(x.mean(1), labels, ProbeConfig(head="mlp"))


def test_bootstrap_interval_brackets_the_score_and_narrows_with_more_tests():
    rng = np.random.default_rng(0)

    def interval(n: int) -> tuple[float, float, float]:
        y = rng.integers(0, 2, n)
        scores = np.where(rng.random(n) < 0.8, y, 1 - y).astype(np.float64)  # 80% right
        s2 = np.stack([1 - scores, scores], 1)
        lo, hi = bootstrap_interval("multiclass", y, s2, seed=1)
        return lo, hi, float((s2.argmax(1) == y).mean())

    lo, hi, acc = interval(100)
    assert lo < acc < hi and 0.1 < hi - lo < 0.25  # ~ 2 * 1.96 * sqrt(.8 * .2 / 100) = 0.16
    lo2, hi2, acc2 = interval(2000)
    assert lo2 < acc2 < hi2 and hi2 - lo2 < (hi - lo) / 3
    y = np.array([0, 1, 1, 0])
    s = np.eye(2)[[0, 1, 0, 0]]
    assert bootstrap_interval("multiclass", y, s, seed=3) == bootstrap_interval("multiclass", y, s, seed=3)


def write_grid(root: Path, n: int = 250) -> Path:
    (root / "videos").mkdir(parents=True)
    letters = "abcdefghij"
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "command", "color", "preposition", "letter", "digit", "adverb"])
        for i in range(n):
            w.writerow([f"s{i:03d}.mp4", "bin", "red", "at", letters[i % 10], str(i % 7), "now"])
    return root


def test_grid_protocol_split_is_fixed_stratified_and_used_by_read_labels(tmp_path):
    root = write_grid(tmp_path / "grid")
    splits = grid_protocol_splits(root)
    assert splits == grid_protocol_splits(root) and splits != grid_protocol_splits(root, seed=1)
    assert splits.count("test") == 50 and set(splits) == {"train", "test"}
    letters = [r["letter"] for r in csv.DictReader(open(root / "labels.csv"))]
    for letter in set(letters):  # 25 sentences per letter: exactly 5 of each in test
        assert sum(s == "test" for s, lt in zip(splits, letters, strict=True) if lt == letter) == 5
    assert read_labels(root, ["digit"]).splits == splits  # `marlin probe --split fixed` uses it
    assert read_grid(root, "digit").splits is None


def test_grid_protocol_split_on_real_grid(shared_data):
    splits = grid_protocol_splits(shared_data / "grid_s1")
    assert len(splits) == 1000 and splits.count("test") == 200


def test_at_layer_gives_the_first_blocks_features_and_shares_weights():
    from marlin.models.model import create_model
    from marlin.models.registry import get_config

    torch.manual_seed(0)
    model = create_model(get_config("marlin_vit_tiny_test")).eval()
    depth = len(model.encoder.blocks)
    cut = model.at_layer(1)
    x = torch.rand(2, 3, model.config.clip_frames, model.config.img_size, model.config.img_size)
    with torch.no_grad():
        enc = model.encoder
        ref = enc.norm(enc.blocks[0](enc.embed(x)))  # [B, N, D]
        assert torch.allclose(cut.extract_features(x, keep_seq=True), ref, atol=1e-6)
        assert torch.allclose(cut.extract_features(x, keep_seq=False), enc.norm(enc.blocks[0](enc.embed(x)).mean(1)))
    assert len(model.encoder.blocks) == depth and len(cut.encoder.blocks) == 1  # the original keeps its blocks
    assert cut.encoder.blocks[0] is model.encoder.blocks[0] and model.at_layer(depth) is model
    with pytest.raises(ValueError, match="layer must be in"):
        model.at_layer(depth + 1)
    with pytest.raises(ValueError, match="cut at layer 1 cannot be saved"):
        cut.save_pretrained("/nonexistent/never-written")


def test_load_features_tokens_for_the_attentive_probe(tmp_path):
    labels = LabelSet(paths=[Path(f"v{i}.mp4") for i in range(3)], targets=np.array([0, 1, 0]), task="multiclass",
                      names=["a", "b"])  # fmt: skip
    (tmp_path / "f").mkdir()
    for i in range(3):
        np.save(tmp_path / "f" / f"v{i}.npy", np.full((2, 5, 4), i, np.float32))  # [W, L, D] (--keep-seq)
    assert load_features(tmp_path / "f", labels, "mean", tokens=True).shape == (3, 5, 4)
    assert load_features(tmp_path / "f", labels, "concat", tokens=True).shape == (3, 10, 4)
    assert load_features(tmp_path / "f", labels, "mean").shape == (3, 4)  # pooled as before
    np.save(tmp_path / "f" / "v1.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(FeatureError, match="--keep-seq"):
        load_features(tmp_path / "f", labels, "mean", tokens=True)


def test_cli_probe_attentive_head_and_layer_extract_on_the_fly(tmp_path, capsys):
    from marlin.cli import main
    from videogen import write_video

    rows = []
    (tmp_path / "videos").mkdir()
    for i in range(12):
        write_video(tmp_path / "videos" / f"c{i}.mp4", n_frames=8 + i % 3, height=32, width=32)
        rows.append({"path": str(tmp_path / "videos" / f"c{i}.mp4"), "kind": "ab"[i % 2]})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "kind"])
        w.writeheader()
        w.writerows(rows)
    rc = main(
        [
            "probe",
            "--labels",
            str(tmp_path / "m.csv"),
            "--label",
            "kind",
            "--model",
            "marlin_vit_tiny_test",
            "--random-init",
            "--layer",
            "1",
            "--head",
            "attentive",
            "--time-steps",
            "2",
            "--folds",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "attentive head" in captured.out and "95% bootstrap interval" in captured.out
    if not torch.cuda.is_available():
        argv = ["probe", "--labels", str(tmp_path / "m.csv"), "--label", "kind", "--device", "cuda"]
        assert main([*argv, "--out", str(tmp_path / "o2")]) == 2
        assert "--device cuda: torch sees no CUDA GPU here" in capsys.readouterr().err
    feats = list((tmp_path / "o" / "features_layer1_tokens").glob("*.npy"))
    assert len(feats) == 12 and np.load(feats[0]).ndim == 3  # [W, L, D] tokens were extracted
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["head"] == "attentive" and res["config"]["extra"]["layer"] == 1
    assert res["config"]["attentive"]["time_steps"] == 2
    rc = main(["probe", "--labels", str(tmp_path / "m.csv"), "--label", "kind", "--features", str(feats[0].parent),
               "--layer", "2", "--out", str(tmp_path / "o2")])  # fmt: skip
    assert rc == 2 and "--layer" in capsys.readouterr().err
    rc = main(["probe", "--labels", str(tmp_path / "m.csv"), "--label", "kind", "--features", str(feats[0].parent),
               "--time-steps", "2", "--out", str(tmp_path / "o3")])  # fmt: skip
    assert rc == 2 and "--time-steps is an option of the attentive head" in capsys.readouterr().err
