"""Settings of the DEN-style learner, with the published DEN defaults where they exist."""

from __future__ import annotations

from dataclasses import dataclass

SPLIT_PICKS = ("most", "least")


@dataclass
class DENConfig:
    """Hyper-parameters of :class:`~ecif.companions.continual.DENLearner`.

    Published DEN defaults (Yoon et al., ICLR 2018, public TF1 code): Adam lr 1e-3, batch 256,
    L1 1e-5, L2 1e-4, group lasso 1e-3, pull 0.5, k = 10, loss threshold 0.01, split threshold
    0.05, layers 784-312-128. As in that code, ``l1`` and ``group_lasso`` are proximal
    thresholds applied after every Adam step (not scaled by the learning rate), and ``l2`` and
    ``pull`` multiply half squared norms in the loss.

    Ours (reconstructed, not published): fixed step counts instead of DEN's early stopping on a
    validation loss; the split restores the old copy exactly instead of retraining it;
    ``split_top_m`` splits the m most drifted units per layer so that criteria can be compared
    at a matched number of new units. Without it, the units over ``split_threshold`` are split,
    at most ``max_split_per_layer``; ``split_pick`` says which ones when more are over it:
    ``"most"`` drifted first (ours), or ``"least"`` drifted first, as DEN's public code does
    (``np.argsort(drifts)[:k]`` over the units above the threshold, k = 10). ``drift`` picks the criterion (``euclidean`` is DEN,
    ``angular`` is Saadi & Khan 2021, ``random`` and ``scale`` are controls).
    """

    hidden: tuple[int, ...] = (312, 128)
    lr: float = 1e-3
    batch_size: int = 256
    l1: float = 1e-5
    l2: float = 1e-4
    group_lasso: float = 1e-3
    pull: float = 0.5
    expand_k: int = 10
    loss_threshold: float = 0.01
    split_threshold: float = 0.05
    split_top_m: int | None = None
    max_split_per_layer: int | None = 10
    split_pick: str = "most"
    drift: str = "euclidean"
    drift_include_bias: bool = False
    steps: int = 1000
    head_steps: int | None = None
    split_retrain_steps: int | None = None
    connect_tol: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.expand_k < 0 or (self.split_top_m is not None and self.split_top_m < 0):
            raise ValueError("expand_k and split_top_m must be non-negative")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.split_pick not in SPLIT_PICKS:
            raise ValueError(f"split_pick must be one of {SPLIT_PICKS}, not {self.split_pick!r}")

    @property
    def n_head_steps(self) -> int:
        """Steps of the head-only phase; DEN uses a tenth of the full budget."""
        return self.head_steps if self.head_steps is not None else max(1, self.steps // 10)

    @property
    def n_split_retrain_steps(self) -> int:
        return self.split_retrain_steps if self.split_retrain_steps is not None else self.steps
