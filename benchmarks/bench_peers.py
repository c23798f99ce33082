"""Peers on the same work: ecif against TRAK, kronfluence and dattri on the same head.

    python benchmarks/bench_peers.py fidelity            # n=240, d=6, batch 24, 3 seeds
    python benchmarks/bench_peers.py fidelity --n 1000 --d 16 --batch-size 40 --val 500 --trak-proj-dim 2048 64
    python benchmarks/bench_peers.py timing --n 20480 --d 64 --peer-max-n default=20480,dattri_cg=4096
    python benchmarks/bench_peers.py timing --n 20480 --d 512 --fit-iter 20 --ecif default ekfac --peer-max-n default=1024,kfl_row=5120,dattri_cg=512

Peers: ``pip install -e .[peers]`` (traker, kronfluence, dattri; see pyproject.toml). A peer
whose package is missing is skipped with a message naming the package; the others still run.

The model, for every method: the bilinear head S_ij = t x_i^T M y_j over frozen unit
embeddings, fitted ONCE by ``ecif.fit`` (float64 for fidelity). Every peer gets that same M as
a torch module (peers only attribute, they never train) and the same fixed batch partition.
The measurement is the validation loss of the head (mean symmetric InfoNCE over the
validation set cut into batches with the head's batch size and seed: ``ecif.loss_gradient``'s
g_val) unless a row says otherwise. Every score is oriented as ecif's: the predicted change of
the validation loss when the pair is removed (a positive multiple of it).

How each peer expresses the contrastive head (the choices a user would naturally make):

* TRAK (``traker``): ``TRAKer(task=CLIPModelOutput(...))``, the library's own CLIP task. The
  module returns ``(x M, y, t)`` as open_clip returns (image features, text features, logit
  scale). CLIPModelOutput's output function is the CLIP margin of a pair against
  ``simulated_batch_size`` text/image embeddings drawn at random from the whole training set
  (set here to the training batch size), WITHOUT the logit scale; its out-to-loss weight
  1 - (p_ii + q_ii)/2 is taken in the featurize batch, and we featurize in the head's fixed
  batches. ``get_embeddings`` hard-codes ``.cuda()``, so the class attributes it fills
  (image_embeddings, text_embeddings, num_computed_embeddings) are set directly. No GPU and no
  fast_jl: TRAK's own CPU projector, ``BasicProjector`` with ``ProjectionType.normal`` (what
  TRAKer picks on CPU), passed with block_size = proj_dim so the matrix is generated once and
  not regenerated block by block for every batch (faster than TRAKer's CPU default);
  use_half_precision=False (float16 matmuls are slow on CPU); lambda_reg = 0 (default).
  proj_dim = min(2048, P): at P <= 2048 the projection is invertible and TRAK's kernel is then
  projection-free. The convex head has one optimum, so TRAK's ensemble over independently
  trained models would repeat the same M: an ensemble of E here is E model ids of the same
  checkpoint (independent projections and negative draws). Rows: "TRAK CLIP" (as shipped),
  "TRAK CLIP, t in features" (image features t x M, so the margin sees the training logits),
  and "TRAK features, g_val target" (TRAK's train features and out-to-loss weights, but the
  target gradient is ecif's g_val projected by TRAK's projector instead of the summed CLIP
  margins of the validation pairs: the same measurement as ecif).
* kronfluence: ``Task.compute_train_loss`` per training EXAMPLE; the head is an nn.Linear
  (weight M^T) that kronfluence tracks for EK-FAC; damping_factor = lambda (the L2 pull of the
  fit, the same scale since kronfluence averages its factors over examples);
  ``aggregate_query_gradients=True`` (one measurement). Two natural examples:
  "kronfluence, pair in its batch (Pos)": an example is one pair carrying its fixed batch
  (B x d, a sequence to kronfluence); loss = the pair's own row + column loss in that batch
  (-log p_nn - log q_nn, ecif's Pos term). Summed over pairs it is the training loss, so the
  EK-FAC Fisher (labels sampled from the row and column softmaxes, sample=True) approximates
  the exact Hessian. "kronfluence, batched loss (row split)": an example is one pair, the
  data loader yields the fixed batches in order (batch size B, no shuffle) and the loss is the
  batch's contrastive loss; kronfluence's per-example gradient is then the part of the batch
  gradient that flows through that pair's image row (x_n (dL_b/du_n)^T). A third row,
  "kronfluence + ecif's R_n", is NOT a natural use: the per-example loss is ecif's closed-form
  removal term (sample=False) while the Fisher is still sampled from Pos: it shows what the
  EK-FAC Hessian costs when the removal term is right.
* dattri: ``AttributionTask(loss_func, model, checkpoints, target_func)`` with a per-sample
  loss in torch.func style. The sample is one pair carrying its fixed batch (as above) and the
  loss is Pos_n (the only per-sample loss whose mean is the training objective, which dattri's
  IF attributors differentiate twice for the Hessian); target_func = the validation loss, the
  whole validation set being ONE test sample (dattri vmaps its inverse-Hessian solve over test
  samples, so one sample per validation batch multiplies memory: 23 GB and an OOM kill at
  1,024 pairs, d = 64, 16 validation batches). IFAttributorExplicit (exact Hessian
  of the mean training loss + regularization = lambda) and IFAttributorCG (regularization =
  lambda, dattri's default max_iter = 10), the full training set cached as ONE loader batch
  (dattri sums inverse-Hessian products over the cached loader's batches, so more batches
  would change the Hessian), and TracInAttributor with the one checkpoint (Grad-Dot: no
  Hessian, dattri's default 512-d projection). dattri cannot express ecif's removal term
  with the right Hessian: the per-sample loss is both the gradient and, averaged, the Hessian.

fidelity: ground truth = warm-start refits (``ecif.fit(train, exclude=..., init=head)``, same
partition) for ``--singles`` single removals (Spearman) and ``--groups`` random 5% subsets
(LDS: Spearman of summed scores against the actual change), computed ONCE per seed and reused
for every method. Seed s: train/val drawn with seeds 5+2s / 6+2s, partition seed s, removals
drawn with seed s (seed 0 is tests/test_engine_influence.py's study exactly).

timing: synthetic unit pairs (20% shuffled captions), a head fitted by L-BFGS with a capped
budget (the cost of attributing does not depend on how converged M is), float32, 2 threads.
ecif: ``ecif.score`` end to end (g_val + H^-1 g_val + scoring pass) with its default solver,
``solver="ekfac"`` and ``solver="cg"``, and the scoring pass alone. Peers: the whole
attribution of all N pairs to the one measurement (factors / featurizing / Hessian work
included, fitting not). A peer with a cap below N (``--peer-max-n``) runs on the first
cap/4 and cap pairs (whole batches, the same M) and its time at N is the line through those
two points (fixed costs are not scaled up); TRAK's negative sampling draws from all N pairs
(O(N) per pair), so for TRAK the line is optimistic. Every call is timed ``--repeat`` times in
rounds and the minimum kept (see ``run_timing``); wall and process CPU time both reported.
Agreement at this size is the Spearman of a method's scores with ecif's first row (the
default solver: exact or CG) on the same (sub)set: no retraining ground truth at this size.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

import ecif
from ecif.datasets import rotated_pairs
from ecif.engine.batches import Partition, make_partition
from ecif.engine.influence import loss_gradient, score_pass
from ecif.engine.inverse_hessian import InverseHessian, SolverArgs, auto_method

PEER_PACKAGES = {"trak": "traker", "kronfluence": "kronfluence", "dattri": "dattri"}
NEG = -1e9  # masked logits (padding rows of a short batch); exp underflows to exactly 0


def missing_peers(wanted):
    """Wanted peers that cannot be imported, each announced with the package to install.

    The peers are imported here, before anything is timed, so no timing includes an import.
    """
    out = []
    for peer in wanted:
        try:
            importlib.import_module(peer)
        except ImportError as exc:
            print(
                f"SKIPPED {peer}: package '{PEER_PACKAGES[peer]}' is not installed or does not "
                f"import ({exc}); pip install -e .[peers]  (or pip install {PEER_PACKAGES[peer]})"
            )
            out.append(peer)
    return out


# --------------------------------------------------------------------------- the problem


@dataclass
class Problem:
    """One head and its data, in the forms the peers need."""

    head: ecif.engine.head.Head
    x: np.ndarray  # (N, d_i) train, ecif row order
    y: np.ndarray
    xv: np.ndarray  # validation
    yv: np.ndarray
    dtype: torch.dtype  # the peers' working precision

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def t(self) -> float:
        return self.head.logit_scale

    @property
    def lam(self) -> float:
        return self.head.lam

    @property
    def bsz(self) -> int:
        return self.head.batch_size

    def val_partition(self) -> Partition:
        return make_partition(len(self.xv), self.bsz, self.head.seed)

    def m(self) -> torch.Tensor:
        return self.head.m.detach().to(self.dtype).clone()

    def gval(self) -> torch.Tensor:
        """g_val = d(mean validation loss)/dM, flat row-major (ecif.score's query gradient)."""
        return loss_gradient(self.head, self.xv, self.yv).to(self.dtype)


def _order(part: Partition) -> np.ndarray:
    """Row positions in batch order; consecutive chunks of batch_size are the batches (only
    the last batch of a partition can be short)."""
    return part.index[part.index >= 0]


class BatchItems(torch.utils.data.Dataset):
    """Example n = (its batch's X (B x d_i), Y (B x d_t), mask (B), one-hot of n (B), position).

    Batches are padded to B with zero rows and a False mask. ``rows``: which pairs are
    examples (default: every member of the partition, in row order).
    """

    def __init__(self, x, y, part: Partition, dtype, rows=None):
        idx = part.index
        mask = idx >= 0
        safe = np.where(mask, idx, 0)
        xt = torch.as_tensor(np.asarray(x), dtype=dtype)
        yt = torch.as_tensor(np.asarray(y), dtype=dtype)
        mt = torch.as_tensor(mask)
        self.xb = xt[torch.as_tensor(safe)] * mt[..., None]
        self.yb = yt[torch.as_tensor(safe)] * mt[..., None]
        self.mb = mt
        b, p = np.nonzero(mask)
        self.batch_of = np.full(part.n, -1)
        self.pos_of = np.full(part.n, -1)
        self.batch_of[idx[b, p]] = b
        self.pos_of[idx[b, p]] = p
        self.rows = np.sort(idx[mask]) if rows is None else np.asarray(rows)
        self.bsz = idx.shape[1]
        self.dtype = dtype

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        b, p = self.batch_of[r], self.pos_of[r]
        onehot = torch.zeros(self.bsz, dtype=self.dtype)
        onehot[p] = 1.0
        return self.xb[b], self.yb[b], self.mb[b], onehot, torch.tensor(p)


class ValBatches(torch.utils.data.Dataset):
    """One example per validation batch: (X, Y, mask), padded to B."""

    def __init__(self, xv, yv, part: Partition, dtype):
        inner = BatchItems(xv, yv, part, dtype)
        self.xb, self.yb, self.mb = inner.xb, inner.yb, inner.mb

    def __len__(self):
        return len(self.xb)

    def __getitem__(self, i):
        return self.xb[i], self.yb[i], self.mb[i]


def masked_logits(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    both = mask[..., :, None] & mask[..., None, :]
    return s.masked_fill(~both, NEG)


def batch_losses(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE sum over the members of each batch: (..., B, B) logits -> (...)."""
    s = masked_logits(s, mask)
    lr = torch.log_softmax(s, -1).diagonal(dim1=-2, dim2=-1)
    lc = torch.log_softmax(s, -2).diagonal(dim1=-2, dim2=-1)
    return -((lr + lc) * mask).sum(-1)


def pair_row_col(u, yb, mb, onehot, t):
    """log p_n. and log q_.n of pair n in its batch, without forming the B x B logits.

    u = X_b M (..., B, d_t), yb (..., B, d_t), mb the batch mask, onehot marks n: the row
    t u_n Y_b^T and the column t U_b y_n are all that Pos_n needs (2 B d flops, not B^2 d).
    """
    un = (onehot[..., :, None] * u).sum(-2)  # (..., d_t)
    yn = (onehot[..., :, None] * yb).sum(-2)
    row = t * (yb @ un[..., :, None])[..., 0]  # S_nj
    col = t * (u @ yn[..., :, None])[..., 0]  # S_in
    row = torch.log_softmax(row.masked_fill(~mb, NEG), -1)
    col = torch.log_softmax(col.masked_fill(~mb, NEG), -1)
    return row, col


# --------------------------------------------------------------------------- ecif


def ecif_scores(pb: Problem, **kw) -> dict[str, np.ndarray]:
    df = ecif.score(pb.head, (pb.x, pb.y), val=(pb.xv, pb.yv), **kw)
    return {"influence": df["influence"].to_numpy(), "pos": df["influence_pos"].to_numpy()}


# --------------------------------------------------------------------------- TRAK


class TrakHead(torch.nn.Module):
    """open_clip's (image features, text features, logit scale) for the bilinear head."""

    def __init__(self, m: torch.Tensor, t: float, scale_in_features: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(m.clone())
        self.t = t
        self.scale_in_features = scale_in_features

    def forward(self, image, text):
        u = image @ self.weight
        if self.scale_in_features:
            u = self.t * u
        return u, text, torch.tensor(self.t, dtype=u.dtype)


def _clip_task():
    """CLIPModelOutput with its out-to-loss weights shaped (B, 1) like TRAK's other tasks.

    traker 0.3.2's CLIPModelOutput.get_out_to_loss_grad returns shape (B,), which its own
    MmapSaver cannot store into the (N, 1) out_to_loss array (featurize raises a broadcast
    ValueError); the image and text classification tasks unsqueeze. Nothing else changes.
    """
    from trak.modelout_functions import CLIPModelOutput

    class CLIPTask(CLIPModelOutput):
        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).unsqueeze(-1)

    return CLIPTask


def trak_scores(
    pb: Problem,
    *,
    proj_dim: int = 2048,
    ensemble: int = 1,
    scale_in_features: bool = False,
    gval_target: bool = False,
) -> dict[str, np.ndarray]:
    from trak import TRAKer
    from trak.modelout_functions import CLIPModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    dt = torch.float32  # TRAK stores float16 or float32
    m = pb.head.m.detach().to(dt)
    model = TrakHead(m, pb.t, scale_in_features)
    p = m.numel()
    k = min(proj_dim, p)
    task = _clip_task()(
        temperature=1.0 if scale_in_features else None, simulated_batch_size=min(pb.bsz, pb.n - 1)
    )
    x = torch.as_tensor(pb.x, dtype=dt)
    y = torch.as_tensor(pb.y, dtype=dt)
    xv = torch.as_tensor(pb.xv, dtype=dt)
    yv = torch.as_tensor(pb.yv, dtype=dt)
    projector = BasicProjector(
        grad_dim=p,
        proj_dim=k,
        seed=0,
        proj_type=ProjectionType.normal,
        device="cpu",
        block_size=k,
        dtype=dt,
    )
    save = tempfile.mkdtemp(prefix="ecif_peers_trak_", dir="/tmp")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            traker = TRAKer(
                model=model,
                task=task,
                train_set_size=pb.n,
                save_dir=save,
                device="cpu",
                projector=projector,
                use_half_precision=False,
                logging_level=logging.ERROR,
            )
        with torch.no_grad():
            CLIPModelOutput.image_embeddings = model(x, y)[0].detach()
        CLIPModelOutput.text_embeddings = y
        CLIPModelOutput.num_computed_embeddings = pb.n
        sd = model.state_dict()
        order = _order(pb.head.partition)
        vorder = _order(pb.val_partition())
        for mid in range(ensemble):
            traker.load_checkpoint(sd, model_id=mid)
            for s in range(0, len(order), pb.bsz):
                sel = torch.as_tensor(order[s : s + pb.bsz])
                traker.featurize(batch=(x[sel], y[sel]), num_samples=len(sel))
        with contextlib.redirect_stderr(io.StringIO()):
            traker.finalize_features()
        # finalize_features frees the projection matrix; BasicProjector only regenerates it
        # when the model id changes, so with one block (proj_dim <= block_size) scoring the
        # last featurized model id would hit the freed matrix (AttributeError in 0.3.2).
        traker.projector.generate_sketch_matrix(traker.projector.generator_states[0])
        out = {}
        if gval_target:  # TRAK's features and weights, ecif's measurement
            target = -pb.gval().to(dt)[None]  # TRAK's outputs rise as the loss falls
            acc = np.zeros(pb.n)
            q = np.zeros(pb.n)
            for mid in range(ensemble):
                traker.saver.load_current_store(mid)
                feats = torch.as_tensor(np.asarray(traker.saver.current_store["features"]))
                g = traker.projector.project(target.clone(), model_id=mid) / traker.normalize_factor
                acc += (feats @ g.T)[:, 0].double().numpy()
                q += np.asarray(traker.saver.current_store["out_to_loss"])[:, 0]
            vals = acc / ensemble * q / ensemble
        else:
            for mid in range(ensemble):
                traker.start_scoring_checkpoint(
                    exp_name="val", checkpoint=sd, model_id=mid, num_targets=len(vorder)
                )
                for s in range(0, len(vorder), pb.bsz):
                    sel = torch.as_tensor(vorder[s : s + pb.bsz])
                    traker.score(batch=(xv[sel], yv[sel]), num_samples=len(sel))
            with contextlib.redirect_stderr(io.StringIO()):
                scores = traker.finalize_scores(exp_name="val")
            vals = np.asarray(scores, dtype=np.float64).sum(1)
        full = np.zeros(pb.n)
        full[order] = vals
        out["influence"] = full
        return out
    finally:
        shutil.rmtree(save, ignore_errors=True)


# --------------------------------------------------------------------------- kronfluence


class KflHead(torch.nn.Module):
    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(m.shape[0], m.shape[1], bias=False, dtype=m.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(m.T)

    def forward(self, x):
        return self.proj(x)


def _kfl_tasks():
    from kronfluence.task import Task

    class PairInBatch(Task):
        """An example is one pair carrying its batch; its loss is Pos_n (or ecif's R_n)."""

        def __init__(self, t, n_val, term="pos"):
            self.t, self.n_val, self.term = t, n_val, term

        def compute_train_loss(self, batch, model, sample=False):
            xb, yb, mb, onehot, pos = batch
            u = model(xb)  # (n, B, d_t): the tracked Linear sees the whole batch
            if self.term == "removal" and not sample:
                s_raw = self.t * u @ yb.transpose(-1, -2)
                without = mb & (onehot == 0)
                return (batch_losses(s_raw, mb) - batch_losses(s_raw, without)).sum()
            row, col = pair_row_col(u, yb, mb, onehot, self.t)
            k = torch.arange(len(pos))
            if sample:  # true Fisher: labels drawn from the model's row and column softmaxes
                with torch.no_grad():
                    j = torch.multinomial(row.exp(), 1)[:, 0]
                    i = torch.multinomial(col.exp(), 1)[:, 0]
                return -(row[k, j] + col[k, i]).sum()
            return -(row[k, pos] + col[k, pos]).sum()

        def compute_measurement(self, batch, model):
            xb, yb, mb = batch
            return batch_losses(self.t * model(xb) @ yb.transpose(-1, -2), mb).sum() / self.n_val

    class BatchedLoss(Task):
        """An example is one pair; the loader's batch is the head's fixed batch."""

        def __init__(self, t, n_val):
            self.t, self.n_val = t, n_val

        def _loss(self, x, y, model, sample):
            s = self.t * model(x) @ y.T
            lr = torch.log_softmax(s, 1)
            lc = torch.log_softmax(s, 0)
            if sample:
                with torch.no_grad():
                    j = torch.multinomial(lr.exp(), 1)[:, 0]
                    i = torch.multinomial(lc.exp().T, 1)[:, 0]
                k = torch.arange(len(x))
                return -(lr[k, j].sum() + lc[i, k].sum())
            return -(lr.diagonal().sum() + lc.diagonal().sum())

        def compute_train_loss(self, batch, model, sample=False):
            return self._loss(batch[0], batch[1], model, sample)

        def compute_measurement(self, batch, model):
            return self._loss(batch[0], batch[1], model, False) / self.n_val

    return PairInBatch, BatchedLoss


def kronfluence_scores(pb: Problem, *, example: str = "pos", items_per_batch: int = 64) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    PairInBatch, BatchedLoss = _kfl_tasks()
    dt = pb.dtype
    n_val = len(pb.xv)
    vpart = pb.val_partition()
    if example in ("pos", "removal"):
        task = PairInBatch(pb.t, n_val, term=example)
        train = BatchItems(pb.x, pb.y, pb.head.partition, dt)
        query = ValBatches(pb.xv, pb.yv, vpart, dt)
        train_bs, query_bs, rows = items_per_batch, len(query), train.rows
    elif example == "row":
        task = BatchedLoss(pb.t, n_val)
        order = _order(pb.head.partition)
        vorder = _order(vpart)
        train = torch.utils.data.TensorDataset(
            torch.as_tensor(pb.x[order], dtype=dt), torch.as_tensor(pb.y[order], dtype=dt)
        )
        query = torch.utils.data.TensorDataset(
            torch.as_tensor(pb.xv[vorder], dtype=dt), torch.as_tensor(pb.yv[vorder], dtype=dt)
        )
        train_bs, query_bs, rows = pb.bsz, pb.bsz, order
    else:
        raise ValueError(example)
    model = prepare_model(KflHead(pb.m()), task)
    out_dir = tempfile.mkdtemp(prefix="ecif_peers_kfl_", dir="/tmp")
    prec = dict(
        activation_covariance_dtype=dt,
        gradient_covariance_dtype=dt,
        lambda_dtype=dt,
        per_sample_gradient_dtype=dt,
    )
    try:
        an = Analyzer(
            analysis_name="peers",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=out_dir,
            log_level=logging.ERROR,
        )
        an.fit_all_factors(
            factors_name="ekfac",
            dataset=train,
            per_device_batch_size=train_bs,
            factor_args=FactorArguments(strategy="ekfac", **prec),
            overwrite_output_dir=True,
        )
        an.compute_pairwise_scores(
            scores_name="val",
            factors_name="ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=query_bs,
            per_device_train_batch_size=train_bs,
            score_args=ScoreArguments(
                damping_factor=pb.lam,
                aggregate_query_gradients=True,
                per_sample_gradient_dtype=dt,
                precondition_dtype=dt,
                score_dtype=dt,
            ),
            overwrite_output_dir=True,
        )
        sc = an.load_pairwise_scores(scores_name="val")
        vals = sc["all_modules"].sum(0).double().numpy()
        full = np.zeros(pb.n)
        full[rows] = vals
        return {"influence": full}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# --------------------------------------------------------------------------- dattri


class DattriHead(torch.nn.Module):
    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(m.clone())

    def forward(self, x):
        return x @ self.weight


def dattri_scores(pb: Problem, *, method: str = "explicit", cg_iter: int = 10) -> dict:
    from dattri.algorithm import IFAttributorCG, IFAttributorExplicit, TracInAttributor
    from dattri.task import AttributionTask

    dt = pb.dtype
    model = DattriHead(pb.m())
    t, n_val = pb.t, len(pb.xv)

    def loss_pos(params, data):  # mean of Pos_n over the given pair(s)
        xb, yb, mb, onehot, _ = data
        u = torch.func.functional_call(model, params, (xb,))
        row, col = pair_row_col(u, yb, mb, onehot, t)
        return -((row + col) * onehot).sum(-1).mean()

    def target(params, data):  # the validation loss: sum of batch losses / n_val
        xb, yb, mb = data
        s = t * torch.func.functional_call(model, params, (xb,)) @ yb.mT
        return batch_losses(s, mb).sum() / n_val

    task = AttributionTask(
        loss_func=loss_pos, model=model, checkpoints=model.state_dict(), target_func=target
    )
    train = BatchItems(pb.x, pb.y, pb.head.partition, dt)
    # ONE test sample holding every validation batch: the measurement is one number, and
    # dattri vmaps its inverse-Hessian solve over test samples (memory x samples).
    vb = ValBatches(pb.xv, pb.yv, pb.val_partition(), dt)
    query = torch.utils.data.TensorDataset(vb.xb[None], vb.yb[None], vb.mb[None])
    full_loader = torch.utils.data.DataLoader(train, batch_size=len(train), shuffle=False)
    query_loader = torch.utils.data.DataLoader(query, batch_size=1, shuffle=False)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if method == "tracin":
            att = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False)
            scores = att.attribute(full_loader, query_loader)
        else:
            if method == "explicit":
                att = IFAttributorExplicit(task, regularization=pb.lam)
            else:
                att = IFAttributorCG(task, regularization=pb.lam, max_iter=cg_iter)
            att.cache(full_loader)
            scores = att.attribute(full_loader, query_loader)
    full = np.zeros(pb.n)
    full[train.rows] = scores.detach().sum(1).double().numpy()
    return {"influence": full}


# --------------------------------------------------------------------------- fidelity


def fidelity_methods(args, p: int):
    ms = [
        ("ecif exact (default)", None, lambda pb: ecif_scores(pb)["influence"]),
        ("ecif first-order Neg", None, lambda pb: ecif_scores(pb, neg="first_order")["influence"]),
        ("ecif Pos only", None, lambda pb: ecif_scores(pb)["pos"]),
        ("ecif EK-FAC solver", None, lambda pb: ecif_scores(pb, solver="ekfac")["influence"]),
    ]
    dims = sorted({min(k, p) for k in args.trak_proj_dim}, reverse=True)
    for k in dims:
        for e in args.trak_ensemble:
            ms += [
                (
                    f"TRAK CLIP (k={k}, E={e})",
                    "trak",
                    lambda pb, e=e, k=k: trak_scores(pb, proj_dim=k, ensemble=e)["influence"],
                ),
                (
                    f"TRAK CLIP, t in features (k={k}, E={e})",
                    "trak",
                    lambda pb, e=e, k=k: trak_scores(
                        pb, proj_dim=k, ensemble=e, scale_in_features=True
                    )["influence"],
                ),
                (
                    f"TRAK features (t in), g_val target (k={k}, E={e})",
                    "trak",
                    lambda pb, e=e, k=k: trak_scores(
                        pb, proj_dim=k, ensemble=e, scale_in_features=True, gval_target=True
                    )["influence"],
                ),
            ]
    ms += [
        ("kronfluence EK-FAC, pair in batch (Pos)", "kronfluence", lambda pb: kfl(pb, "pos")),
        ("kronfluence EK-FAC, batched loss (row split)", "kronfluence", lambda pb: kfl(pb, "row")),
        (
            "kronfluence EK-FAC + ecif's R_n (not natural)",
            "kronfluence",
            lambda pb: kfl(pb, "removal"),
        ),
        ("dattri IF explicit (Pos)", "dattri", lambda pb: dattri_scores(pb)["influence"]),
        (
            "dattri IF CG, max_iter 10 (Pos)",
            "dattri",
            lambda pb: dattri_scores(pb, method="cg")["influence"],
        ),
        (
            "dattri TracIn / Grad-Dot (Pos)",
            "dattri",
            lambda pb: dattri_scores(pb, method="tracin")["influence"],
        ),
    ]
    return ms


def kfl(pb, example):
    return kronfluence_scores(pb, example=example)["influence"]


def ground_truth(args, seed):
    x, y, _ = rotated_pairs(args.n, args.d, noise=0.2, seed=5 + 2 * seed)
    xv, yv, _ = rotated_pairs(args.val, args.d, noise=0.0, seed=6 + 2 * seed)
    kw = dict(
        batch_size=args.batch_size,
        seed=seed,
        lam=args.lam,
        logit_scale=args.logit_scale,
        dtype="float64",
        newton_steps=3,
    )
    train, val = ecif.EmbeddingSet(x, y), ecif.EmbeddingSet(xv, yv)
    t0 = time.perf_counter()
    head = ecif.fit(train, **kw)
    base = head.loss(val)
    rng = np.random.default_rng(seed)
    rem = rng.choice(args.n, args.singles, replace=False)
    actual = np.array([ecif.fit(train, exclude=[r], init=head, **kw).loss(val) - base for r in rem])
    subsets = [rng.choice(args.n, int(0.05 * args.n), replace=False) for _ in range(args.groups)]
    group_actual = np.array(
        [ecif.fit(train, exclude=s, init=head, **kw).loss(val) - base for s in subsets]
    )
    print(
        f"seed {seed}: fit grad {head.info['grad_max']:.1e}; ground truth "
        f"({args.singles} + {args.groups} refits) in {time.perf_counter() - t0:.1f} s"
    )
    pb = Problem(head=head, x=x, y=y, xv=xv, yv=yv, dtype=torch.float64)
    return pb, rem, actual, subsets, group_actual


def run_fidelity(args):
    peers_missing = missing_peers(args.peers)
    methods = fidelity_methods(args, args.d * args.d)
    results = {name: [] for name, _, _ in methods}
    for seed in args.seeds:
        pb, rem, actual, subsets, group_actual = ground_truth(args, seed)
        ref = None
        for name, peer, fn in methods:
            if peer is not None and (peer in peers_missing or peer not in args.peers):
                continue
            torch.manual_seed(seed)  # TRAK's negatives, kronfluence's Fisher labels
            t0 = time.perf_counter()
            try:
                v = np.asarray(fn(pb), dtype=np.float64)
            except Exception as exc:  # a peer failing must not stop the others
                print(f"  {name}: FAILED {type(exc).__name__}: {exc}")
                continue
            sec = time.perf_counter() - t0
            ref = v if ref is None else ref
            loo = spearmanr(v[rem], actual)[0]
            lds = spearmanr([v[s].sum() for s in subsets], group_actual)[0]
            agree = spearmanr(v, ref)[0]
            results[name].append((loo, lds, agree, sec))
            print(
                f"  {name:48s} LOO {loo:6.3f}  LDS {lds:6.3f}  vs ecif {agree:6.3f}  {sec:6.2f} s"
            )
    print(
        f"\nfidelity: n={args.n}, d={args.d}, batch {args.batch_size}, lambda {args.lam}, "
        f"t={args.logit_scale}, {args.singles} single removals, {args.groups} random 5% subsets, "
        f"seeds {args.seeds} (mean, and min..max over seeds)\n"
    )
    print("| method | Spearman, single removals | LDS, 5% subsets | Spearman vs ecif exact | s |")
    print("|---|---|---|---|---|")
    for name, _, _ in methods:
        r = np.array(results[name])
        if not len(r):
            continue

        def cell(col, r=r):
            if len(r) == 1:
                return f"{r[0, col]:.3f}"
            return f"{r[:, col].mean():.3f} ({r[:, col].min():.3f}..{r[:, col].max():.3f})"

        print(f"| {name} | {cell(0)} | {cell(1)} | {cell(2)} | {r[:, 3].mean():.2f} |")


# --------------------------------------------------------------------------- timing


def timing_problem(args):
    x, y, _ = rotated_pairs(args.n, args.d, noise=0.2, seed=args.seed)
    xv, yv, _ = rotated_pairs(args.val, args.d, noise=0.0, seed=args.seed + 1)
    x, y, xv, yv = (a.astype(np.float32) for a in (x, y, xv, yv))
    t0 = time.perf_counter()
    head = ecif.fit(
        (x, y),
        batch_size=args.batch_size,
        seed=args.seed,
        lam=args.lam,
        logit_scale=args.logit_scale,
        dtype="float32",
        optimizer="lbfgs",
        max_iter=args.fit_iter,
    )
    print(
        f"fit (L-BFGS, budget {args.fit_iter} iterations): {time.perf_counter() - t0:.1f} s, "
        f"grad max {head.info['grad_max']:.1e}"
    )
    return Problem(head=head, x=x, y=y, xv=xv, yv=yv, dtype=torch.float32)


def sub_problem(pb: Problem, n_sub: int) -> Problem:
    """The first n_sub // B whole batches of the partition, as their own training set."""
    from dataclasses import replace

    nb = max(1, n_sub // pb.bsz)
    idx = pb.head.partition.index[:nb]
    rows = idx[idx >= 0]
    remap = np.full(pb.n, -1)
    remap[rows] = np.arange(len(rows))
    new_idx = np.where(idx >= 0, remap[np.where(idx >= 0, idx, 0)], -1)
    part = Partition(index=new_idx, batch_size=pb.bsz, seed=pb.head.seed, n=len(rows))
    head = replace(pb.head, partition=part, n_norm=len(rows))
    return Problem(head=head, x=pb.x[rows], y=pb.y[rows], xv=pb.xv, yv=pb.yv, dtype=pb.dtype)


def _timed(fn, *a, **kw):
    """((wall seconds, process CPU seconds), result) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return np.array([time.perf_counter() - t0, time.process_time() - c0]), out


def _s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _fmt(t) -> str:
    return f"{_s(t[0])} s ({_s(t[1])} s CPU)"


def _agreement(q: Problem, v: np.ndarray, method: str, cache: dict) -> float:
    """Spearman of a peer's scores with ecif's (same solver as the reference row) on the same
    (sub)problem; ``cache`` holds ecif's scores per problem size."""
    if q.n not in cache:
        kw = {} if method == "default" else {"method": method}
        cache[q.n] = ecif_scores(q, **kw)["influence"]
    return float(spearmanr(v, cache[q.n])[0])


def run_timing(args):
    """Every timed call runs once per round, ``--repeat`` rounds, in the same order each round
    (ecif rows, then each peer and size); a row's figure is its minimum over the rounds.

    The dev machine is shared: another job can stretch a call 10x or more (OpenMP threads spin
    while a sibling thread is descheduled, so CPU time inflates too). Rounds spread each
    method's calls over the whole run and the minimum is the least disturbed figure, for ecif
    and the peers alike.
    """
    torch.manual_seed(0)
    peers_missing = missing_peers(args.peers)
    pb = timing_problem(args)
    n, d = pb.n, args.d
    default = auto_method(pb.head, SolverArgs())

    def ecif_call(kw):
        return lambda: ecif.score(pb.head, (pb.x, pb.y), val=(pb.xv, pb.yv), **kw)

    jobs = []  # (key, label, callable)
    for m in args.ecif:
        if m == "cg" and default == "cg" and "default" in args.ecif:
            continue
        kw = {} if m == "default" else {"method": m}
        label = f"ecif.score, default solver ({default})" if m == "default" else f"ecif.score, {m}"
        jobs.append((("ecif", m), label, ecif_call(kw)))
    inv = InverseHessian(pb.head, pb.x, pb.y, SolverArgs(solver="ekfac"))
    w = inv.solve(pb.gval())  # the pass costs the same for any w
    jobs.append(
        (
            ("ecif", "pass"),
            "ecif scoring pass alone (w given)",
            lambda: score_pass(pb.head, pb.x, pb.y, w),
        )
    )
    k = min(args.trak_proj_dim[0], d * d)
    peer_defs = [
        (f"TRAK CLIP (k={k}, E=1)", "trak", "trak", lambda q: trak_scores(q, proj_dim=k)),
        (
            "kronfluence EK-FAC, pair in batch (Pos)",
            "kronfluence",
            "kfl_pos",
            lambda q: kronfluence_scores(q, example="pos"),
        ),
        (
            "kronfluence EK-FAC, batched loss (row split)",
            "kronfluence",
            "kfl_row",
            lambda q: kronfluence_scores(q, example="row"),
        ),
        (
            "dattri IF CG, max_iter 10 (Pos)",
            "dattri",
            "dattri_cg",
            lambda q: dattri_scores(q, method="cg"),
        ),
    ]
    peers = []  # (label, key, [sizes' problems])
    for name, peer, key, fn in peer_defs:
        if peer in peers_missing or peer not in args.peers or key in args.skip:
            continue
        cap = args.peer_max_n.get(key, args.peer_max_n["default"])
        sizes = [n] if cap >= n else [max(pb.bsz, cap // 4), cap]
        probs = [pb if size >= n else sub_problem(pb, size) for size in sizes]
        peers.append((name, key, probs))
        for q in probs:
            jobs.append(((key, q.n), f"{name} on {q.n:,} pairs", lambda fn=fn, q=q: fn(q)))

    best, outs, failed = {}, {}, set()
    for r in range(args.repeat):
        for key, label, call in jobs:
            if key[0] in failed:
                continue
            try:
                sec, out = _timed(call)
            except Exception as exc:  # a failing peer must not stop the others
                print(f"{label}: FAILED {type(exc).__name__}: {exc}")
                failed.add(key[0])
                continue
            best[key] = np.minimum(best.get(key, np.inf), sec)
            outs.setdefault(key, out)
            print(f"round {r + 1}: {label}: {_fmt(sec)}", flush=True)

    ecif_rows = []
    for key, label, _ in jobs:
        if key[0] == "ecif" and key[1] != "pass":
            info = outs[key].attrs.get("solver", {})
            if info.get("cg_iterations") is not None:
                label += f" ({info['cg_iterations']} CG iterations)"
            ecif_rows.append((label, best[key], outs[key]["influence"].to_numpy(), key[1]))
    sec_pass = best[("ecif", "pass")]
    ecif_best = np.min([row[1] for row in ecif_rows], axis=0)  # wall and CPU, each the best
    ref_label, _, ref_scores, ref_method = ecif_rows[0]  # the first ecif row is the reference
    ref_cache = {n: ref_scores}
    peer_rows = []
    for name, key, probs in peers:
        if key in failed:
            continue
        points = [(q.n, best[(key, q.n)]) for q in probs]
        q = probs[-1]
        agree = _agreement(q, outs[(key, q.n)]["influence"], ref_method, ref_cache)
        if len(points) == 1:
            est, note = points[0][1], "measured"
        else:
            (n1, t1), (n2, t2) = points
            slope = (t2 - t1) / (n2 - n1)
            # a line through both sizes (fixed costs not scaled); proportional if noise
            # makes a slope non-positive
            est = np.where(slope > 0, t2 + slope * (n - n2), t2 * n / n2)
            note = f"line through {n1:,} and {n2:,} pairs ({_s(t1[0])} s, {_s(t2[0])} s)"
        peer_rows.append((name, est, note, agree, q.n))

    print(
        f"\ntiming: N={n:,} pairs, d={d} (P={d * d:,}), batch {args.batch_size}, "
        f"{len(pb.xv):,} validation pairs, float32, {torch.get_num_threads()} threads, "
        f"best of {args.repeat} rounds, load average at end {os.getloadavg()[0]:.1f}\n"
    )
    ref = ref_label.split(" (")[0].replace("ecif.score, ", "ecif ")
    print(
        "| method | wall s | CPU s | how | peer / fastest ecif.score, wall (CPU) "
        f"| Spearman vs {ref} |"
    )
    print("|---|---|---|---|---|---|")
    for label, sec, scores, _ in ecif_rows:
        agree = float(spearmanr(scores, ref_scores)[0])
        print(f"| {label} | {_s(sec[0])} | {_s(sec[1])} | measured | | {agree:.3f} |")
    print(
        f"| ecif scoring pass alone (w given) | {_s(sec_pass[0])} | {_s(sec_pass[1])} "
        "| measured | | |"
    )
    for name, sec, note, agree, on in peer_rows:
        where = "" if on == n else f" (on {on:,})"
        r = sec / ecif_best
        print(
            f"| {name} | {_s(sec[0])} | {_s(sec[1])} | {note} | {r[0]:.0f}x ({r[1]:.0f}x) "
            f"| {agree:.3f}{where} |"
        )
    if peer_rows:
        fastest = np.min([row[1] for row in peer_rows], axis=0) / ecif_best
        print(
            f"\nfastest peer / fastest ecif.score = {fastest[0]:.1f}x wall, {fastest[1]:.1f}x CPU "
            f"(goal: >= 20x at equal or better fidelity)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("part", choices=["fidelity", "timing"])
    ap.add_argument("--n", type=int, default=None, help="training pairs")
    ap.add_argument("--d", type=int, default=None, help="embedding width (image = text)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--val", type=int, default=None, help="validation pairs")
    ap.add_argument("--lam", type=float, default=1e-3)
    ap.add_argument("--logit-scale", type=float, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fidelity seeds")
    ap.add_argument("--seed", type=int, default=0, help="timing data seed")
    ap.add_argument("--singles", type=int, default=40)
    ap.add_argument("--groups", type=int, default=25)
    ap.add_argument("--peers", nargs="+", default=list(PEER_PACKAGES), choices=list(PEER_PACKAGES))
    ap.add_argument(
        "--skip", nargs="*", default=[], help="timing rows to skip (trak, kfl_pos, ...)"
    )
    ap.add_argument(
        "--trak-proj-dim", type=int, nargs="+", default=[2048], help="capped at P; timing: first"
    )
    ap.add_argument("--trak-ensemble", type=int, nargs="+", default=[1, 5])
    ap.add_argument(
        "--ecif",
        nargs="+",
        default=["default", "ekfac", "cg"],
        choices=["default", "exact", "cg", "ekfac"],
        help="timing: ecif.score solvers to time; the first is the agreement reference",
    )
    ap.add_argument("--repeat", type=int, default=2, help="timing: rounds (best of)")
    ap.add_argument("--fit-iter", type=int, default=50, help="timing: L-BFGS budget")
    ap.add_argument(
        "--peer-max-n",
        default="4096",
        help="timing: pairs a peer runs on before linear extrapolation; a number, or "
        "key=number,... with keys trak, kfl_pos, kfl_row, dattri_cg, default",
    )
    args = ap.parse_args()
    fid = args.part == "fidelity"
    args.n = args.n or (240 if fid else 20480)
    args.d = args.d or (6 if fid else 64)
    args.batch_size = args.batch_size or (24 if fid else 256)
    args.val = args.val or (200 if fid else 4096)
    args.logit_scale = args.logit_scale or (10.0 if fid else 100.0)
    caps = {}
    for part in args.peer_max_n.split(","):
        key, _, val = part.rpartition("=")
        caps[key or "default"] = int(val)
    caps.setdefault("default", 4096)
    args.peer_max_n = caps
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()}")
    run_fidelity(args) if fid else run_timing(args)


if __name__ == "__main__":
    main()
