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
from typing import NamedTuple

import torch
from torch import Tensor, nn

from charlm.config import ModelConfig
from charlm.model.recurrent_layer import RecurrentLayer, State
from charlm.model.regularizers import LockedDropout, embedding_dropout

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
        self.config = config
        c = config
        self.encoder = nn.Embedding(vocab_size, c.embedding_size)
        sizes = [c.embedding_size] + [c.hidden_size] * (c.num_layers - 1)
        sizes.append(c.embedding_size if c.tie_weights else c.hidden_size)
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
