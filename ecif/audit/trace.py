"""Trace-back: which training pairs made the model get one query wrong (docs/math.md section 8).

A query becomes a test loss over candidate answers, L = -log sum_{c positive} softmax_c:
- a test pair (``--query-id`` in a test set) or an image file: image -> text retrieval of
  the query image against candidate texts (the test set's captions, class prompts with a
  true label, or the given caption against the image's nearest training captions);
- a caption alone: text -> image retrieval of the caption against its nearest training
  images; the positives are those whose training caption is the same text (only where
  none is, those within cosine 0.98), so the loss asks "why does this caption not retrieve
  its images".
Candidate training pairs come from FAISS (image-side neighbours of the query image and
text-side neighbours of its caption, interleaved; optionally of the wrong answer); each is
ranked by relative influence g^T d_n / ||d_n||. Negative = removing the pair would lower the
test loss = it pushed the model towards the mistake ("responsible"); positive = "helped".
A pair the audit held in several exact copies is ranked once, as its first row (``copies``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import ecif.api as api
from ecif.audit.copies import Copies, left_out_copies, pair_rows
from ecif.audit.folder import AuditFolderError, trace_head, training_set
from ecif.audit.labels import POSITIVE_COSINE, answer_labels, caption_key, caption_positives
from ecif.audit.trace_args import QUERY_OPTIONS, TraceArgs
from ecif.audit.trace_cache import load_context, load_trace_cache, pair_norms, trace_solver
from ecif.audit.trace_loss import (
    TraceQuery,
    _unit,
    interleave,
    query_loss_and_gradient,
    result_table,
)
from ecif.data.embedding_set import EmbeddingSet, as_unit
from ecif.data.index import VectorIndex, build_indexes, load_indexes
from ecif.data.norms import UnnormalisedRowsWarning
from ecif.engine.head import Head
from ecif.engine.inverse_hessian import InverseHessian
from ecif.options import renamed, with_options


@renamed(
    method="args.solver",
    neg="args.neg",
    device="args.device",
    refine="args.refine",
    context_top="args.context_top",
    query_threads="args.query_threads",
)
@dataclass
class TraceBack:
    """Trace test mistakes to training pairs with a fitted head and FAISS indexes.

    tb = TraceBack(head, train)                        # indexes built in memory if not given
    q = tb.query_from_set(test, query_id)              # or query_from_image / query_from_caption
    table, summary = tb.trace(q, k=10, candidates=1000)
    """

    head: Head
    train: EmbeddingSet
    indexes: dict[str, VectorIndex] | None = None
    args: TraceArgs = field(default_factory=TraceArgs)
    model: dict[str, Any] | None = None  # {"model": ..., "pretrained": ...} for files/captions
    norms: np.ndarray | None = None  # ||d_n|| per training pair (trace.pt from `ecif index`)
    norms_estimated: bool = False  # the norms are K-probe estimates: re-score the top exactly
    context: dict | None = None  # per-pair batch context (index/context/ from `ecif index`)
    cache_note: str | None = None  # why index/ precomputations were not used (from_audit)
    _inverse: InverseHessian | None = field(default=None, init=False, repr=False)
    _encoder: Any = field(default=None, init=False, repr=False)
    copies: Copies | None = field(default=None, init=False, repr=False)  # collapsed by the audit

    def __post_init__(self) -> None:
        if self.head.partition.n != len(self.train):
            raise ValueError(
                f"the head was fit on {self.head.partition.n} pairs, the training set has "
                f"{len(self.train)}: give the embedding folder the audit was run on"
            )
        self.train, note = as_unit(self.train, "training")  # the rows an Auditor's head saw
        if note:
            warnings.warn(note, UnnormalisedRowsWarning, stacklevel=3)
        self.copies = left_out_copies(self.head.partition, self.train)  # scored as their pair

    @classmethod
    @renamed(method="solver")
    def from_audit(
        cls,
        folder: str | os.PathLike,
        args: TraceArgs | None = None,
        *,
        embeddings: str | os.PathLike | None = None,
        **options: Any,
    ) -> TraceBack:
        """Open an audit folder: its head, its training embeddings and AUDIT/index/. Options:
        ``args`` (a ``TraceArgs``) and/or its fields as keywords (``solver``, ``device``,
        ``nprobe``, ...)."""
        a = with_options(TraceArgs, args, options, "TraceBack.from_audit")
        folder = Path(folder)
        train, emb = training_set(folder, embeddings)
        head = trace_head(folder, train)
        idx = None
        if (folder / "index" / "image.faiss").exists():
            idx = load_indexes(folder / "index", device=a.device)
            if any(i.n != len(train) for i in idx.values()):
                raise AuditFolderError(f"{folder}/index does not match the training set; rerun")
            if a.nprobe:
                for i in idx.values():
                    i.set_nprobe(a.nprobe)
        from ecif.data.layout import read_manifest

        man = read_manifest(emb) or {}
        model = {"model": man.get("model"), "pretrained": man.get("pretrained") or None}
        tb = cls(head, train, idx, a, model=model)
        if a.solver == "auto":  # the saved factors and norms are the auto solver's
            inv, tb.norms, info = load_trace_cache(folder / "index", head, train.image, train.text)
            tb.inverse, tb.norms_estimated = inv, bool(info.get("probes"))
            tb.context = load_context(folder / "index", head) if tb.norms is not None else None
            if idx is not None:
                tb.cache_note = info.get("stale")
                if tb.norms is not None and tb.context is None:
                    tb.cache_note = (
                        f"{folder / 'index' / 'context'} is missing, from an older ecif or for "
                        "another head: traces recompute batches; rerun `ecif index` to speed "
                        "them up"
                    )
        return tb

    # -- the solver and the indexes, made on first use ----------------------------------
    @property
    def inverse(self) -> InverseHessian:
        """The trace solver, built on first use unless one was set."""
        if self._inverse is None:
            x, y = self.train.image, self.train.text
            self._inverse = trace_solver(self.head, x, y, self.args.solver)
        return self._inverse

    @inverse.setter
    def inverse(self, inv: InverseHessian | None) -> None:
        """Use ``inv`` (e.g. loaded from ``trace.pt``); None: build it again on next use."""
        self._inverse = inv

    def precompute_norms(self, probes: int | str | None = "auto", progress: bool = True) -> dict:
        """||d_n|| for every training pair, once, so queries pay only their numerator."""
        self.norms, info = pair_norms(
            self.head,
            self.train.image,
            self.train.text,
            self.inverse,
            probes=probes,
            neg=self.args.neg,
            progress=progress,
        )
        self.norms_estimated = bool(info["probes"])
        return info

    def ensure_indexes(self) -> dict[str, VectorIndex]:
        if self.indexes is None:
            self.indexes = build_indexes(self.train.image, self.train.text, device=self.args.device)
        return self.indexes

    # -- queries -----------------------------------------------------------------------
    def captions(self, rows: np.ndarray) -> list[str]:
        meta = self.train.metadata
        if meta is None or "caption" not in meta:
            return [str(i) for i in self.train.ids[rows]]
        return [str(c) for c in meta["caption"].to_numpy()[rows]]

    def query_from_set(
        self,
        test: EmbeddingSet,
        query_id: Any,
        *,
        classes: np.ndarray | None = None,
        class_names: list[str] | None = None,
        label: int | None = None,
        label_col: str | None = None,
    ) -> TraceQuery:
        """A test pair: its image against the test set's captions, or against class prompt
        embeddings ``classes`` with the true class ``label``. A caption is correct when it
        carries the pair's label (``ecif.audit.labels``: the same caption, or the same value of
        ``label_col``), the definition ``ecif clean``'s accuracy uses too."""
        widths, trained = (test.d_image, test.d_text), (self.train.d_image, self.train.d_text)
        if widths != trained:
            raise ValueError(
                f"the test set's embeddings are {widths[0]}-d (image) and {widths[1]}-d (text), "
                f"the audit's training set's {trained[0]}-d and {trained[1]}-d: embed the test "
                "set with the audit's model"
            )
        pos = int(test.positions([query_id])[0])
        x, y = _unit(test.image[pos]), _unit(test.text[pos])
        if classes is not None:
            return self._classes_query(x, classes, class_names, label, f"test pair {query_id}")
        meta = test.metadata
        labels = (
            [str(c) for c in meta["caption"]]
            if meta is not None and "caption" in meta
            else [str(i) for i in test.ids]
        )
        key = answer_labels(test, label_col)
        positive = key == key[pos]  # its own caption, identical captions, or the same class
        return TraceQuery(
            "image->text",
            x,
            _unit(np.asarray(test.text, dtype=np.float64)),
            positive,
            labels,
            image=x,
            text=y,
            description=f"test pair {query_id}: its image against the {len(test)} test captions",
        )

    def _classes_query(self, x, classes, names, label, what) -> TraceQuery:
        classes = _unit(classes)
        if label is None or not 0 <= label < len(classes):
            raise ValueError(f"give the true class --label in 0..{len(classes) - 1}")
        positive = np.zeros(len(classes), dtype=bool)
        positive[label] = True
        names = names or [f"class {i}" for i in range(len(classes))]
        return TraceQuery(
            "image->text",
            x,
            classes,
            positive,
            names,
            image=x,
            text=classes[label],
            description=f"{what} against {len(classes)} class prompts, true class {names[label]!r}",
        )

    def query_from_image(
        self,
        path: str | os.PathLike,
        *,
        caption: str | None = None,
        classes: list[str] | None = None,
        label: int | None = None,
        competitors: int | None = None,
        name: str | None = None,
    ) -> TraceQuery:
        """An image file: zero-shot against ``classes`` (prompts) with the true ``label``, or
        retrieval of ``caption`` against the image's ``competitors`` nearest training captions
        (None: ``args.competitors``).
        ``name``: how the query names the image (default: its path; the app passes the
        uploaded file's name)."""
        x = self.embed_image(path)
        name = name or str(path)
        if classes:
            return self._classes_query(x, self.embed_texts(classes), classes, label, name)
        if caption is None:
            raise ValueError("an image query needs --caption (the right text) or --classes/--label")
        y = self.embed_texts([caption])[0]
        competitors = competitors or self.args.competitors
        _, rows = self.ensure_indexes()["text"].search(x[None], competitors)
        rows = rows[0][rows[0] >= 0]
        caps = self.captions(rows)
        keep = [i for i, c in enumerate(caps) if caption_key(c) != caption_key(caption)]
        rows = rows[keep]
        cand = np.concatenate([y[None], _unit(np.asarray(self.train.text[rows]))])
        positive = np.zeros(len(cand), dtype=bool)
        positive[0] = True
        return TraceQuery(
            "image->text",
            x,
            cand,
            positive,
            [caption] + [caps[i] for i in keep],
            image=x,
            text=y,
            description=f"{name}: {caption!r} against the image's {len(rows)} nearest captions",
        )

    def query_from_caption(self, caption: str, *, competitors: int | None = None) -> TraceQuery:
        """A caption: text -> image retrieval against its nearest training images; correct are
        the images whose training caption is this caption (see ``caption_positives``)."""
        competitors = competitors or self.args.competitors
        y = self.embed_texts([caption])[0]
        idx = self.ensure_indexes()
        _, img_rows = idx["image"].search(y[None], competitors)
        sims, txt_rows = idx["text"].search(y[None], competitors)
        img_rows, txt_rows = img_rows[0][img_rows[0] >= 0], txt_rows[0][txt_rows[0] >= 0]
        same = txt_rows[sims[0][: len(txt_rows)] >= POSITIVE_COSINE]
        rows = np.unique(np.concatenate([img_rows, same]))
        caps = self.captions(rows)
        tv = _unit(np.asarray(self.train.text[rows]))
        positive = caption_positives(caps, caption, tv @ y)
        if not positive.any():
            raise ValueError(
                f"no training pair near {caption!r} carries that caption: give --image FILE "
                "with it (the image the caption should retrieve)"
            )
        img = _unit(np.asarray(self.train.image[rows]))
        return TraceQuery(
            "text->image",
            y,
            img,
            positive,
            [f"image of {i} ({c})" for i, c in zip(self.train.ids[rows], caps, strict=True)],
            image=_unit(img[positive].mean(0)),
            text=y,
            description=f"{caption!r} against its {len(rows)} nearest training images "
            f"({int(positive.sum())} carry the caption)",
        )

    # -- the model, only for files and free text ----------------------------------------
    def _model(self):
        if self._encoder is None:
            from ecif.data.models import load_model

            if not self.model or not self.model.get("model"):
                raise ValueError(
                    "the embedding folder's manifest.json names no model; image files and "
                    "captions cannot be embedded (use --query-id with --test)"
                )
            self._encoder = load_model(
                self.model["model"], self.model.get("pretrained"), self.args.device
            )
        return self._encoder

    @torch.no_grad()
    def embed_image(self, path: str | os.PathLike) -> np.ndarray:
        from PIL import Image

        lm = self._model()
        img = lm.preprocess(Image.open(path).convert("RGB"))[None].to(lm.device)
        return _unit(lm.model.encode_image(img).float().cpu().numpy()[0])

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        lm = self._model()
        return _unit(lm.model.encode_text(lm.tokenizer(texts).to(lm.device)).float().cpu().numpy())

    # -- candidates and ranking --------------------------------------------------------
    def candidates(self, q: TraceQuery, count: int, wrong: np.ndarray | None = None) -> np.ndarray:
        """Up to ``count`` training rows: image-side neighbours of the query image interleaved
        with text-side neighbours of its caption (and of the wrong answer, when given)."""
        idx = self.ensure_indexes()
        searches = []
        if q.image is not None:
            searches.append(("image", q.image))
        if q.text is not None:
            searches.append(("text", q.text))
        if wrong is not None:
            searches.append(("text" if q.direction == "image->text" else "image", wrong))
        lists = [idx[side].search(np.asarray(v)[None], count)[1][0] for side, v in searches]
        return interleave(lists, count)

    def rank(self, q: TraceQuery, rows: np.ndarray | None = None) -> pd.DataFrame:
        """Relative influence of the given rows (all rows if None) on the query's loss."""
        _, g = query_loss_and_gradient(self.head, q)
        rows = np.arange(len(self.train)) if rows is None else np.asarray(rows)
        rows, a = pair_rows(self.copies, rows), self.args  # a pair once, as its first row
        kw = dict(neg=a.neg, inverse=self.inverse)
        fast = dict(norms=self.norms, context=self.context, context_top=a.context_top)
        threads = torch.get_num_threads()
        torch.set_num_threads(a.query_threads or threads)
        try:
            ranked = api.relative_influence(self.head, self.train, g, rows, **fast, **kw)
            if self.norms is None or not self.norms_estimated or a.refine <= 0:
                return ranked
            # estimated norms reorder near-ties: re-score each side's top rows with exact
            # norms (from the batch context when there is one, else from their batches)
            order = np.argsort(ranked["relative_influence"].to_numpy())
            top = np.unique(np.r_[order[: a.refine], order[::-1][: a.refine]])
            ctx = dict(context=self.context, context_top=a.context_top)
            exact = api.relative_influence(self.head, self.train, g, rows[top], **ctx, **kw)
        finally:
            torch.set_num_threads(threads)
        ranked.loc[top, "relative_influence"] = exact["relative_influence"].to_numpy()
        ranked.attrs["norm"] = f"precomputed, top {len(top)} exact"
        return ranked

    def trace(self, q: TraceQuery, **options: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The k pairs most responsible for the query's loss and the k that helped most.

        Options (``args``' unless given here): ``k``, ``candidates`` (0 or None ranks every
        training pair: exhaustive, slow on large sets), ``wrong_answer`` (also search near the
        wrong answer's text; off by default, as it split the budget without raising recall in
        bench_trace.py, benchmarks/README.md).
        """
        bad = sorted(set(options) - set(QUERY_OPTIONS))
        if bad:
            raise TypeError(f"TraceBack.trace() got unexpected keyword(s) {bad}")
        a = replace(self.args, **options)
        k, candidates, wrong_answer = a.k, a.candidates or None, a.wrong_answer
        info, _ = query_loss_and_gradient(self.head, q)
        wrong = None
        if wrong_answer and not info["correct"]:
            wrong = q.candidates[info["predicted_index"]]
        rows = None if candidates is None else self.candidates(q, candidates, wrong)
        ranked = self.rank(q, rows)
        table = result_table(ranked, self, q, k)
        info.update(
            query=q.description,
            direction=q.direction,
            candidates=len(ranked),
            solver=ranked.attrs.get("norm"),
        )
        return table, info
