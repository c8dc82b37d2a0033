"""Compute precision of training, encoding and evaluation: `auto | fp32 | bf16 | fp16`.

    fp32   every operation in float32.
    bf16   autocast: matrix products (linear layers, attention) run in bfloat16 on float32 weights ("master
           weights"); norms, softmax and reductions stay in float32 as torch's autocast lists decide.
           Similarities and losses are float32 in any case (`losses.contrastive` promotes to >= fp32).
    fp16   the same with float16; CUDA only (training adds loss scaling, accelerate's GradScaler).
    auto   bf16 where the device computes bfloat16 natively, fp32 elsewhere; never fp16:
             CUDA  `torch.cuda.is_bf16_supported(including_emulation=False)` (Ampere and newer)
             CPU   AVX512_BF16 or AMX-BF16: flags `avx512_bf16` / `amx_bf16` in /proc/cpuinfo (torch's own
                   CPU feature check where there is no /proc/cpuinfo)
           Without those instructions bf16 is emulated on a CPU and slower than fp32, so auto keeps fp32.

Where llm2emb itself encodes (`llm2emb eval` / `encode` / `mine`, study and pipeline evaluation, teachers) the
default is `ENCODE_DEFAULT` (auto): on a CPU with AMX an fp32 evaluation takes about twice as long. A model loaded
with `Embedder.from_pretrained` and encoded directly keeps its saved setting (fp32 unless saved otherwise), and
`--precision fp32` / `eval.precision: fp32` gives vectors that are bit-stable across machines. Whatever auto
resolves to is recorded with each result and is part of study and pipeline evaluation keys, so results in
different precisions are never mixed in one report.

`resolve_precision(setting, device)` turns a setting into a `Precision` with the reason for the choice;
`log_choice` writes that reason once per process as one line; `autocast(precision, device)` is the context
manager that applies it (a no-op for fp32).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterable

import torch

from llm2emb.errors import UserError, did_you_mean

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # the spellings --dtype uses
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: what llm2emb's commands and orchestration encode in when no precision is given (module docstring)
ENCODE_DEFAULT = "auto"
#: precision -> accelerate's `mixed_precision`
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Precision:
    """A resolved precision (fp32, bf16 or fp16), the setting it came from and why it was chosen."""

    name: str
    setting: str
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _AUTOCAST_DTYPES.get(self.name)

    @property
    def mixed_precision(self) -> str:
        return MIXED_PRECISION[self.name]

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"


def canonical_precision(value: str, source: str = "precision") -> str:
    """`value` as one of PRECISIONS (float32 / bfloat16 / float16 accepted); UserError otherwise."""
    name = ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    if name not in PRECISIONS:
        raise UserError(f"{source} is {value!r}; choose one of: {', '.join(PRECISIONS)}."
                        + did_you_mean(str(value), PRECISIONS))
    return name


def encode_setting(setting: str | None, source: str = "precision") -> str:
    """The precision setting an llm2emb command encodes with: `setting` when given, else ENCODE_DEFAULT."""
    return canonical_precision(setting, source) if setting else ENCODE_DEFAULT


def default_device() -> str:
    """Where llm2emb encodes when no device is named: the first CUDA GPU when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolved_encode_precision(setting: str | None, device: torch.device | str | None = None) -> str:
    """The precision (fp32 / bf16 / fp16) an evaluation with `setting` (None: ENCODE_DEFAULT) computes in on
    `device` (default: `default_device()`); what study and pipeline evaluation keys record."""
    return resolve_precision(encode_setting(setting), device or default_device()).name


# ---------------------------------------------------------------------------------------------- detection
def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU feature flags the kernel reports (first `flags` line of /proc/cpuinfo), None when unreadable."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def _torch_cpu_bf16_flags() -> frozenset[str]:
    """The bf16 flags torch's own CPU feature check reports (for systems without /proc/cpuinfo)."""
    found = set()
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for flag, name in checks.items():
        check = getattr(torch.cpu, name, None)  # private helpers; absent in some torch versions
        try:
            if check is not None and check():
                found.add(flag)
        except RuntimeError:
            continue
    return frozenset(found)


def cpu_bf16_native(flags: Iterable[str] | None = None) -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the evidence); `flags` defaults to this machine's."""
    if flags is not None:
        flag_set, where = frozenset(flags), "given flags"
    else:
        read = cpu_flags()
        flag_set, where = (read, "/proc/cpuinfo") if read is not None else (_torch_cpu_bf16_flags(),
                                                                            "torch's CPU check")
    found = [f for f in CPU_BF16_FLAGS if f in flag_set]
    if found:
        return True, f"CPU has {' and '.join(found)} ({where})"
    return False, f"CPU has neither {' nor '.join(CPU_BF16_FLAGS)} ({where}); bf16 would be emulated and slower"


def cuda_bf16_native(device: torch.device) -> tuple[bool, str]:
    """(whether this CUDA device computes bf16 natively, the evidence)."""
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch without the including_emulation argument
        native = torch.cuda.is_bf16_supported()
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CUDA device"
    if native:
        return True, f"{name} computes bf16 natively"
    return False, f"{name} has no native bf16"


# ---------------------------------------------------------------------------------------------- resolution
def resolve_precision(setting: str, device: torch.device | str, cpu_flag_set: Iterable[str] | None = None
                      ) -> Precision:
    """What `setting` means on `device`; UserError for a precision the device cannot run.

    `cpu_flag_set` replaces this machine's CPU flags (tests)."""
    setting = canonical_precision(setting)
    device = torch.device(device)
    kind = device.type
    if setting == "fp32":
        return Precision("fp32", setting, "as set")
    if setting == "fp16":
        if kind != "cuda":
            raise UserError(f"precision fp16 needs a CUDA GPU, but this runs on {kind}; use bf16 or fp32 "
                            "(or auto).")
        return Precision("fp16", setting, "as set")
    if setting == "bf16":
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"precision bf16: {cuda_bf16_native(device)[1]} and torch cannot emulate it; use "
                            "fp16 or fp32 (or auto).")
        if kind == "cpu":
            native, why = cpu_bf16_native(cpu_flag_set)
            if not native:
                return Precision("bf16", setting, f"as set, although the {why}")
        return Precision("bf16", setting, "as set")
    # auto
    if kind == "cuda":
        native, why = cuda_bf16_native(device)
    elif kind == "cpu":
        native, why = cpu_bf16_native(cpu_flag_set)
    else:
        native, why = False, f"auto uses bf16 on CUDA and CPUs only, not on {kind}"
    return Precision("bf16" if native else "fp32", setting, f"auto: {why}")


def autocast(precision: Precision, device: torch.device | str) -> ContextManager:
    """torch.autocast for bf16 / fp16 on `device`; a no-op for fp32."""
    dtype = precision.autocast_dtype
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


_LOGGED: set[tuple[str, str]] = set()


def log_choice(precision: Precision, what: str) -> None:
    """One INFO line per distinct (what, choice) per process, e.g. 'encode: precision bf16 (auto: CPU has
    avx512_bf16 (/proc/cpuinfo))'; encode() runs many times and should not repeat it."""
    key = (what, precision.describe())
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s: %s", what, precision.describe())
