"""Hand-written forward and backward through time for the LSTM family (the CPU speed path).

Autograd through a Python time loop pays for a graph node per small op per step and for T small
weight-gradient matmuls. Here the kernel owns the input projection (one matmul for every step,
written straight into the buffer the loop works in), the forward loop runs without autograd into
preallocated buffers (for the LSTM: one product U h added in place and six small in-place /
``out=`` ops per step), and the backward loop needs one product and four small in-place ops per
step (a few more with peepholes): every derivative factor is precomputed for all steps at once
(fused ``sigmoid_backward`` / ``tanh_backward`` kernels) straight into the gradient buffer, which the
loop then scales by dc and dh; the recurrent and input weight gradients are one big matmul each at
the end. The per-step products go through :class:`charlm.cells.onednn_matmul.StepProduct` (oneDNN with
a weight packed once per call, where PyTorch has it).

Two tricks keep the per-step op count down: tanh(a) = 2 s(2 a) - 1, so the candidate g shares one
sigmoid call with the gates (its pre-activation rows are scaled by 2 once per call, the loop uses
c' = f c + 2 i s - i, and the g block becomes tanh(a_g) for all steps at once afterwards); and
because the blocks are ordered i, f, g, o, everything driven by the cell gradient (i, f, g) is one
contiguous slice, scaled by one broadcast multiply.

The math is that of :class:`charlm.cells.lstm.GatedLSTMCell` (and of FGR's
:class:`charlm.cells.lstm.GateRecurrentLSTMCell`); the tests check the two agree in value and
gradient for every variant. The normalised LSTMs have their own kernel in
:mod:`charlm.cells.norm_lstm_kernel`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from charlm.cells.onednn_matmul import StepProduct, project_rows, project_rows_backward

if TYPE_CHECKING:
    from charlm.cells.gate_config import GateConfig


def kernel_runs_on(x: Tensor) -> bool:
    """Whether the hand-written kernels (this one, the normalised LSTMs', the Mogrifier's, the GRUs' and MUTs') run
    on ``x``: they compute in the tensor's own dtype, float32 or float64; under autocast the cells take the autograd
    loop."""
    return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)


def _sigd(s: Tensor) -> Tensor:
    """Derivative of the sigmoid from its output."""
    return s * (1.0 - s)


def recurrent_weight_grad(d_pre: Tensor, h0: Tensor, hs: Tensor) -> Tensor:
    """Sum over steps of d_pre_t^T h_{t-1}, (T, B, K) and h0 (B, H), hs (T, B, H) -> (K, H): one big
    matmul over steps 1.. plus h0's step (which saves concatenating h0 to hs)."""
    T, B, K = d_pre.shape
    d_w = d_pre[0].t() @ h0
    if T > 1:
        d_w = d_w.addmm_(d_pre[1:].reshape((T - 1) * B, K).t(), hs[:-1].reshape((T - 1) * B, hs.shape[2]))
    return d_w


def _ifo(t: Tensor, h: int) -> Tensor:
    """The (i, f, o) blocks of a (..., 4H) gate tensor, side by side: (..., 3H)."""
    return torch.cat([t[..., : 2 * h], t[..., 3 * h :]], -1)


class GatedLSTMKernel(torch.autograd.Function):
    """(x (T,B,in), weight_ih [K,in], bias [K] (both biases), h0, c0 (B,H), weight_hh [K,H],
    peephole [P*H], config, gates0, weight_gg) -> (hs, h, c), or (hs, h, c, gates) for FGR.

    The kernel owns the input projection (one matmul for all steps, written straight into the buffer
    the loop works in; its three gradients come from the same dG at the end).

    FGR (full gate recurrence, ``gates0`` (B, 3H) and ``weight_gg`` [3H, 3H] given, peephole LSTM
    only) adds ``weight_gg`` times the previous step's (i, f, o) activations to those gates'
    pre-activations; going back, that gradient reaches the previous step's gates through their
    sigmoid derivatives, kept for all steps.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, w_ih: Tensor, bias: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, peep: Tensor,
        cfg: GateConfig, gates0: Tensor | None, w_gg: Tensor | None,
    ) -> tuple[Tensor, ...]:
        T, B = x.shape[:2]
        K, H = w_hh.shape
        blocks = cfg.blocks
        gi = blocks.index("g")  # number of sigmoid gates before g (i and/or f)
        has_i, has_f, has_o = "i" in blocks, "f" in blocks, "o" in blocks
        npre = gi if cfg.peephole else 0  # peepholes on the gates before g
        gsl = slice(gi * H, (gi + 1) * H)

        # G starts as the input projection of every step (with both biases), so each step adds U h into
        # it in place, and ends holding the activations the backward pass reads.
        x_rows = x.reshape(T * B, x.shape[2])
        G = project_rows(x_rows, w_ih, bias).view(T, B, K)
        w_step = w_hh
        if cfg.g_tanh:  # tanh(a) = 2 s(2a) - 1: the g block is fed to the sigmoid at twice its pre-activation
            G[:, :, gsl].mul_(2.0)
            w_step = w_hh.clone()
            w_step[gsl].mul_(2.0)
        uh = StepProduct(w_step, B, T)
        # Outside CIFG the g block keeps s = s(2 a_g) through the loop (c' takes 2 i s - i) and becomes
        # tanh(a_g) = 2 s - 1 for all steps at once afterwards; CIFG's c + i (g - c) converts per step.
        late_g = cfg.g_tanh and not cfg.coupled
        Cs = G.new_empty(T + 1, B, H)
        Cs[0].copy_(c0)
        Hs = G.new_empty(T, B, H)
        TC = G.new_empty(T, B, H) if cfg.out_tanh else None

        p_pre = peep[: npre * H].view(npre, H) if npre else None
        p_o = peep[npre * H :] if cfg.peephole and has_o else None
        # sigmoid ranges applied before c' (o joins when it needs no c' peephole)
        whole_row = cfg.g_tanh and p_o is None
        sig_to = K if whole_row else ((gi + 1) * H if cfg.g_tanh else gi * H)

        def steps(t: Tensor) -> tuple[Tensor, ...]:
            return t.unbind(0)

        g_all = steps(G)
        fgr = w_gg is not None and gates0 is not None
        if fgr:  # rec = [i, f, o]_prev W_gg^T, in two matmuls because g sits between f and o in G
            from_if, from_o = StepProduct(w_gg[:, : 2 * H], B, T), StepProduct(w_gg[:, 2 * H :], B, T)
            rec = G.new_empty(B, 3 * H)
            if_all, o_all = steps(G[:, :, : 2 * H]), steps(G[:, :, 3 * H :])
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
            uh.add_to(g_all[t], h)  # (B, K) += (B, H) @ (H, K)
            if fgr:
                p_if, p_o3 = (gates0[:, : 2 * H], gates0[:, 2 * H :]) if t == 0 else (if_all[t - 1], o_all[t - 1])
                from_o.add_to(from_if.write(rec, p_if), p_o3)  # (B, 3H)
                if_all[t].add_(rec[:, : 2 * H])
                o_all[t].add_(rec[:, 2 * H :])
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
        ctx.fgr = fgr
        ctx.save_for_backward(G, Cs, TC if TC is not None else Cs[:0], Hs, h0, w_hh, peep, gates0, w_gg, x_rows, w_ih)
        if fgr:
            return Hs, Hs[T - 1].clone(), Cs[T].clone(), _ifo(G[T - 1], H)
        return Hs, Hs[T - 1].clone(), Cs[T].clone()

    @staticmethod
    def backward(ctx: Any, g_hs: Tensor, g_h: Tensor, g_c: Tensor, *g_gates: Tensor) -> tuple[Tensor | None, ...]:
        G, Cs, TC, Hs, h0, w_hh, peep, gates0, w_gg, x_rows, w_ih = ctx.saved_tensors
        cfg, fgr = ctx.cfg, ctx.fgr
        T, B = G.shape[:2]
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
        if fgr:  # the previous gates' gradient enters (i, f, o) through s' = s (1 - s)
            d_prev = g_gates[0].clone()  # (B, 3H): dL/d [i, f, o] of the current step, from the step after
            sd_if, sd_o = steps(_sigd(G[:, :, : 2 * H])), steps(_sigd(G[:, :, 3 * H :]))
            d_if_all = steps(dG[:, :, : 2 * H])
        d_ifg = steps(k_fac)
        d_o_blk = steps(dG[:, :, (gi + 1) * H :]) if has_o else ()
        d_pre = [steps(dG[:, :, k * H : (k + 1) * H]) for k in range(npre)]
        b_c_list, keep_list = steps(b_c), steps(keep)
        # dh of step t is g_hs[t] plus what flows back from step t+1: accumulated in place in a copy
        dh_list = steps(g_hs.clone(memory_format=torch.contiguous_format))
        dh = dh_list[T - 1].add_(g_h)
        dc = g_c.clone()
        back = StepProduct(w_hh.t(), B, T)  # dh_{t-1} += dG_t W_hh
        if fgr:  # d_prev = d[a_i, a_f]_t W_gg[:2H] + d a_o,t W_gg[2H:]
            to_if, to_o = StepProduct(w_gg[: 2 * H].t(), B, T), StepProduct(w_gg[2 * H :].t(), B, T)
        for t in range(T - 1, -1, -1):
            if b_c_list:
                dc.addcmul_(dh, b_c_list[t])
            else:
                dc.add_(dh)
            if d_o_blk:
                d_o = d_o_blk[t].mul_(dh)
                if fgr:
                    d_o.addcmul_(d_prev[:, 2 * H :], sd_o[t])
                if p_o is not None:
                    dc.addcmul_(d_o, p_o)
            d_ifg[t].mul_(dc.unsqueeze(1))
            if fgr:
                d_if_all[t].addcmul_(d_prev[:, : 2 * H], sd_if[t])
                d_prev = to_o.add_to(to_if(d_if_all[t]), d_o_blk[t])  # (B, 3H)
            if keep_list:
                dc.mul_(keep_list[t])
            for k in range(npre):
                dc.addcmul_(d_pre[k][t], p_pre[k])
            dh = back.add_to(dh_list[t - 1], dg_all[t]) if t > 0 else back(dg_all[t])  # (B, H)
        needs = ctx.needs_input_grad
        d_x, d_wih, d_b = project_rows_backward(dG.view(T * B, -1), x_rows, w_ih, (needs[0], needs[1], needs[2]))
        d_w = recurrent_weight_grad(dG, h0, Hs) if needs[5] else None
        d_peep = None
        if cfg.peephole and needs[6]:
            parts = [(dG[:, :, k * H : (k + 1) * H] * c_prev).sum((0, 1)) for k in range(npre)]
            if has_o:
                parts.append((dG[:, :, (gi + 1) * H :] * c_new).sum((0, 1)))
            d_peep = torch.cat(parts)
        d_gates0 = d_wgg = None
        if fgr:
            d_gates0 = d_prev
            if needs[9]:  # sum over steps of d[a_i, a_f, a_o]_t^T [i, f, o]_{t-1}
                d_rec = _ifo(dG, H).reshape(T * B, 3 * H)
                prev = torch.cat([gates0.unsqueeze(0), _ifo(G[:-1], H)]).reshape(T * B, 3 * H)
                d_wgg = d_rec.t() @ prev
        d_x = d_x.view(T, B, -1) if d_x is not None else None
        return d_x, d_wih, d_b, dh, dc, d_w, d_peep, None, d_gates0, d_wgg
