"""The CUDA paths (marked ``cuda``; skipped where torch sees no GPU): features on the GPU match the CPU's, ``auto``
picks bf16 / fp16 there and stays faithful, the encoder runs on SDPA's flash kernel under bf16, uint8 frames reach
the GPU from pinned memory, and a bf16 pretraining run trains on the GPU with TF32 allowed.

On a GPU machine: ``python -m pytest -m cuda tests/test_cuda.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marlin import Marlin, get_config
from marlin.train import Pretrainer, load_config
from marlin.utils.precision import allow_tf32
from marlin.video.pipeline import to_clip_tensor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def tiny(seed: int = 0) -> Marlin:
    torch.manual_seed(seed)
    return Marlin(get_config("marlin_vit_tiny_test")).eval()


def clips(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _torch_default_tf32():
    """Each test starts with torch's defaults, what a user's process has: no TF32 for float32 matmuls, TF32 allowed
    for cuDNN convolutions (so fp32 inference must not run its patch embedding as a convolution); restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_fp32_features_on_the_gpu_equal_the_cpus() -> None:
    x = clips()
    cpu = tiny().for_inference("fp32").extract_features(x, keep_seq=True)
    gpu = tiny().cuda().for_inference("fp32").extract_features(x.cuda(), keep_seq=True).cpu()
    assert gpu.dtype == torch.float32
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_the_patch_embedding_on_the_gpu_is_float32_although_cudnn_may_use_tf32() -> None:
    """cuDNN's default TF32 for convolutions would put ~1e-3 relative error into every token (a Conv3d embedding)."""
    x = torch.rand(2, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0))
    model = Marlin(get_config("marlin_vit_tiny").replace(encoder_depth=1)).eval()
    with torch.no_grad():
        cpu = model.encoder.embed(x)
        gpu = model.cuda().encoder.embed(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-5, rtol=1e-5)


def test_auto_picks_bf16_or_fp16_on_the_gpu_and_stays_faithful() -> None:
    x = clips()
    ref = tiny().for_inference("fp32").extract_features(x, keep_seq=False)
    model = tiny().cuda().for_inference("auto")
    want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert model.precision == want
    out = model.extract_features(x.cuda(), keep_seq=False).cpu()
    assert out.dtype == torch.float32
    assert float(F.cosine_similarity(out, ref, dim=-1).min()) > 0.999


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="flash attention needs an Ampere or newer GPU",
)
def test_the_encoder_runs_on_flash_attention_under_bf16() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny().cuda().for_inference("bf16")
    x = clips().cuda()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises when the encoder's q / k / v cannot use it
        flash = model.extract_features(x, keep_seq=True)
    with sdpa_kernel([SDPBackend.MATH]):
        math = model.extract_features(x, keep_seq=True)
    assert torch.isfinite(flash).all()
    torch.testing.assert_close(flash, math, atol=3e-2, rtol=3e-2)


def test_uint8_frames_reach_the_gpu_and_become_the_same_clip() -> None:
    windows = np.random.default_rng(0).integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
    gpu = to_clip_tensor(windows, "cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), to_clip_tensor(windows), atol=0, rtol=0)


def test_bf16_pretraining_trains_on_the_gpu_with_tf32_allowed(tmp_path) -> None:
    args = ["mask.ratio=0.5", "data.num_workers=0", "data.synthetic_size=6", "batch_size=2", "ckpt.export=false",
            "optim.warmup_steps=1", "max_steps=4", "optim.lr=0.05", "log.tensorboard=false", "device=cuda",
            "precision=bf16", f"out_dir={tmp_path}"]  # fmt: skip
    trainer = Pretrainer(load_config("marlin_vit_tiny_test", args))
    assert trainer.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    losses = [h["loss/rec"] for h in trainer.fit().history]
    assert len(losses) == 4 and np.isfinite(losses).all()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)


def test_allow_tf32_applies_on_cuda_only() -> None:
    assert allow_tf32("cuda") and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    assert not allow_tf32("cpu") and not torch.backends.cuda.matmul.allow_tf32


def test_the_attentive_probe_trains_on_the_gpu_like_on_the_cpu() -> None:
    from marlin.evaluate.attentive import AttentiveConfig, AttentiveProbe
    from test_probe_protocols import marker_tokens

    x, y = marker_tokens(500)  # the class is in one flagged token per clip: mean pooling drowns it, attention finds it
    acc = {}
    for device in ("cpu", "cuda"):
        cfg = AttentiveConfig(epochs=25, lr_grid=(3e-3,), batch_size=32, device=device)
        scores = AttentiveProbe("multiclass", 4, cfg).fit(x[:400], y[:400], select=False).scores(x[400:])
        assert isinstance(scores, np.ndarray) and scores.shape == (100, 4)
        acc[device] = (scores.argmax(1) == y[400:]).mean()
    assert acc["cuda"] > 0.9 and abs(acc["cuda"] - acc["cpu"]) <= 0.05, acc
