"""An independent autograd implementation of the head objective, for brute-force checks,
and the reference forms of closed-form terms that only the tests use.

Written from the definitions in docs/math.md without the engine's closed forms: losses by
log_softmax on each batch, derivatives by the torch.func forms of ``ecif.grad.autodiff``,
the Hessian dense.
"""

import torch

from ecif.datasets import rotated_pairs as synthetic_pairs  # noqa: F401  (tests import it here)
from ecif.engine.batches import make_partition
from ecif.engine.contrastive import BatchStats, RemovalWeights, pair_losses
from ecif.grad import FunctionObjective, dense_hessian, jacobian, value_and_grad


def batch_loss(s):
    return -torch.log_softmax(s, 1).diagonal().sum() - torch.log_softmax(s, 0).diagonal().sum()


class Reference:
    def __init__(self, head, x, y):
        self.head = head
        self.x = torch.as_tensor(x, dtype=torch.float64)
        self.y = torch.as_tensor(y, dtype=torch.float64)
        self.batches = [b[b >= 0] for b in head.partition.index]
        self.d = head.m.shape

    def logits(self, theta, rows, x=None, y=None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        m = theta[: self.d[0] * self.d[1]].reshape(self.d)
        t = (
            theta[-1].exp()
            if self.head.learn_scale
            else torch.tensor(self.head.logit_scale, dtype=torch.float64)
        )
        return t * x[rows] @ m @ y[rows].T

    def objective(self, theta):
        total = sum(batch_loss(self.logits(theta, b)) for b in self.batches)
        theta0 = self.head.m0.reshape(-1)
        if self.head.learn_scale:
            theta0 = torch.cat([theta0, torch.tensor([self.head.log_scale0], dtype=torch.float64)])
        return total / self.head.n_norm + 0.5 * self.head.lam * ((theta - theta0) ** 2).sum()

    def as_objective(self):
        """The reference J as an ``ecif.grad`` objective (value, gradient, HVPs by autodiff)."""
        return FunctionObjective(self.objective)

    def hessian(self):
        return dense_hessian(self.objective, self.head.theta())

    def removal(self, theta, n):
        """R_n = L_b(with n) - L_b(without n): removal of n from its batch, by brute force."""
        b = next(b for b in self.batches if n in b)
        rest = b[b != n]
        with_n = batch_loss(self.logits(theta, b))
        without = batch_loss(self.logits(theta, rest)) if len(rest) else 0.0
        return with_n - without

    def removal_grad(self, n):
        return value_and_grad(lambda th: self.removal(th, n), self.head.theta())[1]

    def removal_grads(self, rows):
        """grad R_n for each of ``rows`` at once: the Jacobian of (R_n)_n (per-pair gradients
        of terms that share their batch)."""
        return jacobian(
            lambda th: torch.stack([self.removal(th, int(n)) for n in rows]), self.head.theta()
        )

    def val_grad(self, xv, yv):
        xv = torch.as_tensor(xv, dtype=torch.float64)
        yv = torch.as_tensor(yv, dtype=torch.float64)
        part = make_partition(len(xv), self.head.batch_size, self.head.seed)

        def val_loss(theta):
            rows = [b[b >= 0] for b in part.index]
            return sum(batch_loss(self.logits(theta, r, xv, yv)) for r in rows) / len(xv)

        return value_and_grad(val_loss, self.head.theta())[1]


# -- reference forms of the removal terms (docs/math.md sections 3 and 5) ------------------
# The library computes these only through ``ecif.engine.contrastive.removal_directional``;
# these spell the formulas out on BatchStats and RemovalWeights, term by term.


def removal_values(st: BatchStats, w: RemovalWeights):
    """(Pos_n, Neg_n) for every member, (c, B) each."""
    return pair_losses(st), w.neg_values


def removal_directional_reference(st: BatchStats, w: RemovalWeights, ds):
    """(dPos_n, dNeg_n) along a logit perturbation ``ds``, (c, B) each:

    dPos_n = -2 dS_nn + sum_j p_nj dS_nj + sum_j q_jn dS_jn
    dNeg_n = sum_k A_kn (dS_kn - r_k) + sum_k Bq_nk (dS_nk - c_k)
    with r_k = sum_j p_kj dS_kj and c_k = sum_j q_jk dS_jk.
    """
    r = (st.p * ds).sum(-1)
    c = (st.q * ds).sum(-2)
    zero = torch.zeros((), dtype=ds.dtype, device=ds.device)
    d_pos = torch.where(st.mask, -2.0 * torch.diagonal(ds, dim1=-2, dim2=-1) + r + c, zero)
    d_neg = (w.a * (ds - r.unsqueeze(-1))).sum(-2) + (w.bq * (ds - c.unsqueeze(-2))).sum(-1)
    return d_pos, torch.where(st.mask, d_neg, zero)
