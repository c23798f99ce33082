"""The Auditor: choose and fit the head, score every pair, flag the suspects, as one DataFrame.

Columns (docs/formats.md): id, caption, clip_score, pair_loss, trusted_loss and
knn_disagreement (with a validation set), influence, influence_pos, influence_neg,
misalign_score, is_misaligned, rank (cleanlab-style ``is_``/``_score``).
``misalign_score`` combines the signals with weights chosen on planted probes
(``ecif.audit.selection``, ``ecif.audit.combine``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

import ecif.api as api
from ecif.audit.audit_args import SELF_INFLUENCE_MAX_PARAMS, VAL_MODES, AuditArgs
from ecif.audit.baselines import KnnConsensus, cosine
from ecif.audit.checks import (  # noqa: F401  (MORE_TRUSTED: re-exported)
    MORE_TRUSTED,
    AuditInputError,
    check_joint_space,
    check_options,
    check_weights,
    small_train_note,
)
from ecif.audit.combine import CONSENSUS, VALIDATED_SIGNALS
from ecif.audit.consensus import consensus
from ecif.audit.copies import Copies, distinct_positions, flags_of_rows, placed
from ecif.audit.misalign import (  # noqa: F401  (signal_suspicions: re-exported)
    ProbeSignals,
    misalign_scores,
    signal_suspicions,
)
from ecif.audit.model_signals import check_model_inputs, model_signals, self_influence_table
from ecif.audit.probes import probe_signals
from ecif.audit.recorded import merged, recording_warnings
from ecif.audit.selection import HeadChoice, choose_head
from ecif.audit.thresholds import UNRELIABLE, UnreliableThresholdWarning, flag_count
from ecif.audit.validation_noise import warn_if_noisy
from ecif.data.duplicates import CopiedPairsWarning, image_halves
from ecif.data.embedding_set import EmbeddingSet, as_unit
from ecif.data.norms import UnnormalisedRowsWarning
from ecif.engine.head import CLIP_LOGIT_SCALE, Head


def clip_scores(data: EmbeddingSet, chunk: int = 65536) -> np.ndarray:
    """Cosine similarity of each pair's raw image and text embeddings (the pretrained model)."""
    return cosine(data.image, data.text, chunk)


def groups_of(data: EmbeddingSet) -> np.ndarray | None:
    """Input shard of each row when known, so batches stay inside shards."""
    meta = data.metadata
    if meta is not None and "part" in meta.columns:
        return meta["part"].to_numpy()
    return None


def _number(value, name: str) -> float | None:
    if value in (None, "auto", "model"):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be 'auto' or a positive number; got {value!r}") from err
    if not out > 0:
        raise ValueError(f"{name} must be positive; got {value!r}")
    return out


@dataclass
class Auditor:
    """Audit a training set against an optional trusted validation set.

    auditor = ecif.Auditor(train, val)
    table = auditor.run()            # one row per pair, most suspicious has rank 1
    auditor.choice                   # the head and weights chosen, and why
    """

    train: EmbeddingSet
    val: EmbeddingSet | None = None
    args: AuditArgs = field(default_factory=AuditArgs)
    # the model modes' inputs (params != "head"): ecif.data.features.FeatureSet of each set
    train_features: Any = None
    val_features: Any = None
    heads: list = field(default_factory=list, init=False)  # Head, or EncoderModel per mode
    val_source: str = field(default="", init=False)
    choice: HeadChoice | None = field(default=None, init=False)
    probes: ProbeSignals | None = field(default=None, init=False)  # the twin audit, once run
    trusted: Head | None = field(default=None, init=False)  # fit_trusted_head's, once fit
    # knn_disagreement given rather than computed: a sampled twin's (``probes.sampled_consensus``)
    known_consensus: np.ndarray | None = field(default=None, init=False)
    # the indexes behind the audit's own knn_disagreement, until the probes have read them
    neighbours: KnnConsensus | None = field(default=None, init=False)
    input_warnings: list = field(default_factory=list, init=False)  # also in audit.json
    copies: Copies | None = field(default=None, init=False)  # exact copies, when collapsed

    def __post_init__(self) -> None:
        if self.args.params != "head":  # the model modes fit their own features
            return
        self.train, train_note = as_unit(self.train, "training")  # as a folder's reader does
        val_note = None
        if self.val is not None:
            self.val, val_note = as_unit(self.val, "validation")
        if self.args.duplicates == "collapse":
            self.copies = Copies.of(self.train)
        distinct = len(self.train) - (self.copies.count if self.copies else 0)
        small = small_train_note(distinct, self.val, self.args.weights)
        for note, kind in (
            (train_note, UnnormalisedRowsWarning),
            (val_note, UnnormalisedRowsWarning),
            (self.copies.note() if self.copies else None, CopiedPairsWarning),
            (small, UserWarning),
        ):
            if note:
                self.input_warnings.append(note)
                warnings.warn(note, kind, stacklevel=3)

    def fit_head(
        self,
        data: EmbeddingSet,
        *,
        logit_scale: float | None = None,
        lam: float | None = None,
        init: Head | None = None,
        progress: bool = False,
        rows: Any = None,
        members: np.ndarray | None = None,
    ) -> Head:
        """Fit a head on ``data`` with the audit's options; scale and pull: as given, else the
        chosen ones, else the explicit options (``select.lam`` and the model's scale otherwise).
        ``rows``: where the fit's passes run (``ecif.ClusterRows``: a Dask cluster);
        ``members``: the rows that take part (``distinct_rows``), the others in no batch."""
        a = self.args
        choice = self.choose() if lam is None or logit_scale is None else self.choice
        if lam is None:
            lam = choice.lam if choice else (_number(a.lam, "lam") or a.select.lam)
        if logit_scale is None:
            logit_scale = choice.logit_scale if choice else _number(a.logit_scale, "logit_scale")
        return api.fit(
            data,
            a.fit_args(lam=lam, logit_scale=logit_scale, progress=progress),
            groups=groups_of(data) if init is None else None,
            init=init,
            rows=rows,
            members=members,
        )

    def fit_trusted_head(self) -> Head:
        """A head fit on the validation pairs alone, with the audit's scale and pull: the
        pairs' loss under it (``trusted_loss``) is how well the trusted pairs explain each
        one. The head fit on the training set learns a swap that recurs (every husky
        captioned "wolf" teaches it that huskies are wolves), so such pairs fit it well; this
        head never saw them. Measured: aligned confusable AP 0.655 against 0.378 for
        ``pair_loss`` (benchmarks/README.md)."""
        if self.val is None:
            raise ValueError("a trusted head needs a validation set")
        if self.trusted is None:  # fit once: the twin audit and scored shards reuse it
            with recording_warnings(prefix="trusted head (validation pairs, trusted_loss): "):
                self.trusted = self.fit_head(self.val)
        return self.trusted

    def choose(self) -> HeadChoice:
        """The logit scale and pull for this audit (measured where "auto")."""
        if self.choice is not None:
            return self.choice
        a = self.args
        check_options(a)
        check_weights(a.weights, self.val is not None, a.params)
        check_joint_space(self.train)
        if self.val is not None and len(self.val) < 2:
            raise AuditInputError(
                f"the validation set has {len(self.val)} usable pair(s); it needs at least 2 "
                "(a contrastive loss compares each pair with the others), or audit without it"
            )
        if a.params != "head":
            check_model_inputs(self)
        scale, lam = _number(a.logit_scale, "logit_scale"), _number(a.lam, "lam")
        if a.logit_scale == "model" or a.logit_scale is None:
            scale = float(getattr(self.train, "logit_scale", None) or CLIP_LOGIT_SCALE)
        self.choice = choose_head(
            self.distinct_train(),
            self.val,
            logit_scale=scale if scale is not None else "auto",
            lam=lam if lam is not None else "auto",
            args=a.select,
            seed=a.seed,
            batch_size=a.batch_size,
        )
        return self.choice

    def distinct_rows(self) -> np.ndarray:
        """The training rows the audit fits and scores: its distinct pairs (all rows when
        copies are kept or there are none)."""
        return distinct_positions(self.copies, len(self.train))

    def distinct_train(self) -> EmbeddingSet:
        """The training set without its copies (itself when it has none)."""
        return self.train if self.copies is None else self.train.subset(self.copies.distinct)

    def fit_members(self) -> np.ndarray | None:
        """The rows a fit of the training set takes (None: all of them)."""
        return None if self.copies is None else self.copies.distinct

    def _no_val_mode(self) -> str:
        mode = self.args.no_val
        if mode not in VAL_MODES:
            raise ValueError(f"no_val must be one of {VAL_MODES}; got {mode!r}")
        if mode == "auto":
            small = self.train.d_image * self.train.d_text <= SELF_INFLUENCE_MAX_PARAMS
            mode = "self" if small else "crossfit"
        return mode

    def _signals(self, progress: bool) -> pd.DataFrame:
        a = self.args
        if a.params != "head":
            df = model_signals(self, progress)
            if self.val is not None:  # a model mode's partition of the training pairs
                self._validated_signals(df, self.heads[0].partition, progress)
            return df
        if self.val is not None:
            head = self.fit_head(self.train, progress=progress, members=self.fit_members())
            self.heads = [head]
            self.val_source = f"validation set ({len(self.val)} pairs)"
            df = api.score(
                head,
                self.train,
                self.val,
                neg=a.neg,
                solver=a.solver_args(),
                progress=progress,
            )
            df["pair_loss"] = api.pair_losses(head, self.train)
            self._validated_signals(df, head.partition, progress)
            return df
        if len(self.train) < 4:
            raise ValueError("without a validation set, auditing needs at least 4 pairs")
        if self._no_val_mode() == "self":
            head = self.fit_head(self.train, members=self.fit_members())
            self.heads = [head]
            self.val_source = "self-influence (no validation set)"
            rows = self.distinct_rows()
            df = self_influence_table(
                self.train.ids,
                placed(
                    api.self_influence(head, self.train, rows, neg=a.neg), rows, len(self.train)
                ),
                api.pair_losses(head, self.train),
            )
        else:
            df = self._crossfit(progress)
        self._add_consensus(df, progress)  # it reads only the embeddings: every head audit
        return df

    def _validated_signals(self, df: pd.DataFrame, partition: Any, progress: bool) -> None:
        """Add ``trusted_loss`` (each pair's loss under the head fit on the validation pairs,
        in the batches of ``partition``: the training fit's) and ``knn_disagreement`` to
        ``df``. Both read only the embeddings, so every mode with a validation set has them."""
        trusted = replace(self.fit_trusted_head(), partition=partition)
        df["trusted_loss"] = api.pair_losses(trusted, self.train)
        self._add_consensus(df, progress)

    def _add_consensus(self, df: pd.DataFrame, progress: bool) -> None:
        """``knn_disagreement`` into ``df``: the twin's given values, else the audit's own."""
        known = self.known_consensus
        if known is None:
            known, self.neighbours = self.pairs_consensus(progress)
        df[CONSENSUS] = known

    def pairs_consensus(self, progress: bool = False) -> tuple[np.ndarray, KnnConsensus]:
        """``consensus`` over the distinct pairs (a copy is no neighbour's agreement), one
        value per training row (NaN on the copies), and the indexes it read."""
        known, near = consensus(self.distinct_train(), self.args.device, progress)
        return placed(known, self.distinct_rows(), len(self.train)), near

    def _crossfit(self, progress: bool) -> pd.DataFrame:
        # each half is scored against the other half's best-fitting pairs (lowest loss under
        # that half's own head) as a proxy validation set. All of the other half would carry
        # its noise into g_val and make noisy pairs look helpful (measured on shapes: AP 0.58
        # untrimmed vs 0.97 trimmed); trimming by the raw clip_score instead fails when the
        # pretrained similarity is uninformative (AUROC 0.42 on rotated pairs).
        a = self.args
        train, distinct = self.distinct_train(), self.distinct_rows()
        folds = image_halves(train.image, a.seed)
        subs = [train.subset(rows) for rows in folds]
        self.heads = [self.fit_head(sub) for sub in subs]
        losses = [api.pair_losses(h, sub) for h, sub in zip(self.heads, subs)]
        proxies = [
            sub.subset(np.nonzero(loss <= np.quantile(loss, a.proxy_fraction))[0])
            for sub, loss in zip(subs, losses)
        ]
        parts = []
        for k in (0, 1):
            df = api.score(
                self.heads[k],
                subs[k],
                proxies[1 - k],
                neg=a.neg,
                solver=a.solver_args(),
                progress=progress,
            )
            df["pair_loss"] = losses[k]
            df.index = distinct[folds[k]]
            parts.append(df)
        self.val_source = (
            f"cross-fit: each half scored against the other half's best-fitting {a.proxy_fraction:.0%} "
            "(no validation set)"
        )
        return pd.concat(parts).reindex(np.arange(len(self.train)))

    def run(self, progress: bool = False) -> pd.DataFrame:
        """Choose the head, fit, score and flag. Returns the audit table in training-set order;
        ``table.attrs["warnings"]`` holds what the inputs lack and what the engine warned of
        (a fit short of its tolerance, an approximate solve; also warned as they happen)."""
        with recording_warnings() as found:
            table = self._run(progress)
        table.attrs["warnings"] = merged(table.attrs.get("warnings"), found)
        return table

    def _run(self, progress: bool) -> pd.DataFrame:
        if len(self.train) < 2:
            raise ValueError(f"need at least 2 pairs to audit; got {len(self.train)}")
        if self.val is not None and (self.val.d_image, self.val.d_text) != (
            self.train.d_image,
            self.train.d_text,
        ):
            raise ValueError(
                f"validation widths ({self.val.d_image}, {self.val.d_text}) differ from training "
                f"widths ({self.train.d_image}, {self.train.d_text}): embed both with the same model"
            )
        self.choose()
        scored = self._signals(progress)
        if self.copies is not None:  # NaN on the copies: each takes its pair's values
            scored = self.copies.spread_frame(scored)
        table = pd.DataFrame({"id": self.train.ids})
        meta = self.train.metadata
        table["caption"] = (
            meta["caption"].to_numpy() if meta is not None and "caption" in meta else None
        )
        table["clip_score"] = clip_scores(self.train)
        table["pair_loss"] = scored["pair_loss"].to_numpy(dtype=np.float32)
        for col in VALIDATED_SIGNALS:  # with a validation set; the consensus in the head mode
            if col in scored:
                table[col] = scored[col].to_numpy(dtype=np.float32)
        for col in ("influence", "influence_pos", "influence_neg"):
            table[col] = scored[col].to_numpy(dtype=np.float32)
        n_norm = float(np.mean([h.n_norm for h in self.heads]))
        if "self_influence" in scored:
            table["self_influence"] = scored["self_influence"].to_numpy(dtype=np.float32)
        self.probes = None
        if self.args.weights == "auto":
            known = table[CONSENSUS].to_numpy() if CONSENSUS in table else None
            self.probes = probe_signals(
                self, self.args.probes, progress=progress, consensus=known, near=self.neighbours
            )
        self.neighbours = None  # the indexes hold a copy of the embeddings: not kept
        pairs = table.iloc[self.distinct_rows()].reset_index(drop=True)  # each pair once
        score, combination, rate = misalign_scores(pairs, self.args.weights, n_norm, self.probes)
        warn_if_noisy(combination)
        count, how = flag_count(score, self.args.threshold, rate)
        if UNRELIABLE in how:  # the fallback: a clean set, or scores with no separate group
            warnings.warn(f"is_misaligned: {how}", UnreliableThresholdWarning, stacklevel=3)
        score, rank, flag = flags_of_rows(self.copies, score.astype(np.float32), count)
        table["misalign_score"], table["rank"], table["is_misaligned"] = score, rank, flag
        table.attrs.update(self.describe(int(flag.sum()), how, pairs=count))
        table.attrs["combination"] = combination
        return table

    def describe(self, flagged: int, how: str, pairs: int | None = None) -> dict:
        """What produced the table: recorded beside it in files and shown in the app.
        ``flagged`` counts rows, ``pairs`` the distinct pairs among them (what the threshold's
        sentence counts; they differ when flagged pairs have copies)."""
        from ecif._version import __version__

        head = self.heads[0]
        return {
            "method": "ecif",
            "validation": self.val_source,
            "threshold": how,
            "flagged": int(flagged),
            "flagged_pairs": int(flagged if pairs is None else pairs),
            "n": len(self.train),
            "options": self.args.record(),
            "logit_scale": head.logit_scale,
            "lam": float(head.lam),  # what the fit used (a model mode's own pull, not the head's)
            "head_choice": self.choice.record() if self.choice else None,
            "copies": self.copies.count if self.copies else 0,
            "warnings": list(self.input_warnings),
            "fit": [dict(h.info) for h in self.heads],
            "ecif_version": __version__,
        }
