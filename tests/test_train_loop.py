"""The loop: logging (JSONL, console ETA, images), bf16 autocast and activation checkpointing, the CLI command."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from marlin import Marlin
from marlin.cli import main
from marlin.train import Pretrainer, load_config

ARGS = ["mask.ratio=0.5", "data.num_workers=0", "data.synthetic_size=6", "batch_size=2", "ckpt.export=false",
        "optim.warmup_steps=1", "mask.strategy=fasking"]  # fmt: skip


def test_logging_scalars_console_and_images(tmp_path, caplog) -> None:
    cfg = load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}", "max_steps=4", "log.every=2",
                                               "log.image_every=2"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="marlin"):
        Pretrainer(cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss/rec", "loss/adv", "loss/gen", "loss/critic", "lr", "samples_per_s"} <= set(records[0])
    progress = [r.message for r in caplog.records if r.message.startswith("step ")]
    assert len(progress) == 2 and progress[0].startswith("step 2/4 (50.0%) | ") and "ETA" in progress[0]
    assert "samples/s" in progress[0] and "rec " in progress[0]
    images = sorted((tmp_path / "images").glob("*.png"))
    assert [p.name for p in images] == ["reconstruction_step_0000002.png", "reconstruction_step_0000004.png"]
    image = np.asarray(Image.open(images[0]))
    assert image.shape == (3 * 32 + 2 * 2, 2 * 32 + 2, 3)  # 3 rows (gt | masked | recon) x 2 tubelets of 32 px
    assert (image[34:66] == 128).any()  # the masked row shows grey hidden patches
    assert (tmp_path / "config.yaml").is_file()


def _losses(cfg) -> list[float]:
    trainer = Pretrainer(cfg)
    return [h["loss/rec"] for h in trainer.fit().history]


# fp32 (the default, auto, is bf16 on CPUs with bf16 units): these runs are compared with each other
COMMON = [*ARGS, "max_steps=4", "optim.lr=0.05", "log.tensorboard=false", "precision=fp32"]


def test_activation_checkpointing_changes_nothing(tmp_path) -> None:
    fp32 = _losses(load_config("marlin_vit_tiny_test", [*COMMON, f"out_dir={tmp_path / 'a'}"]))
    ckpt = _losses(load_config("marlin_vit_tiny_test", [*COMMON, f"out_dir={tmp_path / 'b'}",
                                                        "grad_checkpointing=true"]))  # fmt: skip
    np.testing.assert_allclose(ckpt, fp32, rtol=1e-5)


@pytest.mark.slow  # bf16 matmuls are several times slower than fp32 on CPUs without AVX512-BF16 / AMX
def test_bf16_autocast_tracks_fp32(tmp_path) -> None:
    fp32 = _losses(load_config("marlin_vit_tiny_test", [*COMMON, f"out_dir={tmp_path / 'a'}"]))
    bf16 = _losses(load_config("marlin_vit_tiny_test", [*COMMON, f"out_dir={tmp_path / 'c'}", "precision=bf16"]))
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)  # bf16 autocast follows the fp32 curve closely
    assert bf16 != fp32


def test_pretrain_command(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["pretrain", "--config", "marlin_vit_tiny_test", "--data", "synthetic", "--out", str(out), "--max-steps",
            "2", "--batch-size", "2", "--workers", "0", "mask.ratio=0.5", "data.synthetic_size=4"]  # fmt: skip
    assert main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "batch_size: 2" in printed and "max_steps: 2" in printed and "source: synthetic" in printed
    assert main(argv) == 0
    assert (out / "checkpoints/last.pt").is_file() and (out / "export/marlin_vit_tiny_test.full.pt").is_file()
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["step"] == 2
    assert main(["pretrain", "--config", "marlin_vit_tiny_test", "optim.nope=1"]) == 2
    assert "unknown key 'optim.nope'" in capsys.readouterr().err
    # Overrides may sit between options (argparse alone takes only the first run of positionals).
    assert main(["pretrain", "batch_size=3", "--data", "synthetic", "seed=7", "--print-config", "val.every=9"]) == 0
    printed = capsys.readouterr().out
    assert "batch_size: 3" in printed and "seed: 7" in printed and "every: 9" in printed
    with pytest.raises(SystemExit):
        main(["pretrain", "seed=7", "--print-config", "notanoverride"])
    assert "unrecognized arguments: notanoverride" in capsys.readouterr().err
    assert main(["pretrain", "--config", "marlin_vit_tiny_test", "optim.nope=1"]) == 2
    assert "unknown key 'optim.nope'" in capsys.readouterr().err
    assert main(["pretrain", "--export-from", str(out / "checkpoints/last.pt"), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e/export/marlin_vit_tiny_test/model.safetensors").is_file()


def test_init_from_a_previous_run(tmp_path) -> None:
    first = Pretrainer(load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path / 'a'}", "max_steps=1"]))
    result = first.fit()
    second = Pretrainer(load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path / 'b'}",
                                                             f"init={result.checkpoint}"]))  # fmt: skip
    for k, v in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k


def _videomae_key(key: str) -> str:
    """marlin -> VideoMAE pretraining key names (the inverse of the loader's mapping)."""
    key = re.sub(r"^enc_dec_proj\.", "encoder_to_decoder.", key)
    key = re.sub(r"^decoder\.mask_token$", "mask_token", key)
    key = key.replace(".patch_embedding.projection.", ".patch_embed.proj.")
    return re.sub(r"\.mlp\.layers\.(\d)\.linear\.", lambda m: f".mlp.fc{int(m.group(1)) + 1}.", key)


def test_init_from_a_videomae_checkpoint(tmp_path) -> None:
    donor = Marlin("marlin_vit_tiny_test", as_feature_extractor=False)
    sd = {_videomae_key(k): v for k, v in donor.state_dict().items() if "pos_embedding" not in k}
    torch.save({"model": sd}, tmp_path / "videomae.pth")
    trainer = Pretrainer(load_config("marlin_vit_tiny_test", [*ARGS, f"out_dir={tmp_path}",
                                                              f"init={tmp_path / 'videomae.pth'}"]))  # fmt: skip
    for k, v in donor.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v), k


def test_graceful_stop_first_signal_asks_a_second_ctrl_c_forces() -> None:
    import signal

    from marlin.utils.distributed import GracefulStop

    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop._handle(signal.SIGTERM, None)
        assert stop.signum == signal.SIGTERM and stop.agreed(torch.device("cpu")) == signal.SIGTERM
        stop._handle(signal.SIGINT, None)  # the same Ctrl-C delivered twice (terminal + torchrun): ignored
        assert stop.signum == signal.SIGTERM
        stop._first_at -= GracefulStop.REPEAT_AFTER_S + 0.1  # a later, deliberate second Ctrl-C: stop now
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
