"""The demo's closing note: said exactly when a single signal out-ranks the combined score."""

from ecif.audit.demo import leader_note


def _signals(**ap):
    return {k: {"auroc": 0.5, "ap": v} for k, v in ap.items()}


def test_the_note_names_the_signal_that_leads_and_only_then():
    ahead = leader_note(_signals(misalign_score=0.883, clip_score=0.894, pair_loss=0.889))
    assert ahead is not None and ahead.startswith("note: clip_score alone") and "0.894" in ahead
    assert leader_note(_signals(misalign_score=0.9, clip_score=0.894, pair_loss=0.889)) is None
