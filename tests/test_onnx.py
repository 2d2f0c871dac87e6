"""ONNX export: the graph ONNX Runtime runs gives torch's features (to 1e-4) at any batch size, pooled or per token."""

import json
import sys

import numpy as np
import pytest
import torch

from marlin import Marlin
from marlin.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from marlin.models.onnx import export_onnx, verify_onnx  # noqa: E402


def _run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"video": x.numpy()})[0]


@pytest.mark.parametrize("tokens", [False, True])
def test_onnx_matches_torch_at_batch_1_and_2(tmp_path, tiny_config, tokens):
    model = Marlin(tiny_config).train()  # export must not depend on (or change) the mode
    path = export_onnx(model, tmp_path / "m.onnx", tokens=tokens)
    assert model.training and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left
    model.eval()
    c = tiny_config
    for batch in (1, 2):
        x = torch.rand(batch, 3, c.clip_frames, c.img_size, c.img_size)
        got = _run(path, x)
        want = model.extract_features(x, keep_seq=tokens).numpy()
        shape = (batch, c.num_tokens, c.encoder_embed_dim) if tokens else (batch, c.encoder_embed_dim)
        assert got.shape == want.shape == shape
        assert np.abs(got - want).max() < 1e-4
    assert verify_onnx(model, path, batch_size=3) < 1e-4


def test_onnx_graph_has_a_dynamic_batch_and_carries_the_config(tmp_path, tiny_config):
    path = export_onnx(Marlin(tiny_config), tmp_path / "m.onnx", opset=18)
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    (inp,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "video" and dims == ["batch", 3, tiny_config.clip_frames, 32, 32]
    assert any(o.version == 18 for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["marlin_config"])["encoder_embed_dim"] == tiny_config.encoder_embed_dim
    assert meta["marlin_output"].startswith("pooled")
    with pytest.raises(ValueError, match="opset >= 14"):
        export_onnx(Marlin(tiny_config), tmp_path / "old.onnx", opset=13)
    assert not (tmp_path / "old.onnx").exists()


def test_export_command_from_a_saved_model(tmp_path, tiny_config, capsys):
    src = Marlin(tiny_config).eval()
    src.save_pretrained(tmp_path / "saved")
    out = tmp_path / "deploy" / "tokens.onnx"
    assert main(["export", str(tmp_path / "saved"), "--onnx", str(out), "--tokens"]) == 0
    printed = capsys.readouterr().out
    assert "features [batch, 8, 32]" in printed and "max abs diff" in printed
    diff = float(printed.rsplit("max abs diff ", 1)[1].split()[0])
    assert diff < 1e-4
    x = torch.rand(2, 3, 4, 32, 32)
    assert np.abs(_run(out, x) - src.extract_features(x, keep_seq=True).numpy()).max() < 1e-4

    assert main(["export", str(tmp_path / "missing"), "--onnx", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "marlin export:" in err
    assert not (tmp_path / "x.onnx").exists()


def test_missing_onnxruntime_skips_the_check_with_a_note(tmp_path, tiny_config, monkeypatch, capsys):
    Marlin(tiny_config).save_pretrained(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["export", str(tmp_path / "saved"), "--onnx", str(tmp_path / "m.onnx")]) == 0
    assert "pip install 'marlin[onnx]'" in capsys.readouterr().err
    assert (tmp_path / "m.onnx").is_file()


def test_a_bf16_model_is_exported_from_a_float32_copy(tmp_path, tiny_config):
    model = Marlin(tiny_config).eval().to(torch.bfloat16)
    path = export_onnx(model, tmp_path / "m.onnx")
    assert model.dtype == torch.bfloat16  # left as it was
    x = torch.rand(2, 3, 4, 32, 32)
    want = model.float().extract_features(x, keep_seq=False).numpy()  # the same (bf16-rounded) weights in fp32
    assert np.abs(_run(path, x) - want).max() < 1e-4
