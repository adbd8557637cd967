"""Chapter 10's measurement of tree rules on Medusa heads (typsamp.tree_acceptance) and its
speed benchmark (typsamp.bench.bench_medusa), on a tiny random Gemma with random heads.

The real measurement runs on Gemma 3 270M as a CLI whose JSON is committed; here every
quantity it records is recomputed independently on a model small enough to check."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.tiny_gemma import random_gemma
from typsamp import bench, generate, medusa, sampling, speculative, stats, tree, tree_acceptance, typical

NEW = 12


@pytest.fixture(scope="module")
def system():
    torch.manual_seed(5)
    target = random_gemma(seed=4, scale=0.5)
    V = target.config.vocab_size
    heads = medusa.MedusaHeads(target.model.embed_tokens.weight, torch.randperm(V), n_heads=4)
    with torch.no_grad():                             # heads that are not the target's head
        heads.weight.normal_(0, 0.3)
        heads.bias.normal_(0, 0.3)
    heads.requires_grad_(False)
    return target, heads


def rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (n,), generator=g) for n in (5, 3, 7)]


def test_named_trees():
    assert tree_acceptance.named_tree("small").n_nodes == len(tree.SMALL)
    assert tree_acceptance.named_tree("mc_sim_7b_63").n_nodes == 63
    assert tree_acceptance.named_tree("chain3").parents.tolist() == [-1, 0, 1]
    assert tree_acceptance.named_tree("full2x2").n_nodes == 6
    mc = tree_acceptance.named_tree("mc16")
    assert mc.n_nodes == 16 and set(mc.choices) == set(tree.MC_SIM_7B_63[:16])
    with pytest.raises(ValueError, match="n must lie in"):
        tree_acceptance.named_tree("mc64")
    with pytest.raises(ValueError, match="unknown tree 'chain'"):
        tree_acceptance.named_tree("chain")
    with pytest.raises(TypeError, match="must be a str"):
        tree_acceptance.named_tree(3)


def test_rules_of_the_methods():
    r = tree_acceptance.rule_for("typical")
    assert isinstance(r, typical.TypicalAcceptance) and r.extra == "greedy" and r.entropy == "medusa"
    assert (r.epsilon, r.delta) == (0.09, 0.3)
    assert tree_acceptance.rule_for("typical_sampled").extra == "target"
    assert isinstance(tree_acceptance.rule_for("exact"), speculative.RejectionSampling)
    assert tree_acceptance.rule_for("autoregressive") is None
    with pytest.raises(ValueError, match="`method` must be one of"):
        tree_acceptance.rule_for("medusa")


def _p_of_tokens(target, prompt, x, T):
    logits = stats.teacher_forced_logits(target, torch.cat([prompt, x])[None])[0, prompt.numel() - 1:-1]
    return sampling.Warp(temperature=T)(logits.double()).gather(-1, x[:, None]).squeeze(-1)


@pytest.mark.parametrize("method", list(tree_acceptance.METHODS))
def test_the_distance_from_p_t_is_the_methods_law(system, method):
    # Recompute each row's mean TV and KL from p_T independently: deterministic emissions
    # are point masses (TV 1 - p(x), KL -log p(x)); extra tokens drawn from p_T and the
    # exact rule's tokens have law p_T (distance 0).
    target, heads = system
    T = 0.7
    proposer = medusa.MedusaProposer(heads, tree.small())
    cell, out = tree_acceptance.measure(target, proposer, rows(), method, T, new_tokens=NEW, seed=3)
    assert cell["rows"] == 3 and cell["tokens"] == int(out.lengths.sum()) == 3 * NEW
    for b, prompt in enumerate(rows()):
        x = out.tokens[b, :NEW]
        p = _p_of_tokens(target, prompt, x, T)
        if method == "typical":
            tv, kl = 1 - p, -p.log()
        elif method == "typical_sampled":
            accepted = out.origin[b, :NEW] == 1
            tv, kl = torch.where(accepted, 1 - p, 0.0), torch.where(accepted, -p.log(), 0.0)
        else:
            tv = kl = torch.zeros_like(p)
        assert math.isclose(cell["tv_rows"][b], float(tv.mean()), abs_tol=1e-5)
    mean, se = stats.mean_se(torch.tensor(cell["tv_rows"]))
    assert math.isclose(cell["tv_from_target"], mean, abs_tol=1e-6)   # tv_rows are rounded to 6 places
    assert math.isclose(cell["tv_se"], se, abs_tol=1e-6)
    if method == "typical":
        assert cell["tv_from_target"] > 0.05           # a deterministic decoder is far from p_T at T = 0.7
        assert cell["kl_from_target"] > cell["tv_from_target"]
    if method in ("exact", "autoregressive"):
        assert cell["tv_from_target"] == 0 and cell["kl_from_target"] == 0
    if method != "autoregressive":
        assert sum(cell["accepted_histogram"]) == sum(int((a >= 0).sum()) for a in out.accepted_lengths)
        assert cell["tokens_per_step"] == out.tokens_per_step >= 1


def test_at_t0_every_tree_method_is_greedy_decoding(system):
    target, heads = system
    proposer = medusa.MedusaProposer(heads, tree.small())
    reference = generate.autoregressive(target, rows(1), NEW, warp=sampling.Warp(temperature=0))
    for method in tree_acceptance.METHODS:
        cell, out = tree_acceptance.measure(target, proposer, rows(1), method, 0.0, new_tokens=NEW)
        assert torch.equal(out.tokens, reference.tokens), method
        assert cell["ties"] == 0                         # float32: the teacher-forced argmax agrees


def test_diversity_across_samples(system):
    # Medusa's rule with greedy extra tokens is deterministic at every temperature: six
    # seeds give one text; sampling from p_T gives several.
    target, heads = system
    proposer = medusa.MedusaProposer(heads, tree.small())
    prompt = rows(2)[0]

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    same = tree_acceptance.diversity(target, proposer, prompt, "typical", 1.0, Tok(), samples=6, new_tokens=NEW)
    assert same["distinct_texts"] == 1 and same["samples"] == 6
    spread = tree_acceptance.diversity(target, proposer, prompt, "autoregressive", 1.0, Tok(), samples=6,
                                       new_tokens=NEW)
    assert spread["distinct_texts"] >= 2
    assert spread["distinct_2_across"] > same["distinct_2_across"]


def test_bench_medusa_runs_and_records_every_cell(system):
    target, heads = system
    prompt_rows = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    trees = {"chain2": tree.chain(2), "small": tree.small()}
    reference = copy.deepcopy(target).double()
    out = bench.bench_medusa(target, heads, trees, prompt_rows, progress=False, reference=reference,
                             settings={"tokens": 8, "short": 2, "temperatures": (0.0, 0.7), "repeats": 1})
    cells = out["results"]
    assert len(cells) == 2 * (2 + 2 * 2)
    assert {(r["method"], r.get("tree")) for r in cells} == {("autoregressive", None)} | {
        (m, t) for m in ("typical", "exact") for t in trees}
    for r in cells:
        assert r["tokens_per_s"] > 0
        if r["method"] != "autoregressive":
            ar = [a for a in cells if a["method"] == "autoregressive" and a["temperature"] == r["temperature"]]
            own = next(a for a in ar if not a.get("reference"))
            assert own["dtype"] == "torch.float32" and {a["dtype"] for a in ar} == {"torch.float32", "torch.float64"}
            assert math.isclose(r["speedup_measured"], r["tokens_per_s"] / own["tokens_per_s"], rel_tol=1e-3)
            best = max(a["tokens_per_s"] for a in ar)
            assert math.isclose(r["speedup_over_best_autoregressive"], r["tokens_per_s"] / best, rel_tol=1e-3)
            assert 1 <= r["tokens_per_step"] <= trees[r["tree"]].max_depth + 1
    for name, spec in trees.items():
        assert out["trees"][name]["nodes"] == spec.n_nodes and out["trees"][name]["pass_ms"] > 0
    assert set(out["goals"]) == {"typical_t07_speedup", "typical_t07_tree", "typical_t07_at_least_2x",
                                 "exact_t07_speedup", "exact_t07_tree"}
    with pytest.raises(ValueError, match="unknown keys"):
        bench.bench_medusa(target, heads, trees, prompt_rows, settings={"gamma": 3})
    with pytest.raises(ValueError, match="`trees` is empty"):
        bench.bench_medusa(target, heads, {}, prompt_rows)


def test_plots_tree_draws_every_node_and_edge():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from typsamp import plots

    spec = tree.small()
    fig, ax = plt.subplots()
    plots.tree(ax, spec.parents, [str(c) for c in spec.choices], highlight=[0, 3])
    assert len(ax.texts) == spec.n_nodes + 1                      # the root and every node
    assert len(ax.lines) == spec.n_nodes                          # one edge per node
    lit = [line for line in ax.lines if line.get_linewidth() > 2]
    assert len(lit) == 2                                          # root -> (0,) -> (0, 0)
    with pytest.raises(ValueError, match="must name the 10 nodes"):
        plots.tree(ax, spec.parents, ["a"])
    with pytest.raises(ValueError, match=r"`parents\[1\]` = 1"):
        plots.tree(ax, [-1, 1])
    plt.close(fig)


def test_same_as_autoregressive_reports_the_first_difference(system):
    target, heads = system
    proposer = medusa.MedusaProposer(heads, tree.small())
    greedy = sampling.Warp(temperature=0)
    reference = generate.autoregressive(target, rows(1), NEW, warp=greedy)
    out = generate.speculative(target, proposer, rows(1), NEW, rule=tree_acceptance.rule_for("exact"), warp=greedy)
    report = tree_acceptance.same_as_autoregressive(target, rows(1), out, reference)
    assert report == {"rows": 3, "identical_rows": 3, "differences": []}
    # a row changed at position 4: reported there, with the gap of the target's top two logits
    changed = copy.deepcopy(out)
    changed.tokens[1, 4] = (changed.tokens[1, 4] + 1) % 97
    report = tree_acceptance.same_as_autoregressive(target, rows(1), changed, reference)
    assert report["identical_rows"] == 2 and [d["row"] for d in report["differences"]] == [1]
    d = report["differences"][0]
    prefix = torch.cat([rows(1)[1], reference.tokens[1, :4]])
    top2 = stats.teacher_forced_logits(target, prefix[None])[0, -1].topk(2).values
    assert d["position"] == 4 and math.isclose(d["gap"], float(top2[0] - top2[1]), rel_tol=1e-5)
