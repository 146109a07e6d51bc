"""What ``charlm env`` reports for a bug report: versions, the machine, the CPU features and threads, the
GPUs, and whether the C++ kernels are built for this source. It only looks: nothing is built or changed.

:func:`environment` returns one JSON-ready mapping (sections of primitive values; ``None`` where a thing
is unknown or absent).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from charlm import __version__
from charlm.cells import norm_lstm_cpp
from charlm.cells.onednn_matmul import onednn_in_use
from charlm.native.build import build_directory

# the distributions of charlm's dependencies, then of its optional extras (None: not installed)
REQUIRED = ("torch", "lightning", "torchmetrics", "typer", "rich", "PyYAML", "ninja", "filelock")
OPTIONAL = ("tensorboard", "matplotlib", "onnx", "onnxruntime", "optuna", "fastapi", "uvicorn")
# /proc/cpuinfo flag names -> the name reported; AMX is reported when any of its parts is there
CPU_FLAGS = {"avx2": "avx2", "avx512f": "avx512f", "avx512_bf16": "avx512_bf16"}
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
# macOS (Intel): sysctl machdep.cpu.{features,leaf7_features} words -> the name reported
MAC_FLAGS = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512BF16": "avx512_bf16", "AMX-TILE": "amx"}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sysctl(*names: str) -> str | None:
    try:
        done = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_cpuinfo(text: str) -> tuple[str | None, dict[str, bool]]:
    """(model name, {avx2, avx512f, avx512_bf16, amx: present}) from the text of ``/proc/cpuinfo`` (x86;
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


def cpu() -> dict[str, Any]:
    """The CPU's model, its features that matter to PyTorch's kernels here, and the threads."""
    model: str | None = None
    flags: dict[str, bool | None] = {"avx2": None, "avx512f": None, "avx512_bf16": None, "amx": None}
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform.startswith("linux") and cpuinfo.is_file():
        model, found = parse_cpuinfo(cpuinfo.read_text(encoding="utf-8", errors="replace"))
        flags.update(found)
    elif sys.platform == "darwin":
        model = (_sysctl("machdep.cpu.brand_string") or "").strip() or None
        words = set((_sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features") or "").upper().split())
        flags = {name: (word in words) for word, name in MAC_FLAGS.items()}
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"model": model or platform.processor() or None, "machine": platform.machine(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(), **flags,
            "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def accelerators() -> dict[str, Any]:
    """CUDA / cuDNN as torch was built with them, the GPUs it sees, Apple's MPS, oneDNN."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": torch.version.cuda, "cudnn": cudnn, "cuda_available": torch.cuda.is_available(), "gpus": gpus,
            "mps_available": bool(mps is not None and mps.is_available()),
            "onednn_available": torch.backends.mkldnn.is_available(), "onednn_products": onednn_in_use()}


def cpp_kernels() -> dict[str, Any]:
    """Whether the C++ loops of lstm-ln / lstm-bn are built for this source, torch, Python and CPU (their
    cache folder is looked at, nothing is built)."""
    folder = build_directory(norm_lstm_cpp.SOURCE)
    built = any(p.suffix in (".so", ".pyd", ".dylib") for p in folder.glob(f"{norm_lstm_cpp.NAME}.*"))
    return {"cells": list(norm_lstm_cpp.CELLS), "built": built, "folder": str(folder),
            "disabled": os.environ.get("CHARLM_NATIVE", "1") == "0"}


def environment() -> dict[str, Any]:
    """Everything ``charlm env`` reports, as JSON-ready sections."""
    return {
        "charlm": {"version": __version__, "location": str(Path(__file__).resolve().parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "platform": platform.platform()},
        "packages": {name: package_version(name) for name in REQUIRED},
        "optional": {name: package_version(name) for name in OPTIONAL},
        "cpu": cpu(),
        "accelerators": accelerators(),
        "cpp_kernels": cpp_kernels(),
    }
