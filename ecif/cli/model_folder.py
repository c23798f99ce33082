"""What the CLI reads from a model-mode audit: its part, the training set's feature cache,
and another folder's cache, with one-line errors."""

from __future__ import annotations


def audit_params(folder: str) -> str:
    """The audit's trainable part: "head", "projection" or "lora"."""
    import json
    from pathlib import Path

    from ecif.audit.folder import AuditFolderError

    path = Path(folder) / "audit.json"
    if not path.exists():
        raise AuditFolderError(f"{folder}: not an audit folder (no audit.json)")
    return json.loads(path.read_text()).get("options", {}).get("params") or "head"


def features_of(folder: str):
    """A folder's feature cache, or a one-line usage error."""
    from ecif.cli.errors import UsageError
    from ecif.data.features import load_features

    try:
        return load_features(folder)
    except (OSError, ValueError) as err:
        raise UsageError(str(err).splitlines()[0]) from err


def model_audit(folder: str):
    """(training features, the model fit on all of them, audit.json) of a model-mode audit."""
    import json
    from pathlib import Path

    from ecif.audit.folder import AuditFolderError, read_models

    info = json.loads((Path(folder) / "audit.json").read_text())
    if not info.get("embeddings"):
        raise AuditFolderError(f"{folder}/audit.json records no training embeddings")
    train = features_of(info["embeddings"])
    whole = [m for m in read_models(folder) if m.partition.n == len(train.image)]
    if not whole:
        raise AuditFolderError(
            f"{folder}: the audit fit two cross-fitted halves (no validation set); verify "
            "needs a model fit on all pairs: rerun `ecif score` with --val"
        )
    return train, whole[0], info
