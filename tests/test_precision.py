"""Inference precision: the per-device choice of `auto` (with faked capability probes), the int8 CPU path and the
bf16 autocast path of `Marlin.for_inference`, on tiny models."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from marlin import Marlin, get_config
from marlin.models import quantize
from marlin.models.layers import Attention, Mlp, PackedLinear, bf16_attention, packed_linear_available
from marlin.utils import precision as prec
from marlin.utils.precision import DeviceCaps, _cpu_flags, resolve_precision

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
    ("caps", "want"),
    [
        (CUDA_BF16, "bf16"),
        (CUDA_OLD, "fp16"),
        (CPU_AMX, "bf16"),
        (CPU_ZEN4, "bf16"),  # int8 is faster there, but not faithful enough to pick unasked
        (CPU_BF16_NO_VNNI, "bf16"),
        (CPU_AVX2, "fp32"),  # bf16 emulated, int8 not automatic
        (CPU_PLAIN, "fp32"),
        (MPS, "fp32"),
    ],
)
def test_auto_picks_per_device(caps, want):
    name, reason = resolve_precision("auto", caps.device_type, caps)
    assert name == want and reason.startswith("auto: ")


@pytest.mark.parametrize("caps", [CPU_AVX2, CPU_ZEN4, CPU_AMX, CPU_PLAIN, DeviceCaps("cpu", "cpu", int8=True)])
def test_auto_never_picks_int8_or_emulated_bf16_on_cpu(caps):
    name, _ = resolve_precision(None, "cpu", caps)
    assert name != "int8" and (name == "fp32" or caps.bf16)


def test_int8_on_request_warns_once_with_its_measured_loss():
    with pytest.warns(UserWarning, match="probe .* lost 0.027 .* 8-bit .* 0.10 with 7-bit") as record:
        assert resolve_precision("int8", "cpu", CPU_AVX2)[0] == "int8"
        resolve_precision("int8", "cpu", CPU_ZEN4)
    assert len(record) == 1


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
@pytest.mark.filterwarnings("ignore:int8 linears")
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


def test_bf16_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))  # [B, H, N, d]
    ref = F.scaled_dot_product_attention(q, k, v)
    out = bf16_attention(q, k, v)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1).min() > 0.999
    assert (out - ref).abs().max() < 0.05  # bf16 rounding, not another function
    k2 = k.clone()
    k2[1] = torch.randn(3, 37, 16, generator=g)  # each clip attends to its own keys only
    out2 = bf16_attention(q, k2, v)
    assert torch.equal(out2[0], out[0]) and not torch.allclose(out2[1], out[1], atol=1e-2)


@needs_int8
@pytest.mark.filterwarnings("ignore:int8 linears")
def test_int8_attention_is_bf16_only_where_the_cpu_has_bf16_units():
    model = tiny()
    x = clips(2)
    ref = model.extract_features(x, keep_seq=True)
    with_units = model.for_inference("int8", caps=CPU_ZEN4)
    without = model.for_inference("int8", caps=CPU_AVX2)
    flags = {m.bf16 for m in with_units.modules() if isinstance(m, quantize.QkvLinearAttention)}
    assert flags == {True}
    assert {m.bf16 for m in without.modules() if isinstance(m, quantize.QkvLinearAttention)} == {False}
    a, b = with_units.extract_features(x, keep_seq=True), without.extract_features(x, keep_seq=True)
    assert not torch.equal(a, b)
    assert F.cosine_similarity(a, ref, dim=-1).min() >= 0.99 and F.cosine_similarity(b, ref, dim=-1).min() >= 0.99


@needs_int8
def test_int8_fails_on_activation_outliers_that_fp32_does_not_see():
    """Why int8 is opt-in: a change that leaves the fp32 function as it is (a few LayerNorm channels 100x, the next
    Linear's weights on them 100x smaller: the activation outliers of trained ViTs) ruins the int8 copy."""
    model = tiny(seed=3)
    sample = clips(4)
    ref = model.extract_features(sample, keep_seq=False)
    with torch.no_grad():
        for block in model.encoder.blocks:
            for norm, linear in ((block.norm1, block.attn.qkv), (block.norm2, block.mlp.layers[0].linear)):
                norm.weight[:3] *= 100
                norm.bias[:3] *= 100
                linear.weight[:, :3] /= 100
    assert torch.allclose(model.extract_features(sample, keep_seq=False), ref, atol=1e-5)
    with pytest.warns(UserWarning, match="int8 linears"):
        q = model.for_inference("int8", caps=CPU_AVX2)
    assert F.cosine_similarity(q.extract_features(sample, keep_seq=False), ref, dim=-1).min() < 0.99
    assert model.for_inference("auto", caps=CPU_AVX2) is model and model.precision == "fp32"


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


def test_cpu_inference_kernels_per_precision():
    model = tiny()
    x = clips(2)
    ref = model.extract_features(x, keep_seq=True)
    blocks = [m for m in model.modules() if isinstance(m, (Attention, Mlp))]
    onednn = packed_linear_available()
    m = model.for_inference("bf16", caps=CPU_ZEN4)
    assert all(b.kernels == ("bf16" if packed_linear_available(torch.bfloat16) else "") for b in blocks)
    out = m.extract_features(x, keep_seq=True)
    assert out.dtype == torch.float32 and F.cosine_similarity(out, ref, dim=-1).min() > 0.99
    with torch.enable_grad():  # gradients: F.linear and SDPA (the kernels are for inference only)
        model.encoder(x).float().sum().backward()
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.for_inference("bf16", caps=CPU_AVX2)  # emulated bf16: plain autocast
    assert not any(b.kernels for b in blocks) and all(c.weight is None for b in blocks for c in b._packed)
    fp32 = model.for_inference("fp32")  # prepacked fp32 linears: the same features to float32 rounding
    assert all(b.kernels == ("fp32" if onednn else "") for b in blocks)
    torch.testing.assert_close(fp32.extract_features(x, keep_seq=True), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fp32.set_cpu_kernels("").extract_features(x, keep_seq=True), ref)
    model.for_inference("bf16", caps=CPU_ZEN4)
    if quantize.int8_available():  # asking for int8 leaves this model the exact fp32 reference, kernels off
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = model.for_inference("int8", caps=CPU_ZEN4)
        assert model.precision == "fp32" and not any(b.kernels for b in blocks)
        assert torch.equal(model.extract_features(x, keep_seq=True), ref)
        assert not any(getattr(b, "kernels", "") for b in q.modules())


def test_tf32_is_allowed_on_cuda_only() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert prec.allow_tf32("cpu") is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before  # nothing changed


def test_cpu_inference_runs_one_clip_at_a_time_with_the_same_features():
    model = tiny()
    x = clips(3)
    whole = model.extract_features(x, keep_seq=True)
    assert model.encoder.clips_per_pass == 0
    m = model.for_inference("fp32")
    assert m.encoder.clips_per_pass == 1
    calls = []
    run = m.encoder._run_blocks
    m.encoder._run_blocks = lambda h: calls.append(len(h)) or run(h)
    assert torch.allclose(m.extract_features(x, keep_seq=True), whole, atol=1e-5)
    assert calls == [1, 1, 1]
    calls.clear()
    m.train()  # training keeps the whole batch (one optimiser step sees it at once)
    m.encoder(x).sum().backward()
    assert calls == [3]


@needs_int8
@pytest.mark.filterwarnings("ignore:int8 linears")
def test_int8_features_of_a_clip_do_not_depend_on_its_batch():
    q = tiny().for_inference("int8")
    x = clips(3)
    batch = q.extract_features(x, keep_seq=False)
    alone = torch.cat([q.extract_features(x[i : i + 1], keep_seq=False) for i in range(3)])
    assert (batch - alone).abs().max() < 1e-5


needs_onednn = pytest.mark.skipif(not packed_linear_available(), reason="torch built without oneDNN")


@needs_onednn
def test_packed_linear_matches_f_linear_and_follows_weight_changes():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((2, 5, 24), (16, 24), (16,)))
    packed = PackedLinear()
    if packed_linear_available(torch.bfloat16):  # oneDNN's bf16 needs AVX512 (or AMX) on x86
        want = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float()
        got = packed(x, w, (b,), torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == (2, 5, 16)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(packed(x, w, (b,), torch.float32), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an optimiser step / load_state_dict: in place, same storage
        w.mul_(-1)
        b.add_(3)
    torch.testing.assert_close(packed(x, w, (b,), torch.float32), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # weights without a version counter are repacked on every call
        wi, bi = w.clone(), b.clone()
        first = packed(x, wi, (bi,), torch.float32)
        wi.zero_()
        assert torch.equal(packed(x, wi, (bi,), torch.float32), bi.expand_as(first))


@needs_onednn
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_kernels_never_serve_stale_weights_and_stay_out_of_checkpoints(precision):
    model, x = tiny(), clips(1)
    keys = set(model.state_dict())
    model.for_inference(precision, caps=CPU_ZEN4)
    before = model.extract_features(x, keep_seq=False)
    assert set(model.state_dict()) == keys
    copy_ = copy.deepcopy(model)  # packs its own weights
    assert all(c.weight is None for m in copy_.modules() if isinstance(m, Mlp) for c in m._packed)
    other = tiny(seed=1)
    model.load_state_dict(other.state_dict())
    want = other.for_inference(precision, caps=CPU_ZEN4).extract_features(x, keep_seq=False)
    after = model.extract_features(x, keep_seq=False)
    assert torch.equal(after, want) and not torch.allclose(after, before, atol=1e-2)
    torch.testing.assert_close(copy_.extract_features(x, keep_seq=False), before)


@pytest.mark.parametrize(
    ("caps", "want"),
    [
        (CPU_ZEN4, "bf16"),
        (CPU_AMX, "bf16"),
        (CPU_AVX2, "fp32"),
        (CPU_PLAIN, "fp32"),
        (CUDA_BF16, "bf16"),
        (CUDA_OLD, "fp32"),
        (MPS, "fp32"),
    ],  # fmt: skip
)
def test_training_auto_is_bf16_only_where_it_is_native(caps, want):
    assert prec.training_precision("auto", caps.device_type, caps) == want
    assert prec.training_precision("fp32", caps.device_type, caps) == "fp32"


def test_training_precision_rejects_fp16_and_int8_and_autocast_resolves_auto(monkeypatch):
    for bad in ("fp16", "int8", "half"):
        with pytest.raises(ValueError, match="training precision"):
            prec.training_precision(bad, "cpu", CPU_ZEN4)
    monkeypatch.setattr(prec, "device_capabilities", lambda device: CPU_ZEN4)
    ctx = prec.autocast("cpu", "auto")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    monkeypatch.setattr(prec, "device_capabilities", lambda device: CPU_AVX2)
    assert not isinstance(prec.autocast("cpu", "auto"), torch.autocast)
    with pytest.warns(UserWarning, match="emulated"):
        assert prec.training_precision("bf16", "cpu", CPU_AVX2) == "bf16"


def test_pretraining_defaults_to_auto_and_checks_the_name():
    from marlin.train.config import PretrainConfig

    assert PretrainConfig().precision == "auto"
    with pytest.raises(ValueError, match="precision must be auto, fp32 or bf16"):
        PretrainConfig(precision="fp16")


@needs_onednn
def test_fp32_kernels_leave_other_dtypes_and_gradients_to_the_plain_modules():
    model, x = tiny(), clips(1)
    model.for_inference("fp32")
    ref = model.extract_features(x, keep_seq=False)
    plain = copy.deepcopy(model).set_cpu_kernels("").double()
    double = model.double().extract_features(x.double(), keep_seq=False)
    assert double.dtype == torch.float64 and torch.equal(double, plain.extract_features(x.double(), keep_seq=False))
    model.float()
    grad_x = x.clone().requires_grad_(True)
    out = model.extract_features(grad_x, keep_seq=False)  # input needing gradients: the autograd path
    out.sum().backward()
    assert grad_x.grad is not None and torch.allclose(out, ref, atol=1e-5)


@needs_int8
def test_int8_activation_grid_is_8_bit_only_where_int8_dot_products_cannot_overflow():
    """Inputs at the top of the activation grid against weights of +127: on AVX2, u8 x s8 pairs summed in saturating
    16 bits overflow at 8 bits (255 * 127 * 2 > 32767) and halve the result; at 7 bits (127 * 127 * 2) they cannot.
    The grid chosen for this CPU must give the float result."""
    flags = _cpu_flags()
    full = quantize.int8_full_range(flags)
    assert full == bool({"avx512_vnni", "amx_int8"} & flags)
    for grid in sorted({False, full}):  # 7 bits everywhere, and 8 where this CPU allows it
        linear = torch.nn.Linear(64, 4, bias=False)
        with torch.no_grad():
            linear.weight.fill_(1.0)
        q = quantize.quantize_linears(torch.nn.Sequential(linear), full_range=grid)
        assert [m.full_range for m in q.modules() if isinstance(m, quantize.Int8Linear)] == [grid]
        out = q(torch.ones(3, 64))
        assert torch.allclose(out, torch.full((3, 4), 64.0), rtol=0.02), (grid, out)  # not ~32: saturated pairs


@needs_int8
@pytest.mark.filterwarnings("ignore:int8 linears")
def test_int8_copy_takes_its_activation_grid_from_the_capability_probe():
    model = tiny()
    vnni = DeviceCaps("cpu", "cpu", int8=True, vnni=True, cpu_capability="AVX512", flags=frozenset({"avx512_vnni"}))
    copies = {"avx2": model.for_inference("int8", caps=CPU_AVX2), "vnni": model.for_inference("int8", caps=vnni)}
    grids = {k: {m.full_range for m in q.modules() if isinstance(m, quantize.Int8Linear)} for k, q in copies.items()}
    assert grids == {"avx2": {False}, "vnni": {True}}
    x = clips(2)
    ref = model.extract_features(x, keep_seq=True)
    safe = ["avx2", "vnni"] if quantize.int8_full_range(_cpu_flags()) else ["avx2"]  # 8 bits would overflow here
    for name in safe:
        out = copies[name].extract_features(x, keep_seq=True)
        assert F.cosine_similarity(out, ref, dim=-1).min() >= 0.99
