import pytest
import torch

import marlin
from marlin import Marlin, MarlinConfig, create_model, get_config, list_models
from marlin.models.layers import sincos_table


def _block_keys(prefix: str, depth: int) -> list[str]:
    per_block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.layers.0.linear.weight", "mlp.layers.0.linear.bias",
        "mlp.layers.1.linear.weight", "mlp.layers.1.linear.bias",
    ]  # fmt: skip
    return [f"{prefix}.blocks.{i}.{k}" for i in range(depth) for k in per_block]


def expected_keys(cfg: MarlinConfig, full: bool) -> set[str]:
    keys = [
        "encoder.patch_embedding.projection.weight", "encoder.patch_embedding.projection.bias",
        "encoder.pos_embedding.emb", "encoder.norm.weight", "encoder.norm.bias",
    ] + _block_keys("encoder", cfg.encoder_depth)  # fmt: skip
    if full:
        keys += [
            "decoder.mask_token", "decoder.pos_embedding.emb", "decoder.norm.weight", "decoder.norm.bias",
            "decoder.head.weight", "decoder.head.bias", "enc_dec_proj.weight",
        ] + _block_keys("decoder", cfg.decoder_depth)  # fmt: skip
    return set(keys)


@pytest.mark.parametrize("name", ["marlin_vit_small_ytf", "marlin_vit_base_ytf", "marlin_vit_large_ytf"])
def test_released_variants_have_the_official_key_list_and_shapes(name):
    cfg = get_config(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        full = Marlin(cfg, as_feature_extractor=False)
        enc = Marlin(cfg)
    assert set(full.state_dict()) == expected_keys(cfg, full=True)
    assert set(enc.state_dict()) == expected_keys(cfg, full=False)
    sd = full.state_dict()
    d, dd = cfg.encoder_embed_dim, cfg.decoder_embed_dim
    assert sd["encoder.patch_embedding.projection.weight"].shape == (d, 3, 2, 16, 16)
    assert sd["encoder.pos_embedding.emb"].shape == (1, 1568, d)
    assert sd["encoder.blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    assert sd["encoder.blocks.0.mlp.layers.0.linear.weight"].shape == (4 * d, d)
    assert sd["decoder.head.weight"].shape == (1536, dd)
    assert sd["enc_dec_proj.weight"].shape == (dd, d)


def test_registry_lists_released_and_tiny_variants():
    names = list_models()
    for n in ("marlin_vit_small_ytf", "marlin_vit_base_ytf", "marlin_vit_large_ytf", "marlin_vit_tiny_test"):
        assert n in names
    with pytest.raises(ValueError, match="unknown model 'nope'.*marlin_vit_base_ytf"):
        get_config("nope")


def test_sincos_table_formula():
    t = sincos_table(10, 8)
    pos, i = 3, 5  # odd dim -> cos, exponent uses i // 2
    assert t[pos, i] == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (2 * (i // 2) / 8))).item(), abs=1e-6)
    assert t[pos, 4] == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (4 / 8))).item(), abs=1e-6)
    assert not Marlin("marlin_vit_tiny_test").encoder.pos_embedding.emb.requires_grad


def test_extract_features_shapes_and_pooling_order(tiny_config):
    m = Marlin(tiny_config).eval()
    x = torch.rand(3, 3, tiny_config.clip_frames, tiny_config.img_size, tiny_config.img_size)
    seq = m.extract_features(x, keep_seq=True)
    assert seq.shape == (3, tiny_config.num_tokens, tiny_config.encoder_embed_dim)
    pooled = m.extract_features(x, keep_seq=False)
    assert pooled.shape == (3, tiny_config.encoder_embed_dim)
    # official semantics: mean over the *un-normalised* tokens, then the final norm
    enc = m.encoder
    raw = enc.run_blocks(enc.embed(x))
    torch.testing.assert_close(pooled, enc.norm(raw.mean(1)))
    assert not torch.allclose(pooled, seq.mean(1), atol=1e-3)


def test_extract_features_gradients_flow_when_wanted(tiny_config):
    m = Marlin(tiny_config).eval()
    x = torch.rand(1, 3, tiny_config.clip_frames, tiny_config.img_size, tiny_config.img_size)
    assert not m.extract_features(x).requires_grad  # eval-mode inference builds no graph
    xg = x.clone().requires_grad_()
    (m.extract_features(xg, keep_seq=False) ** 3).sum().backward()  # saliency w.r.t. the input (official issue #36)
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    out = m.extract_features(x, requires_grad=True)
    (out**3).sum().backward()  # (a plain sum of LayerNorm outputs has zero gradient)
    assert m.encoder.blocks[0].attn.qkv.weight.grad is not None
    m.train()
    assert m.extract_features(x).requires_grad
    with torch.no_grad():
        assert not m.extract_features(x).requires_grad


def test_sdpa_matches_naive_attention(tiny_config):
    m = Marlin(get_config("marlin_vit_small_ytf").replace(encoder_depth=2)).eval()  # full geometry, 2 blocks
    x = torch.rand(1, 3, 16, 224, 224)
    fused = m.extract_features(x)
    naive = m.set_fused_attention(False).extract_features(x)
    assert (fused - naive).abs().max() < 1e-4


def test_visible_only_embedding_equals_the_conv_then_select():
    cfg = get_config("marlin_vit_tiny").replace(encoder_depth=1)  # full 224 x 16 geometry, 1568 tokens
    model = Marlin(cfg)
    enc = model.encoder
    x = torch.rand(2, 3, 16, 224, 224, requires_grad=True)
    visible = torch.zeros(2, cfg.num_tokens, dtype=torch.bool)
    visible[0, torch.randperm(cfg.num_tokens)[:157]] = True
    visible[1, torch.randperm(cfg.num_tokens)[:157]] = True
    ref = enc.embed(x)[visible].view(2, 157, -1)
    ours = enc.embed_visible(x, visible)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    w = enc.patch_embedding.projection.weight
    g_ref = torch.autograd.grad(ref.square().sum(), (w, x))
    g_ours = torch.autograd.grad(ours.square().sum(), (w, x))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert g_ours[1][:, :, :2].abs().sum() > 0  # the clip gets gradients through the visible patches
    # forward(x, visible) uses it; set_fused_attention(False) restores the official conv-then-select
    with torch.no_grad():
        fused = enc(x, visible)
        assert enc.fused and not model.set_fused_attention(False).encoder.fused
        torch.testing.assert_close(enc(x, visible), fused, rtol=1e-4, atol=1e-4)


def test_full_model_reconstructs_masked_tokens(tiny_config):
    m = Marlin(tiny_config, as_feature_extractor=False).eval()
    b, n = 2, tiny_config.num_tokens
    x = torch.rand(b, 3, tiny_config.clip_frames, tiny_config.img_size, tiny_config.img_size)
    visible = torch.zeros(b, n, dtype=torch.bool)
    visible[:, ::4] = True
    out = m(x, visible)
    assert out.shape == (b, n - n // 4, tiny_config.patch_dim)
    # the prediction for a hidden token must not depend on that token's pixels... but must on visible ones
    x2 = x.clone()
    x2[:, :, :2, :16, :16] += 0.5  # token 0 (visible)
    assert not torch.allclose(m(x2, visible), out)


def test_forward_errors(tiny_config):
    enc_only = Marlin(tiny_config)
    x = torch.rand(1, 3, tiny_config.clip_frames, tiny_config.img_size, tiny_config.img_size)
    with pytest.raises(RuntimeError, match="encoder-only"):
        enc_only(x, torch.ones(1, tiny_config.num_tokens, dtype=torch.bool))
    full = Marlin(tiny_config, as_feature_extractor=False)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        full(x, torch.ones(1, 5, dtype=torch.bool))
    uneven = torch.zeros(2, tiny_config.num_tokens, dtype=torch.bool)
    uneven[0, :3], uneven[1, :2] = True, True
    with pytest.raises(ValueError, match="same number of visible"):
        full(x.repeat(2, 1, 1, 1, 1), uneven)
    with pytest.raises(ValueError, match=r"expected a clip batch of shape \[B, 3, 4, 32, 32\]"):
        enc_only.extract_features(torch.rand(1, 3, 8, 32, 32))


def test_official_constructor_kwargs_are_accepted():
    m = Marlin(
        img_size=32, patch_size=16, n_frames=4, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
        drop_rate=0.0, attn_drop_rate=0.0, norm_layer="LayerNorm", init_values=0.0, tubelet_size=2,
        as_feature_extractor=False,
    )  # fmt: skip
    assert m.config.clip_frames == 4 and m.decoder is not None
    with pytest.raises(ValueError, match="init_values"):
        Marlin(init_values=0.1)


def test_bf16_model_close_to_fp32(tiny_config):
    m = Marlin(get_config("marlin_vit_small_ytf").replace(encoder_depth=2)).eval()  # full geometry, 2 blocks
    x = torch.rand(1, 3, 16, 224, 224)
    ref = m.extract_features(x, keep_seq=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m.extract_features(x, keep_seq=False).float()
    low = m.to(torch.bfloat16).extract_features(x, keep_seq=False).float()
    for out in (auto, low):
        assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99


def test_config_round_trip_and_validation():
    cfg = get_config("marlin_vit_small_ytf")
    assert MarlinConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MarlinConfig field"):
        MarlinConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        MarlinConfig(img_size=100)
    assert cfg.num_tokens == 1568 and cfg.patch_dim == 1536 and cfg.grid_size == (8, 14, 14)


def test_create_model_and_public_api():
    m = create_model("marlin_vit_tiny_test", full=True)
    assert isinstance(m, marlin.Marlin) and m.decoder is not None
    assert "encoder.norm.weight" in m.no_weight_decay() and "decoder.mask_token" in m.no_weight_decay()
    assert "encoder.blocks.0.attn.qkv.weight" not in m.no_weight_decay()


@pytest.mark.slow
@pytest.mark.parametrize("clip", ["cropped01.mp4", "cropped03.mp4"])
def test_bf16_autocast_cosine_on_real_face_clips(shared_data, clip):
    from marlin.utils.precision import autocast
    from marlin.video.io import read_video
    from marlin.video.pipeline import to_clip_tensor

    m = Marlin("marlin_vit_small_ytf").eval()
    x = to_clip_tensor(read_video(shared_data / "marlin_samples" / clip)[None, :16])
    with torch.inference_mode():
        ref = m.extract_features(x)
        with autocast(m.device, "bf16"):
            low = m.extract_features(x).float()
    cos = torch.nn.functional.cosine_similarity(low, ref, dim=-1)  # per token
    assert cos.min() >= 0.999, cos.min()


def test_from_spec_names_a_dangling_or_looping_link_as_a_file(tmp_path):
    from marlin.models.model import from_spec

    loop = tmp_path / "loop.pt"
    loop.symlink_to(loop)
    dangling = tmp_path / "gone.pt"
    dangling.symlink_to(tmp_path / "nothing.pt")
    for link in (loop, dangling):
        with pytest.raises(FileNotFoundError, match="symbolic link"):
            from_spec(link)


def test_from_spec_random_init_of_a_checkpoint_builds_its_architecture_untrained(tmp_path):
    """`--random-init` with a checkpoint path used to load the checkpoint's weights silently (a 'random init'
    baseline that was in fact the pretrained encoder)."""
    from marlin.models.model import from_spec

    torch.manual_seed(0)
    trained = Marlin(get_config("marlin_vit_tiny_test").replace(img_size=48)).eval()
    path = trained.save_pretrained(tmp_path / "tiny")
    loaded, fresh = from_spec(path), from_spec(path, random_init=True)
    assert fresh.config == loaded.config == trained.config and not fresh.training
    w = "encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(loaded.state_dict()[w], trained.state_dict()[w])
    assert fresh.state_dict()[w].shape == trained.state_dict()[w].shape
    assert not torch.allclose(fresh.state_dict()[w], trained.state_dict()[w])
