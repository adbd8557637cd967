"""A tiny Gemma 3 with random weights, shared by the tests of every module built on
:mod:`typsamp.gemma` (the model, drafts, distillation, the acceptance grid, the benchmark).

``TINY`` has a sliding window of 4, so every pass of more than a few tokens crosses it,
and a global layer every second layer."""

from __future__ import annotations

import pytest
import torch

from typsamp import gemma

TINY = gemma.GemmaConfig(vocab_size=97, n_layer=4, hidden=32, ffn=48, n_head=4, n_kv_head=2, head_dim=8,
                         sliding_window=4, global_every=2, context_length=64)


def random_gemma(config: gemma.GemmaConfig = TINY, seed: int = 0, scale: float = 0.2) -> gemma.Gemma:
    """A Gemma of ``config`` in eval mode whose weights are N(0, scale²) (norm weights
    N(0, 0.3²)), drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = gemma.Gemma(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name else scale))
    return model.eval()


@pytest.fixture(autouse=True)
def tiny_without_cache(request):
    """Imported into a test module, every test there starts and ends with the module's
    shared ``tiny`` model's cache cleared (the decode loops leave theirs in place; a
    forward pass without offsets would continue it)."""
    model = request.getfixturevalue("tiny") if "tiny" in request.fixturenames else None
    if model is not None:
        model.clear_cache()
    yield
    if model is not None:
        model.clear_cache()
