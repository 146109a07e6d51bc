"""The machine a benchmark ran on, for the header of its table: the CPU's model, the features its kernels and
charlm's C++ use, and torch's capability (``charlm env``'s reading of the CPU)."""

from __future__ import annotations

import platform

import torch

from charlm.tools.env import cpu

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx")


def describe_cpu() -> str:
    """``AMD EPYC (avx2, fma; torch capability AVX2)``."""
    facts = cpu()
    flags = [name for name in FLAGS if facts.get(name)]
    return (f"{facts['model'] or platform.machine()} ({', '.join(flags) or 'none of ' + ', '.join(FLAGS)}; "
            f"torch capability {torch.backends.cpu.get_cpu_capability()})")
