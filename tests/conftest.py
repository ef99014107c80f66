"""Shared fixtures. Everything runs offline on the CPU with tiny random models."""

from __future__ import annotations

import os

# Model hubs are unreachable in tests: fail fast instead of retrying for ~45 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole run: the tiny models gain nothing from more, and on a
    small shared machine oversubscribed OpenMP threads slow them down many times over."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _user_cache_of_the_session(tmp_path_factory):
    """The library's own user cache folder (``DALDA_AUG_CACHE``: CLIP tokenizer, textual-inversion
    tokens, stat and coverage records) is a folder of this session, not ~/.cache/dalda_aug; set in
    ``os.environ`` so that subprocesses started by tests inherit it. A test may still set or unset
    it (monkeypatch, or an ``env`` of its own for a subprocess). ``XDG_CACHE_HOME`` is left alone:
    other libraries find their downloaded weights through it (RUN_SLOW tests need them), and the
    library reads it only when ``DALDA_AUG_CACHE`` is unset."""
    previous = os.environ.get("DALDA_AUG_CACHE")
    os.environ["DALDA_AUG_CACHE"] = str(tmp_path_factory.mktemp("dalda-aug-user-cache"))
    yield
    if previous is None:
        os.environ.pop("DALDA_AUG_CACHE", None)
    else:
        os.environ["DALDA_AUG_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A :class:`ModelConfig` pointing at tiny random models written by ``make_tiny_models``."""
    from dalda_aug.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("RUN_SLOW", "0") not in ("", "0", "false")
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="needs real weights; set RUN_SLOW=1"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
