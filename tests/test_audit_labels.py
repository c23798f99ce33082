"""One definition of a right answer for clean's accuracy and trace's test pairs: the same
caption string (case and spacing aside), or the same value of a label column."""

import numpy as np
import pandas as pd

import ecif
from ecif.audit.clean import compare_cleaning, retrieval_accuracy
from ecif.audit.labels import answer_labels


def _classes(n=120, k=4, d=8, seed=0):
    """Pairs of k classes whose captions repeat: 'a photo of a <class>'."""
    g = np.random.default_rng(seed)
    centres = g.standard_normal((k, d))
    cls = np.arange(n) % k
    x = centres[cls] + 0.6 * g.standard_normal((n, d))
    y = centres[cls] + 0.6 * g.standard_normal((n, d))
    meta = pd.DataFrame(
        {
            "caption": [
                f"a photo of a {'ABCD'[c]}" if i % 2 else f"A photo of  a {'ABCD'[c]}"
                for i, c in enumerate(cls)
            ],  # fmt: skip
            "label": cls,
            "digit_name": [f"{c}-{i % 3}" for i, c in enumerate(cls)],
        }
    )
    return ecif.EmbeddingSet(x, y, ids=[f"v{i}" for i in range(n)], metadata=meta)


def test_accuracy_counts_repeated_captions_and_label_columns():
    val = _classes()
    head = ecif.fit(val, batch_size=32, logit_scale=10.0)
    logits = np.asarray(val.image) @ head.m.numpy() @ np.asarray(val.text).T  # numpy, not ecif
    pred = logits.argmax(1)
    caps = [" ".join(c.split()).lower() for c in val.metadata["caption"]]
    by_caption = np.mean([caps[p] == caps[i] for i, p in enumerate(pred)])
    own_row = np.mean(pred == np.arange(len(val)))
    assert by_caption > 0.5 > own_row  # repeated captions: own-row counting is far too low
    assert retrieval_accuracy(head, val) == by_caption
    by_label = np.mean(val.metadata["label"].to_numpy()[pred] == val.metadata["label"].to_numpy())
    from ecif.audit.labels import label_codes

    assert retrieval_accuracy(head, val, labels=label_codes(val, "label")) == by_label
    names = val.metadata["digit_name"].to_numpy()
    finer = retrieval_accuracy(head, val, labels=label_codes(val, "digit_name"))
    assert finer == np.mean(names[pred] == names) < by_label


def test_compare_cleaning_uses_the_label_column(capsys):
    train, val = _classes(seed=1), _classes(seed=2)
    table = ecif.Auditor(train, val, ecif.AuditArgs(batch_size=32, logit_scale=10.0)).run()
    head = ecif.fit(train, batch_size=32, logit_scale=10.0)
    a = compare_cleaning(head, train, val, table, count=10)
    b = compare_cleaning(head, train, val, table, count=10, label_col="digit_name", progress=True)
    assert (b["val_i2t_acc"] <= a["val_i2t_acc"]).all()
    err = capsys.readouterr().err  # progress=True: a spinner line per refit, on stderr
    for name in ("ecif", "random", "clip_score"):
        assert f"refitting without the 10 pairs picked by {name}: done in" in err
    assert b.loc[0, "val_i2t_acc"] == retrieval_accuracy(
        head, val, labels=pd.factorize(val.metadata["digit_name"].astype(str))[0]
    )


def test_answer_labels_without_captions_fall_back_to_ids():
    g = np.random.default_rng(0)
    es = ecif.EmbeddingSet(g.standard_normal((3, 2)), g.standard_normal((3, 2)), ids=[5, 6, 7])
    assert list(answer_labels(es)) == ["id:5", "id:6", "id:7"]
