"""The plain hand-written ``nn.LSTM`` character model every charlm figure is compared against.

Deliberately ordinary: Embedding -> nn.LSTM (dropout between layers) -> dropout -> Linear, Adam,
gradient clipping, truncated BPTT over side-by-side streams, no schedule. Shared by
``benchmarks/quality.py`` and ``benchmarks/throughput.py``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.data.streams import StreamLayout, WindowSampler
from charlm.evaluation.scoring import evaluate_ids


class PlainLSTM(nn.Module):
    """Embedding -> nn.LSTM -> dropout -> Linear."""

    def __init__(self, vocab_size: int, hidden: int = 256, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):  # type: ignore[no-untyped-def]
        out, state = self.lstm(self.embed(x), state)
        return self.head(self.drop(out)), state


class _EvalAdapter(nn.Module):
    """Lets :func:`charlm.evaluation.scoring.evaluate_ids` score a :class:`PlainLSTM` (same exact streaming)."""

    def __init__(self, model: PlainLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, states=None):  # type: ignore[no-untyped-def]
        from charlm.model.char_lm import LMOutput

        state = None if states is None else states[0]
        logits, new = self.model(x, state)
        return LMOutput(logits, [new], logits, logits)


def train_plain(train_ids: Tensor, val_ids: Tensor, vocab_size: int, *, seconds: float | None = None,
                steps: int | None = None, hidden: int = 256, layers: int = 2, batch: int = 32, bptt: int = 128,
                lr: float = 2e-3, dropout: float = 0.1, seed: int = 1234, device: str | torch.device = "cpu",
                eval_batch: int = 16, eval_bptt: int = 128, autocast: torch.dtype | None = None) -> dict[str, float]:
    """Train for ``seconds`` (or ``steps``); return chars/s, steps and the exact val loss.

    On ``device="cuda"`` nn.LSTM is the cuDNN kernel; ``autocast=torch.bfloat16`` runs the training steps
    under autocast (the final evaluation stays fp32).

    Denormals are flushed to zero here too (as ``charlm train`` does): without it the carried state
    drifts into denormal floats, on which this loop would run far slower on CPU and flatter charlm.
    """
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    device = torch.device(device)
    model = PlainLSTM(vocab_size, hidden, layers, dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    layout = StreamLayout(train_ids.to(device), batch)  # the whole split on the device: windows are views
    windows = list(WindowSampler(layout, bptt))
    state = None
    n_steps, chars, start = 0, 0, time.perf_counter()
    timed_from, timed_chars = None, 0
    while True:
        for i, w in enumerate(windows):
            if i == 0:
                state = None
            b = layout.batch(w)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits, state = model(b.x, state)
                state = tuple(s.detach() for s in state)
                loss = F.cross_entropy(logits.reshape(-1, vocab_size), b.y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n_steps += 1
            chars += b.y.numel()
            if n_steps == 5:  # skip warm-up steps in the speed figure
                timed_from, timed_chars = time.perf_counter(), chars
            elapsed = time.perf_counter() - start
            if (seconds is not None and elapsed >= seconds) or (steps is not None and n_steps >= steps):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # kernels still queued belong to the timed steps
                speed = (chars - timed_chars) / max(time.perf_counter() - (timed_from or start), 1e-9)
                val = evaluate_ids(_EvalAdapter(model), val_ids, batch_size=eval_batch,  # type: ignore[arg-type]
                                   bptt=eval_bptt, device=device)
                return {"steps": n_steps, "seconds": elapsed, "chars_per_s": speed, "val_loss": val["loss"],
                        "val_bpc": val["bpc"], "parameters": sum(p.numel() for p in model.parameters())}
