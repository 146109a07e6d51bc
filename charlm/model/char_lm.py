"""The language model: a plain ``nn.Module`` (AWD-LSTM layout, Merity et al. 2017).

    chars (B, T) -> Embedding (+ embedding dropout: whole characters)         (B, T, E)
                 -> locked dropout (dropouti)
                 -> L recurrent layers, locked dropout (dropouth) between them  (B, T, H) ... (B, T, E)
                 -> locked dropout (dropout) -> Linear decoder (tied to the embedding)  (B, T, V)

With ``tie_weights`` the last layer is sized to the embedding so the decoder can share its matrix
(Press & Wolf 2017; Inan et al. 2017).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import torch
from torch import Tensor, nn

from charlm.cells.registry import get_cell
from charlm.config import ModelConfig
from charlm.model.recurrent_layer import RecurrentLayer, State
from charlm.model.regularizers import LockedDropout, embedding_dropout
from charlm.util.errors import CharlmError

States = list[State]


class LMOutput(NamedTuple):
    logits: Tensor  # (B, T, V)
    states: States  # one per layer
    raw_last: Tensor  # last layer's output (after its LayerNorm, if any) before dropout (B, T, H_L), for TAR
    dropped_last: Tensor  # the same after dropout, for AR


class CharLM(nn.Module):
    """Embedding -> recurrent layers -> decoder, with the AWD-LSTM regularizers at each joint."""

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        if torch.get_default_device().type != "meta":  # (on the meta device nothing is allocated)
            check_fits_in_memory(vocab_size, config)
        self.config = config
        c = config
        self.encoder = nn.Embedding(vocab_size, c.embedding_size)
        sizes = layer_sizes(c)
        self.layers = nn.ModuleList(
            RecurrentLayer(c.cell, sizes[i], sizes[i + 1], weight_drop=c.weight_drop,
                           weight_drop_variational=c.weight_drop_variational, torch_rnn=c.torch_rnn, init=c.init,
                           forget_bias=c.forget_bias, compile=c.compile, cell_options=dataclasses.asdict(c))
            for i in range(c.num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(sizes[i + 1]) if c.layer_norm else nn.Identity()
                                   for i in range(c.num_layers))
        self.drop_in, self.drop_between, self.drop_out = (
            LockedDropout(c.dropouti), LockedDropout(c.dropouth), LockedDropout(c.dropout))
        self.decoder = nn.Linear(sizes[-1], vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if c.tie_weights:
            self.decoder.weight = self.encoder.weight

    def forward(self, x: Tensor, states: States | None = None) -> LMOutput:
        """x (B, T) char ids -> logits (B, T, V), the new states, and the last layer's outputs."""
        h = embedding_dropout(self.encoder, x, self.config.dropoute, self.training)  # (B, T, E)
        h = self.drop_in(h)
        new_states: States = []
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            h, state = layer(h, None if states is None else states[i])  # (B, T, H_i)
            h = norm(h)
            new_states.append(state)
            if i < len(self.layers) - 1:
                h = self.drop_between(h)
        dropped = self.drop_out(h)
        return LMOutput(self.decoder(dropped), new_states, h, dropped)

    @torch.no_grad()
    def step(self, x: Tensor, states: States | None = None) -> tuple[Tensor, States]:
        """One character per stream (eval mode): x (N,) ids -> logits (N, V), new states, in PyTorch.

        Generation steps through :func:`charlm.model.fast_step.step`, which takes a C++ route where the
        model's layers allow (the same result) and this step otherwise."""
        h = self.encoder(x)  # (N, E)
        new_states: States = []
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            h, state = layer.step(h, None if states is None else states[i])  # (N, H_i)
            h = norm(h)
            new_states.append(state)
        return self.decoder(h), new_states


def detach_states(states: States) -> States:
    """Cut the graph between windows: truncated BPTT keeps the values, not the history."""
    return [tuple(t.detach() for t in state) for state in states]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layer_sizes(config: ModelConfig) -> list[int]:
    """The input size of each recurrent layer, then the last one's output size: embedding, hidden, ...,
    and the embedding again where the decoder is tied to it."""
    c = config
    return [c.embedding_size] + [c.hidden_size] * (c.num_layers - 1) + [
        c.embedding_size if c.tie_weights else c.hidden_size]


def parameter_count(vocab_size: int, config: ModelConfig) -> int:
    """The parameters of ``CharLM(vocab_size, config)``, counted from the cells' shapes without building
    anything, so a size far beyond memory is told at once (the layers of one shape are counted once)."""
    c, sizes = config, layer_sizes(config)
    spec = get_cell(c.cell)
    options = {k: v for k, v in dataclasses.asdict(c).items() if k in spec.options}
    per_shape: dict[tuple[int, int], int] = {}
    total = vocab_size * c.embedding_size + vocab_size  # the embedding and the decoder's bias
    total += 0 if c.tie_weights else vocab_size * sizes[-1]
    for i in range(c.num_layers):
        shape = (sizes[i], sizes[i + 1])
        if shape not in per_shape:
            cell = spec.build(*shape, **options)
            per_shape[shape] = sum(math.prod(s) for s in cell.param_shapes().values())
        total += per_shape[shape] + (2 * sizes[i + 1] if c.layer_norm else 0)
    return total


def memory_bytes() -> int | None:
    """This machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(vocab_size: int, config: ModelConfig) -> None:
    """Refuse, in one sentence, a model whose float32 weights alone would not fit in this machine's memory
    (before any of it is allocated: a hidden size of a million would otherwise ask for terabytes)."""
    memory = memory_bytes()
    count = parameter_count(vocab_size, config)
    if memory is None or count * 4 <= memory:
        return
    c = config
    raise CharlmError(f"the model (cell {c.cell}, {c.num_layers} layer(s) of {c.hidden_size:,}, embedding "
                      f"{c.embedding_size:,}) has {count:,} parameters, {count * 4 / 1e9:,.1f} GB for its weights "
                      f"alone, more than this machine's {memory / 1e9:,.1f} GB of memory; make model.hidden_size, "
                      "model.embedding_size or model.num_layers smaller")
