"""The installed Gemma 3 270M for the tests that need it (``make install``), and the one
way those tests compare greedy decoders on it.

``TYPSAMP_SKIP_GEMMA=1`` skips them; a missing or broken install fails them with the
message that says which command fixes it."""

from __future__ import annotations

import os

import pytest
import torch

from typsamp import gemma

# A greedy token is a near-tie when the fp32 target's two largest logits lie within TIE of
# each other: a multi-position pass (verification, a tree) and a one-position decoding pass
# sum in different orders (differences ~1e-5, measured in tests/test_gemma.py), so either
# token is the target's greedy choice there.
TIE = 1e-3


def load() -> tuple[gemma.Gemma, object]:
    """(float32 model, tokenizer), or a skip / failure as the module docstring says."""
    if os.environ.get("TYPSAMP_SKIP_GEMMA") == "1":
        pytest.skip("TYPSAMP_SKIP_GEMMA=1: the Gemma 3 270M tests are skipped on request")
    try:
        return gemma.load(torch.float32), gemma.load_tokenizer()
    except gemma.InstallError as error:
        pytest.fail(f"{error} (or set TYPSAMP_SKIP_GEMMA=1 to skip these tests)")


def assert_same_greedy(model, prompts: list[torch.Tensor], reference, out) -> None:
    """Rows of two greedy generations (``Generation`` objects) agree up to their first
    difference, which must be a near-tie (:data:`TIE`) of ``model`` on the reference's
    prefix."""
    for b, prompt in enumerate(prompts):
        a, s = reference.tokens[b].tolist(), out.tokens[b].tolist()
        if a == s:
            continue
        first = next(i for i in range(min(len(a), len(s))) if a[i] != s[i])
        with torch.inference_mode():
            logits = model(torch.cat([prompt, torch.tensor(a[:first], dtype=torch.long)])[None])[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < TIE, (b, first, a, s)
