"""PretrainConfig: official YAML translation, native YAML round trip, dotted overrides, the LR schedule."""

from __future__ import annotations

import math

import pytest

from marlin import get_config
from marlin.train.config import PretrainConfig, apply_overrides, build_schedule, load_config

# The official config/pretrain/marlin_vit_base.yaml, as released (small/large differ in model_name/encoder/decoder).
OFFICIAL_BASE = """\
model_name: "marlin_vit_base"
img_size: 224
patch_size: 16
clip_frames: 16
tubelet_size: 2
mask_strategy: "fasking"
temporal_sample_rate: 2
mask_percentage_target: 0.9
mlp_ratio: 4.0
qkv_bias: true
qk_scale: null
drop_rate: 0.0
attn_drop_rate: 0.0
norm_layer: "LayerNorm"
init_values: 0.0
weight_decay: 0.0
feature_dir: "Marlin_Features_Vit_Base"
adv_loss: true
adv_weight: 0.01
gp_weight: 0.0
d_steps: 1
g_steps: 1

learning_rate:
  base: 1.5e-4
  warmup: 1.0e-6
  min: 1.0e-5
  warmup_epochs: 40

optimizer:
  type: "AdamW"
  eps: 1.0e-8
  betas: [0.9, 0.95]

encoder:
  embed_dim: 768
  depth: 12
  num_heads: 12

decoder:
  embed_dim: 384
  depth: 4
  num_heads: 6
"""

SIZES = {  # name: (encoder dim, depth, heads), (decoder dim, depth, heads)
    "small": ((384, 12, 6), (192, 4, 3)),
    "base": ((768, 12, 12), (384, 4, 6)),
    "large": ((1024, 24, 16), (512, 12, 8)),
}


def _official(size: str) -> str:
    (ed, edp, eh), (dd, ddp, dh) = SIZES[size]
    text = OFFICIAL_BASE.replace("marlin_vit_base", f"marlin_vit_{size}").replace("Vit_Base", f"Vit_{size.title()}")
    enc = f"encoder:\n  embed_dim: {ed}\n  depth: {edp}\n  num_heads: {eh}\n"
    dec = f"decoder:\n  embed_dim: {dd}\n  depth: {ddp}\n  num_heads: {dh}\n"
    head = text.split("encoder:\n")[0]
    return head + enc + "\n" + dec


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_official_yaml_is_accepted_as_is(tmp_path, size) -> None:
    path = tmp_path / f"marlin_vit_{size}.yaml"
    path.write_text(_official(size))
    cfg = load_config(path)
    assert cfg.model == get_config(f"marlin_vit_{size}")  # architecture fields equal the registered variant
    assert cfg.model.name == f"marlin_vit_{size}"
    assert (cfg.mask.strategy, cfg.mask.ratio, cfg.data.temporal_sample_rate) == ("fasking", 0.9, 2)
    assert (cfg.loss.adversarial, cfg.loss.adv_weight, cfg.loss.gp_weight) == (True, 0.01, 0.0)
    assert (cfg.loss.d_steps, cfg.loss.g_steps) == (1, 1)
    o = cfg.optim
    assert (o.type, o.lr, o.warmup_lr, o.min_lr, o.warmup_epochs) == ("AdamW", 1.5e-4, 1e-6, 1e-5, 40.0)
    assert (o.eps, o.betas, o.weight_decay) == (1e-8, (0.9, 0.95), 0.0)


def test_official_yaml_refuses_unknown_keys_and_unsupported_options(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(OFFICIAL_BASE + "lr_typo: 1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown official key\(s\) \['lr_typo'\]"):
        load_config(path)
    path.write_text(OFFICIAL_BASE.replace("drop_rate: 0.0", "drop_rate: 0.1"))
    with pytest.raises(ValueError, match="drop_rate"):
        load_config(path)


def test_native_yaml_round_trip_and_defaults_match_the_released_recipe(tmp_path) -> None:
    cfg = load_config("marlin_vit_small", ["optim.lr=3e-4", "batch_size=8"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg and again.model == get_config("marlin_vit_small")
    d = PretrainConfig()
    assert (d.loss.adv_weight, d.loss.gp_weight, d.loss.d_steps, d.loss.g_steps) == (0.01, 0.0, 1, 1)
    assert (d.optim.betas, d.optim.eps, d.optim.weight_decay, d.optim.lr, d.optim.min_lr) == (
        (0.9, 0.95),
        1e-8,
        0.0,
        1.5e-4,
        1e-5,
    )
    assert d.optim.warmup_epochs == 40 and d.optim.scale_lr


def test_overrides_convert_types_and_refuse_typos() -> None:
    cfg = apply_overrides(
        PretrainConfig(),
        ["optim.lr=1e-3", "optim.betas=[0.9, 0.999]", "model.encoder_depth=6", "max_steps=100", "init=null",
         "mask.strategy=tube", "optim.warmup_epochs=5", "optim.clip_grad=1"],
    )  # fmt: skip
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.model.encoder_depth == 6 and cfg.model.encoder_embed_dim == 768
    assert cfg.max_steps == 100 and cfg.mask.strategy == "tube" and cfg.optim.clip_grad == 1.0
    assert apply_overrides(cfg, ["model=marlin_vit_small"]).model == get_config("marlin_vit_small")
    with pytest.raises(ValueError, match=r"unknown key 'optim.lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="expected dotted.key=value"):
        apply_overrides(cfg, ["optim.lr"])
    with pytest.raises(ValueError, match="batch_size must be int"):
        apply_overrides(cfg, ["batch_size=two"])
    with pytest.raises(ValueError, match="mask.strategy must be one of"):
        apply_overrides(cfg, ["mask.strategy=blobs"])
    with pytest.raises(ValueError, match="leaves 0 of 8 tokens"):
        load_config("marlin_vit_tiny_test")  # 8 tokens at the default 0.9 ratio: nothing visible
    with pytest.raises(FileNotFoundError, match="not a registered model"):
        load_config("no_such_file.yaml")


def test_schedule_scales_warms_up_and_decays_per_iteration() -> None:
    cfg = apply_overrides(PretrainConfig(), ["batch_size=64", "accum_steps=2", "epochs=10", "optim.warmup_epochs=2"])
    sched = build_schedule(cfg, steps_per_epoch=100.0, world_size=4)  # global batch 512 -> scale 2
    assert sched.total_steps == 1000 and sched.warmup_steps == 200
    assert sched.base_lr == pytest.approx(3e-4) and sched.min_lr == pytest.approx(2e-5)
    assert sched(0) == pytest.approx(2e-6)  # warmup_lr, scaled
    assert sched(100) == pytest.approx(2e-6 + (3e-4 - 2e-6) / 2)
    assert sched(200) == pytest.approx(3e-4)
    assert sched(600) == pytest.approx(2e-5 + 0.5 * (3e-4 - 2e-5) * (1 + math.cos(math.pi * 0.5)))
    assert sched(1000) == pytest.approx(2e-5)
    values = [sched(s) for s in range(1000)]
    assert all(a < b for a, b in zip(values[:200], values[1:201], strict=True))  # rises every step of the warmup
    assert all(a > b for a, b in zip(values[200:999], values[201:1000], strict=True))  # then falls every step
    fixed = apply_overrides(cfg, ["optim.scale_lr=false", "max_steps=50", "optim.warmup_steps=5"])
    sched = build_schedule(fixed, steps_per_epoch=100.0, world_size=4)
    assert (sched.total_steps, sched.warmup_steps, sched.base_lr) == (50, 5, 1.5e-4)
