"""What the CLI reads from a model-mode audit: its part, the training set's feature cache,
and another folder's cache, with one-line errors."""

from __future__ import annotations


def features_of(folder: str):
    """A folder's feature cache, or a one-line usage error."""
    from ecif.cli.errors import UsageError
    from ecif.data.features import load_features

    try:
        return load_features(folder)
    except (OSError, ValueError) as err:
        raise UsageError(str(err).splitlines()[0]) from err


def model_audit(folder: str):
    """(training features, the model fit on all of them, audit.json) of a model-mode audit,
    a missing feature cache as a one-line usage error."""
    from ecif.audit.model_trace_pair import model_audit as read

    try:
        return read(folder)
    except (OSError, ValueError) as err:
        from ecif.cli.errors import UsageError

        raise UsageError(str(err).splitlines()[0]) from err
