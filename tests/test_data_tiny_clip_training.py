"""The one training loop trains even when called from code running under ``torch.no_grad``.

On a fresh machine the benchmarks' in-memory embedding (decorated ``no_grad``) builds the tiny
CLIP lazily on first use; the loop then failed with "element 0 of tensors does not require
grad". Checked against a second copy trained outside ``no_grad``: the same weights.
"""

import copy

import open_clip
import torch

from ecif.data.tiny_clip import fit_contrastive, tiny_config
from tests.conftest import TEST_TINY_CFG


def _setup():
    cfg = tiny_config(**TEST_TINY_CFG)
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(32, 3, size, size)
    tokens = torch.randint(1, 100, (32, cfg["text_cfg"]["context_length"]))
    return model, images, tokens


def test_training_under_no_grad_updates_the_weights_as_outside_it():
    model, images, tokens = _setup()
    reference = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        fit_contrastive(model, images, tokens, steps=3, batch_size=16, lr=1e-3, seed=0)
    fit_contrastive(reference, images, tokens, steps=3, batch_size=16, lr=1e-3, seed=0)
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert sum(moved) > len(moved) // 2
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    with torch.no_grad():
        fit_contrastive(model, images, tokens, steps=1, batch_size=16, lr=1e-3, seed=0)
        assert not torch.is_grad_enabled()
