"""What decides an audit's numbers (``AuditArgs``), apart from the Auditor that runs it, so
the shard scorer, the CLI and the app read the options without the audit's machinery."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ecif.audit.combine import SIGNALS, VALIDATED_SIGNALS
from ecif.audit.selection import SelectArgs
from ecif.device import resolve_device
from ecif.engine.contrastive import NEG_FORMS
from ecif.engine.fit import FitArgs
from ecif.engine.head import CLIP_LOGIT_SCALE, DENSE_HESSIAN_MAX_PARAMS
from ecif.engine.inverse_hessian import SolverArgs
from ecif.engine.model_mode import PARAMS, ModelArgs
from ecif.options import borrow, default_of, option, renamed

VAL_MODES = ("auto", "self", "crossfit")
DUPLICATE_MODES = ("collapse", "keep")
# no validation set, "auto": self-influence (a solve per pair, affordable with the head's dense
# factorization) up to this many adapter entries, cross-fitting above
SELF_INFLUENCE_MAX_PARAMS = DENSE_HESSIAN_MAX_PARAMS
WEIGHT_MODES = ("auto", "equal", *SIGNALS, *VALIDATED_SIGNALS)
# the fit's options an audit hands on (FitArgs's own fields), and the solve's (SolverArgs's)
FIT_OPTIONS = ("batch_size", "seed", "dtype", "device", "warmup_epochs")
SOLVER_OPTIONS = ("solver",)
RENAMED_OPTIONS = {"method": "solver"}  # recorded options of older audits: old -> new name


@renamed(**RENAMED_OPTIONS)
@dataclass
class AuditArgs:
    """Everything that decides an audit's numbers (recorded in every output).

    The options it hands on to the fit and the solve are ``FitArgs``'s and ``SolverArgs``'s
    own fields (``borrow``: one default, one help text); ``fit_args()`` and ``solver_args()``
    compose those stages' options from them. The rest are the audit's own: the head's scale
    and pull are chosen per audit ("auto"), unlike a plain ``ecif.fit``.
    """

    params: str = option(
        "head",
        help="what influence is taken through: head (a bilinear head over the frozen "
        "embeddings), projection (both of the model's output projections) or lora (low-rank "
        "adapters in the last blocks of both towers, plus the projections); the model modes "
        "need feature caches from `ecif embed --cache-features projection|lora`",
        choices=PARAMS,
    )
    lora_rank: int = borrow(ModelArgs, "lora_rank")
    lora_blocks: int | None = borrow(ModelArgs, "lora_blocks")
    batch_size: int = borrow(FitArgs, "batch_size")
    seed: int = borrow(
        FitArgs, "seed", help="seed of the batch partition, the scale calibration and cross-fitting"
    )
    logit_scale: float | str | None = option(
        "auto",
        help="logit scale t of the head; auto: half the temperature that calibrates the "
        "pretrained similarity on the trusted pairs (the validation set, else the training "
        "pairs less the share select.untrusted_drop = "
        f"{default_of(SelectArgs, 'untrusted_drop'):g} it fits worst); model: the embedding "
        f"model's own (else {CLIP_LOGIT_SCALE:g}); or a number. In --params projection or "
        "lora, auto is the whole calibration; without a validation set self-influence takes "
        "the geometric mean of the calibrations on all training pairs and on the trimmed ones, "
        "the projection mode's cross-fit the all-pairs one, lora's the trimmed one",
    )
    lam: float | str = option(
        "auto",
        help="L2 pull of the head towards the pretrained model; auto: "
        f"{default_of(SelectArgs, 'lam'):g} (select.lam; audit.json's head_choice records the "
        "pull used), or a number",
    )
    weights: str = option(
        "auto",
        help="how misalign_score combines the standardised signals: auto (log-odds of a "
        "two-component mixture over the signals, plus the signals weighted by planted probes), "
        "equal (sum of standardised influence, pair_loss and clip_score), or one signal alone "
        "(trusted_loss needs a validation set, knn_disagreement one or params=head)",
        choices=WEIGHT_MODES,
    )
    probes: float = option(
        0.1,
        help="weights auto: planted probes (copies with wrong captions; in a model mode, "
        "another real pair's caption) per training pair in a twin audit of at most 20,000 "
        "pairs that weighs the signals; 0: the mixture alone (also below 300 pairs)",
    )
    duplicates: str = option(
        "collapse",
        help="rows whose image and text embeddings are exact copies of an earlier row: "
        "collapse (each distinct pair is fit and scored once, its copies carry its scores "
        "and flag) or keep (every row as it is: a pair's copies are fit once each and can be "
        "each other's negatives). Head mode; the model modes keep every row",
        choices=DUPLICATE_MODES,
    )
    neg: str = option("exact", help="form of the removal term", choices=NEG_FORMS)
    solver: str = borrow(SolverArgs, "solver")
    threshold: str | float | int = option(
        "auto",
        help="how many to flag: 'auto' (estimated noise rate), a fraction like 0.1, or a count "
        "like 500",
    )
    no_val: str = option(
        "auto",
        help="without a validation set: self-influence or cross-fitting (auto: self for small "
        "heads and in the projection mode, cross-fitting otherwise; in the projection mode "
        "self takes x2-x20 the time of crossfit: choose crossfit for a large set)",
        choices=VAL_MODES,
    )
    proxy_fraction: float = option(
        0.5,
        help="cross-fitting: share of the other half (lowest pair loss) kept as its proxy "
        "validation set",
    )
    dtype: str = borrow(FitArgs, "dtype")
    device: str = borrow(FitArgs, "device")
    warmup_epochs: int | None = borrow(FitArgs, "warmup_epochs")
    select: SelectArgs = option(
        default_factory=SelectArgs, help="how the head's scale and pull are set when auto"
    )

    def fit_args(self, **overrides: Any) -> FitArgs:
        """The fit's options: this audit's, FitArgs's defaults for the rest, ``overrides``."""
        return FitArgs(**{k: getattr(self, k) for k in FIT_OPTIONS}, **overrides)

    def solver_args(self, **overrides: Any) -> SolverArgs:
        """The inverse-Hessian solve's options: this audit's solver, SolverArgs's defaults."""
        return SolverArgs(**{k: getattr(self, k) for k in SOLVER_OPTIONS}, **overrides)

    def record(self) -> dict:
        """The options as recorded beside the scores, with the device that computed them."""
        return {**asdict(self), "device": resolve_device(self.device)}

    @classmethod
    def from_record(cls, options: dict) -> AuditArgs:
        """The options recorded by an audit (older names read too; ``select`` as default)."""
        opts = {RENAMED_OPTIONS.get(k, k): v for k, v in options.items()}
        keep = {f.name for f in fields(cls)} - {"select"}
        return cls(**{k: v for k, v in opts.items() if k in keep})
