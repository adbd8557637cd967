"""Trees of candidates (typsamp.tree) and the rules that verify them.

* TreeSpec from Medusa's choices: sort, parents, depths, ranks, top-k, retrieve order
  (against a plain re-statement of what Medusa's generate_medusa_buffers does), bad input.
* The exact tree rule (recursive rejection over deterministic children) and exact match:
  chi-square of the whole verdict against its exact law on toy trees, and a check that the
  same test rejects a slightly wrong law.
* Typical acceptance on trees against an independent, loop-over-paths re-implementation of
  Medusa's evaluate_posterior (fast=True): accepted path and next token.
* T = 0: every rule accepts the argmax path.
* Chains: the tree kernels give the chain kernels' verdicts and use the generator alike.
* The engine: greedy tree decoding with a top-k tree proposer equals greedy autoregressive
  decoding token for token.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from laws import encode, fit_pvalue
from typsamp import generate, tree
from typsamp.generate import Proposal
from typsamp.model import GPT, GPTConfig
from typsamp.sampling import RowSeeds, Warp
from typsamp.speculative import ExactMatch, RejectionSampling, tree_rejection_law
from typsamp.typical import TypicalAcceptance

F64 = torch.float64

#: Significance level of every chi-square test here: a correct law fails with probability
#: 1e-3 per test (fixed seeds make each outcome reproducible).
ALPHA = 1e-3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- TreeSpec ----------------------------------------------------------------------------


def medusa_sorted_and_retrieved(choices):
    """What generate_medusa_buffers computes, restated: the sorted choices and, walking them
    from the end, each path not yet retrieved, with all its prefixes (as sorted indices)."""
    ordered = sorted((tuple(c) for c in choices), key=lambda c: (len(c), c))
    retrieved, seen = [], set()
    for c in reversed(ordered):
        if c in seen:
            continue
        retrieved.append([ordered.index(c[:k]) for k in range(1, len(c) + 1)])
        seen.update(c[:k] for k in range(1, len(c) + 1))
    return ordered, retrieved


@pytest.mark.parametrize("make", [tree.small, tree.mc_sim_7b_63, lambda: tree.full(2, 3), lambda: tree.chain(4),
                                  lambda: tree.TreeSpec.from_choices([(1,), (0, 2), (0,), (0, 2, 0), (1, 0)])],
                         ids=["small", "mc_sim_7b_63", "full_2_3", "chain_4", "unsorted"])
def test_treespec_follows_medusa_sort_and_retrieve_order(make):
    spec = make()
    ordered, retrieved = medusa_sorted_and_retrieved(spec.choices)
    assert spec.choices == tuple(ordered)
    N, D = spec.n_nodes, spec.max_depth
    assert N == len(ordered) and D == max(map(len, ordered))
    assert spec.parents.tolist() == [ordered.index(c[:-1]) if len(c) > 1 else -1 for c in ordered]
    assert spec.depth.tolist() == [len(c) for c in ordered]
    assert spec.rank.tolist() == [c[-1] for c in ordered]
    assert spec.top_k == tuple(max(c[-1] for c in ordered if len(c) == d) + 1 for d in range(1, D + 1))
    assert spec.paths.tolist() == [r + [-1] * (D - len(r)) for r in retrieved]
    assert all(p.dtype == torch.long for p in (spec.parents, spec.depth, spec.rank, spec.paths))
    topo = tree.topology(spec)
    # retrieve: the first retrieved path holding each node
    assert topo.retrieve.tolist() == [min(k for k, r in enumerate(retrieved) if i in r) for i in range(N)]
    assert topo.depth.tolist() == [0] + spec.depth.tolist()


def test_named_trees():
    mc = tree.mc_sim_7b_63()
    assert (mc.n_nodes, mc.max_depth, mc.top_k) == (63, 4, (10, 10, 10, 2))
    assert set(mc.choices) == set(tree.MC_SIM_7B_63) and len(tree.MC_SIM_7B_63) == 63
    assert tree.chain(3).parents.tolist() == [-1, 0, 1] and tree.chain(3).choices == ((0,), (0, 0), (0, 0, 0))
    assert tree.full(3, 2).n_nodes == 12 and tree.full(2, 3).n_nodes == 14
    s = tree.small()
    assert (s.n_nodes, s.max_depth, s.top_k) == (10, 4, (3, 2, 2, 1))
    assert tree.topology(s).width == 3


def test_candidates_pick_each_heads_topk_entry():
    spec = tree.TreeSpec.from_choices([(0,), (1,), (0, 0), (0, 2), (1, 1)])
    topk = torch.arange(2 * 3 * 4).reshape(2, 3, 4)      # row b, head d, rank k -> 12b + 4d + k
    got = spec.candidates(topk)
    want = [[12 * b + 4 * (len(c) - 1) + c[-1] for c in spec.choices] for b in range(2)]
    assert got.tolist() == want and got.dtype == torch.long
    with pytest.raises(ValueError, match="needs at least 2 heads of top-3"):
        spec.candidates(topk[:, :1])
    with pytest.raises(ValueError, match="needs at least 2 heads of top-3"):
        spec.candidates(topk[:, :, :2])
    with pytest.raises(ValueError, match="int64 of shape"):
        spec.candidates(topk.float())
    with pytest.raises(TypeError, match="torch.Tensor"):
        spec.candidates([[1]])


def test_to_device_keeps_the_tree():
    spec = tree.small()
    moved = spec.to("cpu")
    assert moved is not spec and moved.parents.device == torch.device("cpu")
    assert moved.choices == spec.choices and torch.equal(moved.paths, spec.paths)
    assert tree.topology(moved).parents is moved.parents


@pytest.mark.parametrize("bad, error, match", [
    ([], ValueError, "at least one node"),
    ("01", TypeError, "sequence of index paths"),
    (5, TypeError, "sequence of index paths"),
    ([(0,), ()], ValueError, "is empty"),
    ([(0,), (0,)], ValueError, "twice"),
    ([(0,), (1, 0)], ValueError, r"no parent: \(1,\) is not in"),
    ([(0,), (0, -1)], ValueError, "top-k index >= 0"),
    ([(0,), (True,)], TypeError, "must be an int"),
    ([(0.0,)], TypeError, "must be an int"),
    ([0, 1], TypeError, "sequence of ints"),
])
def test_bad_choices(bad, error, match):
    with pytest.raises(error, match=match):
        tree.TreeSpec.from_choices(bad)


def test_bad_named_tree_arguments():
    with pytest.raises(ValueError, match="`n` must be"):
        tree.chain(0)
    with pytest.raises(TypeError):
        tree.full(2.0, 2)
    with pytest.raises(ValueError, match="at most 4096"):
        tree.full(10, 4)


def test_topology_tables_and_cache():
    parents = torch.tensor([-1, -1, 0, 0, 1, 2, 2, 4, 5])
    topo = tree.topology(parents)
    assert tree.topology(parents) is topo                       # cached on the object
    again = tree.topology(parents.clone())                      # an equal tensor: built anew, same tables
    assert again is not topo and torch.equal(again.children, topo.children)
    assert topo.children.tolist() == [[0, 1], [2, 3], [4, -1], [5, 6], [-1, -1], [7, -1], [8, -1],
                                      [-1, -1], [-1, -1], [-1, -1]]
    assert topo.root_paths[1 + 8].tolist() == [0, 2, 5, 8] and topo.root_paths[0].tolist() == [-1] * 4
    assert topo.depth.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    # leaves by decreasing index: 8, 7, 6, 3; node 0 first lies on leaf 8's path (order 0)
    assert topo.retrieve.tolist() == [0, 1, 0, 3, 1, 0, 2, 1, 0]
    assert not topo.chain and tree.topology(torch.arange(-1, 3)).chain
    assert (topo.max_depth, topo.width) == (4, 2)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0]), r"`parents\[0\]` = 0"),
    (torch.tensor([-1, 2, 0]), r"`parents\[1\]` = 2"),
    (torch.tensor([-2]), r"`parents\[0\]` = -2"),
    (torch.zeros(0, dtype=torch.long), "int64 of shape"),
    (torch.tensor([-1.0]), "int64 of shape"),
])
def test_bad_parents(bad, match):
    with pytest.raises(ValueError, match=match):
        tree.topology(bad)


def test_tree_kernels_check_shapes():
    spec = tree.small()
    x = torch.zeros(2, spec.n_nodes, dtype=torch.long)
    p = torch.full((2, spec.n_nodes + 1, 3), 1 / 3)
    for rule in (RejectionSampling(), ExactMatch(), TypicalAcceptance()):
        with pytest.raises(ValueError, match=r"needs `draft_tokens` of shape \[B, 10\]"):
            rule.kernel(x[:, :5], None, p, None, parents=spec.parents)
        with pytest.raises(ValueError, match=r"needs `target_probs` of shape"):
            rule.kernel(x, None, p[:, :5], None, parents=spec.parents)
    with pytest.raises(ValueError, match="deterministic candidates"):
        RejectionSampling().kernel(x, torch.full((2, spec.n_nodes, 3), 1 / 3), p, None, parents=spec.parents)
    with pytest.raises(ValueError, match="lenience 1"):
        RejectionSampling(0.5).kernel(x, None, p, None, parents=spec.parents)


# --- the exact law of a tree step ----------------------------------------------------------


def walk_law(x_row, p_row, parents, V: int) -> dict[tuple[int, ...], float]:
    """The law of the target's own walk down the tree: at node v (the root first) y ~ p_v;
    if a child of v carries y (the first such child), go there and repeat, else stop.
    The emitted tokens are the y's. An exact rule's verdict has this law."""
    kids = {v: [i for i, u in enumerate(parents) if u == v] for v in range(-1, len(parents))}
    law: dict[tuple[int, ...], float] = {}

    def visit(v, prefix, prob):
        for y in range(V):
            py = prob * float(p_row[v + 1, y])
            if py == 0:
                continue
            child = next((c for c in kids[v] if int(x_row[c]) == y), None)
            if child is None:
                law[prefix + (y,)] = law.get(prefix + (y,), 0.0) + py
            else:
                visit(child, prefix + (y,), py)

    visit(-1, (), 1.0)
    return law


def law_table(law, D: int, V: int):
    """Outcome codes (as laws.encode gives them) and their probabilities."""
    codes = [sum((t + 1) * (V + 1) ** j for j, t in enumerate(seq)) for seq in law]
    return torch.tensor(codes), torch.tensor(list(law.values()), dtype=F64)


def verdict_fit(verdict, law, D: int, V: int, perturb: float = 0.0) -> float:
    codes, probs = law_table(law, D, V)
    if perturb:
        probs = probs.clone()
        big = int(probs.argmax())
        probs[big] -= perturb                       # move mass from the likeliest outcome
        probs[(big + 1) % len(probs)] += perturb
    observed = encode(verdict, V)
    assert bool(torch.isin(observed, codes).all()), "a verdict outside the walk's support"
    counts = (observed[:, None] == codes[None]).sum(0)
    return fit_pvalue(counts, probs, "tree verdict")


#: Toy trees: widths 2-3, depths 2-3, one repeated sibling token in the second.
TOYS = {
    "w3d2": ([-1, -1, -1, 0, 0, 1], [0, 1, 2, 1, 3, 0]),
    "w2d3_repeat": ([-1, -1, 0, 0, 1, 2, 3], [2, 2, 0, 1, 3, 1, 0]),
    "w2d3_chainy": ([-1, 0, 0, 1, 2, 3], [1, 0, 2, 3, 3, 0]),
}


def toy_probs(N: int, V: int, seed: int) -> torch.Tensor:
    return torch.softmax(torch.randn(N + 1, V, generator=gen(seed), dtype=F64) * 1.2, dim=-1)


@pytest.mark.parametrize("name", sorted(TOYS))
@pytest.mark.parametrize("rule", [RejectionSampling(), ExactMatch()], ids=["rejection", "match"])
def test_exact_tree_rules_have_the_targets_law(rule, name):
    parents, tokens = TOYS[name]
    V, N, B = 4, len(parents), 40_000
    p = toy_probs(N, V, seed=len(name)).expand(B, -1, -1)
    x = torch.tensor(tokens).expand(B, -1)
    verdict = rule.kernel(x, None, p, gen(7), parents=torch.tensor(parents))
    D = tree.topology(torch.tensor(parents)).max_depth
    law = walk_law(tokens, p[0], parents, V)
    assert math.isclose(sum(law.values()), 1.0, rel_tol=1e-12)
    assert verdict_fit(verdict, law, D, V) > ALPHA
    # the verdict's pieces agree: accepted = the path's length, path tokens = its nodes' tokens
    a = verdict.accepted
    assert torch.equal((verdict.path >= 0).sum(1), a)
    k = torch.arange(D)
    assert torch.equal(torch.where(k < a[:, None], x.gather(1, verdict.path.clamp(min=0)), -1),
                       torch.where(k < a[:, None], verdict.tokens[:, :D], -1))


def test_the_law_test_rejects_a_wrong_law():
    # The same sample against a law 2 points off in one outcome: the test must reject it,
    # so passing above means something at this sample size.
    parents, tokens = TOYS["w3d2"]
    V, N, B = 4, len(parents), 40_000
    p = toy_probs(N, V, seed=len("w3d2")).expand(B, -1, -1)
    verdict = RejectionSampling().kernel(torch.tensor(tokens).expand(B, -1), None, p, gen(7),
                                         parents=torch.tensor(parents))
    law = walk_law(tokens, p[0], parents, V)
    assert verdict_fit(verdict, law, 2, V) > ALPHA
    assert verdict_fit(verdict, law, 2, V, perturb=0.02) < ALPHA


def test_row_seeds_make_a_row_independent_of_its_batch_mates():
    parents, tokens = TOYS["w2d3_repeat"]
    N, V = len(parents), 4
    p = torch.softmax(torch.randn(3, N + 1, V, generator=gen(3)), -1)
    x = torch.tensor(tokens).expand(3, -1)
    for rule in (RejectionSampling(), ExactMatch(), TypicalAcceptance(extra="target")):
        whole = rule.kernel(x, None, p, RowSeeds([5, 6, 7]), parents=torch.tensor(parents))
        alone = rule.kernel(x[1:2], None, p[1:2], RowSeeds([6]), parents=torch.tensor(parents))
        assert torch.equal(whole.tokens[1:2], alone.tokens) and torch.equal(whole.path[1:2], alone.path)


# --- Medusa's evaluate_posterior, re-implemented over its retrieved paths -----------------------


def medusa_evaluate_posterior(x_row, p_row, spec, epsilon, delta):
    """One row of Medusa's evaluate_posterior (typical, fast=True) written as its code reads:
    per retrieved path the candidate probabilities under the preceding position's
    distribution, Medusa's threshold min(ε, exp(-H) δ) with H = -Σ p log(p + 1e-5), the
    cumulative product of p > threshold, the longest accepted length, ties by the summed log
    probability of the accepted prefix (first maximum in retrieve order). Paths end at their
    leaves (no padding). Returns (accepted node indices, next token = argmax after them,
    whether distinct accepted prefixes tied on length and likelihood)."""
    entropy = -(p_row * torch.log(p_row + 1e-5)).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), torch.exp(-entropy) * delta)
    lengths, probs = [], []
    for path in spec.paths.tolist():
        nodes = [i for i in path if i >= 0]
        rows = [0] + [i + 1 for i in nodes[:-1]]             # the distribution before each node
        prob = torch.stack([p_row[r, x_row[i]] for r, i in zip(rows, nodes)])
        mask = (prob > threshold[rows]).long()
        lengths.append(int(torch.cumprod(mask, 0).sum()))
        probs.append(prob)
    best_length = max(lengths)
    if best_length == 0:
        return [], int(p_row[0].argmax()), False
    best = [k for k, n in enumerate(lengths) if n == best_length]
    likelihood = torch.stack([torch.sum(torch.log(probs[k][:best_length])) for k in best])
    chosen = best[int(torch.argmax(likelihood))]
    nodes = [i for i in spec.paths[chosen].tolist() if i >= 0][:best_length]
    top = [tuple(spec.paths[k].tolist()[:best_length]) for k, l in zip(best, likelihood) if l == likelihood.max()]
    return nodes, int(p_row[nodes[-1] + 1].argmax()), len(set(top)) > 1


def random_choices(seed: int, n: int, width: int, depth: int):
    rng = torch.Generator().manual_seed(seed)
    choices = {(int(torch.randint(width, (), generator=rng)),)}
    while len(choices) < n:
        parent = sorted(choices)[int(torch.randint(len(choices), (), generator=rng))]
        if len(parent) < depth:
            choices.add(parent + (int(torch.randint(width, (), generator=rng)),))
    return sorted(choices)


def compare_with_medusa(seed: int) -> int:
    """TypicalAcceptance on a random tree against the re-implementation, row by row;
    returns how many rows had a tie on length and likelihood between distinct prefixes."""
    spec = tree.TreeSpec.from_choices(random_choices(seed, n=4 + 3 * seed, width=3, depth=4))
    N, V, B = spec.n_nodes, 6, 64
    g = gen(100 + seed)
    # Sharp rows, candidates drawn from the parent's own distribution (often passing) or at
    # random, and from a small vocabulary so siblings repeat tokens (likelihood ties).
    p = torch.softmax(torch.randn(B, N + 1, V, generator=g, dtype=F64) * 2.5, -1)
    up = spec.parents + 1
    own = torch.multinomial(p[:, up].reshape(-1, V), 1, generator=g).reshape(B, N)
    x = torch.where(torch.rand(B, N, generator=g) < 0.7, own, torch.randint(V, (B, N), generator=g))
    eps, delta = (0.09, 0.3) if seed % 2 else (0.2, 0.6)
    rule = TypicalAcceptance(eps, delta, extra="greedy", entropy="medusa")
    verdict = rule.kernel(x, None, p, None, parents=spec.parents)
    ties = 0
    for b in range(B):
        nodes, token, tied = medusa_evaluate_posterior(x[b], p[b], spec, eps, delta)
        a = len(nodes)
        assert int(verdict.accepted[b]) == a
        assert verdict.path[b].tolist() == nodes + [-1] * (spec.max_depth - a)
        assert verdict.tokens[b].tolist() == [int(x[b, i]) for i in nodes] + [token] + [-1] * (spec.max_depth - a)
        ties += tied
    assert verdict.accepted.min() == 0 and verdict.accepted.max() >= 2
    return ties


def test_typical_on_a_tree_is_medusas_evaluate_posterior():
    ties = [compare_with_medusa(seed) for seed in range(6)]
    # the comparison exercised the tie rule: some rows tied on length and likelihood
    assert sum(ties) > 0


def test_typical_tree_ties_go_to_medusas_retrieve_order():
    # Two root children carry the same token: same pass, same likelihood. Medusa retrieves
    # the path of the later sorted node first, so it wins.
    spec = tree.TreeSpec.from_choices([(0,), (1,)])
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]], dtype=F64)
    x = torch.tensor([[0, 0]])
    verdict = TypicalAcceptance(entropy="medusa").kernel(x, None, p, None, parents=spec.parents)
    assert verdict.path.tolist() == [[1]] and verdict.tokens.tolist() == [[0, 2]]
    assert medusa_evaluate_posterior(x[0], p[0], spec, 0.09, 0.3) == ([1], 2, True)
    # a deeper accepted node wins over any likelihood: node (0, 0) after node 0
    spec = tree.TreeSpec.from_choices([(0,), (1,), (0, 0)])
    p = torch.tensor([[[0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]], dtype=F64)
    x = torch.tensor([[1, 0, 2]])                              # node 0 = token 1 (p 0.3) then token 2
    verdict = TypicalAcceptance(entropy="medusa").kernel(x, None, p, None, parents=spec.parents)
    assert verdict.path.tolist() == [[0, 2]] and verdict.tokens.tolist() == [[1, 2, 2]]


# --- T = 0: the argmax path -------------------------------------------------------------------


def argmax_walk(x_row, p_row, parents):
    """Follow the child carrying the argmax after each node; then the argmax."""
    v, nodes = -1, []
    while True:
        best = int(p_row[v + 1].argmax())
        child = next((c for c, u in enumerate(parents) if u == v and int(x_row[c]) == best), None)
        if child is None:
            return nodes, best
        nodes.append(child)
        v = child


@pytest.mark.parametrize("make", [tree.small, lambda: tree.full(3, 2), tree.mc_sim_7b_63],
                         ids=["small", "full_3_2", "mc_sim_7b_63"])
def test_greedy_tree_verification_is_the_argmax_path(make):
    spec = make()
    N, V, B = spec.n_nodes, 12, 32
    g = gen(5)
    logits = torch.randn(B, N + 1, V, generator=g) * 3
    p = Warp(temperature=0)(logits)
    # top-k candidates after each parent (distinct among siblings), as heads would give
    topk = logits.argsort(-1, descending=True)                       # [B, N+1, V]
    up = spec.parents + 1
    shift = torch.randint(0, 2, (B, N), generator=g)                 # sometimes rank 1 first
    x = topk[torch.arange(B)[:, None], up, (spec.rank + shift) % V]
    # siblings must carry distinct tokens for the argmax path to be unique
    parents = spec.parents.tolist()
    for b in range(B):
        for v in range(-1, N):
            kids = [c for c, u in enumerate(parents) if u == v]
            toks = [int(x[b, c]) for c in kids]
            if len(set(toks)) < len(toks):
                x[b, kids] = topk[b, v + 1, spec.rank[kids]]
    rules = [RejectionSampling(), ExactMatch(), TypicalAcceptance(), TypicalAcceptance(entropy="medusa"),
             TypicalAcceptance(extra="target")]
    verdicts = [rule.kernel(x, None, p, gen(1), parents=spec.parents) for rule in rules]
    for b in range(B):
        nodes, token = argmax_walk(x[b], p[b], parents)
        a = len(nodes)
        for verdict in verdicts:
            assert verdict.path[b].tolist() == nodes + [-1] * (spec.max_depth - a)
            assert verdict.tokens[b, a] == token
    assert len(verdicts[0].accepted.unique()) >= 2 and verdicts[0].accepted.max() >= 2


# --- chains: the tree kernels are the chain kernels -------------------------------------------


CHAIN_RULES = [RejectionSampling(), ExactMatch(), TypicalAcceptance(), TypicalAcceptance(extra="target"),
               TypicalAcceptance(extra="truncated", entropy="medusa"), TypicalAcceptance(0.3, 0.9, extra="target")]


@pytest.mark.parametrize("rule", CHAIN_RULES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@pytest.mark.parametrize("seeds", [False, True], ids=["generator", "row_seeds"])
def test_a_chain_gives_the_chain_kernels_verdict(rule, dtype, seeds):
    B, gamma, V = 200, 4, 5
    g = gen(11)
    p = torch.softmax(torch.randn(B, gamma + 1, V, generator=g) * 1.5, -1).to(dtype)
    own = torch.multinomial(p[:, :gamma].float().reshape(-1, V), 1, generator=g).reshape(B, gamma)
    x = torch.where(torch.rand(B, gamma, generator=g) < 0.8, own, torch.randint(V, (B, gamma), generator=g))

    def generator():
        return RowSeeds(list(range(B))) if seeds else gen(3)

    g1, g2 = generator(), generator()
    chain = rule.kernel(x, None, p, g1)
    parents = torch.arange(-1, gamma - 1)
    on_tree = rule.kernel(x, None, p, g2, parents=parents)
    assert torch.equal(chain.tokens, on_tree.tokens) and torch.equal(chain.accepted, on_tree.accepted)
    k = torch.arange(gamma)
    assert torch.equal(on_tree.path, torch.where(k < chain.accepted[:, None], k, -1))
    # the generators were used alike: their next numbers agree
    after = [torch.rand(3, generator=g1) if not seeds else g1.words((B, 1)) for _ in range(1)]
    again = [torch.rand(3, generator=g2) if not seeds else g2.words((B, 1)) for _ in range(1)]
    assert torch.equal(after[0], again[0])
    assert chain.accepted.min() < gamma and chain.accepted.max() > 0


# --- the engine: greedy tree decoding = greedy autoregressive decoding ---------------------------

VOCAB = 12


def gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, block_size=128))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(4.0)                   # sharper logits
    return model.double().eval()


class TopKTree:
    """A toy Medusa: at each depth d the top-k of a draft model's distribution after the
    committed text and the draft's own greedy continuation of d - 1 tokens; the candidates
    are ``spec.candidates`` of those (deterministic, q = None)."""

    def __init__(self, draft: GPT, spec: tree.TreeSpec):
        self.draft = copy.deepcopy(draft)
        self.draft.clear_cache()
        self.spec = spec
        self.vocab_size = draft.config.vocab_size
        self.passes = 0

    def width(self, gamma):
        return self.spec.n_nodes

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp):
        self.passes = 0

    def propose(self, seq, n, top, generator):
        B, D, k = seq.shape[0], self.spec.max_depth, max(self.spec.top_k)
        with torch.inference_mode(False), torch.no_grad():
            topk = torch.zeros(B, D, k, dtype=torch.long)
            for b in range(B):
                text = seq[b, :int(n[b])].clone()
                for d in range(D):
                    ids = self.draft(text[None])[0, -1].topk(k).indices
                    topk[b, d] = ids
                    text = torch.cat([text, ids[:1]])
                    self.passes += 1
            tokens = self.spec.candidates(topk)
        return Proposal(tokens=tokens, parents=self.spec.parents)

    def commit(self, n):
        pass


def noisy(model, noise: float, seed: int = 3):
    """A copy of ``model`` with N(0, noise²) added to every weight: a draft that is often,
    not always, right."""
    out = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in out.parameters():
            w.add_(torch.randn_like(w) * noise)
    return out


@pytest.fixture(scope="module")
def target():
    return gpt(0)


@pytest.fixture(scope="module")
def gemma_target():
    from tiny_gemma import random_gemma
    return random_gemma()


@pytest.mark.parametrize("rule", [RejectionSampling(), TypicalAcceptance(), ExactMatch()], ids=repr)
@pytest.mark.parametrize("shape", ["small", "mc_sim_7b_63"])
def test_greedy_tree_decoding_equals_greedy_autoregressive(target, rule, shape):
    spec = tree.small() if shape == "small" else tree.mc_sim_7b_63()
    g = gen(21)
    rows = [torch.randint(VOCAB, (n,), generator=g) for n in (5, 1, 9)]
    greedy = Warp(temperature=0)
    new = 24 if shape == "small" else 12
    reference = generate.autoregressive(target, rows, new, warp=greedy)
    for draft in (target, noisy(target, 0.15)):                   # the target itself, a noisy copy
        out = generate.speculative(target, TopKTree(draft, spec), rows, new, rule=rule, warp=greedy)
        assert torch.equal(out.tokens, reference.tokens)
        assert out.gamma == spec.max_depth
    a = out.accepted_lengths[out.accepted_lengths >= 0]
    assert a.max() >= 1                                          # the noisy draft is right sometimes


@pytest.mark.parametrize("rule", [RejectionSampling(), TypicalAcceptance(entropy="medusa")], ids=repr)
@pytest.mark.parametrize("make", [tree.small, lambda: tree.full(2, 3)], ids=["small", "full_2_3"])
def test_greedy_tree_decoding_on_gemma_equals_greedy_autoregressive(gemma_target, rule, make):
    spec = make()
    g = gen(22)
    rows = [torch.randint(97, (n,), generator=g) for n in (5, 1, 9)]
    greedy = Warp(temperature=0)
    reference = generate.autoregressive(gemma_target, rows, 16, warp=greedy)
    out = generate.speculative(gemma_target, TopKTree(noisy(gemma_target, 0.3), spec), rows, 16,
                               rule=rule, warp=greedy)
    assert torch.equal(out.tokens, reference.tokens)
    a = out.accepted_lengths[out.accepted_lengths >= 0]
    assert a.min() == 0 and a.max() >= 2                         # paths of several lengths were taken


def test_sampled_tree_decoding_runs_and_stays_in_the_vocabulary(target):
    # At T = 1 the exact rule on a tree gives valid text of the asked length (its law is
    # tested above, one step at a time).
    rows = torch.randint(VOCAB, (2, 4), generator=gen(2))
    out = generate.speculative(target, TopKTree(noisy(target, 0.15), tree.small()), rows, 16,
                               rule=RejectionSampling(), warp=Warp(temperature=1.0), seed=[1, 2])
    assert out.tokens.shape == (2, 16) and bool(((out.tokens >= 0) & (out.tokens < VOCAB)).all())
    assert torch.equal(out.lengths, torch.tensor([16, 16]))


# --- CUDA ---------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("rule", [RejectionSampling(), ExactMatch(), TypicalAcceptance(extra="target")], ids=repr)
def test_cuda_tree_kernels_never_synchronise_and_keep_the_law(rule):
    parents, tokens = TOYS["w2d3_repeat"]
    V, N, B = 4, len(parents), 40_000
    p = toy_probs(N, V, seed=len("w2d3_repeat"))
    parents_cuda = torch.tensor(parents, device="cuda")
    x = torch.tensor(tokens, device="cuda").expand(B, -1)
    probs = p.float().cuda().expand(B, -1, -1)
    g = torch.Generator(device="cuda").manual_seed(9)
    rule.kernel(x[:2], None, probs[:2], g, parents=parents_cuda)         # first sight: builds the topology
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        verdict = rule.kernel(x, None, probs, g, parents=parents_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert verdict.tokens.device.type == "cuda" and verdict.path.device.type == "cuda"
    if not isinstance(rule, TypicalAcceptance):                            # the exact rules: the walk's law
        D = tree.topology(parents_cuda).max_depth
        assert verdict_fit(type(verdict)(verdict.tokens.cpu(), verdict.accepted.cpu(), verdict.path.cpu()),
                           walk_law(tokens, p, parents, V), D, V) > ALPHA


@needs_cuda
def test_cuda_greedy_tree_verdicts_equal_the_cpus():
    spec = tree.mc_sim_7b_63()
    N, V, B = spec.n_nodes, 12, 16
    g = gen(4)
    logits = torch.randn(B, N + 1, V, generator=g)
    p = Warp(temperature=0)(logits)
    x = logits.argsort(-1, descending=True)[torch.arange(B)[:, None], spec.parents + 1, spec.rank]
    cuda = spec.to("cuda")
    for rule in (RejectionSampling(), TypicalAcceptance(), ExactMatch()):
        here = rule.kernel(x, None, p, gen(1), parents=spec.parents)
        there = rule.kernel(x.cuda(), None, p.cuda(), torch.Generator(device="cuda").manual_seed(1),
                            parents=cuda.parents)
        assert torch.equal(here.tokens, there.tokens.cpu()) and torch.equal(here.path, there.path.cpu())


# --- the law functions the chapter uses -------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_rejection_law_equals_the_target_law(seed):
    spec = tree.TreeSpec.from_choices(random_choices(seed, n=3 + 2 * seed, width=3, depth=3))
    N, V = spec.n_nodes, 4
    g = gen(50 + seed)
    p = torch.softmax(torch.randn(N + 1, V, generator=g, dtype=F64) * 1.5, -1)
    p[0, 1] = 0                                                    # a token the root never emits
    p = p / p.sum(-1, keepdim=True)
    x = torch.randint(V, (N,), generator=g)                        # siblings may repeat tokens
    rejection = tree_rejection_law(x, p, spec.parents)
    target = tree.target_law(x, p, spec)
    independent = walk_law(x.tolist(), p, spec.parents.tolist(), V)
    assert set(rejection) == set(target) == {k for k, v in independent.items() if v > 0}
    for k in target:
        assert rejection[k] == pytest.approx(target[k], rel=1e-12, abs=1e-15)
        assert target[k] == pytest.approx(independent[k], rel=1e-12)
    assert sum(rejection.values()) == pytest.approx(1, abs=1e-12)


def test_law_functions_check_their_input():
    spec = tree.small()
    x = torch.zeros(spec.n_nodes, dtype=torch.long)
    p = torch.full((spec.n_nodes + 1, 3), 1 / 3)
    with pytest.raises(ValueError, match="one row"):
        tree.target_law(x[None], p, spec)
    with pytest.raises(ValueError, match=r"needs `draft_tokens` \[10\]"):
        tree.target_law(x[:3], p, spec)
    with pytest.raises(ValueError, match=r"token ids in \[0, 3\)"):
        tree.target_law(x + 3, p, spec)
    with pytest.raises(ValueError, match="target_probs"):
        tree.target_law(x, p * 2, spec)
    with pytest.raises(TypeError, match="torch.Tensor"):
        tree.target_law(x.tolist(), p, spec)


@pytest.mark.parametrize("seed", range(20))
def test_topology_inner_rows_are_exactly_the_parents(seed):
    # inner: the rows (root 0, candidate i at 1 + i) that some candidate is scored against;
    # up_inner maps each candidate's parent row into it. Built independently here.
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 30, (1,), generator=g))
    parents = torch.tensor([int(torch.randint(-1, i, (1,), generator=g)) if i else -1 for i in range(N)])
    topo = tree.topology(parents)
    want = sorted({p + 1 for p in parents.tolist()})
    assert topo.inner.tolist() == want and topo.inner.dtype == torch.long
    assert torch.equal(topo.inner[topo.up_inner], parents + 1)
    leaves = [i + 1 for i in range(N) if i not in parents.tolist()]
    assert not set(leaves) & set(topo.inner.tolist())
