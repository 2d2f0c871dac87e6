"""Every supported checkpoint format, written by the test, loads to the same numbers; every error is one line."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import marlin
from marlin import CheckpointError, Marlin, get_config, load, read_checkpoint
from marlin.models.checkpoint import infer_config

NAME = "marlin_vit_tiny_test"


@pytest.fixture
def full_model():
    return Marlin(NAME, as_feature_extractor=False).eval()


@pytest.fixture
def clip():
    cfg = get_config(NAME)
    return torch.rand(2, 3, cfg.clip_frames, cfg.img_size, cfg.img_size)


def same_features(a: Marlin, b: Marlin, x: torch.Tensor) -> bool:
    return torch.equal(a.extract_features(x), b.extract_features(x))


def test_official_encoder_and_full_pt(tmp_path, full_model, clip):
    full_path = full_model.export_official(tmp_path / f"{NAME}.full.pt")
    enc_path = full_model.export_official(tmp_path / f"{NAME}.encoder.pt", full=False)
    assert all(k.startswith("encoder.") for k in torch.load(enc_path, weights_only=True))
    enc = Marlin.from_file(NAME, str(enc_path))
    assert enc.decoder is None and same_features(enc, full_model, clip)
    full = Marlin.from_file(NAME, str(full_path))
    assert full.decoder is not None and same_features(full, full_model, clip)
    visible = torch.zeros(2, full.config.num_tokens, dtype=torch.bool)
    visible[:, :3] = True
    assert torch.equal(full(clip, visible), full_model(clip, visible))


def test_lightning_ckpt_drops_discriminator(tmp_path, full_model, clip):
    sd = dict(full_model.state_dict())
    sd["discriminator.layers.0.linear.weight"] = torch.zeros(4, 4)
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 1e-4}}, tmp_path / "last.ckpt")
    m = Marlin.from_file(NAME, str(tmp_path / "last.ckpt"))
    assert m.load_report.format == "lightning"
    assert m.load_report.dropped == ["discriminator.layers.0.linear.weight"]
    assert same_features(m, full_model, clip)


def test_hf_safetensors_prefixed_keys(tmp_path, full_model, clip):
    sd = {f"marlin.{k}": v.contiguous() for k, v in full_model.state_dict().items() if k.startswith("encoder.")}
    save_file(sd, tmp_path / "model.safetensors")
    m = load(tmp_path / "model.safetensors")  # variant inferred from shapes
    assert m.config.name == NAME and m.load_report.format == "hf" and same_features(m, full_model, clip)


def test_videomae_checkpoint_maps_keys_and_reports(tmp_path, full_model, clip):
    def to_videomae(k: str) -> str:
        k = k.replace("patch_embedding.projection", "patch_embed.proj")
        k = k.replace("mlp.layers.0.linear", "mlp.fc1").replace("mlp.layers.1.linear", "mlp.fc2")
        return {"enc_dec_proj.weight": "encoder_to_decoder.weight", "decoder.mask_token": "mask_token"}.get(k, k)

    sd = {to_videomae(k): v for k, v in full_model.state_dict().items() if "pos_embedding" not in k}
    sd["encoder.head.weight"] = torch.zeros(3, 3)  # something VideoMAE has and MARLIN does not
    torch.save({"model": sd, "epoch": 799}, tmp_path / "checkpoint-799.pth")
    m = load(tmp_path / "checkpoint-799.pth")
    r = m.load_report
    assert r.format == "videomae"
    assert set(r.missing) == {"encoder.pos_embedding.emb", "decoder.pos_embedding.emb"}  # rebuilt identically
    assert r.unexpected == ["encoder.head.weight"]
    assert same_features(m, full_model, clip)


def test_save_pretrained_round_trip_without_a_name(tmp_path, full_model, clip):
    out = full_model.save_pretrained(tmp_path / "run")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    for src in (out, out / "model.safetensors"):  # the directory, or the single file (config in its metadata)
        m = load(src)
        assert m.config == full_model.config and m.decoder is not None and same_features(m, full_model, clip)
    assert load(out, full=False).decoder is None


def test_custom_architecture_is_inferred_from_shapes(tmp_path, clip):
    cfg = get_config(NAME).replace(name="whatever", encoder_depth=3, encoder_embed_dim=64, encoder_num_heads=1)
    m = Marlin(cfg).eval()
    m.export_official(tmp_path / "x.encoder.pt")
    inferred = infer_config(read_checkpoint(tmp_path / "x.encoder.pt").state_dict)
    assert (inferred.encoder_depth, inferred.encoder_embed_dim, inferred.encoder_num_heads) == (3, 64, 1)
    assert infer_config(Marlin("marlin_vit_small_ytf").state_dict()).name == "marlin_vit_small_ytf"


def test_official_layout_geometry_prefers_16_frame_clips(tmp_path, caplog):
    """An official .pt has no config: 392 tokens are a 16-frame clip of 112 px crops (7 x 7 x 8), not 4 frames of
    224 px — the file a 112 px training run exports must load with the geometry it was trained with."""
    cfg = get_config("marlin_vit_tiny").replace(name="tiny112", img_size=112, encoder_depth=1, decoder_depth=1)
    Marlin(cfg).export_official(tmp_path / "t.encoder.pt")
    with caplog.at_level("WARNING", logger="marlin"):
        m = load(tmp_path / "t.encoder.pt")
    assert (m.config.img_size, m.config.clip_frames) == (112, 16)
    assert "inferred img_size=112, clip_frames=16 from 392 tokens" in caplog.text
    assert m.extract_features(torch.rand(1, 3, 16, 112, 112), keep_seq=True).shape == (1, 392, 192)


# ---- errors: one line, naming the file, what was expected and what was found ---------------------------------------
def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_wrong_variant(tmp_path):
    Marlin("marlin_vit_small_ytf").export_official(tmp_path / "s.encoder.pt")
    with pytest.raises(CheckpointError) as e:
        Marlin.from_file("marlin_vit_base_ytf", str(tmp_path / "s.encoder.pt"))
    msg = one_line(e)
    assert "s.encoder.pt" in msg and "'marlin_vit_base_ytf' expects encoder_embed_dim=768" in msg
    assert "marlin_vit_small_ytf" in msg


def test_truncated_file(tmp_path, full_model):
    path = full_model.export_official(tmp_path / "t.full.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load(path)
    assert "t.full.pt" in one_line(e) and "truncated or corrupt" in str(e.value)
    st = tmp_path / "t.safetensors"
    save_file({"encoder.norm.weight": torch.ones(8)}, st)
    st.write_bytes(st.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load(st)


def test_not_a_checkpoint(tmp_path):
    txt = tmp_path / "notes.pt"
    txt.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(CheckpointError) as e:
        load(txt)
    assert "notes.pt" in one_line(e)
    torch.save({"weights": [1, 2, 3]}, tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no tensors found"):
        load(tmp_path / "list.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"not a MARLIN checkpoint: no 'encoder\.\*' weights"):
        load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt: no such checkpoint file"):
        load(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or empty"):
        load(tmp_path / "empty.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_needing_code_execution_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"encoder.norm.weight": torch.ones(2), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError) as e:
        load(path)
    assert "refused to unpickle" in one_line(e) and "evil.pt" in str(e.value)
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.pt"  # a legacy (non-zip) pickle
    raw.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(CheckpointError):
        load(raw)
    assert not (tmp_path / "pwned").exists()


def test_full_requested_from_encoder_only(tmp_path, full_model):
    path = full_model.export_official(tmp_path / "e.encoder.pt", full=False)
    with pytest.raises(CheckpointError, match="full model requested but the file holds only an encoder"):
        load(path, full=True)


def test_package_exports():
    assert marlin.load is load and callable(marlin.create_model)


# ---- corrupt values and shapes are named ----------------------------------------------------------------------------
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, full_model, capsys):
    from marlin.cli import main

    sd = {k: v.clone() for k, v in full_model.state_dict().items()}
    sd["encoder.blocks.1.mlp.layers.0.linear.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.full.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.layers\.0\.linear\.weight' holds 1 NaN and 0 inf"):
        load(path)
    with pytest.raises(CheckpointError, match="holds 1 NaN"):
        Marlin.from_file(NAME, str(path))  # the drop-in path too
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "NOT USABLE" in err and "blocks.1.mlp.layers.0.linear.weight" in err


def test_a_wrong_shape_names_the_tensor(tmp_path):
    Marlin("marlin_vit_small_ytf").export_official(tmp_path / "s.encoder.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'encoder\.[\w.]+' is \[\d+(, \d+)*\], expected \[\d+"):
        Marlin.from_file("marlin_vit_base_ytf", str(tmp_path / "s.encoder.pt"))


def test_info_on_a_bad_file_is_one_line(tmp_path, capsys):
    from marlin.cli import main

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for path in (tmp_path / "junk.pt", tmp_path / "absent.pt"):
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("marlin info: ") and str(path) in err and "\n" not in err


def test_a_crafted_config_is_checked_against_the_tensors_before_allocating(tmp_path, full_model):
    """config.json saying encoder_embed_dim=3000000 used to make marlin allocate ~18 GB before looking at a tensor."""
    import json

    folder = full_model.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["encoder_embed_dim"] = 3_000_000
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config does not match its weights.*encoder_embed_dim=3000000 but the "
                                              "tensors hold 32"):  # fmt: skip
        load(folder)


@pytest.mark.parametrize("field", ["encoder_depth", "img_size", "decoder_num_heads"])
def test_config_sizes_must_be_positive(field):
    from marlin.train.config import load_config

    with pytest.raises(ValueError, match=f"{field} must be a positive integer, got -1"):
        load_config(NAME, [f"model.{field}=-1"])  # used to be accepted and export a file nothing could load
