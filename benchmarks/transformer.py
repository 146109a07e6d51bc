"""A small character transformer for the frontier (``benchmarks/frontier.py``): a nanoGPT-style decoder.

    chars (B, T) -> token + position embedding                               (B, T, C)
                 -> L blocks: x + attn(LN(x)), x + mlp(LN(x))   causal self-attention, GELU MLP (4C)
                 -> LN -> Linear decoder (tied to the token embedding)       (B, T, V)

Trained with AdamW (weight decay on matrices only), linear warm-up then cosine to ``lr / 10``, gradient
clipping at 1, on random windows of ``block`` characters of the training split.

It is scored by charlm's own :func:`charlm.evaluation.scoring.evaluate_ids`, like the recurrent models: the
"state" handed from one window to the next is the last ``block - 1`` characters before it, so every
character is scored exactly once, with as much context as the model can see (up to ``block - 1``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.evaluation.scoring import evaluate_ids


@dataclass(frozen=True)
class TransformerConfig:
    layers: int = 4
    width: int = 128  # C
    heads: int = 4
    block: int = 128  # characters of context
    dropout: float = 0.0
    lr: float = 1e-3
    batch: int = 32
    warmup: int = 100
    weight_decay: float = 0.1


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a GELU MLP, each residual."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.mlp = nn.Sequential(nn.Linear(c.width, 4 * c.width), nn.GELU(), nn.Linear(4 * c.width, c.width))
        self.drop = nn.Dropout(c.dropout)
        self.p = c.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)  # (B, T, C) each
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, h, T, C/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    """Token + position embedding -> blocks -> LayerNorm -> tied decoder."""

    def __init__(self, vocab_size: int, c: TransformerConfig) -> None:
        super().__init__()
        self.config = c
        self.tokens = nn.Embedding(vocab_size, c.width)
        self.positions = nn.Embedding(c.block, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln = nn.LayerNorm(c.width)
        self.decoder = nn.Linear(c.width, vocab_size, bias=False)
        self.decoder.weight = self.tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T <= block) -> logits (B, T, V)."""
        positions = torch.arange(x.size(1), device=x.device)
        h = self.tokens(x) + self.positions(positions)  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        return self.decoder(self.ln(h))


class _EvalAdapter(nn.Module):
    """Lets :func:`charlm.evaluation.scoring.evaluate_ids` score a transformer: the carried "state" is the context.

    Each window of T characters is read after the last ``block - T`` characters before it (its state), and
    only the window's own positions are scored, so each character is scored once."""

    def __init__(self, model: CharTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, states=None):  # type: ignore[no-untyped-def]
        from charlm.model.char_lm import LMOutput

        block = self.model.config.block
        # the state is (1, B, K) like a recurrent layer's (1, B, H), so a tail window's slice of the last
        # row (``t[:, -1:]`` in charlm.evaluation.scoring.score_batch) works on it unchanged
        context = x if states is None else torch.cat([states[0][0][0], x], dim=1)  # (B, K + T)
        context = context[:, -block:]
        logits = self.model(context)[:, -x.size(1):]  # (B, T, V)
        keep = context[:, -(block - 1):]  # (B, <= block - 1)
        return LMOutput(logits, [(keep.unsqueeze(0),)], logits, logits)


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 over the remaining steps (``total`` may be an estimate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_transformer(train_ids: Tensor, val_ids: Tensor, vocab_size: int, c: TransformerConfig, *,
                      seconds: float, seed: int = 1234, eval_batch: int = 16) -> dict[str, float]:
    """Train for ``seconds`` of wall time; return steps, chars/s and the exact val loss.

    The cosine runs over the steps the time buys, estimated from the speed of the first 20 steps."""
    torch.manual_seed(seed)
    model = CharTransformer(vocab_size, c)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    n = train_ids.numel() - c.block - 1
    offsets = torch.arange(c.block + 1)
    start = time.perf_counter()
    total, step, chars = 10**9, 0, 0
    while (elapsed := time.perf_counter() - start) < seconds:
        if step == 20:  # the speed is known: how many steps the budget buys
            total = max(step + 1, int(step * seconds / max(elapsed, 1e-9)))
        starts = torch.randint(0, n, (c.batch,), generator=generator)
        chunk = train_ids[starts[:, None] + offsets]  # (B, block + 1)
        model.train()
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), chunk[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = c.lr * schedule(step, total, c.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        chars += c.batch * c.block
    val = evaluate_ids(_EvalAdapter(model), val_ids, batch_size=eval_batch, bptt=c.block // 2)  # type: ignore[arg-type]
    return {"steps": step, "seconds": elapsed, "chars_per_s": chars / max(elapsed, 1e-9),
            "val_loss": val["loss"], "val_bpc": val["bpc"],
            "parameters": sum(p.numel() for p in model.parameters())}
