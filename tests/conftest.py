import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- data layer (issue 3) ---------------------------------------------------------------
import pytest  # noqa: E402

TEST_TINY_CFG = dict(embed_dim=32, vision_width=32, vision_layers=1, text_width=32, text_layers=1)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A very small open_clip model trained once per session (seconds), as a local-dir folder."""
    from ecif.data.tiny_clip import tiny_config, train_tiny_clip

    out = tmp_path_factory.mktemp("tiny-clip") / "model"
    train_tiny_clip(
        out,
        cfg=tiny_config(**TEST_TINY_CFG),
        n_train=2000,
        steps=200,
        batch_size=64,
        lr=4e-3,
        n_eval=200,
        candidates=100,
        threads=1,
    )
    return out


@pytest.fixture(scope="session")
def projection_folders(tmp_path_factory, tiny_clip_dir):
    """Shapes embedded with the projection feature cache: 160 training pairs (25% noise) and
    64 clean validation pairs, as embedding folders ("train", "val") under "root"."""
    import ecif
    from ecif import datasets

    root = tmp_path_factory.mktemp("model-mode")
    model = f"local-dir:{tiny_clip_dir}"
    out = {}
    for name, n, noise, seed in (("train", 160, 0.25, 0), ("val", 64, 0.0, 1)):
        datasets.shapes(n, seed=seed, noise=noise).to_parquet(root / f"{name}-shards")
        ecif.embed(root / f"{name}-shards", root / name, model=model, cache_features="projection")
        out[name] = root / name
    out["root"] = root
    return out


# --- app and notebooks (issue 5) ---------------------------------------------------------
@pytest.fixture(scope="session")
def small_audit(tmp_path_factory, tiny_clip_dir):
    """A small real audit folder (240 shapes pairs in 3 shards, val set, head, w.npy)."""
    from tests.app_audit import make_small_audit

    return make_small_audit(tmp_path_factory.mktemp("audit") / "audit", tiny_clip_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch problems on a loaded 2-core machine: two threads spin-wait on each other and
    run tiny ops 30-100x slower; one thread does not. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
