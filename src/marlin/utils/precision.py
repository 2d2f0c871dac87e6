"""Numeric precision: the one autocast helper every command uses, and the per-device choice of an inference precision.

Names: ``"fp32"`` (no autocast), ``"bf16"`` and ``"fp16"`` (autocast on the device's type; weights, optimiser state
and losses stay float32), ``"auto"`` (resolved per device: `resolve_precision` for inference, `training_precision`
for training, where `autocast` resolves it), and, for inference only, ``"int8"`` (dynamic int8 Linear layers on x86
CPUs, see `marlin.models.quantize`).

Why a choice per device: bf16 is fast on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16) but emulated,
~5x slower than fp32 for ViT-B, on a 2-core AVX2 CPU (measured). int8 dynamic quantisation is the fastest CPU path
(ViT-B 1.3-1.4x fp32 on AVX2, ~2.2x on a 2-core AVX512-BF16 + VNNI EPYC) but `auto` never picks it: on GRID clips
its features moved by 0.56 (tiny encoder at random init) and 0.08 (MARLIN-pretrained 1000 steps) of their spread
between clips while the pooled cosine to fp32 stayed >= 0.9999 (cosine cannot see it: the clips of one face differ by
~4% of the feature norm), and a lip-reading probe lost 0.10 and 0.02-0.03 mean accuracy, where bf16 changed nothing
(within 0.01). So `auto` = bf16 where it is native, else fp32; int8 only on request, with a warning. `auto` never
picks a path slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from dataclasses import dataclass, field

import torch

__all__ = [
    "INFERENCE_PRECISIONS",
    "INT8_WARNING",
    "PRECISIONS",
    "TRAIN_PRECISIONS",
    "DeviceCaps",
    "allow_tf32",
    "autocast",
    "device_capabilities",
    "inference_precision_name",
    "precision_name",
    "resolve_precision",
    "training_precision",
]

log = logging.getLogger("marlin")

PRECISIONS = ("fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # fp16 training would need loss scaling: not offered
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", torch.float32: "fp32", torch.bfloat16: "bf16",
            torch.float16: "fp16", None: "fp32", "qint8": "int8"}  # fmt: skip
_SAID: set[str] = set()  # messages already logged / warned (each once per process)


def precision_name(precision: str | torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a name, alias or dtype; a one-line ``ValueError`` otherwise."""
    name = _ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return name  # type: ignore[return-value]


def inference_precision_name(precision: str | torch.dtype | None) -> str:
    """One of `INFERENCE_PRECISIONS` for a name, alias or dtype (None = auto); a one-line ``ValueError`` otherwise."""
    name = "auto" if precision is None else _ALIASES.get(precision, precision)
    if name not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    return name  # type: ignore[return-value]


def autocast(device: torch.device | str, precision: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (nothing for fp32); ``"auto"`` is `training_precision`'s
    choice for `device`."""
    name = training_precision("auto", device) if precision == "auto" else precision_name(precision)
    if name == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)


def allow_tf32(device: torch.device | str) -> bool:
    """Let float32 matmuls and convolutions on a CUDA `device` use TF32 tensor cores (Ampere and later); whether it
    applied (False off CUDA, where nothing changes).

    Training runs call it (the fp32 parts outside bf16 autocast, e.g. losses and the optimiser's own matmuls, then run
    on tensor cores, as PyTorch's own recipes do); inference does not: ``--dtype fp32`` stays true float32, the
    reference that bf16 / int8 are compared with."""
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


@dataclass(frozen=True)
class DeviceCaps:
    """What a device can run fast. `bf16` / `fp16`: native matrix support (CUDA; on CPUs AMX / AVX512-BF16 for
    bf16, AMX-FP16 / AVX512-FP16 for fp16); `int8`: torch's x86 int8 engine on an AVX2+ CPU; `vnni`: int8
    dot-product instructions; `amx`: Intel AMX tiles (bf16 matmuls far faster than on AVX512-BF16)."""

    device_type: str
    name: str = ""
    bf16: bool = False
    fp16: bool = False
    int8: bool = False
    vnni: bool = False
    amx: bool = False
    cpu_capability: str = ""
    flags: frozenset[str] = field(default_factory=frozenset)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist, e.g. macOS); read once (a training step
    resolves ``auto`` through `device_capabilities` every time)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def device_capabilities(device: torch.device | str) -> DeviceCaps:
    """Probe `device` (``"cpu"``, ``"cuda[:i]"``, ...) for fast bf16 / fp16 / int8 matrix support, at run time."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return DeviceCaps("cuda", torch.cuda.get_device_name(index), bf16=torch.cuda.is_bf16_supported(), fp16=True)
    if dev.type != "cpu":
        return DeviceCaps(dev.type, dev.type)
    capability = str(torch.backends.cpu.get_cpu_capability())
    flags = _cpu_flags()
    amx = "amx_bf16" in flags or "AMX" in capability.upper()
    bf16_units = amx or "avx512_bf16" in flags
    engine = any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))
    x86_simd = capability.upper().startswith(("AVX2", "AVX512"))
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    fp16_units = bool({"amx_fp16", "avx512_fp16"} & flags)
    return DeviceCaps("cpu", "cpu", bf16=bf16_units, fp16=fp16_units, int8=engine and x86_simd, vnni=vnni,
                      amx=amx, cpu_capability=capability, flags=flags)  # fmt: skip


def _say_once(message: str, *, warn: bool = False) -> None:
    if message in _SAID:
        return
    _SAID.add(message)
    if warn:
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        log.info(message)


def _cpu_desc(caps: DeviceCaps) -> str:
    return f"CPU {caps.cpu_capability or '?'}" + ("" if caps.bf16 else ", no AMX / AVX512-BF16 units")


#: Why int8 is never automatic (measured; README "Precision"), said once when it is asked for.
INT8_WARNING = (
    "int8 linears are fast but coarse: measured on GRID clips a lip-reading probe on a random-init tiny encoder lost "
    "0.027 mean accuracy with 8-bit activations (CPUs with AVX512-VNNI / AMX-INT8) and 0.10 with 7-bit (elsewhere), "
    "0.02-0.03 on a pretrained one (bf16: <= 0.008); check it on your task, or use precision auto / bf16 / fp32"
)


def _auto(caps: DeviceCaps) -> tuple[str, str]:
    if caps.device_type == "cuda":
        if caps.bf16:
            return "bf16", f"auto: bf16 on {caps.name or 'cuda'} (native bf16 matmuls)"
        return "fp16", f"auto: fp16 on {caps.name or 'cuda'} (no bf16 support)"
    if caps.device_type != "cpu":
        return "fp32", f"auto: fp32 on {caps.device_type} (reduced precision not measured there)"
    if caps.bf16:
        return "bf16", f"auto: bf16 on {_cpu_desc(caps)} (bf16 matrix units)"
    return "fp32", (f"auto: fp32 on {_cpu_desc(caps)} (bf16 would be emulated, ~5x slower; int8 is faster but not "
                    "faithful enough to choose for you: precision int8 asks for it)")  # fmt: skip


def resolve_precision(
    precision: str | torch.dtype | None,
    device: torch.device | str,
    caps: DeviceCaps | None = None,
) -> tuple[str, str]:
    """The concrete precision (``fp32``/``bf16``/``fp16``/``int8``) to run on `device`, and why (logged once).

    ``auto``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with bf16 units (AMX / AVX512-BF16), else
    fp32; never int8 (see the module doc). An explicit precision is kept, with a warning (once) where it is emulated
    and slow, and for int8 (its measured loss of detail); int8 off an x86 CPU with the int8 engine is a ValueError.
    `caps` defaults to `device_capabilities(device)`; tests pass fakes.
    """
    name = inference_precision_name(precision)
    caps = caps or device_capabilities(device)
    if name == "auto":
        name, reason = _auto(caps)
        _say_once(reason)
        return name, reason
    if name == "int8":
        if not (caps.device_type == "cpu" and caps.int8):
            where = _cpu_desc(caps) if caps.device_type == "cpu" else caps.device_type
            raise ValueError(f"precision 'int8' needs an x86 CPU with torch's int8 engine, not {where}: use auto")
        _say_once(INT8_WARNING, warn=True)
        return name, INT8_WARNING
    reason = f"{name} requested"
    native = {"bf16": caps.bf16, "fp16": caps.fp16}.get(name, True)
    if caps.device_type == "cpu" and not native:
        reason = (f"{name} on {_cpu_desc(caps)}, is emulated: bf16 measured ~5x slower than fp32 for ViT-B on AVX2; "
                  "use precision auto (fp32 there) for speed")  # fmt: skip
        _say_once(reason, warn=True)
    return name, reason


def training_precision(precision: str, device: torch.device | str, caps: DeviceCaps | None = None) -> str:
    """The precision a training step runs in on `device`: ``fp32`` or ``bf16`` (autocast; weights, optimiser state and
    losses stay float32).

    ``auto``: bf16 where the device has native bf16 matmuls (CUDA with bf16, CPUs with AMX / AVX512-BF16), else fp32
    (logged once). Measured: marlin's ViT-S pretraining step on a 2-core AVX512-BF16 EPYC ran 3.41x the official
    step in bf16 and 2.36x in fp32, same loss to 1e-5 (`benchmarks/bench_pretrain.py --bf16`); on an AVX2 CPU bf16
    would be emulated and several times slower. An explicit bf16 where it is emulated runs, with a warning (once).
    """
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"training precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}")
    caps = caps or device_capabilities(device)
    where = _cpu_desc(caps) if caps.device_type == "cpu" else (caps.name or caps.device_type)
    if precision == "auto":
        name = "bf16" if caps.bf16 and caps.device_type in ("cpu", "cuda") else "fp32"
        why = "native bf16 matmuls" if name == "bf16" else "bf16 would be emulated or is not measured there"
        _say_once(f"training precision auto: {name} on {where} ({why})")
        return name
    if precision == "bf16" and caps.device_type == "cpu" and not caps.bf16:
        _say_once(f"training in bf16 on {where}, where it is emulated and several times slower than fp32: use auto",
                  warn=True)  # fmt: skip
    return precision
