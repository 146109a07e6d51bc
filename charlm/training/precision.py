"""``train.precision: auto`` (the default): the precision a run trains in when the config leaves the choice to charlm.

bfloat16 pays on a CPU that has it natively (AVX512_BF16 or AMX): there the default model (``lstm``, whose layers
run the torch LSTM op, which oneDNN runs in bfloat16) trained its 4,200 steps faster under ``bf16-mixed`` than in
float32, to the same validation loss (docs/results.md, "bf16-mixed on a CPU"). Everywhere else ``auto`` is
float32: on GPUs (``configs/awd-lstm.yaml`` names ``bf16-mixed`` itself), on CPUs without native bfloat16, and
for the cells with a hand-written kernel, which runs in float32 or float64 only (under autocast they would take
the slower autograd loop). A comparison or a search (``charlm compare``, ``charlm tune``) trains every run in
float32 under ``auto``, so that cells and trials are never measured in different precisions.
"""

from __future__ import annotations

import copy

import torch

from charlm.cells.registry import get_cell
from charlm.config import Config
from charlm.util.cpu_features import native_bf16

AUTO = "auto"
FLOAT32 = "32-true"


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting trains on the CPU (``auto`` picks a CUDA or Apple GPU first)."""
    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()


def auto_precision(config: Config) -> tuple[str, str | None]:
    """What ``auto`` means for this config on this machine, and the line that says why where it is not float32."""
    m = config.model
    feature = native_bf16()
    torch_lstm = get_cell(m.cell).torch_rnn == "LSTM" and m.torch_rnn and not m.compile
    if feature and torch_lstm and on_cpu(config.train.accelerator):
        return "bf16-mixed", (f"auto chose bf16-mixed: this CPU has native bfloat16 ({feature}), where it trains "
                              "the LSTM faster to the same loss; --precision 32-true trains in float32")
    return FLOAT32, None


def precision_of(config: Config) -> str:
    """The Lightning precision ``config`` trains in here: ``train.precision``, with ``auto`` resolved."""
    return auto_precision(config)[0] if config.train.precision == AUTO else config.train.precision


def resolve_precision(config: Config) -> tuple[Config, str | None]:
    """``config`` with ``train.precision: auto`` replaced by what it means here (a copy; the same config where it
    names a precision), and the line to show the user, if any."""
    if config.train.precision != AUTO:
        return config, None
    precision, note = auto_precision(config)
    config = copy.deepcopy(config)
    config.train.precision = precision
    return config, note


def for_comparison(config: Config) -> Config:
    """``config`` for a run that is compared with others (a comparison's cells, a search's trials): ``auto``
    becomes float32 for every run alike (in place; returns the config)."""
    if config.train.precision == AUTO:
        config.train.precision = FLOAT32
    return config
