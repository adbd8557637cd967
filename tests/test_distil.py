"""typsamp.distil: the distilled Gemma draft.

On a tiny random Gemma 3 (the target): the teacher's targets are the target's own
distribution (the top-k's log-probabilities, and samples drawn exactly from the whole
distribution), training lowers the KL, a stopped and resumed run ends with the same
weights as an unbroken one, the saved draft loads back to the same logits (-inf outside
the kept tokens), and greedy speculative decoding with it equals greedy autoregressive
decoding of the target. On the real model (``TYPSAMP_SKIP_GEMMA=1`` skips): the committed
draft loads with the engine's interface and its file holds no copy of the embedding.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from typsamp import distil, gemma, generate, sampling
import real_gemma
from tiny_gemma import TINY, random_gemma

LAYERS = (0, 3)   # a local and a global layer of TINY, as (0, 17) are of the real model
KEEP = 60
RECIPE = distil.Recipe(steps=24, batch_size=4, lr=3e-3, min_lr=3e-4, warmup=4, eval_interval=8, autocast=False)


@pytest.fixture(scope="module")
def tiny():
    return random_gemma()


@pytest.fixture(scope="module")
def targets(tiny):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY.vocab_size, (int(torch.randint(1, 8, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(48)]
    return distil.make_targets(tiny, prompts, new_tokens=12, top_k=16, batch_size=16, progress=False,
                               eos_token_id=1)


@pytest.fixture(scope="module")
def trained(tiny, targets, tmp_path_factory):
    kept = distil.temporary_kept_tokens(targets, KEEP)
    draft, record = distil.train(tiny, targets, kept, recipe=RECIPE, layers=LAYERS, seed=3,
                                 checkpoint_dir=tmp_path_factory.mktemp("ck"), progress=False)
    return kept, draft, record


def test_targets_are_the_targets_top_k(tiny, targets):
    seq, P = targets["sequences"][0], int(targets["prompt_lengths"][0])
    with torch.no_grad():
        logp = torch.log_softmax(tiny(seq[None])[0].float(), dim=-1)[P - 1:len(seq) - 1]   # [G, V]
    G = len(seq) - P
    values, index = logp.topk(16, dim=-1)
    assert torch.equal(targets["topk_ids"][:G].long(), index)
    torch.testing.assert_close(targets["topk_logp"][:G].float(), values, atol=2e-3, rtol=1e-3)
    assert targets["topk_ids"].shape[0] == sum(len(s) for s in targets["sequences"]) - int(targets["prompt_lengths"].sum())


def test_targets_sample_the_whole_distribution(tiny):
    # One prompt, many rows, one new token each: with top_k = 3 most draws fall in the
    # tail, so both branches of the sampler are exercised against the exact law.
    n = 6000
    prompt = [5, 17, 42]
    out = distil.make_targets(tiny, [prompt] * n, new_tokens=1, top_k=3, batch_size=n, seed=7, progress=False)
    draws = torch.stack([s[-1] for s in out["sequences"]])
    with torch.no_grad():
        p = torch.softmax(tiny(torch.tensor([prompt]))[0, -1].double(), dim=-1)
    freq = torch.bincount(draws, minlength=TINY.vocab_size).double() / n
    tail = 1 - p.topk(3).values.sum()
    assert tail > 0.3, "the tail branch must be exercised"
    bound = 5 * (p * (1 - p) / n).sqrt() + 1e-12     # 5 standard errors per token
    assert ((freq - p).abs() <= bound).all(), (freq - p).abs().max()


def test_training_lowers_the_kl(tiny, targets, trained):
    kept, draft, record = trained
    before, after = record["val_before"], record["val_after"]
    assert after["kl"] < 0.9 * before["kl"], (before, after)
    data = distil._Data(targets, kept, TINY.vocab_size)
    fresh = distil.build_draft(tiny, kept, LAYERS)
    train_before = distil.evaluate(fresh, data, data.train, autocast=False)["kl"]
    train_after = distil.evaluate(draft, data, data.train, autocast=False)["kl"]
    assert train_after < 0.8 * train_before, (train_before, train_after)
    # the draft owns its layers and norm; the embedding is the target's own tensor
    assert draft.body.model.embed_tokens.weight is tiny.model.embed_tokens.weight
    assert "model.embed_tokens.weight" not in draft.trainable()


def test_a_resumed_run_ends_with_the_same_weights(tiny, targets, trained, tmp_path):
    kept, draft, _ = trained
    assert distil.train(tiny, targets, kept, recipe=RECIPE, layers=LAYERS, seed=3, checkpoint_dir=tmp_path,
                        stop_at=8, progress=False) is None
    resumed, _ = distil.train(tiny, targets, kept, recipe=RECIPE, layers=LAYERS, seed=3, checkpoint_dir=tmp_path,
                              resume=True, progress=False)
    a, b = draft.trainable(), resumed.trainable()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="settings"):
        distil.train(tiny, targets, kept, recipe=RECIPE, layers=LAYERS, seed=4, checkpoint_dir=tmp_path,
                     resume=True, progress=False)


def test_saved_draft_loads_back_with_the_engine_interface(tiny, trained, tmp_path):
    kept, draft, record = trained
    path = distil.save_draft(draft, tmp_path / "d.safetensors", record)
    assert (tmp_path / "d.json").is_file()
    loaded = distil.load_draft(torch.float32, target=tiny, path=path)
    assert torch.equal(loaded.kept, kept)
    assert loaded.body.model.embed_tokens.weight is tiny.model.embed_tokens.weight
    # the same logits as the trained draft with its weights rounded to bfloat16
    rounded = distil.build_draft(tiny, kept, LAYERS)
    rounded.body.load_state_dict({**{k: v.to(torch.bfloat16).float() for k, v in draft.trainable().items()},
                                  "model.embed_tokens.weight": tiny.model.embed_tokens.weight})
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = loaded(tokens), rounded(tokens)
    assert got.shape == (2, 9, TINY.vocab_size)
    assert torch.equal(got, want)
    outside = torch.ones(TINY.vocab_size, dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(got[..., outside]).all() and torch.isfinite(got[..., kept]).all()
    # cached decoding gives the full pass's logits
    loaded.setup_cache(2, 16)
    with torch.no_grad():
        first = loaded(tokens[:, :5], torch.zeros(2, dtype=torch.long), span=5)
        rest = loaded(tokens[:, 5:], torch.full((2,), 5), span=9)
    torch.testing.assert_close(torch.cat([first, rest], 1), got, atol=1e-5, rtol=1e-5)


def test_greedy_speculative_with_the_draft_is_the_targets_greedy(tiny, trained):
    _, draft, _ = trained
    draft.body.eval()
    prompt = torch.randint(0, TINY.vocab_size, (3, 5), generator=torch.Generator().manual_seed(9))
    warp = sampling.Warp(temperature=0.0)
    auto = generate.autoregressive(tiny, prompt, 20, warp=warp)
    spec = generate.speculative(tiny, draft, prompt, 20, gamma=3, warp=warp, seed=0)
    assert torch.equal(spec.tokens, auto.tokens)
    assert 0 < spec.accepted   # the draft gets some right


def test_input_errors(tiny, targets):
    kept = distil.temporary_kept_tokens(targets, KEEP)
    with pytest.raises(ValueError, match="layers"):
        distil.build_draft(tiny, kept, (0, 9))
    with pytest.raises(ValueError, match="cannot be laid out"):
        distil.build_draft(tiny, kept, (1, 0))          # global then local
    with pytest.raises(ValueError, match="kept"):
        distil.build_draft(tiny, torch.tensor([1, 1, 2]), LAYERS)
    with pytest.raises(ValueError, match="kept"):
        distil.build_draft(tiny, torch.tensor([0, 97]), LAYERS)
    with pytest.raises(TypeError, match="target"):
        distil.build_draft("tiny", kept, LAYERS)
    with pytest.raises(ValueError, match="keep"):
        distil.temporary_kept_tokens(targets, TINY.vocab_size + 1)
    with pytest.raises(ValueError, match="new_tokens"):
        distil.make_targets(tiny, [[1, 2]], new_tokens=0, progress=False)
    with pytest.raises(ValueError, match="prompts"):
        distil.make_targets(tiny, [[]], progress=False)
    with pytest.raises(FileNotFoundError, match="distil train"):
        distil.load_draft(torch.float32, target=tiny, path="/nonexistent/d.safetensors")
    with pytest.raises(ValueError, match="dtype"):
        distil.load_draft(torch.int32, target=tiny)


# ---------------------------------------------------------------------------------------
# The committed draft on the real model


@pytest.fixture(scope="module")
def committed():
    if os.environ.get("TYPSAMP_SKIP_GEMMA") == "1":
        pytest.skip("TYPSAMP_SKIP_GEMMA=1: the Gemma 3 270M tests are skipped on request")
    try:
        return distil.load_draft(torch.bfloat16)
    except gemma.InstallError as error:
        pytest.fail(f"{error} (or set TYPSAMP_SKIP_GEMMA=1 to skip these tests)")


def test_committed_draft_is_small_and_trimmed(committed):
    from safetensors import safe_open

    with safe_open(str(distil.DRAFT_FILE), framework="pt") as f:
        keys = set(f.keys())
        assert "model.embed_tokens.weight" not in keys
        assert all(f.get_tensor(k).dtype in (torch.bfloat16, torch.int32) for k in keys)
    assert distil.DRAFT_FILE.stat().st_size < 32 * 2 ** 20
    assert committed.kept.numel() == distil.KEEP and committed.config.n_layer == len(distil.LAYERS)
    tokens = torch.tensor([[2, 818, 5279, 529, 9405, 563]])       # "<bos>The capital of France is"
    with torch.no_grad():
        logits = committed(tokens)
    assert logits.shape == (1, 6, 262_144)
    inside = torch.zeros(262_144, dtype=torch.bool)
    inside[committed.kept] = True
    assert torch.isneginf(logits[..., ~inside]).all() and torch.isfinite(logits[..., inside]).all()
    assert not math.isnan(float(logits[..., inside].float().mean()))


def test_greedy_speculative_with_the_committed_draft_equals_greedy_autoregressive_on_the_real_model():
    target, tokenizer = real_gemma.load()
    draft = distil.load_draft(torch.float32, target=target)       # shares the target's embedding
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, there was a"]
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    greedy = sampling.Warp(temperature=0.0)
    with torch.inference_mode():
        ar = generate.autoregressive(target, prompts, 12, warp=greedy)
        spec = generate.speculative(target, draft, prompts, 12, gamma=3, warp=greedy)
    assert spec.accepted > 0
    real_gemma.assert_same_greedy(target, prompts, ar, spec)
