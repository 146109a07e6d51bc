"""Hand-written forward and backward through time for the normalised LSTMs (``lstm-ln``, ``lstm-bn``).

The scheme of :mod:`charlm.cells.lstm_kernel`, with the two norms of every step (of U h and of c') run as
one ATen op each: ``native_layer_norm`` over the features for ``lstm-ln``, ``native_batch_norm``
over the batch for ``lstm-bn`` in training (which also moves that step's running statistics, as
:class:`charlm.cells.norm_lstm.BatchNormLSTMCell` does). Going back, ``native_layer_norm_backward`` /
``native_batch_norm_backward`` reuse the mean and 1/std kept from the forward pass and give each
step's share of the gains' (and the cell shift's) gradients, summed in the loop.

The kernel takes the projected input W x of every step and normalises it itself, in one op for all
steps, into the buffer the loop then works in (no separate buffer for the gates: one (T, B, 4H)
tensor less per layer). For the batch norm W x comes batch-major, (B, T, 4H) seen as (B, T*4H), so that
one ``native_batch_norm`` normalises every (step, feature) column over the batch, with the gain and
shift tiled over the steps inside the same op. The recurrent weight's gradient is one matmul over all
steps after the backward loop.

Per step, forward: U h, its norm, added in place to the normalised input, one sigmoid over the whole
row (tanh(a) = 2 s(2a) - 1 for g: its input rows and its norm gain are doubled), c', the norm of c',
tanh, h. Backward: the factors of every gate are precomputed for all steps and scaled in place by
dh and dc; the two norm backwards and one product carry the gradient to the step before.

The math is that of :mod:`charlm.cells.norm_lstm`; the tests check value and gradient against it.
:class:`NormLSTMKernel` is the one autograd Function of both kernels: its ``TimeLoop`` argument runs the
steps, :data:`PYTHON_LOOP` (this module) or :data:`charlm.cells.norm_lstm_cpp.CPP_LOOP`, the same math in
C++ loops (where that library builds). The cells use the C++ loops on the CPU, the Python ones elsewhere;
the Python loops are also the reference the C++ ones are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from charlm.cells.lstm_kernel import recurrent_weight_grad
from charlm.cells.onednn_matmul import StepProduct

_sig_bw = torch.ops.aten.sigmoid_backward
_tanh_bw = torch.ops.aten.tanh_backward


def batch_norm_over_steps(
    v: Tensor, gain: Tensor, shift: Tensor, run_mean: Tensor, run_var: Tensor, momentum: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step batch norm of v (T, B, K) in one op (no copy where v is the time-major view of a contiguous
    (B, T, K) tensor).

    The (B, T*K) view's T*K (step, feature) columns are normalised over the B rows, with the gain and
    shift [K] tiled over the steps inside the same ``native_batch_norm``; ``run_mean`` / ``run_var``
    (T, K) (contiguous rows of the running buffers) move in place. Returns the (T, B, K) view of the
    batch-major result and the op's saved mean and 1/std (T*K). Differentiable by autograd as well.
    """
    T, B, K = v.shape
    y, mean, rstd = torch.native_batch_norm(
        v.transpose(0, 1).reshape(B, T * K), gain.repeat(T), shift.repeat(T), run_mean.view(-1), run_var.view(-1),
        True, momentum, eps,
    )
    return y.view(B, T, K).transpose(0, 1), mean, rstd


@dataclass(frozen=True, eq=False)
class StepNorm:
    """The norms: over the features (layer) or over the batch with per-step running statistics.

    ``running`` (batch only): the (L, F) buffers ``bn_ih_mean``, ``bn_ih_var``, ``bn_hh_mean``,
    ``bn_hh_var``, ``bn_c_mean``, ``bn_c_var``, with L >= the sequence length; row t is updated in
    place by step t.
    """

    kind: str  # "layer" or "batch"
    eps: float
    running: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor] | None = None
    momentum: float = 0.1

    def input_forward(self, v: Tensor, gain: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The norm of the projected input of every step, v (T, B, K), with its gain and shift: returns a
        new (T, B, K) tensor and the statistics kept for :meth:`input_backward`. For the batch norm v is
        the time-major view of a contiguous (B, T, K) tensor, and so is the result."""
        T, K = v.shape[0], v.shape[2]
        if self.kind == "layer":
            return torch.ops.aten.native_layer_norm(v, (K,), gain, shift, self.eps)
        assert self.running is not None
        return batch_norm_over_steps(v, gain, shift, self.running[0][:T], self.running[1][:T], self.momentum, self.eps)

    def input_backward(
        self, dy: Tensor, v: Tensor, mean: Tensor, rstd: Tensor, gain: Tensor, shift: Tensor,
        mask: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Gradients of :meth:`input_forward` from dy (T, B, K, laid out as v is) for v, the gain and the shift."""
        T, B, K = v.shape
        if self.kind == "layer":
            return torch.ops.aten.native_layer_norm_backward(dy, v, (K,), mean, rstd, gain, shift, mask)
        dv, dg, db = torch.ops.aten.native_batch_norm_backward(
            dy.transpose(0, 1).view(B, T * K), v.transpose(0, 1).view(B, T * K), gain.repeat(T), None, None,
            mean, rstd, True, self.eps, mask,
        )
        return (
            dv.view(B, T, K).transpose(0, 1) if dv is not None else None,
            dg.view(T, K).sum(0) if dg is not None else None,
            db.view(T, K).sum(0) if db is not None else None,
        )

    def forward(self, v: Tensor, gain: Tensor, shift: Tensor | None, which: int, t: int) -> tuple[Tensor, ...]:
        """Normalised v (B, F) and its (mean, 1/std); ``which`` 1 is the U h norm, 2 the c' norm."""
        if self.kind == "layer":
            return torch.ops.aten.native_layer_norm(v, (v.shape[1],), gain, shift, self.eps)
        assert self.running is not None
        mean, var = self.running[2 * which][t], self.running[2 * which + 1][t]
        return torch.native_batch_norm(v, gain, shift, mean, var, True, self.momentum, self.eps)

    def backward(
        self, dy: Tensor, v: Tensor, mean: Tensor, rstd: Tensor, gain: Tensor, shift: Tensor | None,
        mask: tuple[bool, bool, bool],
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Gradients of the normalisation above with respect to v (B, F, always asked for), the gain and
        the shift, each where ``mask`` asks for it (this step's share of the sum over steps), else None."""
        if self.kind == "layer":
            return torch.ops.aten.native_layer_norm_backward(dy, v, (v.shape[1],), mean, rstd, gain, shift, mask)
        return torch.ops.aten.native_batch_norm_backward(dy, v, gain, None, None, mean, rstd, True, self.eps, mask)


class TimeLoop(Protocol):
    """The forward and backward time loops behind :class:`NormLSTMKernel`: :data:`PYTHON_LOOP` (here, ATen
    ops, any device) or :data:`charlm.cells.norm_lstm_cpp.CPP_LOOP` (C++, the CPU). Both take and give what
    the kernel does (``inputs``: its nine tensors in order) and keep on ``ctx`` what their backward needs."""

    name: str
    batch_major_input: bool  # lstm-bn's W x: laid out batch-major underneath (else time-major)

    def forward(self, ctx: Any, norm: StepNorm, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]: ...

    def backward(self, ctx: Any, norm: StepNorm, grads: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor | None, ...]:
        ...


class NormLSTMKernel(torch.autograd.Function):
    """(v (T,B,4H) = W x, gain_ih [4H], shift [4H] (both biases), h0, c0 (B,H), weight_hh [4H,H],
    gain_hh [4H], gain_c, shift_c [H], StepNorm, TimeLoop) -> (hs (T,B,H), h, c).

    The kernel normalises the projected input itself, into the buffer the loop then works in. The
    ``TimeLoop`` runs the steps both ways: the Python one of this module or the C++ one.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, v: Tensor, g_ih: Tensor, shift: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, g_hh: Tensor,
        g_c: Tensor, b_c: Tensor, norm: StepNorm, loop: TimeLoop,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.norm, ctx.loop = norm, loop
        return loop.forward(ctx, norm, (v, g_ih, shift, h0, c0, w_hh, g_hh, g_c, b_c))

    @staticmethod
    def backward(ctx: Any, g_hs: Tensor, g_h: Tensor, g_cT: Tensor) -> tuple[Tensor | None, ...]:
        return (*ctx.loop.backward(ctx, ctx.norm, (g_hs, g_h, g_cT)), None, None)


class PythonLoop:
    """The time loops of :class:`NormLSTMKernel` in Python, with ATen ops (on any device)."""

    name = "python"
    batch_major_input = True  # one native_batch_norm over every step wants W x batch-major underneath

    @staticmethod
    def forward(ctx: Any, norm: StepNorm, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        v, g_ih, shift, h0, c0, w_hh, g_hh, g_c, b_c = inputs
        T, B = v.shape[:2]
        H = h0.shape[1]
        gsl = slice(2 * H, 3 * H)
        # A: the normalised input, then (each step adding its normalised U h in place) the gate activations
        A, mean_in, rstd_in = norm.input_forward(v, g_ih, shift)
        A[:, :, gsl].mul_(2.0)  # tanh(a) = 2 s(2a) - 1: the g block enters the sigmoid doubled
        g_hh2 = g_hh.clone()
        g_hh2[gsl].mul_(2.0)
        Cs = v.new_empty(T + 1, B, H)
        Cs[0].copy_(c0)
        Hs = v.new_empty(T, B, H)
        TC = v.new_empty(T, B, H)  # tanh(N(c'))
        uh = StepProduct(w_hh, B, T)
        a_l, c_l, h_l, tc_l = A.unbind(0), Cs.unbind(0), Hs.unbind(0), TC.unbind(0)
        i_l, f_l = A[:, :, :H].unbind(0), A[:, :, H : 2 * H].unbind(0)
        g_l, o_l = A[:, :, gsl].unbind(0), A[:, :, 3 * H :].unbind(0)
        kept: list[tuple[Tensor, ...]] = []  # per step: U h and the two norms' (mean, 1/std)
        h = h0
        for t in range(T):
            r = uh(h)  # (B, 4H)
            n, mean, rstd = norm.forward(r, g_hh2, None, 1, t)
            a_l[t].add_(n).sigmoid_()
            cn = c_l[t + 1]
            torch.mul(f_l[t], c_l[t], out=cn)  # c' = f c + i (2 s - 1)
            cn.addcmul_(i_l[t], g_l[t], value=2.0).sub_(i_l[t])
            c_hat, mean_c, rstd_c = norm.forward(cn, g_c, b_c, 2, t)
            torch.tanh(c_hat, out=tc_l[t])
            h = torch.mul(o_l[t], tc_l[t], out=h_l[t])
            kept.append((r, mean, rstd, mean_c, rstd_c))
        A[:, :, gsl].mul_(2.0).sub_(1.0)  # the g block now holds tanh(a_g)
        ctx.kept = kept  # intermediates of this call only: kept on ctx, not through save_for_backward
        ctx.save_for_backward(v, mean_in, rstd_in, A, Cs, TC, Hs, h0, w_hh, g_ih, shift, g_hh, g_c, b_c)
        return Hs, Hs[T - 1].clone(), Cs[T].clone()

    @staticmethod
    def backward(ctx: Any, norm: StepNorm, grads: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor | None, ...]:
        g_hs, g_h, g_cT = grads
        v, mean_in, rstd_in, G, Cs, TC, Hs, h0, w_hh, g_ih, shift, g_hh, g_c, b_c = ctx.saved_tensors
        needs = ctx.needs_input_grad
        T, B = G.shape[:2]
        H = Hs.shape[2]
        i, f, g, o = G.split(H, dim=2)
        c_prev = Cs[:-1]
        # factors for all steps: d a_o = dh * tanh(c^) s'(a_o), dc^ = dh * o (1 - tanh(c^)^2),
        # (d a_i, d a_f, d a_g) = dc' * (g s'(a_i), c s'(a_f), i (1 - g^2))
        dG = torch.empty_like(G)  # laid out as G (batch-major underneath for the batch norm)
        k_fac = dG[:, :, : 3 * H].unflatten(2, (3, H))
        k_fac[:, :, 0] = _sig_bw(g, i)
        k_fac[:, :, 1] = _sig_bw(c_prev, f)
        k_fac[:, :, 2] = _tanh_bw(i, g)
        dG[:, :, 3 * H :] = _sig_bw(TC, o)
        b_fac = _tanh_bw(o, TC)
        DR = G.new_empty(G.shape)  # dL/d (U h) per step (time-major), for dU at the end
        dg_l, dr_l = dG.unbind(0), DR.unbind(0)
        d_ifg, d_o = k_fac.unbind(0), dG[:, :, 3 * H :].unbind(0)
        b_l, f_l, c_l = b_fac.unbind(0), f.unbind(0), Cs.unbind(0)
        # the gains' and the shift's gradients: each step's share, from the norm backwards, summed here
        d_ghh = torch.zeros_like(g_hh) if needs[6] else None
        d_gc = torch.zeros_like(g_c) if needs[7] else None
        d_bc = torch.zeros_like(b_c) if needs[8] else None
        mask_hh = (True, d_ghh is not None, False)
        mask_c = (True, d_gc is not None, d_bc is not None)
        dh_l = g_hs.clone(memory_format=torch.contiguous_format).unbind(0)
        dh = dh_l[T - 1].add_(g_h)
        dc = g_cT.clone()
        back = StepProduct(w_hh.t(), B, T)  # dh_{t-1} = d(U h) W_hh
        for t in range(T - 1, -1, -1):
            r, mean, rstd, mean_c, rstd_c = ctx.kept[t]
            d_o[t].mul_(dh)
            d_cn, d_gc_t, d_bc_t = norm.backward(dh * b_l[t], c_l[t + 1], mean_c, rstd_c, g_c, b_c, mask_c)
            dc.add_(d_cn)
            if d_gc is not None:
                d_gc.add_(d_gc_t)  # type: ignore[arg-type]
            if d_bc is not None:
                d_bc.add_(d_bc_t)  # type: ignore[arg-type]
            d_ifg[t].mul_(dc.unsqueeze(1))
            dc.mul_(f_l[t])
            # (a copy where dG is batch-major: native_batch_norm_backward is slow on strided rows)
            d_r, d_ghh_t, _ = norm.backward(dg_l[t].contiguous(), r, mean, rstd, g_hh, None, mask_hh)
            if d_ghh is not None:
                d_ghh.add_(d_ghh_t)  # type: ignore[arg-type]
            dr_l[t].copy_(d_r)
            dh = back.add_to(dh_l[t - 1], dr_l[t]) if t > 0 else back(dr_l[t])  # (B, H)
        d_w = recurrent_weight_grad(DR, h0, Hs) if needs[5] else None
        d_v, d_gih, d_shift = norm.input_backward(dG, v, mean_in, rstd_in, g_ih, shift, (needs[0], needs[1], needs[2]))
        return d_v, d_gih, d_shift, dh, dc, d_w, d_ghh, d_gc, d_bc


PYTHON_LOOP = PythonLoop()
