"""Auditing: the Auditor, thresholds, shard scoring, trace-back, cleaning and verification."""

from ecif.audit.auditor import AuditArgs, Auditor, clip_scores
from ecif.audit.folder import read_audit, write_audit
from ecif.audit.trace import TraceBack
from ecif.audit.trace_args import TraceArgs

__all__ = [
    "AuditArgs",
    "Auditor",
    "clip_scores",
    "TraceArgs",
    "TraceBack",
    "read_audit",
    "write_audit",
]
