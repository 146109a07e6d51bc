"""Hand-written forward and backward through time for the cells whose reset gate acts before the candidate's
product: Cho et al.'s GRU (``gru-cho``) and Jozefowicz et al.'s MUT1-3.

Every one of them has the same step, up to which gates see the state and how the update gate mixes:

    z, r = s(a_z + [U_z s_z(h)]), s(a_r + [U_r h])      (a = the input projection of this step)
    n    = tanh(a_n + U_n (r * h))
    h'   = n + z (h - n)    (``gru-cho``: z keeps h)    or    h + z (n - h)    (MUT: z takes n)

where s_z(h) is h, or tanh(h) for MUT3, and MUT1's z sees no state. The two products per step are
sequential (the candidate's needs r), so a step is two small matmuls plus a few elementwise ops, and the
autograd loop pays a graph node for each. Here the forward loop runs without autograd into preallocated
buffers, and the backward loop needs the same two products (transposed) and five small in-place ops per
step: every derivative factor that does not depend on dh is computed for all steps at once first. The
recurrent weight's gradient is one big matmul per block at the end. The products go through
:class:`charlm.cells.onednn_matmul.StepProduct`, as the LSTM kernel's do (:mod:`charlm.cells.lstm_kernel`).

The kernel takes the input projection as computed by the cell (MUT1's has a tanh inside it) and returns
its gradient; autograd does the rest. The tests check it against the cells' autograd step, in value and
gradient, for every cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from charlm.cells.onednn_matmul import StepProduct


@dataclass(frozen=True)
class GateProduct:
    """One recurrent product into the gates: ``rows`` blocks of ``weight_hh`` (start, stop, in units of H)
    times h (or tanh(h) when ``tanh_h``), added to the projection's blocks from ``to`` on."""

    rows: tuple[int, int]
    to: int
    tanh_h: bool = False

    def weight(self, w_hh: Tensor, h: int) -> Tensor:
        """This product's rows of ``weight_hh`` ([k H, H])."""
        return w_hh[self.rows[0] * h : self.rows[1] * h]

    def target(self, g: Tensor, h: int) -> Tensor:
        """The blocks of g (..., 3H) it adds to (..., k H)."""
        return g[..., self.to * h : (self.to + self.rows[1] - self.rows[0]) * h]


@dataclass(frozen=True)
class ResetGateSpec:
    """Where one cell's pieces sit. The projection's blocks hold z and r (in the order ``z_block`` /
    ``r_block`` say, both among the first two) and then n; ``cand_row`` is U_n's block in ``weight_hh``."""

    z_block: int
    r_block: int
    products: tuple[GateProduct, ...]
    cand_row: int
    z_keeps_h: bool

    def candidate_weight(self, w_hh: Tensor, h: int) -> Tensor:
        """U_n: the candidate's rows of ``weight_hh`` (or of its gradient), [H, H]."""
        return w_hh[self.cand_row * h : (self.cand_row + 1) * h]


def _block(g: Tensor, k: int, h: int) -> Tensor:
    """Block k of the last dimension of g (..., 3H): (..., H)."""
    return g[..., k * h : (k + 1) * h]


def _h_prev(h0: Tensor, hs: Tensor) -> Tensor:
    """The state each step starts from: h0, then every output but the last, (T, B, H)."""
    return torch.cat([h0.unsqueeze(0), hs[:-1]])


class ResetGateKernel(torch.autograd.Function):
    """(xw (T,B,3H), h0 (B,H), weight_hh [k H, H], spec) -> (hs (T,B,H), h (B,H))."""

    @staticmethod
    def forward(ctx: Any, xw: Tensor, h0: Tensor, w_hh: Tensor, spec: ResetGateSpec) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        T, B, K = xw.shape
        H = K // 3
        # G starts as the projection; each step adds its products in place and leaves the activations
        # (z, r, n) that the backward pass reads.
        G = xw.contiguous().clone()
        Hs = G.new_empty(T, B, H)
        RH = G.new_empty(T, B, H)  # r * h of every step, the candidate product's input
        tanh_h = any(p.tanh_h for p in spec.products)
        TH = G.new_empty(T, B, H) if tanh_h else None  # tanh(h) of every step (MUT3's z)
        prods = [StepProduct(p.weight(w_hh, H), B, T) for p in spec.products]
        cand = StepProduct(spec.candidate_weight(w_hh, H), B, T)
        targets = [p.target(G, H).unbind(0) for p in spec.products]
        gates, n_blk = G[:, :, : 2 * H].unbind(0), G[:, :, 2 * H :].unbind(0)
        z_blk, r_blk = _block(G, spec.z_block, H).unbind(0), _block(G, spec.r_block, H).unbind(0)
        h_list, rh_list = Hs.unbind(0), RH.unbind(0)
        th_list = TH.unbind(0) if TH is not None else ()
        h = h0
        for t in range(T):
            for p, prod, tgt in zip(spec.products, prods, targets, strict=True):
                prod.add_to(tgt[t], torch.tanh(h, out=th_list[t]) if p.tanh_h else h)  # (B, k H) += (B, H) @ (H, k H)
            gates[t].sigmoid_()
            cand.add_to(n_blk[t], torch.mul(r_blk[t], h, out=rh_list[t])).tanh_()  # n = tanh(a_n + U_n (r h))
            # h' = n + z (h - n) where z keeps h, h + z (n - h) where it takes n
            kept, taken = (h, n_blk[t]) if spec.z_keeps_h else (n_blk[t], h)
            h = torch.sub(kept, taken, out=h_list[t]).mul_(z_blk[t]).add_(taken)
        ctx.spec = spec
        ctx.save_for_backward(G, Hs, RH, TH if TH is not None else Hs[:0], h0, w_hh)
        return Hs, Hs[T - 1].clone()

    @staticmethod
    def backward(ctx: Any, g_hs: Tensor, g_h: Tensor) -> tuple[Tensor | None, ...]:
        G, Hs, RH, TH, h0, w_hh = ctx.saved_tensors
        spec: ResetGateSpec = ctx.spec
        T, B, K = G.shape
        H = K // 3
        hp = _h_prev(h0, Hs)  # (T, B, H)
        z, r, n = _block(G, spec.z_block, H), _block(G, spec.r_block, H), _block(G, 2, H)
        sig_bw, tanh_bw = torch.ops.aten.sigmoid_backward, torch.ops.aten.tanh_backward
        # The factors that dh is multiplied by, for every step at once, written where the gradients go:
        # d a_n = dh * k_n, d a_z = dh * k_z, and d a_r = d(r h) * h r (1 - r); dh reaches h directly by k_h.
        dG = torch.empty_like(G)
        d_z, d_r, d_n = (_block(dG, b, H) for b in (spec.z_block, spec.r_block, 2))
        keep = z if spec.z_keeps_h else 1.0 - z  # what h' keeps of h
        d_n[:] = tanh_bw(1.0 - z if spec.z_keeps_h else z, n)  # what h' takes of n, times tanh'
        d_z[:] = sig_bw(hp - n if spec.z_keeps_h else n - hp, z)
        d_r[:] = sig_bw(hp, r)
        products = [(p, StepProduct(p.weight(w_hh, H).t(), B, T)) for p in spec.products]
        cand_back = StepProduct(spec.candidate_weight(w_hh, H).t(), B, T)
        tanh_h = TH.shape[0] > 0
        th_fac = 1.0 - TH * TH if tanh_h else None  # tanh'(h) of MUT3's z
        blocks = [p.target(dG, H).unbind(0) for p in spec.products]
        dz_l, dr_l, dn_l = d_z.unbind(0), d_r.unbind(0), d_n.unbind(0)
        r_l, keep_l = r.unbind(0), keep.unbind(0)
        th_l = th_fac.unbind(0) if th_fac is not None else ()
        dh_list = g_hs.clone(memory_format=torch.contiguous_format).unbind(0)
        dh = dh_list[T - 1].add_(g_h)
        for t in range(T - 1, -1, -1):
            dn_l[t].mul_(dh)
            dz_l[t].mul_(dh)
            d_rh = cand_back(dn_l[t])  # (B, H) = d a_n U_n
            dr_l[t].mul_(d_rh)
            # dh_{t-1} = dh k_h + d(r h) r + the gates' products, plus what the loss gives step t-1 directly
            dh_prev = dh_list[t - 1].addcmul_(dh, keep_l[t]) if t > 0 else dh * keep_l[t]
            dh_prev.addcmul_(d_rh, r_l[t])
            for (p, back), blk in zip(products, blocks, strict=True):
                if p.tanh_h:
                    dh_prev.addcmul_(back(blk[t]), th_l[t])
                else:
                    back.add_to(dh_prev, blk[t])
            dh = dh_prev
        d_w = None
        if ctx.needs_input_grad[2]:
            d_w = torch.zeros_like(w_hh)
            flat = T * B
            for p in spec.products:
                src = (TH if p.tanh_h else hp).reshape(flat, H)
                p.weight(d_w, H).copy_(p.target(dG, H).reshape(flat, -1).t() @ src)
            spec.candidate_weight(d_w, H).copy_(d_n.reshape(flat, H).t() @ RH.reshape(flat, H))
        return dG, dh, d_w, None


class GRUKernel(torch.autograd.Function):
    """nn.GRU's form, where the reset gate acts after the product: (xw (T,B,3H) with b_hr and b_hz folded in,
    h0 (B,H), weight_hh [3H, H], b_hn [H]) -> (hs (T,B,H), h (B,H)).

        r, z = s(a_r + U_r h), s(a_z + U_z h),   n = tanh(a_n + r * (U_n h + b_hn)),   h' = n + z (h - n)

    One product per step both ways (all three blocks see h itself); going back, the product's input is
    [d a_r, d a_z, r d a_n], and U_n h + b_hn is kept for every step.
    """

    @staticmethod
    def forward(ctx: Any, xw: Tensor, h0: Tensor, w_hh: Tensor, b_hn: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        T, B, K = xw.shape
        H = K // 3
        G = xw.contiguous().clone()  # ends holding r, z, n of every step
        Hs = G.new_empty(T, B, H)
        HN = G.new_empty(T, B, H)  # U_n h + b_hn of every step
        uh = StepProduct(w_hh, B, T)
        rz_l, n_l = G[:, :, : 2 * H].unbind(0), G[:, :, 2 * H :].unbind(0)
        r_l, z_l = G[:, :, :H].unbind(0), G[:, :, H : 2 * H].unbind(0)
        h_list, hn_list = Hs.unbind(0), HN.unbind(0)
        h = h0
        for t in range(T):
            u = uh(h)  # (B, 3H) = h @ U^T
            rz_l[t].add_(u[:, : 2 * H]).sigmoid_()
            hn = torch.add(u[:, 2 * H :], b_hn, out=hn_list[t])
            n = n_l[t].addcmul_(r_l[t], hn).tanh_()
            h = torch.sub(h, n, out=h_list[t]).mul_(z_l[t]).add_(n)  # h' = n + z (h - n)
        ctx.save_for_backward(G, Hs, HN, h0, w_hh)
        return Hs, Hs[T - 1].clone()

    @staticmethod
    def backward(ctx: Any, g_hs: Tensor, g_h: Tensor) -> tuple[Tensor | None, ...]:
        G, Hs, HN, h0, w_hh = ctx.saved_tensors
        T, B, K = G.shape
        H = K // 3
        hp = _h_prev(h0, Hs)
        r, z, n = (_block(G, k, H) for k in range(3))
        sig_bw, tanh_bw = torch.ops.aten.sigmoid_backward, torch.ops.aten.tanh_backward
        # DU holds what goes back through the product, [d a_r, d a_z, d(U_n h + b_hn)]; d a_n is kept apart.
        # The factors that dh (or d a_n) multiplies, for every step at once, go where the gradients will be.
        DU = torch.empty_like(G)
        d_an = tanh_bw(1.0 - z, n)  # d a_n = dh (1 - z) (1 - n^2)
        DU[:, :, :H] = sig_bw(HN, r)  # d a_r = d a_n (U_n h + b_hn) r (1 - r)
        DU[:, :, H : 2 * H] = sig_bw(hp - n, z)  # d a_z = dh (h - n) z (1 - z)
        dr_l, dz_l, dhn_l = (_block(DU, k, H).unbind(0) for k in range(3))
        du_l, dan_l, r_l, z_l = DU.unbind(0), d_an.unbind(0), r.unbind(0), z.unbind(0)
        back = StepProduct(w_hh.t(), B, T)  # dh_{t-1} += DU_t U
        dh_list = g_hs.clone(memory_format=torch.contiguous_format).unbind(0)
        dh = dh_list[T - 1].add_(g_h)
        for t in range(T - 1, -1, -1):
            dan = dan_l[t].mul_(dh)
            dz_l[t].mul_(dh)
            dr_l[t].mul_(dan)
            torch.mul(dan, r_l[t], out=dhn_l[t])
            dh_prev = dh_list[t - 1].addcmul_(dh, z_l[t]) if t > 0 else dh * z_l[t]
            dh = back.add_to(dh_prev, du_l[t])
        needs = ctx.needs_input_grad
        d_xw = torch.cat([DU[:, :, : 2 * H], d_an], 2) if needs[0] else None
        flat = T * B
        d_w = DU.reshape(flat, K).t() @ hp.reshape(flat, H) if needs[2] else None
        d_bhn = DU[:, :, 2 * H :].sum((0, 1)) if needs[3] else None
        return d_xw, dh, d_w, d_bhn
