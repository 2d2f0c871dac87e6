"""Register tokens (`MarlinConfig.num_registers`): carried through the blocks, never in an output, saved and loaded
with the model, learnt in pretraining, refused by the official layout."""

import pytest
import torch

import marlin
from marlin import Marlin
from marlin.models.checkpoint import CheckpointError, check_config_matches, infer_config
from marlin.utils.optim import layer_of, param_groups
from marlin.viz.attention import attention_received


@pytest.fixture
def reg_config(tiny_config):
    return tiny_config.replace(num_registers=3)


def _clips(cfg, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, cfg.clip_frames, cfg.img_size, cfg.img_size)


def test_the_released_architecture_has_no_register_parameter(tiny_config):
    m = Marlin(tiny_config)
    assert m.encoder.registers is None
    assert not any("registers" in k for k in m.state_dict())


def test_config_refuses_a_negative_or_fractional_count(tiny_config):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_registers"):
            tiny_config.replace(num_registers=bad)


def test_outputs_keep_one_row_per_patch_and_depend_on_the_registers(reg_config):
    m = Marlin(reg_config).eval()
    x = _clips(reg_config)
    seq = m.extract_features(x, keep_seq=True)
    assert seq.shape == (2, reg_config.num_tokens, reg_config.encoder_embed_dim)
    assert m.extract_features(x, keep_seq=False).shape == (2, reg_config.encoder_embed_dim)
    with torch.no_grad():
        m.encoder.registers.mul_(100.0)  # keys that stand out: the patches' attention moves to them
    assert (m.extract_features(x, keep_seq=True) - seq).abs().max() > 0.05


def test_iter_blocks_matches_run_blocks_and_at_layer(reg_config):
    m = Marlin(reg_config).eval()
    x = _clips(reg_config)
    enc = m.encoder
    with torch.no_grad():
        per_block = list(enc.iter_blocks(enc.embed(x)))
        assert len(per_block) == reg_config.encoder_depth
        torch.testing.assert_close(per_block[-1], enc.run_blocks(enc.embed(x)))
        first = m.at_layer(1).extract_features(x, keep_seq=False)
    torch.testing.assert_close(first, enc.norm(per_block[0].mean(1)))


def test_pretraining_forward_learns_the_registers(reg_config):
    m = Marlin(reg_config, as_feature_extractor=False).train()
    x = _clips(reg_config)
    visible = torch.zeros(2, reg_config.num_tokens, dtype=torch.bool)
    visible[:, ::4] = True
    out = m(x, visible)
    assert out.shape == (2, reg_config.num_tokens - visible[0].sum().item(), reg_config.patch_dim)
    out.square().mean().backward()
    assert m.encoder.registers.grad is not None and m.encoder.registers.grad.abs().sum() > 0


def test_registers_sit_in_the_stem_layer_without_weight_decay(reg_config):
    m = Marlin(reg_config, as_feature_extractor=False)
    assert "encoder.registers" in m.no_weight_decay()
    layer = layer_of(m.encoder.group_matcher(), reg_config.encoder_depth, prefix="encoder.")
    assert layer("encoder.registers") == 0 and layer("encoder.pos_embedding.emb") == 0
    assert layer("encoder.blocks.0.attn.qkv.weight") == 1
    groups = param_groups(m.named_parameters(), weight_decay=0.05, no_weight_decay=m.no_weight_decay())
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(m.encoder.registers) in undecayed


def test_save_and_load_keep_the_registers(reg_config, tmp_path):
    m = Marlin(reg_config).eval()
    x = _clips(reg_config, 1)
    back = marlin.load(m.save_pretrained(tmp_path / "m")).eval()
    assert back.config.num_registers == 3
    torch.testing.assert_close(back.extract_features(x), m.extract_features(x))
    # a bare state dict: the count is read from the tensor
    sd = m.state_dict()
    assert infer_config(sd).num_registers == 3
    with pytest.raises(CheckpointError, match="num_registers=0 but the tensors hold 3"):
        check_config_matches(reg_config.replace(num_registers=0), sd, "x.pt")


def test_the_official_layout_refuses_registers_and_export_all_skips_it(reg_config, tmp_path):
    m = Marlin(reg_config, as_feature_extractor=False)
    with pytest.raises(ValueError, match="register tokens"):
        m.export_official(tmp_path / "m.encoder.pt")
    out = m.export_all(tmp_path)
    assert set(out) == {"marlin"}
    assert marlin.load(out["marlin"]).config.num_registers == 3


def test_attention_maps_count_what_the_registers_draw(reg_config):
    m = Marlin(reg_config).eval()
    x = _clips(reg_config, 1)
    maps = attention_received(m, x, layer=1)
    t, g = reg_config.grid_size[0], reg_config.grid_size[1]
    assert maps.shape == (1, t, g, g)
    n, r = reg_config.num_tokens, reg_config.num_registers
    patch_total = maps.sum().item()  # the patches' draw, in units of 1 / (R + N)
    assert 0 < patch_total < n + r
    with torch.no_grad():  # registers that every query prefers: the patches' draw falls
        m.encoder.registers.mul_(50.0)
    assert attention_received(m, x, layer=1).sum().item() < patch_total


def test_a_pretraining_run_learns_saves_and_exports_the_registers(tmp_path):
    from marlin.train import Pretrainer, load_config

    cfg = load_config("marlin_vit_tiny_test", [
        "model.num_registers=2", "mask.ratio=0.5", "data.num_workers=0", "data.synthetic_size=4", "batch_size=2",
        "max_steps=2", "optim.warmup_steps=1", "optim.lr=0.05", "log.tensorboard=false", "precision=fp32",
        f"out_dir={tmp_path}",
    ])  # fmt: skip
    trainer = Pretrainer(cfg)
    start = trainer.model.encoder.registers.detach().clone()
    result = trainer.fit()
    learnt = trainer.model.encoder.registers.detach()
    assert learnt.shape == (1, 2, cfg.model.encoder_embed_dim) and not torch.equal(learnt, start)
    assert set(result.exports) == {"marlin"}  # no official layout for registers
    back = marlin.load(result.exports["marlin"])
    torch.testing.assert_close(back.encoder.registers, learnt)
    resumed = marlin.load(result.checkpoint)
    torch.testing.assert_close(resumed.encoder.registers, learnt)


def test_onnx_export_carries_the_registers(reg_config, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from marlin.models.onnx import export_onnx, verify_onnx

    m = Marlin(reg_config).eval()
    assert verify_onnx(m, export_onnx(m, tmp_path / "m.onnx")) < 1e-4
