"""An independent autograd implementation of the head objective, for brute-force checks.

Written from the definitions in docs/math.md without the engine's closed forms: losses by
log_softmax on each batch, derivatives by torch.func, the Hessian dense.
"""

import torch

from ecif.datasets import rotated_pairs as synthetic_pairs  # noqa: F401  (tests import it here)
from ecif.engine.batches import make_partition


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

    def hessian(self):
        return torch.func.hessian(self.objective)(self.head.theta())

    def removal(self, theta, n):
        """R_n = L_b(with n) - L_b(without n): removal of n from its batch, by brute force."""
        b = next(b for b in self.batches if n in b)
        rest = b[b != n]
        with_n = batch_loss(self.logits(theta, b))
        without = batch_loss(self.logits(theta, rest)) if len(rest) else 0.0
        return with_n - without

    def removal_grad(self, n):
        return torch.func.grad(lambda th: self.removal(th, n))(self.head.theta())

    def val_grad(self, xv, yv):
        xv = torch.as_tensor(xv, dtype=torch.float64)
        yv = torch.as_tensor(yv, dtype=torch.float64)
        part = make_partition(len(xv), self.head.batch_size, self.head.seed)

        def val_loss(theta):
            rows = [b[b >= 0] for b in part.index]
            return sum(batch_loss(self.logits(theta, r, xv, yv)) for r in rows) / len(xv)

        return torch.func.grad(val_loss)(self.head.theta())
