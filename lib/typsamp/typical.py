"""Typical acceptance: Medusa's verification rule (chapters 5 and 6).

Cai et al. (2024, §2.3.1) replace speculative sampling's coin flip by a threshold on the
target's own distribution. With p_i the target's warped distribution at draft position
i and H(p_i) its entropy in nats, draft x_i is accepted when

    p_i(x_i) > τ_i = min(ε, δ · exp(−H(p_i)))

which is η-sampling's threshold (Hewitt et al. 2022) with ε = η and δ = √η; Medusa's
defaults ε = 0.09, δ = 0.3 are exactly that pair. The accepted prefix stops at the first
failure; one extra token is then emitted at the first failing position n (or at position
γ+1 when every draft passed).

**Medusa's rule as shipped.** Read in ``FasterDecoding/Medusa``,
``medusa/model/medusa_model.py`` at commit 60eeab92e98adb0e787987493b11fa38535a8260 and
``medusa/model/utils.py`` at commit 2b8981448074423a09aec01f4c79a0c0c47f5317:
``medusa_generate`` calls ``generate_candidates(medusa_logits, logits, tree_indices,
retrieve_indices)`` without a temperature, so its default ``temperature=0`` applies and
the first candidate of every step is ``argmax`` of the base model's logits, at every
temperature (the paper's §2.3.1: the first token is decoded greedily and always
accepted). The heads' candidates are deterministic ``torch.topk``. ``evaluate_posterior``
(default ``fast=True``) computes ``softmax(logits / T)``, the entropy
−Σ p log(p + 1e-5), the threshold ``min(posterior_threshold, exp(−H) · posterior_alpha)``
(``medusa_generate`` passes 0.09 and 0.3, so ε is ``posterior_threshold`` and δ is
``posterior_alpha``), keeps the candidates while ``p > threshold`` (cumulative product),
and commits the longest accepted prefix; the base model's logits at the first failing
position become the next step's logits, whose argmax is the next greedy first token.
The non-fast branch calls ``get_typical_posterior_mask`` with six arguments where the
function takes five, so it cannot run; ``get_typical_one_token`` (sampling from p
truncated to {p >= τ}) is reached only from ``generate_candidates`` with T > 0, which
``medusa_generate`` never asks for. So, as shipped, the extra token is **argmax p_n**
and typical acceptance with Medusa's own candidates is a deterministic decoder at every
T: temperature only moves the threshold.

Where the extra token comes from is therefore a choice, ``extra``:

* ``"greedy"``: argmax of p_n (lowest index among ties, as ``torch.argmax``): Medusa's
  own choice, the default of :class:`TypicalAcceptance`;
* ``"target"``: drawn from p_n itself (the default of the functional :func:`verify`
  and :func:`output_distribution`, which chapters 5, 6 and 8 call; one of the book's two
  sampled alternatives);
* ``"truncated"``: drawn from p_n restricted to {x : p_n(x) >= τ_n} and renormalised,
  the distribution of Medusa's ``get_typical_one_token``, code that Medusa's decoder
  never runs; the book's other sampled alternative, under which no token below the
  threshold is ever emitted. If nothing clears the threshold (possible only when δ > 1),
  p_n is used.

The rule never looks at q: with deterministic drafts it needs only the token ids, which
is the point of chapter 7. It is *not* exact: the output is not p. For one position with
drafts x ~ q and the accepted set A = {x : p(x) > τ}, the emitted token has law

    r(y) = q(y) 1[y ∈ A] + (1 − q(A)) e(y)

with e the extra token's distribution (one-hot on argmax p, p, or p truncated); for a
deterministic draft x̂, r = one-hot(x̂) when p(x̂) > τ and e otherwise.
:func:`output_distribution` computes r, :func:`acceptance_rate` computes q(A). A bonus
token (all γ accepted) comes from e at position γ+1, so text generated with γ drafts per
step mixes positions drawn from r and from e.

**Entropy and ties.** ``entropy="exact"`` (default) uses −Σ p log p. Medusa's code
computes −Σ p log(p + 1e-5), a slightly smaller entropy and so a slightly larger
threshold; ``entropy="medusa"`` uses that form and then compares ``p(x) > τ`` exactly as
Medusa's code does, so it reproduces Medusa's decisions; chapter 2 compares the two forms
on real distributions (they decide differently only when p(x) lies between the two
thresholds). The exact form fixes the tie rule: a draft passes only when p(x) exceeds
δ exp(−H) by more than the rounding error of computing it, a relative
``4 · eps · (1 + H)`` (eps the machine epsilon of the compute dtype: the error of a
V-term entropy sum grows with H); p(x) = τ, a tie, fails. The comparison with the cap ε
is exact. So a uniform row at δ = 1 (p(x) = 1/V = δ exp(−H) in exact arithmetic) never
passes, for every V and dtype, although rounding puts the computed 1/V above the computed
exp(−H) for about half of all V. :func:`threshold` returns τ itself.

**Trees** (chapter 10). With ``parents=`` (:mod:`typsamp.tree`; p [B, N+1, V], p[:, 0]
after the last committed token, p[:, 1 + i] after candidate i) the rule verifies a tree as
Medusa's ``evaluate_posterior`` (``fast=True``, same file and commit) does over its
retrieved paths: node i passes when p_parent(x_i) > τ(p_parent); a path is accepted up to
its first failing node (cumulative product); the longest accepted length wins; among the
paths that reach it, the one whose accepted prefix has the largest likelihood
Σ log p(x) (``torch.argmax``: the first best path in retrieve order on a tie) is chosen;
the next token is drawn per ``extra`` from p after the accepted prefix (Medusa: its
argmax). Paths sharing the accepted prefix give the same outcome, so this is: the deepest
node whose whole root path passes, ties by the prefix's likelihood, then by the first leaf
path in Medusa's retrieve order that holds it (:attr:`typsamp.tree.Topology.retrieve`).
At T = 0 Medusa's branch accepts a node when its token is the parent's argmax and takes
the first longest path in retrieve order; with one-hot p (``Warp(temperature=0)``) a node
passes exactly when its token is the argmax (whenever min(ε, δ) < 1, as at Medusa's
defaults) and every passing path has likelihood log 1 = 0, so the rule above gives the same. One difference:
Medusa pads a path shorter than the deepest with index -1, which reads an appended token
0 and the last node's logits, so where token 0 clears the threshold after a short path's
leaf, Medusa's accepted length runs past the leaf onto that phantom token; here a path
ends at its leaf. On a chain the tree kernel gives exactly the chain kernel's verdicts
(same generator use; tested).

Every function works on rows divided by their sums, so 16-bit rows that sum to 1 only
within rounding behave as their normalised selves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typsamp import checks, tree
from typsamp.sampling import RowSeeds, sample_weights
from typsamp.rules import Rule, Verdict, accepted_prefix, emit, normalised, row_sums

__all__ = ["TypicalAcceptance", "verify", "threshold", "acceptance_rate", "output_distribution",
           "EXTRA", "ENTROPY"]

#: Where the extra token comes from (see the module docstring).
EXTRA = ("greedy", "target", "truncated")
#: How the threshold's entropy is computed: exactly, or as Medusa's code does.
ENTROPY = ("exact", "medusa")

# The relative rounding margin of the entropy branch, per unit of (1 + H) and machine eps.
_MARGIN = 4


def _params(epsilon, delta) -> tuple[float, float]:
    epsilon = checks.real("epsilon", epsilon, low=0.0, high=1.0)
    delta = checks.real("delta", delta, low=0.0)
    return epsilon, delta


def _choice(name: str, value, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def _entropy(p: torch.Tensor, entropy: str) -> torch.Tensor:
    if entropy == "medusa":
        return -(p * torch.log(p + 1e-5)).sum(dim=-1)
    return torch.special.entr(p).sum(dim=-1)


def _threshold(p: torch.Tensor, epsilon: float, delta: float, entropy: str = "exact") -> torch.Tensor:
    """τ = min(ε, δ exp(−H(p))) over the last dimension; no checks (hot path)."""
    return torch.clamp(delta * torch.exp(-_entropy(p, entropy)), max=epsilon)


def _bound(p: torch.Tensor, epsilon: float, delta: float, entropy: str) -> torch.Tensor:
    """[...]: the value a candidate's p(x) must exceed under each row of ``p`` [..., V].

    min(ε, δ exp(−H)); for ``entropy="exact"`` the entropic branch is first raised by the
    rounding margin of the module docstring (x > min(a, b) is x > a or x > b).
    """
    H = _entropy(p, entropy)
    entropic = delta * torch.exp(-H)
    if entropy == "exact":
        entropic = entropic * (1 + _MARGIN * torch.finfo(p.dtype).eps * (1 + H))
    return torch.clamp(entropic, max=epsilon)


def _passes(p_x: torch.Tensor, p: torch.Tensor, epsilon: float, delta: float, entropy: str) -> torch.Tensor:
    """The acceptance test p(x) > τ with the tie rule of the module docstring.

    ``p_x`` [..., k] are probabilities of k candidate tokens under the rows ``p`` [..., V].
    """
    return p_x > _bound(p, epsilon, delta, entropy)[..., None]


def _extra_weights(p: torch.Tensor, tau: torch.Tensor, extra: str) -> torch.Tensor:
    """Unnormalised weights of the extra token's distribution e, rows [..., V]."""
    if extra == "target":
        return p
    if extra == "greedy":
        return torch.zeros_like(p).scatter_(-1, p.argmax(dim=-1, keepdim=True), 1.0)
    kept = p * (p >= tau[..., None])
    return torch.where(kept.sum(dim=-1, keepdim=True) > 0, kept, p)


def _float(x: torch.Tensor) -> torch.Tensor:
    return normalised(x, checks.compute_dtype(x))


@dataclass(frozen=True)
class TypicalAcceptance(Rule):
    """Medusa's typical acceptance as a rule object (see the module docstring).

    Args:
        epsilon: ε in [0, 1], the threshold's cap (Medusa's ``posterior_threshold``).
        delta: δ >= 0, the entropy factor (Medusa's ``posterior_alpha``).
        extra: ``"greedy"`` (Medusa's own: argmax p at the first failing position),
            ``"target"`` or ``"truncated"``.
        entropy: ``"exact"`` or ``"medusa"`` (−Σ p log(p + 1e-5), Medusa's code).

    ``kernel(..., parents=parents)`` verifies a tree as Medusa's ``evaluate_posterior``
    does (module docstring, "Trees").
    """

    epsilon: float = 0.09
    delta: float = 0.3
    extra: str = "greedy"
    entropy: str = "exact"

    name = "typical"
    needs_draft_probs = False
    supports_tree = True

    def __post_init__(self):
        epsilon, delta = _params(self.epsilon, self.delta)
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "delta", delta)
        object.__setattr__(self, "extra", _choice("extra", self.extra, EXTRA))
        object.__setattr__(self, "entropy", _choice("entropy", self.entropy, ENTROPY))

    def kernel(self, draft_tokens, draft_probs, target_probs, generator, parents=None) -> Verdict:
        if parents is not None:
            return self._tree(draft_tokens, target_probs, generator, parents)
        B, gamma = draft_tokens.shape
        p = _float(target_probs)
        p_x = p[:, :gamma].gather(-1, draft_tokens[..., None])               # p_i(x_i) [B, γ, 1]
        ok = _passes(p_x, p[:, :gamma], self.epsilon, self.delta, self.entropy).squeeze(-1)
        accepted = accepted_prefix(ok)                                       # [B]
        rows = torch.arange(B, device=p.device)
        return emit(draft_tokens, accepted, self._extra(p[rows, accepted], generator))

    def _extra(self, p_n: torch.Tensor, generator) -> torch.Tensor:
        """The extra token [B] from the rows p_n [B, V] at the end of the accepted path."""
        if self.extra == "greedy":
            return p_n.argmax(dim=-1)
        tau_n = _threshold(p_n, self.epsilon, self.delta, self.entropy)
        return sample_weights(_extra_weights(p_n, tau_n, self.extra), generator)

    def _tree(self, draft_tokens, target_probs, generator, parents) -> Verdict:
        """Medusa's ``evaluate_posterior`` (fast) on a tree (module docstring, "Trees")."""
        topo = tree.check_step(draft_tokens, target_probs, parents)
        B, N = draft_tokens.shape
        # What _float (normalised rows) would give, computed only where it is read: every
        # row's sum, p_parent(x_i) divided by its row's sum, the rows with children whole
        # (for the threshold's entropy), the path's end row for the extra token. The same
        # divisions of the same numbers, so the same bits, without passes over the leaves'
        # [262144]-wide rows.
        raw, total = row_sums(target_probs, checks.compute_dtype(target_probs))  # [B, N+1, V], [B, N+1, 1]
        rows = torch.arange(B, device=raw.device)[:, None]
        up = topo.parents + 1                                                # parent's row of p
        p_x = raw[rows, up, draft_tokens] / total[:, up, 0]                  # p_parent(x_i) [B, N]
        inner = raw[:, topo.inner] / total[:, topo.inner]                    # [B, I, V]
        passes = p_x > _bound(inner, self.epsilon, self.delta, self.entropy)[:, topo.up_inner]
        # Root paths: a node stands when it and all its ancestors pass; the likelihood of
        # its path is the sum of log p_parent(x) from the root down. One sweep per level.
        log_p = torch.where(passes, torch.log(p_x), 0)
        ok, loglik = passes, log_p
        true, zero = passes.new_ones(B, 1), log_p.new_zeros(B, 1)
        for _ in range(topo.max_depth - 1):
            ok = passes & torch.cat([true, ok], dim=1)[:, up]
            loglik = log_p + torch.cat([zero, loglik], dim=1)[:, up]
        # The deepest standing node; ties by path likelihood, then Medusa's retrieve order.
        depth = torch.where(ok, topo.depth[1:], 0)
        best = depth.max(dim=1, keepdim=True).values
        tied = ok & (depth == best)
        loglik = torch.where(tied, loglik, -torch.inf)
        tied = tied & (loglik == loglik.max(dim=1, keepdim=True).values)
        end = torch.where(tied, topo.retrieve, N).argmin(dim=1)
        end = torch.where(best.squeeze(1) > 0, end, -1)
        b = rows.squeeze(1)
        p_end = raw[b, end + 1] / total[b, end + 1]
        return tree.path_verdict(topo, draft_tokens, end, self._extra(p_end, generator))


def threshold(probs: torch.Tensor, epsilon: float = 0.09, delta: float = 0.3, *,
              entropy: str = "exact") -> torch.Tensor:
    """Medusa's acceptance threshold τ = min(ε, δ · exp(−H(p))) for each row of ``probs``.

    ``probs`` [..., V] are warped target distributions (an empty batch gives an empty
    result); returns float32 (float64 for float64 input) of shape [...]. A draft token x
    is accepted when p(x) > τ (with the tie rule of the module docstring).
    """
    checks.probs("probs", probs)
    epsilon, delta = _params(epsilon, delta)
    return _threshold(_float(probs), epsilon, delta, _choice("entropy", entropy, ENTROPY))


def verify(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    epsilon: float = 0.09,
    delta: float = 0.3,
    generator: torch.Generator | RowSeeds | None = None,
    *,
    draft_probs: torch.Tensor | None = None,
    extra: str = "target",
    entropy: str = "exact",
    validate: bool = True,
) -> Verdict:
    """Typical acceptance of γ draft tokens, batched, with no host synchronisation.

    ``TypicalAcceptance(epsilon, delta, extra, entropy).verify(...)``, kept as a function
    so the chapters and outside users keep working. Note the default ``extra="target"``
    (what this function has always done); Medusa's own rule is ``extra="greedy"``, the
    default of :class:`TypicalAcceptance`.

    Args:
        draft_tokens: int64 [B, γ].
        target_probs: [B, γ+1, V], the target's warped distributions at each draft
            position plus one more.
        epsilon, delta: the threshold's parameters, ε in [0, 1] and δ >= 0 (Medusa's
            ``posterior_threshold`` and ``posterior_alpha``; note the swapped names).
        generator: ``None``, a ``torch.Generator`` or a :class:`typsamp.rng.RowSeeds`, for
            the extra token (unused with ``extra="greedy"``).
        draft_probs: accepted and ignored, so that this function plugs into
            :func:`typsamp.generate.speculative` unchanged; the rule never reads q.
        extra: ``"greedy"``, ``"target"`` or ``"truncated"`` (see the module docstring).
        entropy: ``"exact"`` or ``"medusa"``.
        validate: check values (token range, rows summing to 1); shapes always.

    Returns:
        :class:`typsamp.rules.Verdict`, as :func:`typsamp.speculative.verify` does.
    """
    rule = TypicalAcceptance(epsilon, delta, extra, entropy)
    return rule.verify(draft_tokens, draft_probs, target_probs, generator, validate=validate)


def _draft(p: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
    """The draft as a distribution q [..., V]: token ids become one-hot rows."""
    if not isinstance(draft, torch.Tensor):
        raise checks.InputTypeError(f"`draft` must be a tensor, got {type(draft).__name__}")
    if draft.device != p.device:
        raise ValueError(f"`draft` is on {draft.device} but `p` is on {p.device}")
    V = p.shape[-1]
    if draft.dtype == torch.int64:
        if tuple(draft.shape) != tuple(p.shape[:-1]):
            raise ValueError(f"token-id `draft` must have shape {tuple(p.shape[:-1])}, got {tuple(draft.shape)}")
        if draft.numel() and (int(draft.min()) < 0 or int(draft.max()) >= V):
            raise ValueError(f"`draft` token ids must lie in [0, {V})")
        return torch.zeros_like(p).scatter_(-1, draft[..., None], 1.0)
    if not draft.is_floating_point():
        raise checks.InputTypeError(f"`draft` must be int64 token ids or floating probabilities, got {draft.dtype}")
    if tuple(draft.shape) != tuple(p.shape):
        raise ValueError(f"`draft` probabilities must have the shape of `p` {tuple(p.shape)}, got {tuple(draft.shape)}")
    checks.probs("draft", draft)
    return normalised(draft, p.dtype)


def _accepted_set(p: torch.Tensor, epsilon: float, delta: float, entropy: str) -> torch.Tensor:
    """bool [..., V]: which tokens pass the test under each row of p."""
    return _passes(p, p, epsilon, delta, entropy)


def acceptance_rate(p: torch.Tensor, draft: torch.Tensor, epsilon: float = 0.09,
                    delta: float = 0.3, *, entropy: str = "exact") -> torch.Tensor:
    """Probability that one draft is accepted: q(A), A = {x : p(x) > τ}.

    ``draft`` is either int64 token ids [...] (a deterministic draft: the result is
    1 or 0) or draft probabilities q [..., V]. Returns [...] (float32, or float64); an
    empty batch gives an empty result.
    """
    checks.probs("p", p)
    epsilon, delta = _params(epsilon, delta)
    entropy = _choice("entropy", entropy, ENTROPY)
    p = _float(p)
    q = _draft(p, draft)
    return (q * _accepted_set(p, epsilon, delta, entropy)).sum(dim=-1)


def output_distribution(p: torch.Tensor, draft: torch.Tensor, epsilon: float = 0.09,
                        delta: float = 0.3, *, extra: str = "target", entropy: str = "exact") -> torch.Tensor:
    """The exact law r of the token typical acceptance emits at one draft position.

    r(y) = q(y) 1[p(y) > τ] + (1 − q(A)) e(y), with e one-hot on argmax p
    (``extra="greedy"``), p (``"target"``) or p truncated to {p >= τ} (``"truncated"``);
    ``draft`` as in :func:`acceptance_rate`. ``typsamp.proofs.typical_one_position``
    derives it, the tests check it by simulation. Returns [..., V] (float32, or float64
    for float64 input); an empty batch gives an empty result.
    """
    checks.probs("p", p)
    epsilon, delta = _params(epsilon, delta)
    extra = _choice("extra", extra, EXTRA)
    entropy = _choice("entropy", entropy, ENTROPY)
    p = _float(p)
    q = _draft(p, draft)
    tau = _threshold(p, epsilon, delta, entropy)
    accepted = q * _accepted_set(p, epsilon, delta, entropy)
    e = _extra_weights(p, tau, extra)
    e = e / e.sum(dim=-1, keepdim=True)
    return accepted + (1 - accepted.sum(dim=-1, keepdim=True)).clamp(min=0) * e
