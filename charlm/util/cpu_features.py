"""What this CPU can do, read from the operating system without importing torch: its model name and the
instruction sets PyTorch's kernels and charlm's C++ depend on (``/proc/cpuinfo`` on Linux, ``sysctl`` on an
Intel Mac; other systems report nothing). ``charlm env`` shows them, the benchmarks print them, and
``train.precision=auto`` asks :func:`native_bf16` whether bfloat16 arithmetic is native here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# /proc/cpuinfo flag names -> the name reported; AMX is reported when any of its parts is there
CPU_FLAGS = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512_bf16": "avx512_bf16"}
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
# macOS (Intel): sysctl machdep.cpu.{features,leaf7_features} words -> the name reported
MAC_FLAGS = {"AVX2": "avx2", "FMA": "fma", "AVX512F": "avx512f", "AVX512BF16": "avx512_bf16", "AMX-TILE": "amx"}
CPUINFO = Path("/proc/cpuinfo")


def sysctl(*names: str) -> str | None:
    """The values ``sysctl -n`` prints for ``names``, or None where there is no sysctl or it fails."""
    try:
        done = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_cpuinfo(text: str) -> tuple[str | None, dict[str, bool]]:
    """(model name, {avx2, fma, avx512f, avx512_bf16, amx: present}) from the text of ``/proc/cpuinfo`` (x86;
    other CPUs have other flags, and every one of these reads False)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    found = {name: flag in flags for flag, name in CPU_FLAGS.items()}
    found["amx"] = any(flag in flags for flag in AMX_FLAGS)
    return model, found


def cpu_flags() -> tuple[str | None, dict[str, bool | None]]:
    """(model name, {avx2, fma, avx512f, avx512_bf16, amx: present, or None where this system cannot say})."""
    model: str | None = None
    flags: dict[str, bool | None] = {name: None for name in [*CPU_FLAGS.values(), "amx"]}
    if sys.platform.startswith("linux") and CPUINFO.is_file():
        model, found = parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
        flags.update(found)
    elif sys.platform == "darwin":
        model = (sysctl("machdep.cpu.brand_string") or "").strip() or None
        words = set((sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features") or "").upper().split())
        flags = {name: (word in words) for word, name in MAC_FLAGS.items()}
    return model, flags


def native_bf16() -> str | None:
    """The feature that gives this CPU bfloat16 arithmetic natively (``"avx512_bf16"`` or ``"amx"``), or None."""
    flags = cpu_flags()[1]
    return next((name for name in ("amx", "avx512_bf16") if flags.get(name)), None)
