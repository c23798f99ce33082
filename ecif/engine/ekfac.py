"""EK-FAC of the head's Hessian: the eigenbases of its two summed Kronecker factors with the
exact diagonal of H in that basis (one pass over the data each). Cheap to apply, and a strong
preconditioner for CG on exact Hessian-vector products (``ecif.engine.inverse_hessian``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecif.engine.batches import Chunk
from ecif.engine.contrastive import batch_stats
from ecif.engine.head import HeadObjective
from ecif.engine.row_sums import Pass
from ecif.grad.solvers import LinearOp


@dataclass
class EKFAC:
    """EK-FAC of the head's Hessian: eigenbases of the summed Kronecker factors with the
    exact diagonal of H in that basis, and the learned scale's row kept exact."""

    q1: torch.Tensor  # (d_img, d_img) eigenbasis, image side
    q2: torch.Tensor  # (d_txt, d_txt) eigenbasis, text side
    diag: torch.Tensor  # (d_img, d_txt) exact diagonal of H in that basis, damping included
    tau_col: torch.Tensor | None  # exact H[M, tau] column when the scale is learned
    tau_u: torch.Tensor | None  # A^-1 H[M, tau] (A = the EK-FAC M block)
    schur: float | None  # H_tau,tau - H[tau, M] A^-1 H[M, tau]

    @classmethod
    def build(cls, obj: HeadObjective) -> EKFAC:
        head = obj.head
        m, t = obj.split(head.theta())

        a_img, a_txt = obj.reduce(Pass(factor_terms, (m, t)))
        q1 = torch.linalg.eigh(0.5 * (a_img + a_img.T))[1]
        q2 = torch.linalg.eigh(0.5 * (a_txt + a_txt.T))[1]
        (diag,) = obj.reduce(Pass(diagonal_terms, (m, t, q1, q2)))
        diag = diag * (t * t * obj.weight / head.n_norm) + head.lam
        out = cls(q1=q1, q2=q2, diag=diag, tau_col=None, tau_u=None, schur=None)
        if head.learn_scale:  # the scale couples to every entry of M: keep that block exact
            e = torch.zeros(head.num_params, dtype=m.dtype, device=m.device)
            e[-1] = 1.0
            col = obj.hvp(head.theta(), e)
            out.tau_col = col[:-1]
            out.tau_u = out.apply_m(out.tau_col[None])[0]
            out.schur = float(col[-1] - out.tau_col @ out.tau_u)
        return out

    def _rotate(self, g: torch.Tensor) -> torch.Tensor:
        di, dt = self.diag.shape
        gm = g.reshape(-1, di, dt)
        return self.q1.T @ gm @ self.q2

    def apply_m(self, gm: torch.Tensor) -> torch.Tensor:
        """The M block's inverse applied to rows (K, d_img * d_txt)."""
        return (self.q1 @ (self._rotate(gm) / self.diag) @ self.q2.T).reshape(gm.shape[0], -1)

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """The approximate H^-1 applied to rows g (K, P)."""
        if self.schur is None:
            return self.apply_m(g)
        # block solve with the Schur complement of the M block
        a_inv_gm = self.apply_m(g[:, :-1])
        x_tau = (g[:, -1] - a_inv_gm @ self.tau_col) / self.schur
        return torch.cat([a_inv_gm - x_tau[:, None] * self.tau_u[None], x_tau[:, None]], dim=1)

    def quad_form(self, g: torch.Tensor) -> torch.Tensor:
        """g^T H^-1 g for each row of g (K, P) under the approximation."""
        if self.schur is None:
            return (self._rotate(g).square() / self.diag).sum((1, 2))
        gm = g[:, :-1]
        q = (self._rotate(gm).square() / self.diag).sum((1, 2))
        return q + (g[:, -1] - self.apply_m(gm) @ self.tau_col).square() / self.schur

    def preconditioner(self) -> LinearOp:
        """EK-FAC as a CG preconditioner on single vectors, which must be positive definite.
        With a learned scale its Schur complement can be negative away from the optimum (the
        M block's approximation is rough against the exact coupling column; measured -3.5 at
        grad 2.5e-2): then the M block and the exact H_tau,tau on the diagonal instead."""
        if self.schur is None or self.schur > 0:
            return lambda r: self.apply(r[None])[0]
        h_tt = self.schur + float(self.tau_col @ self.tau_u)
        if not h_tt > 0:
            return lambda r: torch.cat([self.apply_m(r[None, :-1])[0], r[-1:]])
        return lambda r: torch.cat([self.apply_m(r[None, :-1])[0], r[-1:] / h_tt])


def factor_terms(ch: Chunk, _state, m: torch.Tensor, t: float):
    """A chunk's part of the summed Kronecker factors (image side, text side)."""
    s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
    st = batch_stats(s, ch.mask)
    xbar = st.q.transpose(-1, -2) @ ch.x  # (c, B, di): mean image under column j
    ybar = st.p @ ch.y  # (c, B, dt): mean text under row i
    wp = st.p.sum(-2)  # column sums of P: weight of y_j y_j^T in sum_i Cov_{p_i}(y)
    mx = ch.mask.to(m.dtype)
    a_img = torch.einsum("cb,cbi,cbk->ik", mx + st.q.sum(-1), ch.x, ch.x)
    a_img = a_img - torch.einsum("cbi,cbk->ik", xbar, xbar)
    a_txt = torch.einsum("cb,cbi,cbk->ik", mx + wp, ch.y, ch.y)
    a_txt = a_txt - torch.einsum("cbi,cbk->ik", ybar, ybar)
    return a_img, a_txt


def diagonal_terms(ch: Chunk, _state, m: torch.Tensor, t: float, q1, q2):
    """A chunk's part of H's diagonal in the eigenbasis q1 (x) q2 (before t^2/N, damping)."""
    s = t * (ch.x @ m) @ ch.y.transpose(-1, -2)
    st = batch_stats(s, ch.mask)
    al = ch.x @ q1  # (c, B, di)
    be = ch.y @ q2  # (c, B, dt)
    var_r = st.p @ be.square() - (st.p @ be).square()  # Var_{p_i}(beta): (c, B, dt)
    qt = st.q.transpose(-1, -2)
    var_c = qt @ al.square() - (qt @ al).square()  # Var_{q_j}(alpha): (c, B, di)
    diag = torch.einsum("cbi,cbj->ij", al.square(), var_r)
    return (diag + torch.einsum("cbi,cbj->ij", var_c, be.square()),)
