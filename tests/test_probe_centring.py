"""Centring time-kept features in the linear and attentive probes (``ProbeConfig.centre``, ``marlin probe
--centre``): what a clip holds constant goes, what changes within it stays, and ``auto`` chooses on training data
only."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from marlin.evaluate.attentive import AttentiveConfig, centre_tokens
from marlin.evaluate.features import load_features
from marlin.evaluate.linear import centre_steps
from marlin.evaluate.manifest import LabelSet
from marlin.evaluate.probe import ProbeConfig, run_probe


def clips(n: int = 240, steps: int = 6, dim: int = 8, k: int = 3, where: str = "change", seed: int = 0):
    """Time-kept features ``[n, steps, dim]`` and classes. ``change``: the class is a pattern over the steps (zero
    mean over them) under a large per-clip constant (a nuisance 10x its size, like who / light / session);
    ``constant``: the class is the per-clip constant and nothing changes over the steps but noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    noise = rng.normal(size=(n, steps, dim)) * 0.3
    if where == "change":
        pattern = rng.normal(size=(k, steps, dim))
        pattern -= pattern.mean(1, keepdims=True)
        offset = rng.normal(size=(n, 1, dim)) * 10.0
        x = pattern[y] + offset + noise
    else:
        protos = rng.normal(size=(k, 1, dim)) * 3.0
        x = protos[y] + noise
    return x.astype(np.float32), y


def labelset(y: np.ndarray) -> LabelSet:
    splits = ["test" if i % 4 == 0 else "train" for i in range(len(y))]
    return LabelSet(paths=[Path(f"v{i}.mp4") for i in range(len(y))], targets=y, task="multiclass",
                    names=[str(c) for c in range(int(y.max()) + 1)], splits=splits)  # fmt: skip


def accuracy(x: np.ndarray, y: np.ndarray, **cfg) -> tuple[float, list]:
    res = run_probe(x, labelset(y), ProbeConfig(folds=None, **cfg))["by_fraction"]["1"]
    return res["metrics"]["accuracy"]["mean"], res["l2"]


def test_centre_steps_removes_each_clips_mean_and_keeps_the_changes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 6, 3)) + 7.0
    c = centre_steps(x)  # one clip of 6 steps per sample
    assert c.shape == x.shape and np.allclose(c.mean(1), 0)
    assert np.allclose(np.diff(c, axis=1), np.diff(x, axis=1))  # step-to-step changes untouched
    c2 = centre_steps(x, clip_steps=3)  # two clips of 3 steps
    assert np.allclose(c2.reshape(5, 2, 3, 3).mean(2), 0)
    assert np.allclose(c2[:, :3], centre_steps(x[:, :3]))
    assert not np.allclose(c2, c)
    with pytest.raises(ValueError, match="do not split into clips of 4"):
        centre_steps(x, clip_steps=4)
    with pytest.raises(ValueError, match=r"\[N, S, D\]"):
        centre_steps(x.reshape(5, -1))


def test_centring_recovers_a_class_under_a_per_clip_constant_and_auto_chooses_it():
    x, y = clips(where="change")
    off, _ = accuracy(x, y, pca=4)  # the 4 leading directions are the nuisance: chance
    on, _ = accuracy(x, y, pca=4, centre="on")
    auto, chosen = accuracy(x, y, pca=4, centre="auto")
    assert off < 0.55 and on > 0.9
    assert auto == on and chosen[0]["centred"] is True


def test_auto_keeps_the_features_as_they_are_when_the_class_is_the_constant():
    x, y = clips(where="constant")
    off, _ = accuracy(x, y, pca=4)
    on, _ = accuracy(x, y, pca=4, centre="on")
    auto, chosen = accuracy(x, y, pca=4, centre="auto")
    assert off > 0.9 and on < 0.55  # centring throws the class away
    assert auto == off and chosen[0]["centred"] is False


def test_auto_chooses_inside_the_training_part_under_k_fold_too():
    x, y = clips(where="change", n=150)
    labels = LabelSet(paths=[Path(f"v{i}.mp4") for i in range(len(y))], targets=y, task="multiclass",
                      names=["0", "1", "2"])  # fmt: skip
    res = run_probe(x, labels, ProbeConfig(folds=3, pca=4, centre="auto"))["by_fraction"]["1"]
    assert [c["centred"] for c in res["l2"]] == [True, True, True]
    assert res["metrics"]["accuracy"]["mean"] > 0.9


def test_centring_options_are_checked():
    x, y = clips(n=40)
    with pytest.raises(ValueError, match="needs time-kept features"):
        accuracy(x.reshape(len(x), -1), y, centre="on")
    with pytest.raises(ValueError, match="leave l2 unset"):
        accuracy(x, y, centre="auto", l2=1e-3)
    with pytest.raises(ValueError, match="centre must be one of"):
        accuracy(x, y, centre="yes")
    with pytest.raises(ValueError, match="do not split into clips of 4"):
        accuracy(x, y, centre="on", clip_steps=4)
    with pytest.raises(ValueError, match="needs their time steps"):
        accuracy(x, y, centre="on", head="attentive")  # one pool over all tokens: no time steps to centre over
    with pytest.raises(ValueError, match="6 time steps do not split into clips of 4"):
        accuracy(x, y, centre="on", head="attentive", clip_steps=4, attentive=AttentiveConfig(time_steps=6))
    flat, _ = accuracy(x.reshape(len(x), -1), y)
    kept, _ = accuracy(x, y)  # time-kept features without centring: flattened, the same probe
    assert flat == kept


def tokens(n: int = 200, steps: int = 4, places: int = 3, dim: int = 8, k: int = 3, where: str = "change"):
    """Tokens ``[n, steps * places, dim]`` (time step major) and classes, as :func:`clips` with a per-clip constant
    of its own at every place."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    noise = rng.normal(size=(n, steps, places, dim)) * 0.3
    if where == "change":
        pattern = rng.normal(size=(k, steps, places, dim))
        pattern -= pattern.mean(1, keepdims=True)
        x = pattern[y] + rng.normal(size=(n, 1, places, dim)) * 10.0 + noise
    else:
        x = rng.normal(size=(k, 1, places, dim))[y] * 3.0 + noise
    return x.reshape(n, steps * places, dim).astype(np.float32), y


def test_centre_tokens_centres_each_place_over_its_clips_steps():
    x, _ = tokens(n=5, steps=6)
    c = centre_tokens(x, time_steps=6)
    per_place = c.reshape(5, 6, 3, 8)
    assert np.allclose(per_place.mean(1), 0, atol=1e-5)
    assert np.allclose(per_place[:, :, 1], centre_steps(x.reshape(5, 6, 3, 8)[:, :, 1]), atol=1e-5)
    halves = centre_tokens(x, time_steps=6, clip_steps=3).reshape(5, 2, 3, 3, 8)  # two clips of 3 steps
    assert np.allclose(halves.mean(2), 0, atol=1e-5)
    with pytest.raises(ValueError, match="in 5 time steps"):
        centre_tokens(x, time_steps=5)


@pytest.mark.parametrize("where", ["change", "constant"])
def test_attentive_centring_auto_takes_what_the_validation_part_prefers(where):
    """A class that changes over time under a per-clip constant at every place is at chance for the attentive probe
    as it is and found centred; a class that is the constant is kept by leaving the tokens as they are."""
    x, y = tokens(where=where)
    acfg = AttentiveConfig(time_steps=4, epochs=10, lr_grid=(3e-3,))
    runs = {}
    for centre in ("off", "on", "auto"):
        res = run_probe(x, labelset(y), ProbeConfig(head="attentive", folds=None, centre=centre, attentive=acfg))
        runs[centre] = res["by_fraction"]["1"]
    acc = {c: r["metrics"]["accuracy"]["mean"] for c, r in runs.items()}
    kept, lost = ("on", "off") if where == "change" else ("off", "on")
    assert acc[kept] > 0.9 and acc[lost] < 0.6
    assert acc["auto"] == acc[kept] and runs["auto"]["chosen"][0]["centred"] is (where == "change")


def test_cli_probe_centre_on_window_features(tmp_path, capsys):
    from marlin.cli import main

    x, y = clips(where="change", n=120)
    (tmp_path / "f").mkdir()
    rows = []
    for i in range(len(y)):
        np.save(tmp_path / "f" / f"v{i}.npy", x[i])  # [W, D]: one feature per window, as `marlin extract` writes
        rows.append({"path": f"v{i}.mp4", "word": str(y[i])})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "word"])
        w.writeheader()
        w.writerows(rows)
    assert load_features(tmp_path / "f", labelset(y), "concat", keep_steps=True).shape == (120, 6, 8)
    base = ["probe", "--labels", str(tmp_path / "m.csv"), "--label", "word", "--features", str(tmp_path / "f"),
            "--folds", "3", "--pca", "4", "--no-plot"]  # fmt: skip
    assert main([*base, "--centre", "auto", "--out", str(tmp_path / "o")]) == 2  # windows pooled: nothing to centre
    assert "--reduce concat" in capsys.readouterr().err
    assert main([*base, "--reduce", "concat", "--centre", "auto", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["config"]["centre"] == "auto" and all(c["centred"] for c in res["by_fraction"]["1"]["l2"])
    assert res["by_fraction"]["1"]["metrics"]["accuracy"]["mean"] > 0.9
    assert main([*base, "--reduce", "concat", "--out", str(tmp_path / "o2")]) == 0  # uncentred: the nuisance wins
    res = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert res["by_fraction"]["1"]["metrics"]["accuracy"]["mean"] < 0.6


def test_cli_probe_centre_with_the_attentive_head(tmp_path, capsys):
    from marlin.cli import main

    x, y = tokens(n=90)
    (tmp_path / "f").mkdir()
    for i in range(len(y)):
        np.save(tmp_path / "f" / f"v{i}.npy", x[i][None])  # [W, L, D]: one window's tokens (--keep-seq)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        f.write("path,word\n" + "".join(f"v{i}.mp4,{y[i]}\n" for i in range(len(y))))
    base = ["probe", "--labels", str(tmp_path / "m.csv"), "--label", "word", "--features", str(tmp_path / "f"),
            "--head", "attentive", "--split", "fixed", "--no-plot", "--centre", "on"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "o")]) == 2  # one pool over all tokens: no time steps
    assert "--time-steps" in capsys.readouterr().err
    assert main([*base, "--time-steps", "4", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["config"]["centre"] == "on" and all(c["centred"] for c in res["by_fraction"]["1"]["chosen"])
    assert res["by_fraction"]["1"]["metrics"]["accuracy"]["mean"] > 0.9
