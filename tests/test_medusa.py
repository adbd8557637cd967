"""typsamp.medusa: Medusa-1 heads on a frozen target, their data, training and proposer.

Mechanics run on the tiny random Gemma 3 of tests/tiny_gemma.py (vocabulary 97). The
committed weights are checked from their file; the real 270M model (``make install``)
checks that greedy decoding with the committed heads and a tree gives the fp32 target's
own greedy text. ``TYPSAMP_SKIP_GEMMA=1`` skips the real-model test, as in
tests/test_drafts.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from typsamp import gemma, generate, medusa, sampling, tree
import real_gemma
from tiny_gemma import TINY, random_gemma, tiny_without_cache  # noqa: F401 (autouse fixture)
from typsamp.speculative import RejectionSampling
from typsamp.typical import TypicalAcceptance

RECIPE = medusa.Recipe(steps=40, batch_size=32, lr=3e-3, min_lr=3e-4, warmup=4, eval_interval=10, autocast=False)


@pytest.fixture(scope="module")
def tiny():
    return random_gemma()


def _rows(n=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, TINY.vocab_size, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_data(tiny):
    data = medusa.make_data(tiny, _rows(24), new_tokens=16, top_k=8, batch_size=7, seed=11, progress=False)
    tiny.clear_cache()
    return data


def _all_ids():
    return torch.randperm(TINY.vocab_size, generator=torch.Generator().manual_seed(0))


def _random_heads(tiny, n_heads=4, scale=0.5, seed=0):
    heads = medusa.MedusaHeads(tiny.model.embed_tokens.weight, _all_ids(), n_heads)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=g) * scale / TINY.hidden ** 0.5)
        heads.bias.copy_(torch.randn(heads.bias.shape, generator=g) * 0.1)
    return heads


# ---------------------------------------------------------------------------------------
# The heads


def test_untrained_heads_are_the_target_head_and_shapes_follow(tiny):
    E = tiny.model.embed_tokens.weight
    kept = _all_ids()
    heads = medusa.MedusaHeads(E, kept, n_heads=3)
    assert heads.weight.shape == (3, TINY.hidden, TINY.hidden) and heads.bias.shape == (3, TINY.hidden)
    assert sum(p.numel() for p in heads.parameters()) == 3 * (TINY.hidden ** 2 + TINY.hidden)
    h = torch.randn(2, 5, TINY.hidden, generator=torch.Generator().manual_seed(1))
    logits = heads(h)
    assert logits.shape == (2, 5, 3, TINY.vocab_size)
    # W = 0, b = 0: r_k(h) = h + SiLU(0) = h, so every head is the tied head over `kept`
    reference = (h @ E.T)[..., kept]
    for k in range(3):
        torch.testing.assert_close(logits[:, :, k], reference)
    ids = heads.topk(h, 4)
    assert ids.shape == (2, 5, 3, 4) and ids.dtype == torch.long
    torch.testing.assert_close(ids[:, :, 0], (h @ E.T).topk(4, dim=-1).indices)
    # a prefix of the rows: the same logits' first columns, shared parameters
    small = heads.restrict(10)
    torch.testing.assert_close(small(h), logits[..., :10])
    assert small.weight is heads.weight and small.kept.tolist() == kept[:10].tolist()


def test_trained_head_is_the_residual_block(tiny):
    heads = _random_heads(tiny, n_heads=2)
    h = torch.randn(3, TINY.hidden, generator=torch.Generator().manual_seed(2))
    for k in range(2):
        r = h + torch.nn.functional.silu(h @ heads.weight[k].T + heads.bias[k])
        torch.testing.assert_close(heads(h)[:, k], (r @ tiny.model.embed_tokens.weight.T)[:, heads.kept])


def test_heads_reject_bad_input(tiny):
    E = tiny.model.embed_tokens.weight
    with pytest.raises(ValueError, match="shape"):
        medusa.MedusaHeads(E[0], _all_ids())
    with pytest.raises(TypeError):
        medusa.MedusaHeads(E, [1, 2, 3])
    with pytest.raises(ValueError, match="repeat"):
        medusa.MedusaHeads(E, torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match="outside"):
        medusa.MedusaHeads(E, torch.tensor([1, TINY.vocab_size]))
    with pytest.raises(ValueError, match="1-D"):
        medusa.MedusaHeads(E, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="n_heads"):
        medusa.MedusaHeads(E, _all_ids(), n_heads=0)
    heads = medusa.MedusaHeads(E, _all_ids(), n_heads=2)
    with pytest.raises(ValueError, match="hidden size"):
        heads(torch.zeros(2, TINY.hidden + 1))
    with pytest.raises(TypeError):
        heads(torch.zeros(2, TINY.hidden, dtype=torch.long))
    with pytest.raises(ValueError, match="rows"):
        heads.topk(torch.zeros(2, TINY.hidden), TINY.vocab_size + 1)
    with pytest.raises(ValueError, match="rows"):
        heads.restrict(TINY.vocab_size + 1)
    with pytest.raises(ValueError):
        heads.restrict(0)


# ---------------------------------------------------------------------------------------
# The data


def test_data_rows_are_the_states_and_distributions_that_drew_each_token(tiny, tiny_data):
    data = tiny_data
    E = tiny.model.embed_tokens.weight
    S = data["prompt_lengths"].numel()
    assert S == 24 and data["gen_starts"][-1] == data["hidden"].shape[0] == data["topk_ids"].shape[0]
    for s in (0, 5, 23):
        seq = data["tokens"][data["starts"][s]:data["starts"][s + 1]].long()
        P = int(data["prompt_lengths"][s])
        g0, g1 = int(data["gen_starts"][s]), int(data["gen_starts"][s + 1])
        assert g1 - g0 == seq.numel() - P
        with torch.no_grad():
            fresh = tiny(seq[None], head=None)[0]                         # [L, H], float32
        # row j: the state after token P - 1 + j, whose distribution drew token P + j
        torch.testing.assert_close(data["hidden"][g0:g1].float(), fresh[P - 1:-1], atol=0.05, rtol=0.02)
        logp = torch.log_softmax(fresh[P - 1:-1] @ E.T, dim=-1)
        values, ids = logp.topk(8, dim=-1)
        torch.testing.assert_close(data["topk_logp"][g0:g1].float(), values, atol=0.02, rtol=0.01)
        agree = (data["topk_ids"][g0:g1].long()[:, :3] == ids[:, :3]).float().mean()
        assert agree > 0.9                                                 # bf16 states may swap near-ties
    # the sampled tokens are drawn from those distributions: in a random model's top 8 often
    pairs = medusa._Pairs(data, _all_ids(), TINY.vocab_size, 3)
    inside = (data["topk_ids"].long() == pairs.sampled[:, None]).any(1).float().mean()
    assert inside > 0.3


def test_data_save_load_round_trip_and_bad_input(tiny, tiny_data, tmp_path):
    path = medusa.save_data(tiny_data, tmp_path / "d.safetensors", names=["x"] * 24)
    back = medusa.load_data(path)
    for key in ("tokens", "starts", "hidden", "topk_ids", "topk_logp", "gen_starts"):
        assert torch.equal(back[key], tiny_data[key])
    assert back["meta"] == tiny_data["meta"] and back["names"] == ["x"] * 24
    with pytest.raises(FileNotFoundError):
        medusa.load_data(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="rows"):
        medusa.make_data(tiny, [], progress=False)
    with pytest.raises(ValueError, match="vocabulary"):
        medusa.make_data(tiny, [[1, TINY.vocab_size]], progress=False)
    with pytest.raises(TypeError):
        medusa.make_data(object(), [[1, 2]], progress=False)


def test_data_is_seeded_and_resumes_batch_by_batch(tiny, tmp_path):
    rows = _rows(6, seed=8)
    a = medusa.make_data(tiny, rows, new_tokens=6, top_k=4, batch_size=4, seed=2, parts=tmp_path, progress=False)
    parts = sorted(tmp_path.iterdir())
    assert len(parts) == 2
    parts[1].unlink()                                                     # an interrupted run
    b = medusa.make_data(tiny, rows, new_tokens=6, top_k=4, batch_size=4, seed=2, parts=tmp_path, progress=False)
    c = medusa.make_data(tiny, rows, new_tokens=6, top_k=4, batch_size=4, seed=3, progress=False)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["hidden"], b["hidden"])
    assert not torch.equal(a["tokens"], c["tokens"])


# ---------------------------------------------------------------------------------------
# Training


def test_pairs_map_head_k_to_the_distribution_k_rows_later(tiny_data):
    pairs = medusa._Pairs(tiny_data, _all_ids(), TINY.vocab_size, 3)
    anchors = torch.cat([pairs.train, pairs.val])
    h, index, p, valid, sampled, argmax = pairs.batch(anchors, "cpu")
    end = tiny_data["gen_starts"][1:]
    for i in (0, 7, 30):
        j = int(anchors[i])
        seq_end = int(end[(end > j).nonzero()[0]])
        for k in range(3):
            assert bool(valid[i, k]) == (j + k + 1 < seq_end)
            if valid[i, k]:
                assert argmax[i, k] == tiny_data["topk_ids"][j + k + 1, 0]
                torch.testing.assert_close(p[i, k].sum(), torch.tensor(1.0))
            else:
                assert p[i, k].sum() == 0
    # held out by prompt: no sequence contributes to both
    seq_of = lambda a: torch.bucketize(a, tiny_data["gen_starts"][1:], right=True)
    assert not set(seq_of(pairs.train).tolist()) & set(seq_of(pairs.val).tolist())


def test_training_lowers_the_loss_and_resumes_exactly(tiny, tiny_data, tmp_path):
    E = tiny.model.embed_tokens.weight
    kept = _all_ids()
    heads, record = medusa.train(E, tiny_data, kept, recipe=RECIPE, n_heads=3, seed=0,
                                 checkpoint_dir=tmp_path / "a", progress=False)
    pairs = medusa._Pairs(tiny_data, kept, TINY.vocab_size, 3)
    untrained = medusa.MedusaHeads(E, kept, 3)
    before = medusa.accuracy(untrained, pairs, pairs.train, autocast=False)["cross_entropy"]
    after = medusa.accuracy(heads, pairs, pairs.train, autocast=False)["cross_entropy"]
    assert all(b - a > 0.05 for a, b in zip(after, before)), (before, after)
    assert record["val_before"]["step"] == 0 and record["history"][-1]["step"] == RECIPE.steps
    assert record["n_heads"] == 3 and record["parameters"] == 3 * (TINY.hidden ** 2 + TINY.hidden)
    assert len(record["val_after"]["kept"]["sampled"]["top1"]) == 3
    # a run stopped and resumed ends with the same weights as the unbroken one
    assert medusa.train(E, tiny_data, kept, recipe=RECIPE, n_heads=3, seed=0, checkpoint_dir=tmp_path / "b",
                        stop_at=15, progress=False) is None
    resumed, _ = medusa.train(E, tiny_data, kept, recipe=RECIPE, n_heads=3, seed=0,
                              checkpoint_dir=tmp_path / "b", resume=True, progress=False)
    assert torch.equal(resumed.weight, heads.weight) and torch.equal(resumed.bias, heads.bias)
    with pytest.raises(ValueError, match="settings"):
        medusa.train(E, tiny_data, kept, recipe=RECIPE, n_heads=3, seed=1, checkpoint_dir=tmp_path / "b",
                     resume=True, progress=False)


def test_accuracy_counts_against_a_hand_count(tiny, tiny_data):
    heads = _random_heads(tiny, n_heads=2)
    pairs = medusa._Pairs(tiny_data, heads.kept, TINY.vocab_size, 2)
    got = medusa.accuracy(heads, pairs, pairs.train, autocast=False, rows=(20,), full_vocab=True)
    h, _, _, valid, sampled, argmax = pairs.batch(pairs.train, "cpu")
    top = heads.topk(h, 5)                                                  # [n, 2, 5]
    for k in range(2):
        v = valid[:, k]
        one = (top[v, k, 0] == sampled[v, k]).double().mean()
        five = (top[v, k] == sampled[v, k, None]).any(-1).double().mean()
        assert got["kept"]["sampled"]["top1"][k] == pytest.approx(float(one), abs=1e-4)
        assert got["kept"]["sampled"]["top5"][k] == pytest.approx(float(five), abs=1e-4)
        # every row kept: the whole vocabulary gives the same counts
        assert got["full_vocab"]["argmax"]["top5"][k] == got["kept"]["argmax"]["top5"][k]
        assert got["rows_20"]["sampled"]["top5"][k] <= got["kept"]["sampled"]["top5"][k] + 1e-9


def test_ranked_kept_orders_by_expected_count(tiny_data):
    kept = torch.arange(TINY.vocab_size)
    ranked = medusa.ranked_kept(tiny_data, kept, TINY.vocab_size)
    assert sorted(ranked.tolist()) == kept.tolist()
    counts = torch.zeros(TINY.vocab_size, dtype=torch.float64)
    counts.index_add_(0, tiny_data["topk_ids"].long().flatten(), tiny_data["topk_logp"].double().exp().flatten())
    assert (counts[ranked][1:] <= counts[ranked][:-1]).all()


# ---------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip(tiny, tmp_path):
    heads = _random_heads(tiny, n_heads=3)
    path = medusa.save_heads(heads, tmp_path / "m.safetensors", record={"hello": 1})
    assert json.loads(path.with_suffix(".json").read_text()) == {"hello": 1}
    E = tiny.model.embed_tokens.weight
    back = medusa.load_heads(torch.float32, embedding=E, path=path)
    assert torch.equal(back.weight, heads.weight.to(torch.bfloat16).float())
    assert torch.equal(back.kept, heads.kept) and back.n_heads == 3 and not back.weight.requires_grad
    small = medusa.load_heads(torch.float32, embedding=E, path=path, rows=12)
    assert small.kept.tolist() == heads.kept[:12].tolist()
    from safetensors.torch import load_file
    assert set(load_file(str(path))) == {"weight", "bias", "kept"}           # no embedding stored
    with pytest.raises(FileNotFoundError):
        medusa.load_heads(torch.float32, embedding=E, path=tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="shape"):
        medusa.load_heads(torch.float32, embedding=E[:, :8], path=path)
    with pytest.raises(ValueError, match="dtype"):
        medusa.load_heads(torch.int64, embedding=E, path=path)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "nope"})
    with pytest.raises(ValueError, match="not a typsamp Medusa"):
        medusa.load_heads(torch.float32, embedding=E, path=other)


# ---------------------------------------------------------------------------------------
# The proposer and the engine


def test_proposer_reads_the_observed_state(tiny):
    heads = _random_heads(tiny, n_heads=4)
    spec = tree.small()
    proposer = medusa.MedusaProposer(heads, spec)
    assert proposer.needs_hidden and proposer.width(7) == spec.n_nodes and proposer.vocab_size == TINY.vocab_size
    prompt = torch.zeros(3, 4, dtype=torch.long)
    proposer.start(prompt, torch.tensor([4, 2, 1]), max_new_tokens=5, gamma=1, warp=sampling.Warp())
    hidden = torch.randn(3, 6, TINY.hidden, generator=torch.Generator().manual_seed(4))
    end = torch.tensor([2, 0, -1])
    proposer.observe(hidden, end)
    got = proposer.propose(torch.zeros(3, 9, dtype=torch.long), torch.tensor([4, 2, 1]), 4, None)
    state = torch.stack([hidden[0, 2], hidden[1, 0], torch.zeros(TINY.hidden)])
    expected = spec.candidates(heads.topk(state, max(spec.top_k))[:, :spec.max_depth])
    assert torch.equal(got.tokens, expected) and got.q is None and got.parents is spec.parents
    assert proposer.passes == 1
    again = proposer.propose(torch.zeros(3, 9, dtype=torch.long), torch.tensor([4, 2, 1]), 4, None)
    assert again.parents is got.parents                                     # one layout for the engine


def test_proposer_rejects_bad_input(tiny):
    heads = _random_heads(tiny, n_heads=2)
    with pytest.raises(ValueError, match="deep"):
        medusa.MedusaProposer(heads, tree.chain(3))
    with pytest.raises(TypeError):
        medusa.MedusaProposer(heads, [(0,), (0, 0)])
    with pytest.raises(TypeError):
        medusa.MedusaProposer(object(), tree.chain(2))
    proposer = medusa.MedusaProposer(heads, tree.chain(2))
    with pytest.raises(RuntimeError):
        proposer.observe(torch.zeros(1, 2, TINY.hidden), torch.zeros(1, dtype=torch.long))
    proposer.start(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 3]), max_new_tokens=4, gamma=1,
                   warp=sampling.Warp())
    with pytest.raises(ValueError, match="hidden"):
        proposer.observe(torch.zeros(2, 3, TINY.hidden + 1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="end"):
        proposer.observe(torch.zeros(2, 3, TINY.hidden), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="end"):
        proposer.observe(torch.zeros(2, 3, TINY.hidden), torch.zeros(2, dtype=torch.int32))


@pytest.fixture(scope="module")
def trained_tiny_heads(tiny, tiny_data, tmp_path_factory):
    heads, _ = medusa.train(tiny.model.embed_tokens.weight, tiny_data, _all_ids(),
                            recipe=RECIPE, n_heads=4, seed=0,
                            checkpoint_dir=tmp_path_factory.mktemp("medusa"), progress=False)
    return heads.eval().requires_grad_(False)


@pytest.mark.parametrize("rule", [RejectionSampling(), TypicalAcceptance()], ids=["rejection", "typical"])
@pytest.mark.parametrize("spec", [tree.chain(3), tree.small(), tree.full(2, 2)], ids=["chain3", "small", "full2x2"])
def test_greedy_medusa_decoding_equals_greedy_autoregressive(tiny, trained_tiny_heads, spec, rule):
    """At T = 0 both rules keep exactly the target's argmax path (typical acceptance: p is
    one-hot, so only the argmax passes its threshold, and its extra token is the argmax)."""
    prompts = [torch.tensor(r) for r in _rows(5, seed=21)] + [torch.tensor([5])]
    greedy = sampling.Warp(temperature=0.0)
    new = 14
    with torch.inference_mode():
        ar = generate.autoregressive(tiny, prompts, new, warp=greedy)
        proposer = medusa.MedusaProposer(trained_tiny_heads, spec)
        out = generate.speculative(tiny, proposer, prompts, new, rule=rule, warp=greedy, seed=0)
    assert torch.equal(out.tokens, ar.tokens)
    assert out.gamma == spec.max_depth and out.drafted == spec.n_nodes * int((out.accepted_lengths >= 0).sum())
    assert out.accepted > 0                                                 # the heads' candidates do get used
    assert out.draft_passes == out.steps


def test_medusa_with_rejection_sampling_keeps_the_target_distribution(tiny, trained_tiny_heads):
    """At T = 1 the first new token is distributed as the target's p: a chi-square test
    over 4,000 rows (each its own seed, 2 tokens with a small tree; cells expected below
    5 draws pooled), at level 1e-3."""
    prompt = torch.tensor([[7, 3, 9]])
    n = 4000
    with torch.inference_mode():
        p = torch.softmax(tiny(prompt)[0, -1].double(), dim=-1)
        tiny.clear_cache()
        out = generate.speculative(tiny, medusa.MedusaProposer(trained_tiny_heads, tree.small()),
                                   prompt.expand(n, -1).contiguous(), 2, rule=RejectionSampling(),
                                   warp=sampling.Warp(), seed=list(range(n)))
    counts = torch.bincount(out.tokens[:, 0], minlength=TINY.vocab_size).double()
    expected = p * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (stat, df, p_value)


# ---------------------------------------------------------------------------------------
# The committed weights


def test_committed_heads_file_and_record():
    path = medusa.HEADS_FILE
    assert path.is_file(), f"{path} is missing: run `python -m typsamp.medusa train`"
    assert 1_000_000 < path.stat().st_size < 6_000_000
    record = json.loads(path.with_suffix(".json").read_text())
    K = record["n_heads"]
    assert record["format"] == medusa.FORMAT and K in (3, 4) and record["rows"] == 32_768
    assert record["data"]["prompt_split"] == "train" and record["data"]["positions"] > 10_000
    after, before = record["val_after"], record["val_before"]
    for name in ("kept", "rows_4096", "full_vocab"):
        for label in ("sampled", "argmax"):
            assert len(after[name][label]["top1"]) == K and len(after[name][label]["top5"]) == K
    # training helped every head over the untrained one (the target's own next-token head)
    assert all(a > b for a, b in zip(after["kept"]["argmax"]["top1"], before["top1_argmax"]))
    # top-1 falls with the depth predicted, as Medusa reports for its heads
    assert after["kept"]["argmax"]["top1"][0] > after["kept"]["argmax"]["top1"][-1]
    assert record["wall_time_s"] > 0 and "machine" in record and record["published"]
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"weight", "bias", "kept"}
        assert f.get_slice("weight").get_dtype() == "BF16"
    # it loads (a stand-in embedding of the right shape: the file does not hold one)
    V, H = 262_144, 640
    heads = medusa.load_heads(torch.bfloat16, embedding=torch.zeros(1, 1, dtype=torch.bfloat16).expand(V, H),
                              rows=4096)
    assert heads.n_heads == K and heads.kept.numel() == 4096 and heads.weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------
# The real model (needs `make install`)


@pytest.fixture(scope="module")
def real():
    return real_gemma.load()


def test_greedy_medusa_on_gemma_equals_greedy_autoregressive(real):
    model, tokenizer = real
    texts = ["The capital of France is", 'def add(a, b):\n    """Add two numbers."""\n']
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    heads = medusa.load_heads(torch.float32, target=model)
    greedy = sampling.Warp(temperature=0.0)
    new = 12
    with torch.inference_mode():
        ar = generate.autoregressive(model, prompts, new, warp=greedy)
        out = generate.speculative(model, medusa.MedusaProposer(heads, tree.small()), prompts, new,
                                   rule=RejectionSampling(), warp=greedy)
        assert out.accepted > 0
    real_gemma.assert_same_greedy(model, prompts, ar, out)
