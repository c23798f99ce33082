"""Trial, not adopted: ``bench_detect.py`` with ``knn_disagreement`` computed and combined
without a validation set too (the default leaves it out there). Every option of
``bench_detect.py`` applies; give ``--no-val``:

    python benchmarks/trial_noval_consensus.py --geometries clip_like aligned --no-val \\
        --captions-per-image 5 --csv consensus.csv

The audit's no-validation signals are patched in this process only: after the audit's own
(self-influence or cross-fitting), the kNN consensus over its distinct pairs, as an audit
with a validation set computes it (the twin audit gets it the same way).
"""

from __future__ import annotations

import bench_detect

import ecif.audit.auditor as auditor_module
from ecif.audit.combine import CONSENSUS

_own_signals = auditor_module.Auditor._signals


def _with_consensus(self, progress):
    df = _own_signals(self, progress)
    if self.val is None and self.args.params == "head" and CONSENSUS not in df:
        known = self.known_consensus
        if known is None:
            known, self.neighbours = self.pairs_consensus(progress)
        df[CONSENSUS] = known
    return df


if __name__ == "__main__":
    auditor_module.Auditor._signals = _with_consensus
    bench_detect.main()
