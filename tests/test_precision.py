"""Inference precision: the per-device choice of `auto` (with faked capability probes), the int8 CPU path and the
bf16 autocast path of `Marlin.for_inference`, on tiny models."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from marlin import Marlin, get_config
from marlin.models import quantize
from marlin.utils import precision as prec
from marlin.utils.precision import DeviceCaps, resolve_precision

CUDA_BF16 = DeviceCaps("cuda", "H100", bf16=True, fp16=True)
CUDA_OLD = DeviceCaps("cuda", "T4", bf16=False, fp16=True)
CPU_AMX = DeviceCaps("cpu", "cpu", bf16=True, int8=True, vnni=True, amx=True, cpu_capability="AVX512")
# AVX512-BF16 + VNNI without AMX (AMD EPYC Zen 4, measured): int8 ran ViT-B 1.3x faster than bf16
CPU_ZEN4 = DeviceCaps("cpu", "cpu", bf16=True, int8=True, vnni=True, cpu_capability="AVX512")
CPU_BF16_NO_VNNI = DeviceCaps("cpu", "cpu", bf16=True, int8=True, vnni=False, cpu_capability="AVX512")
CPU_AVX2 = DeviceCaps("cpu", "cpu", bf16=False, int8=True, cpu_capability="AVX2")  # this machine: emulated bf16
CPU_PLAIN = DeviceCaps("cpu", "cpu", bf16=False, int8=False, cpu_capability="DEFAULT")  # no int8 engine / SIMD
MPS = DeviceCaps("mps", "mps")

needs_int8 = pytest.mark.skipif(not quantize.int8_available(), reason="no x86 int8 engine in this torch build")


@pytest.fixture(autouse=True)
def _fresh_messages():
    prec._SAID.clear()  # "once per process" messages: each test sees its own
    yield
    prec._SAID.clear()


def tiny(seed: int = 0) -> Marlin:
    torch.manual_seed(seed)
    return Marlin(get_config("marlin_vit_tiny_test")).eval()


def clips(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("caps", "int8_ok", "want"),
    [
        (CUDA_BF16, True, "bf16"),
        (CUDA_OLD, True, "fp16"),
        (CPU_AMX, True, "bf16"),
        (CPU_ZEN4, True, "int8"),
        (CPU_ZEN4, False, "bf16"),  # int8 failed its fidelity check: bf16 units are still faster than fp32
        (CPU_BF16_NO_VNNI, True, "bf16"),
        (CPU_AVX2, True, "int8"),
        (CPU_AVX2, False, "fp32"),  # the fidelity check failed
        (CPU_PLAIN, True, "fp32"),
        (MPS, True, "fp32"),
    ],
)
def test_auto_picks_per_device(caps, int8_ok, want):
    name, reason = resolve_precision("auto", caps.device_type, caps, int8_ok=int8_ok)
    assert name == want and reason.startswith("auto: ")


@pytest.mark.parametrize("caps", [CPU_AVX2, CPU_PLAIN, DeviceCaps("cpu", "cpu", bf16=False, int8=False)])
def test_auto_never_picks_emulated_bf16_or_a_slow_path_on_cpu(caps):
    for int8_ok in (True, False):
        name, _ = resolve_precision(None, "cpu", caps, int8_ok=int8_ok)
        assert name in ("fp32", "int8") and (name != "int8" or (caps.int8 and int8_ok))


def test_int8_check_runs_only_when_int8_is_the_candidate():
    calls = []

    def check() -> bool:
        calls.append(1)
        return True

    for caps in (CUDA_BF16, CPU_AMX, CPU_PLAIN):
        resolve_precision("auto", caps.device_type, caps, int8_ok=check)
    assert calls == []
    assert resolve_precision("auto", "cpu", CPU_AVX2, int8_ok=check)[0] == "int8" and calls == [1]


def test_emulated_precision_warns_once_with_the_reason():
    with pytest.warns(UserWarning, match="emulated.*5x slower") as record:
        assert resolve_precision("bf16", "cpu", CPU_AVX2)[0] == "bf16"
        resolve_precision("bf16", "cpu", CPU_AVX2)
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve_precision("bf16", "cpu", CPU_AMX)[0] == "bf16"
        assert resolve_precision("bf16", "cuda", CUDA_BF16)[0] == "bf16"
        assert resolve_precision(torch.float32, "cpu", CPU_AVX2)[0] == "fp32"


def test_bad_names_and_int8_off_cpu_are_one_line_errors():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16, int8"):
        resolve_precision("int4", "cpu", CPU_AVX2)
    with pytest.raises(ValueError, match="int8.*cuda"):
        resolve_precision("int8", "cuda", CUDA_BF16)


def test_probe_of_this_machine_is_consistent():
    caps = prec.device_capabilities("cpu")
    assert caps.device_type == "cpu"
    flags = prec._cpu_flags()
    assert caps.bf16 == (bool({"amx_bf16", "avx512_bf16"} & flags) or "AMX" in caps.cpu_capability.upper())
    assert caps.int8 == (quantize.int8_available() and caps.cpu_capability.upper().startswith(("AVX2", "AVX512")))


@needs_int8
def test_int8_copy_quantises_every_encoder_linear_and_stays_faithful():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = tiny()
    x = clips(3)
    ref_pooled = model.extract_features(x, keep_seq=False)
    ref_tokens = model.extract_features(x, keep_seq=True)
    q = model.for_inference("int8")
    assert q is not model and q.precision == "int8" and model.precision == "fp32"
    n_linear = sum(isinstance(m, DynamicLinear) for m in q.encoder.blocks.modules())
    assert n_linear == 4 * len(model.encoder.blocks)  # qkv, proj, two MLP layers per block
    assert not quantize.is_quantized(model)
    pooled, tokens = q.extract_features(x, keep_seq=False), q.extract_features(x, keep_seq=True)
    assert pooled.dtype == torch.float32 and pooled.shape == ref_pooled.shape
    assert F.cosine_similarity(pooled, ref_pooled, dim=-1).min() >= 0.99
    assert F.cosine_similarity(tokens, ref_tokens, dim=-1).min() >= 0.99
    assert not torch.equal(pooled, ref_pooled)  # it really runs another computation
    assert torch.equal(model.extract_features(x, keep_seq=False), ref_pooled)  # the fp32 model is untouched
    with pytest.raises(ValueError, match="int8 inference copy cannot be saved"):
        q.export_official("/nonexistent/x.pt")


@needs_int8
def test_auto_on_cpu_checks_fidelity_and_falls_back_to_fp32_on_outliers():
    model = tiny(seed=3)
    assert model.for_inference("auto", caps=CPU_AVX2).precision == "int8"
    with torch.no_grad():  # the activation outliers of trained ViTs: a few LayerNorm channels 100x the rest
        for block in model.encoder.blocks:
            block.norm1.weight[:3] *= 100
            block.norm2.weight[:3] *= 100
    sample = clips(4)
    assert quantize.int8_cosine(model, quantize.quantize_int8(model), sample) < 0.99  # int8 is not faithful here
    chosen = model.for_inference("auto", sample=sample, caps=CPU_AVX2)
    assert chosen is model and chosen.precision == "fp32"


def test_bf16_runs_under_autocast_and_returns_float32():
    model = tiny()
    x = clips(2)
    ref = model.extract_features(x, keep_seq=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = model.for_inference("bf16", caps=CPU_AMX)
    assert m is model and m.precision == "bf16"
    out = m.extract_features(x, keep_seq=False)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    assert F.cosine_similarity(out, ref, dim=-1).min() > 0.99
    assert torch.equal(m.for_inference("fp32").extract_features(x, keep_seq=False), ref)


def test_tf32_is_allowed_on_cuda_only() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert prec.allow_tf32("cpu") is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # nothing changed
