"""torch.compile of the transformer blocks (`Marlin.compile_blocks`, ``compile=true``, ``--compile``): in place, so
state dicts and checkpoints keep their keys; the real compiler gives the eager numbers (slow: it compiles)."""

from __future__ import annotations

import argparse

import pytest
import torch

from marlin import Marlin, get_config
from marlin.cli import main
from marlin.train import Pretrainer, load_config


def _compiled(module: torch.nn.Module) -> bool:
    return module._compiled_call_impl is not None


def test_compile_blocks_compiles_each_block_in_place_and_keeps_the_state_dict(tmp_path) -> None:
    model = Marlin(get_config("marlin_vit_tiny_test"), as_feature_extractor=False)
    keys = list(model.state_dict())
    x = torch.rand(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = model.extract_features(x, keep_seq=True)
        assert model.compile_blocks(backend="eager") is model
        assert all(_compiled(b) for b in [*model.encoder.blocks, *model.decoder.blocks])
        assert not _compiled(model) and not _compiled(model.encoder)
        torch.testing.assert_close(model.extract_features(x, keep_seq=True), ref)
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefixes: checkpoints load into a plain model
    torch.save(model.state_dict(), tmp_path / "w.pt")
    plain = Marlin(get_config("marlin_vit_tiny_test"), as_feature_extractor=False)
    plain.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))


def test_compile_options_reach_pretraining_finetuning_and_extraction(tmp_path, capsys, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(type(self).__name__))
    cfg = load_config(
        "marlin_vit_tiny_test", [f"out_dir={tmp_path}", "compile=true", "data.source=synthetic", "mask.ratio=0.5"]
    )
    Pretrainer(cfg)
    assert seen == ["Block"] * (cfg.model.encoder_depth + cfg.model.decoder_depth)
    assert main(["pretrain", "--config", "marlin_vit_tiny_test", "--compile", "--print-config", "mask.ratio=0.5"]) == 0
    assert "compile: true" in capsys.readouterr().out

    from marlin.commands import extract, finetune

    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    assert finetune.config_from_args(p.parse_args(["--labels", "x.csv", "--out", "o", "--compile"])).compile
    p = argparse.ArgumentParser()
    extract.add_arguments(p)
    seen.clear()
    args = p.parse_args(["v.mp4", "--model", "marlin_vit_tiny_test", "--random-init", "--dtype", "fp32", "--compile"])
    extract._model(args, "cpu")
    assert seen == ["Block"] * get_config("marlin_vit_tiny_test").encoder_depth


@pytest.mark.slow  # the real compiler: tens of seconds on a CPU
def test_inductor_compiled_blocks_give_the_eager_numbers_and_train(tmp_path) -> None:
    model = Marlin(get_config("marlin_vit_tiny_test")).eval()
    x = torch.rand(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = model.extract_features(x, keep_seq=True)
        torch.testing.assert_close(model.compile_blocks().extract_features(x, keep_seq=True), ref, atol=1e-5, rtol=1e-5)
    overrides = [f"out_dir={tmp_path}", "compile=true", "data.source=synthetic", "mask.ratio=0.5", "max_steps=2",
                 "batch_size=2", "data.num_workers=0", "precision=fp32", "data.synthetic_size=4",
                 "log.tensorboard=false"]  # fmt: skip
    cfg = load_config("marlin_vit_tiny_test", overrides)
    history = Pretrainer(cfg).fit().history
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss/rec"])) for h in history)
