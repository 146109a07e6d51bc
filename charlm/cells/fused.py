"""Hand-written forward and backward through time for the LSTM family (the CPU speed path).

Autograd through a Python time loop pays for a graph node per small op per step and for T small
weight-gradient matmuls. Here the forward loop runs without autograd into preallocated buffers
(one ``addmm`` and eight small in-place / ``out=`` ops per step for the LSTM), and the backward
loop needs one ``addmm`` and four small ops per step (a few more with peepholes), with every
derivative factor precomputed for all steps at once (fused ``sigmoid_backward`` /
``tanh_backward`` kernels) and the recurrent weight gradient done as one big matmul at the end.

Two tricks keep the per-step op count down: tanh(a) = 2 s(2 a) - 1, so the candidate g shares one
sigmoid call with the gates (its pre-activation rows are scaled by 2 once per call); and because
the blocks are ordered i, f, g, o, everything driven by the cell gradient (i, f, g) is one
contiguous slice, written by one broadcast multiply.

The math is that of :class:`charlm.cells.lstm.GatedLSTMCell`; the tests check the two agree in
value and gradient for every variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from charlm.cells.lstm import GateConfig


def fused_available(xw: Tensor) -> bool:
    """The fused kernel runs in the tensor's own dtype; under autocast use the autograd loop."""
    return xw.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(xw.device.type)


def _sigd(s: Tensor) -> Tensor:
    """Derivative of the sigmoid from its output."""
    return s * (1.0 - s)


class FusedGatedLSTM(torch.autograd.Function):
    """(xw (T,B,K) with biases, h0, c0 (B,H), weight_hh [K,H], peephole [P*H], config) -> (hs, h, c)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, peep: Tensor, cfg: GateConfig
    ) -> tuple[Tensor, Tensor, Tensor]:
        T, B, K = xw.shape
        H = h0.shape[1]
        blocks = cfg.blocks
        gi = blocks.index("g")  # number of sigmoid gates before g (i and/or f)
        has_i, has_f, has_o = "i" in blocks, "f" in blocks, "o" in blocks
        npre = gi if cfg.peephole else 0  # peepholes on the gates before g
        gsl = slice(gi * H, (gi + 1) * H)

        # G starts as a contiguous copy of xw, so each step adds U h into it in place (no per-step copy
        # of the input rows), and ends holding the activations the backward pass reads.
        G = xw.clone(memory_format=torch.contiguous_format)
        wt = w_hh.t()
        if cfg.g_tanh:  # tanh(a) = 2 s(2a) - 1: the g block is fed to the sigmoid at twice its pre-activation
            G[:, :, gsl].mul_(2.0)
            w2 = w_hh.clone()
            w2[gsl].mul_(2.0)
            wt = w2.t()
        # Outside CIFG the g block keeps s = s(2 a_g) through the loop (c' takes 2 i s - i) and becomes
        # tanh(a_g) = 2 s - 1 for all steps at once afterwards; CIFG's c + i (g - c) converts per step.
        late_g = cfg.g_tanh and not cfg.coupled
        Cs = xw.new_empty(T + 1, B, H)
        Cs[0].copy_(c0)
        Hs = xw.new_empty(T, B, H)
        TC = xw.new_empty(T, B, H) if cfg.out_tanh else None

        p_pre = peep[: npre * H].view(npre, H) if npre else None
        p_o = peep[npre * H :] if cfg.peephole and has_o else None
        # sigmoid ranges applied before c' (o joins when it needs no c' peephole)
        whole_row = cfg.g_tanh and p_o is None
        sig_to = K if whole_row else ((gi + 1) * H if cfg.g_tanh else gi * H)

        def steps(t: Tensor) -> tuple[Tensor, ...]:
            return t.unbind(0)

        g_all = steps(G)
        g_blk = steps(G[:, :, gsl])
        sig_blk = steps(G[:, :, :sig_to]) if sig_to else None
        pre_blk = steps(G[:, :, : npre * H].unflatten(2, (npre, H))) if npre else None
        i_blk = steps(G[:, :, :H]) if has_i else None
        f_blk = steps(G[:, :, (gi - 1) * H : gi * H]) if has_f else None
        o_blk = steps(G[:, :, (gi + 1) * H :]) if has_o else None
        c_list, h_list = steps(Cs), steps(Hs)
        tc_list = steps(TC) if TC is not None else None
        h = h0
        for t in range(T):
            g_all[t].addmm_(h, wt)  # (B, K) += (B, H) @ (H, K)
            g = g_blk[t]
            c = c_list[t]
            if pre_blk is not None:
                pre_blk[t].addcmul_(p_pre, c.unsqueeze(1))
            if sig_blk is not None:
                sig_blk[t].sigmoid_()
            if o_blk is not None and not whole_row and p_o is None:
                o_blk[t].sigmoid_()
            cn = c_list[t + 1]
            if cfg.coupled:  # c' = c + i (g - c)
                assert i_blk is not None
                if cfg.g_tanh:
                    g.mul_(2.0).sub_(1.0)
                torch.sub(g, c, out=cn)
                cn.mul_(i_blk[t]).add_(c)
            else:
                i = i_blk[t] if i_blk is not None else None
                scale = 2.0 if late_g else 1.0
                if f_blk is not None:
                    torch.mul(f_blk[t], c, out=cn)
                    if i is not None:
                        cn.addcmul_(i, g, value=scale)
                    else:
                        cn.add_(g, alpha=scale)
                elif i is not None:
                    torch.addcmul(c, i, g, value=scale, out=cn)
                else:
                    torch.add(c, g, alpha=scale, out=cn)
                if late_g:  # the "- i" of 2 i s - i (or the "- 1" with no input gate)
                    if i is not None:
                        cn.sub_(i)
                    else:
                        cn.sub_(1.0)
            if o_blk is not None and p_o is not None:
                o_blk[t].addcmul_(p_o, cn).sigmoid_()
            a = torch.tanh(cn, out=tc_list[t]) if tc_list is not None else cn
            h = torch.mul(o_blk[t], a, out=h_list[t]) if o_blk is not None else h_list[t].copy_(a)
        if late_g:
            G[:, :, gsl].mul_(2.0).sub_(1.0)
        ctx.cfg = cfg
        ctx.save_for_backward(G, Cs, TC if TC is not None else Cs[:0], Hs, h0, w_hh, peep)
        return Hs, Hs[T - 1].clone(), Cs[T].clone()

    @staticmethod
    def backward(ctx: Any, g_hs: Tensor, g_h: Tensor, g_c: Tensor) -> tuple[Tensor | None, ...]:
        G, Cs, TC, Hs, h0, w_hh, peep = ctx.saved_tensors
        cfg = ctx.cfg
        T, B, K = G.shape
        H = Hs.shape[2]
        blocks = cfg.blocks
        gi = blocks.index("g")
        has_i, has_f, has_o = "i" in blocks, "f" in blocks, "o" in blocks
        npre = gi if cfg.peephole else 0
        p_o = peep[npre * H :] if cfg.peephole and has_o else None
        sig_bw = torch.ops.aten.sigmoid_backward
        tanh_bw = torch.ops.aten.tanh_backward

        def act(name: str) -> Tensor:
            k = blocks.index(name)
            return G[:, :, k * H : (k + 1) * H]

        c_prev, c_new = Cs[:-1], Cs[1:]
        tanh_c = TC if cfg.out_tanh else None
        a = tanh_c if tanh_c is not None else c_new
        # Derivative factors for every step at once. dh drives d a_o = dh * a_o and dc' += dh * b_c;
        # dc' drives (d a_i, d a_f, d a_g) = dc' * k_fac.
        o = act("o") if has_o else None
        if tanh_c is not None:
            b_c: Tensor | None = tanh_bw(o, tanh_c) if o is not None else 1.0 - tanh_c * tanh_c
        else:
            b_c = o
        g = act("g")
        i = act("i") if has_i else None
        # dG is filled with the factors first; the loop then scales them in place by dc and dh.
        dG = torch.empty_like(G)
        k_fac = dG[:, :, : (gi + 1) * H].unflatten(2, (gi + 1, H))  # (T, B, gi+1, H): i, f, g blocks
        j = 0
        if i is not None:
            k_fac[:, :, j] = sig_bw((g - c_prev) if cfg.coupled else g, i)
            j += 1
        if has_f:
            k_fac[:, :, j] = sig_bw(c_prev, act("f"))
            j += 1
        if cfg.g_tanh:
            k_fac[:, :, j] = tanh_bw(i, g) if i is not None else 1.0 - g * g
        else:
            k_fac[:, :, j] = i if i is not None else 1.0
        if o is not None:
            dG[:, :, (gi + 1) * H :] = sig_bw(a, o)
        keep = act("f") if has_f else (1.0 - i if cfg.coupled and i is not None else None)
        p_pre = [peep[k * H : (k + 1) * H] for k in range(npre)]

        def steps(t: Tensor | None) -> tuple[Tensor, ...]:
            return t.unbind(0) if t is not None else ()

        dg_all = steps(dG)
        d_ifg = steps(k_fac)
        d_o_blk = steps(dG[:, :, (gi + 1) * H :]) if has_o else ()
        d_pre = [steps(dG[:, :, k * H : (k + 1) * H]) for k in range(npre)]
        b_c_list, keep_list = steps(b_c), steps(keep)
        # dh of step t is g_hs[t] plus what flows back from step t+1: accumulated in place in a copy
        dh_list = steps(g_hs.clone(memory_format=torch.contiguous_format))
        dh = dh_list[T - 1].add_(g_h)
        dc = g_c.clone()
        for t in range(T - 1, -1, -1):
            if b_c_list:
                dc.addcmul_(dh, b_c_list[t])
            else:
                dc.add_(dh)
            if d_o_blk:
                d_o = d_o_blk[t].mul_(dh)
                if p_o is not None:
                    dc.addcmul_(d_o, p_o)
            d_ifg[t].mul_(dc.unsqueeze(1))
            if keep_list:
                dc.mul_(keep_list[t])
            for k in range(npre):
                dc.addcmul_(d_pre[k][t], p_pre[k])
            dh = dh_list[t - 1].addmm_(dg_all[t], w_hh) if t > 0 else dg_all[t] @ w_hh  # (B, H)
        d_w = None
        if ctx.needs_input_grad[3]:
            # sum over steps of dG_t^T h_{t-1}: one big matmul (plus h0's step, to avoid a copy)
            d_w = dG[0].t() @ h0
            if T > 1:
                d_w = d_w.addmm_(dG[1:].reshape((T - 1) * B, K).t(), Hs[:-1].reshape((T - 1) * B, H))
        d_peep = None
        if cfg.peephole and ctx.needs_input_grad[4]:
            parts = [(dG[:, :, k * H : (k + 1) * H] * c_prev).sum((0, 1)) for k in range(npre)]
            if has_o:
                parts.append((dG[:, :, (gi + 1) * H :] * c_new).sum((0, 1)))
            d_peep = torch.cat(parts)
        return dG, dh, dc, d_w, d_peep, None
