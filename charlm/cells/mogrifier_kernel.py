"""Hand-written forward and backward through time for the Mogrifier LSTM (:mod:`charlm.cells.mogrifier`).

The scheme of :mod:`charlm.cells.lstm_kernel`: the forward loop runs without autograd into preallocated
buffers, the backward loop precomputes every derivative factor it can for all steps at once, and each
weight's gradient is one matmul over all steps at the end. The rounds' gating depends on the step's h, so
each round is one product per step in both loops, and so is the input projection W x of the gated x. The
products are ATen's (MKL on x86), not oneDNN's packed ones: with those this kernel was slower where measured.

A round ``v' = v * (1 + tanh(u M^T))`` (M the halved matrix, 2 s(a) = 1 + tanh(a / 2)) keeps tanh(u M^T)
for every step; going back, dv = dv' (1 + tanh), d(u M^T) = dv' v (1 - tanh^2) (kept for all steps: M's
gradient at the end), du += d(u M^T) M. The math is :meth:`charlm.cells.mogrifier.MogrifierLSTMCell.step`'s;
the tests check value and gradient against autograd through it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_sig_bw = torch.ops.aten.sigmoid_backward
_tanh_bw = torch.ops.aten.tanh_backward


def _rounds(r: int) -> list[tuple[bool, int, int]]:
    """Per round i = 1 .. r: (gates x, index of the vector it writes, index of the vector it reads) into the
    lists of x values (x, x^1, x^3, ...) and h values (h, h^2, h^4, ...)."""
    return [(True, (i + 1) // 2, (i - 1) // 2) if i % 2 else (False, i // 2, i // 2) for i in range(1, r + 1)]


class MogrifierKernel(torch.autograd.Function):
    """(x (T,B,in), h0, c0 (B,H), weight_ih [4H,in], bias [4H] (both biases), weight_hh [4H,H], *M) ->
    (hs (T,B,H), h, c), M the r rounds' halved matrices: [in, H] for odd rounds, [H, in] for even ones."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, bias: Tensor, w_hh: Tensor, *mats: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        T, B = x.shape[:2]
        H = h0.shape[1]
        rounds = _rounds(len(mats))
        n_x, n_h = (len(mats) + 1) // 2, len(mats) // 2
        xs = [x, *(x.new_empty(x.shape) for _ in range(n_x))]  # x, x^1, x^3, ... for every step
        h_all = x.new_empty(T + 1, B, H)  # h_all[t] = h_{t-1}: the carried state, then the outputs
        h_all[0].copy_(h0)
        hs = [h_all[:-1], *(x.new_empty(T, B, H) for _ in range(n_h))]  # h, h^2, ... for every step
        ths = [x.new_empty(T, B, m.shape[0]) for m in mats]  # tanh(u M^T) of every round and step
        G = bias.expand(T, B, 4 * H).contiguous()  # pre-activations, then the gate activations i, f, g, o
        Cs = x.new_empty(T + 1, B, H)
        Cs[0].copy_(c0)
        TC = x.new_empty(T, B, H)  # tanh(c')
        # every product stays with ATen's matmul: here oneDNN's packed one made this kernel slower where
        # measured (benchmarks/results/mogrifier.txt)
        mats_t, w_ih_t, w_hh_t = [m.t() for m in mats], w_ih.t(), w_hh.t()
        for t in range(T):
            for (on_x, out, src), m_t, th in zip(rounds, mats_t, ths, strict=True):
                gated, other = (xs, hs) if on_x else (hs, xs)
                v, new = gated[out - 1][t], gated[out][t]
                torch.mm(other[src][t], m_t, out=th[t]).tanh_()
                torch.addcmul(v, v, th[t], out=new)
            g = G[t]
            g.addmm_(xs[-1][t], w_ih_t).addmm_(hs[-1][t], w_hh_t)
            g[:, : 2 * H].sigmoid_()
            g[:, 2 * H : 3 * H].tanh_()
            g[:, 3 * H :].sigmoid_()
            cn = torch.mul(g[:, H : 2 * H], Cs[t], out=Cs[t + 1])
            cn.addcmul_(g[:, :H], g[:, 2 * H : 3 * H])
            torch.mul(g[:, 3 * H :], torch.tanh(cn, out=TC[t]), out=h_all[t + 1])
        ctx.n_x = n_x
        ctx.save_for_backward(G, Cs, TC, w_ih, w_hh, *mats, *xs, *hs, *ths)
        out = h_all[1:]
        return out, out[T - 1].clone(), Cs[T].clone()

    @staticmethod
    def backward(ctx: Any, g_hs: Tensor, g_h: Tensor, g_c: Tensor) -> tuple[Tensor | None, ...]:
        G, Cs, TC, w_ih, w_hh, *rest = ctx.saved_tensors
        r, n_x = (len(rest) - 2) // 3, ctx.n_x
        mats, xs, hs, ths = rest[:r], rest[r : r + n_x + 1], rest[r + n_x + 1 : 2 * r + 2], rest[2 * r + 2 :]
        rounds = _rounds(r)
        T, B = G.shape[:2]
        H = Cs.shape[2]
        i, f, g, o = G.split(H, dim=2)
        # factors for all steps: d a_o = dh * tanh(c') s'(a_o), dc' += dh * o (1 - tanh(c')^2),
        # (d a_i, d a_f, d a_g) = dc' * (g s'(a_i), c s'(a_f), i (1 - g^2)); a round's d(u M^T) = dv' * v (1 - th^2)
        dG = torch.empty_like(G)
        k_fac = dG[:, :, : 3 * H].unflatten(2, (3, H))
        k_fac[:, :, 0] = _sig_bw(g, i)
        k_fac[:, :, 1] = _sig_bw(Cs[:-1], f)
        k_fac[:, :, 2] = _tanh_bw(i, g)
        dG[:, :, 3 * H :] = _sig_bw(TC, o)
        b_fac = _tanh_bw(o, TC)
        d_a = [_tanh_bw((xs if on_x else hs)[out - 1], th) for (on_x, out, _), th in zip(rounds, ths, strict=True)]
        keep = [th + 1.0 for th in ths]  # dv = dv' (1 + th)
        dx_all = torch.empty_like(xs[0]) if ctx.needs_input_grad[0] else None
        dh_l = g_hs.clone(memory_format=torch.contiguous_format).unbind(0)
        dh = dh_l[T - 1].add_(g_h)
        dc = g_c.clone()
        for t in range(T - 1, -1, -1):
            dc.addcmul_(dh, b_fac[t])
            dG[t, :, 3 * H :].mul_(dh)
            k_fac[t].mul_(dc.unsqueeze(1))
            dc.mul_(f[t])
            dx, dh = dG[t] @ w_ih, dG[t] @ w_hh  # to the gated x and h
            for (on_x, _, _), m, da, kp in zip(reversed(rounds), reversed(mats), reversed(d_a), reversed(keep),
                                              strict=True):
                dv = dx if on_x else dh
                da[t].mul_(dv)
                dv.mul_(kp[t])
                (dh if on_x else dx).addmm_(da[t], m)
            if dx_all is not None:
                dx_all[t].copy_(dx)
            if t > 0:
                dh = dh.add_(dh_l[t - 1])
        needs = ctx.needs_input_grad

        def flat(v: Tensor) -> Tensor:
            return v.reshape(T * B, v.shape[2])

        d_wih = flat(dG).t() @ flat(xs[-1]) if needs[3] else None
        d_bias = dG.sum((0, 1)) if needs[4] else None
        d_whh = flat(dG).t() @ flat(hs[-1]) if needs[5] else None
        d_mats = [
            flat(da).t() @ flat(hs[src] if on_x else xs[src]) if needs[6 + k] else None
            for k, ((on_x, _, src), da) in enumerate(zip(rounds, d_a, strict=True))
        ]
        return (dx_all, dh, dc, d_wih, d_bias, d_whh, *d_mats)
