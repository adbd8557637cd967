"""Tests of typsamp.hf: the transformers adapter, GPT-2 conversion and the peer baseline."""

from __future__ import annotations

import pytest
import torch

from typsamp import generate, hf, sampling, stats
from typsamp.model import GPT, GPTConfig

V = 9


def tiny(seed: int, n_layer: int = 2, n_embd: int = 32, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=64))
    return model.to(dtype).eval()


def tokens(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def target():
    return tiny(0)


def test_to_hf_and_back_give_the_same_logits(target):
    model = tiny(0, dtype=torch.float64)
    converted = hf.to_hf(model)
    assert isinstance(converted, hf.transformers.GPT2LMHeadModel)
    x = tokens(2, 12)
    with torch.inference_mode():
        torch.testing.assert_close(converted(x).logits, model(x), rtol=1e-10, atol=1e-10)
        back = hf.from_hf(converted)
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_conversion_validation():
    with pytest.raises(TypeError, match="`model` must be a typsamp.model.GPT"):
        hf.to_hf(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="`hf` must be a transformers.GPT2LMHeadModel"):
        hf.from_hf(tiny(0))
    config = hf.transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                        activation_function="relu")
    with pytest.raises(ValueError, match="gelu_new"):
        hf.from_hf(hf.transformers.GPT2LMHeadModel(config))


def test_adapter_exposes_the_vocabulary_and_keeps_the_models_dtype():
    for dtype in (torch.float64, torch.bfloat16):
        adapter = hf.HFCausalLM(hf.to_hf(tiny(0, dtype=dtype)))
        assert adapter.vocab_size == V
        adapter.setup_cache(1, 32)
        out = adapter(tokens(1, 6), torch.zeros(1, dtype=torch.long), span=6)
        assert out.shape == (1, 6, V) and out.dtype == dtype      # never converted to float32


def test_adapter_logits_to_keep_computes_only_the_last_positions():
    model = tiny(0, dtype=torch.float64)
    adapter = hf.HFCausalLM(hf.to_hf(model))
    x = tokens(1, 7, seed=1)
    adapter.setup_cache(1, 32)
    full = adapter(x, torch.zeros(1, dtype=torch.long))
    adapter.setup_cache(1, 32)
    last = adapter(x, torch.zeros(1, dtype=torch.long), logits_to_keep=1)
    assert last.shape == (1, 1, V)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-12, atol=1e-12)


def test_adapter_crops_its_cache_and_refuses_what_it_cannot_do(target):
    adapter = hf.HFCausalLM(hf.to_hf(target))
    with pytest.raises(ValueError, match="setup_cache"):
        adapter(tokens(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size 1"):
        adapter.setup_cache(2, 16)
    adapter.setup_cache(1, 32)
    x = tokens(1, 8, seed=2)
    full = adapter(x, torch.zeros(1, dtype=torch.long))
    assert adapter.cache.lengths.tolist() == [8]
    again = adapter(x[:, 5:], torch.tensor([5]))               # crops 3 positions, feeds them again
    torch.testing.assert_close(again, full[:, 5:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="skips positions"):
        adapter(x[:, :1], torch.tensor([12]))
    with pytest.raises(ValueError, match="cannot roll back to length 20"):
        adapter.cache.rollback(torch.tensor([20]))
    with pytest.raises(ValueError, match="chains only"):
        adapter(x[:, :2], torch.tensor([8]), depths=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`tokens` must be int64 of shape \[1, T\]"):
        adapter(x.double(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="transformers causal LM"):
        hf.HFCausalLM(target.config)


def test_the_adapter_drives_the_engine(target):
    draft = tiny(1, n_layer=1, n_embd=16)
    adapter = hf.HFCausalLM(hf.to_hf(target))
    prompt = tokens(1, 5, seed=3)
    greedy = sampling.Warp(temperature=0)
    reference = generate.autoregressive(target, prompt, 30, warp=greedy)
    out = generate.speculative(adapter, draft, prompt, 30, gamma=3, warp=greedy)
    assert torch.equal(out.tokens, reference.tokens)
    assert out.alpha < 1.0                                     # rejections crop the HF cache
    assert torch.equal(generate.autoregressive(adapter, prompt, 30, warp=greedy).tokens, reference.tokens)
    with pytest.raises(ValueError, match="batch_size 1"):
        generate.speculative(adapter, draft, tokens(2, 5), 5, gamma=3, warp=greedy)


def test_teacher_forced_logits_through_the_adapter(target):
    x = tokens(1, 10, seed=4)
    torch.testing.assert_close(stats.teacher_forced_logits(hf.HFCausalLM(hf.to_hf(target)), x),
                               stats.teacher_forced_logits(target, x), rtol=1e-5, atol=1e-5)


def test_peer_generate_matches_our_greedy_decoding(target):
    draft = tiny(1, n_layer=1, n_embd=16)
    prompt = tokens(1, 6, seed=5)
    ours = generate.autoregressive(target, prompt, 20, warp=sampling.Warp(temperature=0)).tokens
    target_hf, draft_hf = hf.to_hf(target), hf.to_hf(draft)
    counter = hf.ForwardCounter(target_hf)
    plain = hf.peer_generate(target_hf, None, prompt, 20, 0.0)
    assert torch.equal(plain, ours) and counter.n == 20
    before = counter.n
    assisted = hf.peer_generate(target_hf, draft_hf, prompt, 20, 0.0, gamma=3)
    assert torch.equal(assisted, ours)
    spec = generate.speculative(target, draft, prompt, 20, gamma=3, warp=sampling.Warp(temperature=0))
    assert counter.n - before == spec.steps                   # one target pass per step, as ours
    counter.remove()
    hf.peer_generate(target_hf, None, prompt, 3, 1.0, seed=1)
    assert counter.n - before == spec.steps                   # no longer counting
    with pytest.raises(ValueError, match="`gamma` must be >= 1"):
        hf.peer_generate(target_hf, draft_hf, prompt, 5, 0.0, gamma=0)
    with pytest.raises(ValueError, match="`temperature`"):
        hf.peer_generate(target_hf, None, prompt, 5, -1.0)


def test_peer_generate_samples_reproducibly(target):
    target_hf = hf.to_hf(target)
    prompt = tokens(1, 4, seed=6)
    a = hf.peer_generate(target_hf, None, prompt, 15, 1.0, seed=3)
    assert torch.equal(a, hf.peer_generate(target_hf, None, prompt, 15, 1.0, seed=3))
    assert not torch.equal(a, hf.peer_generate(target_hf, None, prompt, 15, 1.0, seed=4))


def test_without_transformers_the_error_names_the_extra():
    import subprocess
    import sys

    code = "import sys; sys.modules['transformers'] = None; import typsamp.hf"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "install the `hf` extra" in out.stderr, out.stderr
    # the rest of the library does not need it
    code = "import sys; sys.modules['transformers'] = None; import typsamp, typsamp.stats, typsamp.provenance"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_auto_tokenizer_validation():
    with pytest.raises(TypeError, match="`path` must be a str or Path"):
        hf.auto_tokenizer(3)
