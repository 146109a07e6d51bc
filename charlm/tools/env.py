"""What ``charlm env`` reports for a bug report: versions, the machine, the CPU features, the GPUs, and the C++
libraries built so far. It only looks: nothing is built or changed.

:func:`environment` answers at once: everything here is read without importing torch (package metadata,
``/proc/cpuinfo`` or ``sysctl``, the NVIDIA driver's ``/proc`` files, the build cache). ``with_torch=True``
(``charlm env --torch``) adds what torch itself reports, which needs torch loaded (a few seconds): the CPU
capability its kernels dispatch to, its thread counts, CUDA / cuDNN and the GPUs it sees, Apple's MPS, oneDNN,
and whether the C++ kernels are built for this source, torch, Python and CPU.

Every value is JSON-ready (``None`` where a thing is unknown or absent).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from charlm import __version__
from charlm.native.cache import built_libraries, cache_root
from charlm.util.cpu_features import cpu_flags

# the distributions of charlm's dependencies, then of its optional extras (None: not installed)
REQUIRED = ("torch", "lightning", "torchmetrics", "typer", "rich", "PyYAML", "ninja", "filelock")
OPTIONAL = ("tensorboard", "matplotlib", "scipy", "onnx", "onnxruntime", "optuna", "fastapi", "uvicorn",
            "safetensors")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu() -> dict[str, Any]:
    """The CPU's model, the features PyTorch's kernels and charlm's C++ depend on (:mod:`charlm.util.cpu_features`),
    and the CPUs usable here."""
    model, flags = cpu_flags()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"model": model or platform.processor() or None, "machine": platform.machine(), **flags,
            "logical_cpus": os.cpu_count(), "usable_cpus": affinity}


def driver_gpus(folder: Path = NVIDIA_GPUS) -> list[str]:
    """The NVIDIA GPUs the driver lists (``Model:`` of ``/proc/driver/nvidia/gpus/*/information``): none where
    there is no NVIDIA driver (other GPUs: ``charlm env --torch``)."""
    names = []
    for info in sorted(folder.glob("*/information")) if folder.is_dir() else []:
        found = re.search(r"^Model:\s*(.+)$", info.read_text(errors="replace"), re.MULTILINE)
        names.append(found.group(1).strip() if found else info.parent.name)
    return names


def native() -> dict[str, Any]:
    """The build cache: where it is, whether the C++ libraries are turned off, and what is built there (a
    folder per torch, Python, CPU capability and source; ``--torch`` says which folder this install uses)."""
    root = cache_root()
    builds = {p.name: built_libraries(p) for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
    return {"cache": str(root), "disabled": os.environ.get("CHARLM_NATIVE", "1") == "0",
            "builds": {name: libraries for name, libraries in builds.items() if libraries}}


def torch_facts() -> dict[str, Any]:
    """What torch reports here (imports torch, and charlm's modules that use it)."""
    import torch

    from charlm.cells import norm_lstm_cpp
    from charlm.cells.onednn_matmul import onednn_in_use
    from charlm.model import fast_step
    from charlm.native.build import build_directory

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    mps = getattr(torch.backends, "mps", None)
    libraries = {"norm_lstm": (norm_lstm_cpp.SOURCE, norm_lstm_cpp.NAME), "model_step": (fast_step.SOURCES,
                                                                                      fast_step.NAME)}
    kernels = {}
    for label, (sources, name) in libraries.items():
        folder = build_directory(sources)
        kernels[label] = {"built": name in built_libraries(folder), "folder": str(folder)}
    return {"version": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "gpus": gpus,
            "mps_available": bool(mps is not None and mps.is_available()),
            "onednn_available": torch.backends.mkldnn.is_available(), "onednn_products": onednn_in_use(),
            "cpp_kernels": kernels}


def environment(with_torch: bool = False) -> dict[str, Any]:
    """Everything ``charlm env`` reports, as JSON-ready sections (``torch`` only ``with_torch``)."""
    facts = {
        "charlm": {"version": __version__, "location": str(Path(__file__).resolve().parent.parent)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(), "platform": platform.platform()},
        "packages": {name: package_version(name) for name in REQUIRED},
        "optional": {name: package_version(name) for name in OPTIONAL},
        "cpu": cpu(),
        "gpus": {"nvidia_driver": driver_gpus()},
        "native": native(),
    }
    if with_torch:
        facts["torch"] = torch_facts()
    return facts
