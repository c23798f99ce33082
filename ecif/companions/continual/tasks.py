"""Task sequences for continual learning: permuted and split versions of one labelled set.

Nothing is downloaded: the inputs are either synthetic Gaussian blobs or scikit-learn's bundled
8x8 digits (shipped inside the wheel), optionally upsampled to MNIST's 28x28 = 784 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Task:
    """One task's train/validation/test split; labels are 0..n_classes-1."""

    name: str
    n_classes: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def synthetic_xy(
    n: int = 600, dim: int = 20, n_classes: int = 4, seed: int = 0, spread: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class blobs with random means: a fast stand-in for an image set."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, dim, generator=g) * 2.0
    y = torch.randint(n_classes, (n,), generator=g)
    return means[y] + spread * torch.randn(n, dim, generator=g), y


def digits_xy() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 bundled 8x8 digits, pixels scaled to [0, 1] (needs scikit-learn)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def digits28_xy() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits in MNIST's layout: 784 inputs as in the DEN and angular-drift papers.

    Each 8x8 image is upsampled bilinearly to 20x20 and centred in a 28x28 zero frame, as MNIST
    centres its digits in a 20x20 box; a constant border means many inputs carry no signal, so
    the L1 step can zero their weights, the high-dimensional sparse regime the papers argue for.
    """
    import torch.nn.functional as F

    x, y = digits_xy()
    img = F.interpolate(x.view(-1, 1, 8, 8), size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(img, (4, 4, 4, 4)).reshape(-1, 784).clamp(0.0, 1.0), y


def _split(name: str, x: torch.Tensor, y: torch.Tensor, n_classes: int, g: torch.Generator):
    perm = torch.randperm(x.shape[0], generator=g)
    n_tr, n_va = int(0.6 * len(perm)), int(0.2 * len(perm))
    tr, va, te = perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]
    return Task(name, n_classes, x[tr], y[tr], x[va], y[va], x[te], y[te])


def permuted_tasks(x: torch.Tensor, y: torch.Tensor, n_tasks: int, seed: int = 0) -> list[Task]:
    """Same labels, a fixed random permutation of the input features per task."""
    g = torch.Generator().manual_seed(seed)
    n_classes = int(y.max()) + 1
    tasks = []
    for t in range(n_tasks):
        p = torch.randperm(x.shape[1], generator=g)
        tasks.append(_split(f"perm{t}", x[:, p], y, n_classes, g))
    return tasks


def split_tasks(
    x: torch.Tensor, y: torch.Tensor, groups: Sequence[Sequence[int]], seed: int = 0
) -> list[Task]:
    """One task per group of classes (e.g. (0, 1), (2, 3), ...), labels renumbered per task."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for group in groups:
        keep = torch.isin(y, torch.tensor(list(group)))
        relabel = {c: i for i, c in enumerate(group)}
        yy = torch.tensor([relabel[int(v)] for v in y[keep]])
        tasks.append(_split("split" + "-".join(map(str, group)), x[keep], yy, len(group), g))
    return tasks
