"""Speculative sampling: verify γ draft tokens against the target (chapter 3).

One verification step of Leviathan et al. (2023) and Chen et al. (2023). The draft
proposed tokens x_1..x_γ, sampled from its distributions q_1..q_γ; one forward pass of
the target gave p_1..p_{γ+1}. Walking left to right, draft x_i is accepted with
probability min(1, p_i(x_i) / q_i(x_i)). At the first rejection one token is drawn
from the residual norm(max(0, p_i - q_i)) and the step ends; if all γ drafts pass, a
bonus token is drawn from p_{γ+1}. The emitted tokens are distributed exactly as the
target sampling them one at a time (``typsamp.proofs`` checks this symbolically).

``draft_probs=None`` means the drafts were *deterministic* (greedy, or picked by a
rule, as Medusa's candidates are): q_i is then a point mass on x_i, the acceptance
probability is p_i(x_i), and the residual is p_i with x_i removed.

The rules are objects (:class:`typsamp.rules.Rule`): :class:`RejectionSampling` (name
``"rejection"``) and :class:`ExactMatch` (``"match"``). :func:`verify` and
:func:`verify_match` are thin functional wrappers around them. Both are vectorised over
batch and draft positions, with no Python loop over positions, rows or the vocabulary
and no host synchronisation once inputs are checked (pass ``validate=False``, or call
the rule's ``kernel``, in a hot loop whose inputs you built yourself), so they run under
``torch.compile`` and CUDA graphs. Every rule works on rows divided by their sums
(:func:`typsamp.rules.normalised`), so its output follows exactly the normalised target
even for 16-bit rows that sum to 1 only within rounding. :func:`verify_reference` is the
same rule written as plainly as possible, one row and one position at a time; the
chapter shows it and the tests use it as the oracle.

**Trees** (chapter 10). With ``parents=`` (int64 [N], ``parents[i]`` the candidate node
i follows, -1 for the last committed token; :mod:`typsamp.tree`) the kernels verify a tree
of N candidates against p [B, N+1, V], where p[:, 0] is the target's distribution after
the last committed token and p[:, 1 + i] the one after candidate i, and return a verdict
with ``path`` [B, D] (D the tree's depth). :class:`RejectionSampling` needs deterministic
candidates there (``draft_probs=None``; a q raises ``ValueError``) and runs *recursive
rejection*: at node v with children c_1, c_2, ... (in candidate order) it keeps c_1 with
probability p_v(x_{c_1}); on a rejection x_{c_1} is removed from p_v and the rest
renormalised, and c_2 is kept with probability r(x_{c_2}) / Σ r, and so on; the walk
descends into the first child kept; when every child fails, the extra token comes from
the final residual, and at a leaf it is the bonus token from p_leaf. A child repeating an
earlier sibling's token has residual 0 and is never kept. The emitted tokens follow p
exactly (:func:`typsamp.proofs.tree_step_exact` proves it; the chi-square tests in
``tests/test_tree.py`` check it). :class:`ExactMatch` samples y_v ~ p_v at every node and
descends into the first child whose token is y_v, else emits y_v: also exact. Each node
gets its own uniform, drawn in one call as the chain rule draws them, so on a chain
(``parents = arange(-1, N-1)``) both tree kernels consume the generator exactly as their
chain kernels and return the same verdicts (tested). The loop runs over the tree's
depth only; there is no host synchronisation beyond the first sight of a ``parents``
tensor (:func:`typsamp.tree.topology`).

**Lenience** (Leviathan et al. 2023, Appendix A.5): ``RejectionSampling(lenience=l)``
with l in (0, 1] accepts x with probability min(1, p(x) / (l q(x))) and, at a rejection,
draws from norm(max(0, p - l q)). l = 1 is the exact rule; smaller l accepts more drafts
and the output is no longer p. Its one-position law is :func:`lenient_output_distribution`:

    r(y) = min(q(y), p(y)/l) + (1 - β) (p(y) - l q(y))_+ / (1 - l β),   β = Σ_y min(q(y), p(y)/l)

(β is the acceptance rate). As l → 0 every draft the target allows (p(x) > 0) is kept;
l = 0 itself (the paper's "always accept") is not allowed, because a draft with
p(x) = 0 would then be kept although the target can never produce it.

Also the theory of Leviathan et al. §3: :func:`acceptance_rate`,
:func:`expected_tokens`, :func:`speedup`, :func:`optimal_gamma`. Draft lengths in the
theory are bounded by :data:`MAX_GAMMA` (10**6): no decoder drafts more per step, and
the bound keeps :func:`optimal_gamma`'s search to milliseconds.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from typsamp import checks, tree
from typsamp.sampling import RowSeeds, sample_weights, uniform
from typsamp.rules import Rule, Verdict, accepted_prefix, check_step, emit, normalised, row_sums

__all__ = [
    "Verdict",
    "RejectionSampling",
    "ExactMatch",
    "verify",
    "verify_reference",
    "verify_match",
    "lenient_output_distribution",
    "tree_rejection_law",
    "acceptance_rate",
    "expected_tokens",
    "speedup",
    "optimal_gamma",
    "MAX_GAMMA",
]

#: The largest draft length the theory functions accept (and ``optimal_gamma`` searches).
MAX_GAMMA = 10**6


def _lenience(lenience) -> float:
    return checks.real("lenience", lenience, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class RejectionSampling(Rule):
    """Speculative sampling's rule (Leviathan et al. 2023; Chen et al. 2023), batched.

    ``lenience`` l in (0, 1]: 1 (default) is the exact rule; l < 1 is Leviathan et al.'s
    inexact relaxation (Appendix A.5; see the module docstring). ``draft_probs=None``
    means point-mass drafts. All arithmetic is float32 (float64 stays float64).
    ``kernel(..., parents=parents)`` verifies a tree of deterministic candidates by
    recursive rejection (module docstring, "Trees"; lenience 1 only).
    """

    lenience: float = 1.0

    name = "rejection"
    needs_draft_probs = True
    supports_tree = True

    def __post_init__(self):
        object.__setattr__(self, "lenience", _lenience(self.lenience))

    def kernel(self, draft_tokens, draft_probs, target_probs, generator, parents=None) -> Verdict:
        if parents is not None:
            return self._tree(draft_tokens, draft_probs, target_probs, generator, parents)
        B, gamma = draft_tokens.shape
        dtype = checks.compute_dtype(target_probs)
        p = normalised(target_probs, dtype)
        x = draft_tokens[..., None]
        p_x = p[:, :gamma].gather(-1, x).squeeze(-1)                      # p_i(x_i)  [B, γ]
        if draft_probs is None:
            q_x = torch.ones_like(p_x)                                     # point mass
        else:
            q = normalised(draft_probs, dtype)
            q_x = q.gather(-1, x).squeeze(-1)                              # q_i(x_i)  [B, γ]
        lenient = self.lenience != 1.0
        if lenient:
            q_x = q_x * self.lenience

        # Accept x_i with probability min(1, p/(l q)): u < p/(l q), written u*l*q < p.
        u = uniform((B, gamma), dtype=dtype, device=p.device, generator=generator)
        accepted = accepted_prefix(u * q_x < p_x)                          # [B]

        # The extra token's distribution at position n = accepted: the residual
        # max(0, p_n - l q_n) after a rejection, or p_{γ+1} itself when all γ passed.
        rows = torch.arange(B, device=p.device)
        p_n = p[rows, accepted]                                            # [B, V]
        rejected = (accepted < gamma)[:, None]
        at = accepted.clamp(max=gamma - 1)
        if draft_probs is None:
            q_n = torch.zeros_like(p_n).scatter_(-1, draft_tokens[rows, at][:, None], 1.0)
        else:
            q_n = q[rows, at]
        if lenient:
            q_n = q_n * self.lenience
        residual = torch.where(rejected, (p_n - q_n).clamp(min=0), p_n)
        # A residual with no mass means p_n <= l q_n everywhere (so l = 1 and p_n = q_n;
        # for a point mass: p_n one-hot on x_n), where a rejection has probability 0;
        # fall back to p_n rather than divide by 0.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
        extra = sample_weights(residual, generator)
        return emit(draft_tokens, accepted, extra)

    def _tree(self, draft_tokens, draft_probs, target_probs, generator, parents) -> Verdict:
        """Recursive rejection over each node's deterministic children (module docstring)."""
        if draft_probs is not None:
            raise ValueError("RejectionSampling verifies a tree only for deterministic candidates "
                             "(draft_probs=None, as Medusa's top-k candidates are); got draft_probs")
        if self.lenience != 1.0:
            raise ValueError(f"RejectionSampling verifies a tree only with lenience 1 (the exact rule), "
                             f"got lenience={self.lenience}")
        topo = tree.check_step(draft_tokens, target_probs, parents)
        B, N = draft_tokens.shape
        dtype = checks.compute_dtype(target_probs)
        # normalised(target_probs) read only where the walk reads it: every row's sum, then
        # the visited rows divided by theirs (the same divisions, the same bits, without a
        # pass over every leaf's row).
        p, total = row_sums(target_probs, dtype)                           # [B, N+1, V], [B, N+1, 1]
        # One uniform per node, drawn as the chain rule draws one per draft (the same
        # stream on a chain); a node's number is used only when the walk tests it.
        u = uniform((B, N), dtype=dtype, device=p.device, generator=generator)
        rows = torch.arange(B, device=p.device)
        earlier = torch.ones(topo.width, topo.width, dtype=torch.bool, device=p.device).tril(-1)
        at = torch.full((B,), -1, dtype=torch.long, device=p.device)       # the walk's node
        going = torch.ones(B, dtype=torch.bool, device=p.device)
        for _ in range(topo.max_depth):
            kids = topo.children[at + 1]                                   # [B, W]
            valid = kids >= 0
            index = kids.clamp(min=0)
            x = draft_tokens.gather(1, index)                              # children's tokens
            p_x = p[rows, at + 1].gather(1, x) / total[rows, at + 1]        # p_v(x_c)  [B, W]
            # A child whose token an earlier sibling already carried has residual 0.
            repeat = ((x[:, :, None] == x[:, None, :]) & valid[:, None, :] & earlier).any(-1)
            r_x = torch.where(valid & ~repeat, p_x, 0)
            # Child j is tried after children 1..j-1 failed: the residual then has mass
            # 1 - (their p), and j is kept with probability r(x_j) / that mass.
            mass = 1 - (r_x.cumsum(1) - r_x)
            ok = valid & (u.gather(1, index) * mass < r_x)
            first = ok.long().argmax(dim=1)                                # first kept child
            going = going & ok.any(dim=1)
            at = torch.where(going, kids.gather(1, first[:, None]).squeeze(1), at)
        # The walk ended at node `at`: every child was rejected (or it has none, a leaf);
        # the extra token comes from p_at with those children's tokens removed.
        kids = topo.children[at + 1]
        x = draft_tokens.gather(1, kids.clamp(min=0))
        p_n = p[rows, at + 1] / total[rows, at + 1]
        removed = torch.zeros_like(p_n).scatter_add_(1, x, (kids >= 0).to(dtype)) > 0
        residual = p_n.masked_fill(removed, 0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
        return tree.path_verdict(topo, draft_tokens, at, sample_weights(residual, generator))


@dataclass(frozen=True)
class ExactMatch(Rule):
    """The exact-match rule: keep draft x_i while the target's own sample y_i ~ p_i equals it.

    The target samples y_1..y_{γ+1} (one uniform per position); drafts are kept up to
    the first i with y_i != x_i, and y_i is emitted there (y_{γ+1} when all match). Every
    emitted token is the target's own sample given a prefix equal to its own earlier
    samples, so the output is exactly p, like :class:`RejectionSampling`; but a draft
    x ~ q is kept with probability Σ_x p(x) q(x) instead of Σ_x min(p(x), q(x)), which is
    smaller (chapter 5). ``draft_probs`` is accepted and ignored.
    """

    name = "match"
    needs_draft_probs = False
    supports_tree = True

    def kernel(self, draft_tokens, draft_probs, target_probs, generator, parents=None) -> Verdict:
        gamma = draft_tokens.shape[1]
        if parents is not None:
            topo = tree.check_step(draft_tokens, target_probs, parents)
        p = normalised(target_probs, checks.compute_dtype(target_probs))
        y = sample_weights(p, generator)                                  # [B, γ+1]
        if parents is None:
            accepted = accepted_prefix(y[:, :gamma] == draft_tokens)
            return emit(draft_tokens, accepted, y.gather(1, accepted[:, None]).squeeze(1))
        # A tree: y[:, 1 + v] is the target's own sample after node v; descend to the
        # first child carrying it, else emit it.
        at = torch.full((draft_tokens.shape[0],), -1, dtype=torch.long, device=p.device)
        going = torch.ones_like(at, dtype=torch.bool)
        for _ in range(topo.max_depth):
            kids = topo.children[at + 1]
            ok = (kids >= 0) & (draft_tokens.gather(1, kids.clamp(min=0)) == y.gather(1, (at + 1)[:, None]))
            going = going & ok.any(dim=1)
            at = torch.where(going, kids.gather(1, ok.long().argmax(dim=1)[:, None]).squeeze(1), at)
        return tree.path_verdict(topo, draft_tokens, at, y.gather(1, (at + 1)[:, None]).squeeze(1))


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | RowSeeds | None = None,
    *,
    validate: bool = True,
    lenience: float = 1.0,
) -> Verdict:
    """Speculative sampling's verification, batched: ``RejectionSampling(lenience).verify``.

    Args:
        draft_tokens: int64 [B, γ], the drafts x_1..x_γ of each row.
        draft_probs: [B, γ, V], the draft distributions the drafts were sampled from
            (already warped: temperature and truncation applied), or ``None`` when the
            drafts were deterministic (q_i is the point mass on x_i).
        target_probs: [B, γ+1, V], the target's warped distributions at each draft
            position plus one more (for the bonus token).
        generator: ``None``, a ``torch.Generator`` on the tensors' device, or a
            :class:`typsamp.rng.RowSeeds` (one stream per row).
        validate: check values too (see :func:`typsamp.rules.check_step`); shapes are
            always checked.
        lenience: Leviathan et al.'s lenience l in (0, 1]; 1 is exact.

    Returns:
        :class:`Verdict`. All arithmetic is float32 (float64 stays float64).
    """
    return RejectionSampling(lenience).verify(draft_tokens, draft_probs, target_probs, generator,
                                              validate=validate)


def verify_reference(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    lenience: float = 1.0,
) -> Verdict:
    """The same rule as :func:`verify`, one row and one position at a time.

    Deliberately plain: it reads like the algorithm in the paper and serves
    as the oracle in the tests. Slow; do not use it to generate text. It
    draws its uniforms one at a time, so it takes a ``torch.Generator`` or
    ``None``, not per-row seeds.
    """
    lenience = _lenience(lenience)
    B, gamma, V = check_step(draft_tokens, draft_probs, target_probs,
                             generator, True)
    if isinstance(generator, RowSeeds):
        raise checks.InputTypeError(
            "`generator` of verify_reference must be a torch.Generator "
            "or None (it draws one number at a time)")
    device = target_probs.device

    def uniform_one() -> float:
        u = torch.rand((), dtype=torch.float64, device=device,
                       generator=generator)
        return float(u)

    def draw(weights: torch.Tensor) -> int:
        """One token from unnormalised weights: invert the cumulative sum."""
        cdf = weights.cumsum(0)
        below = cdf <= uniform_one() * float(cdf[-1])
        return int(below.sum().clamp(max=V - 1))

    tokens = torch.full((B, gamma + 1), -1, dtype=torch.int64)
    accepted = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        for i in range(gamma + 1):
            p = target_probs[b, i].double().cpu()
            p = p / p.sum()                     # the normalised target
            if i == gamma:
                # every draft accepted: the bonus token, from p_{γ+1}
                tokens[b, i] = draw(p)
                break
            x = int(draft_tokens[b, i])
            if draft_probs is None:
                q = torch.zeros(V, dtype=torch.float64)
                q[x] = 1.0                      # deterministic draft
            else:
                q = draft_probs[b, i].double().cpu()
                q = q / q.sum()
            # accept with probability min(1, p(x) / (l q(x)))
            if uniform_one() * lenience * q[x] < p[x]:
                tokens[b, i] = x
                accepted[b] += 1
                continue
            # reject: draw from norm(max(0, p - l q)), or p if that is 0
            residual = (p - lenience * q).clamp(min=0)
            tokens[b, i] = draw(residual if residual.sum() > 0 else p)
            break
    device = draft_tokens.device
    return Verdict(tokens=tokens.to(device), accepted=accepted.to(device))


def verify_match(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | RowSeeds | None = None,
    *,
    draft_probs: torch.Tensor | None = None,
    validate: bool = True,
) -> Verdict:
    """The exact-match rule, functional form: ``ExactMatch().verify`` (see :class:`ExactMatch`).

    ``draft_probs`` is accepted and ignored so the rule plugs into
    :func:`typsamp.generate.speculative`.
    """
    return ExactMatch().verify(draft_tokens, draft_probs, target_probs, generator, validate=validate)


def tree_rejection_law(draft_tokens: torch.Tensor, target_probs: torch.Tensor, parents
                       ) -> dict[tuple[int, ...], float]:
    """The exact law of one :class:`RejectionSampling` step on one row's tree.

    Every branch of recursive rejection is enumerated in float64: at node v the residual r
    starts as p_v; child c_j (candidate order) is kept with probability r(x_j) / Σ r and the
    walk goes on below it, else x_j is removed from r; after the last child the token comes
    from r / Σ r; at a leaf from p_v. Returns {emitted tokens: probability} over outcomes of
    positive probability. It equals :func:`typsamp.tree.target_law` (the target's own
    walk), which is the exactness the chapter shows; ``tests/test_tree.py`` checks both.

    Args: ``draft_tokens`` int64 [N], ``target_probs`` [N + 1, V], ``parents`` int64 [N]
    or a :class:`typsamp.tree.TreeSpec`.
    """
    x, p, kids = tree.law_inputs(draft_tokens, target_probs, parents)
    law: dict[tuple[int, ...], float] = {}

    def add(tokens, prob):
        if prob > 0:
            law[tokens] = law.get(tokens, 0.0) + prob

    def walk(v, prefix, prob):
        residual = list(p[v + 1])
        for c in kids[v + 1]:
            total = sum(residual)
            keep = residual[x[c]] / total if total > 0 else 0.0
            if keep > 0:
                walk(c, prefix + (x[c],), prob * keep)
            prob *= 1 - keep
            residual[x[c]] = 0.0
        total = sum(residual)
        if prob > 0 and total > 0:
            for y, r in enumerate(residual):
                add(prefix + (y,), prob * r / total)

    walk(-1, (), 1.0)
    return law


def lenient_output_distribution(p: torch.Tensor, q: torch.Tensor, lenience: float) -> torch.Tensor:
    """The exact law of the token one lenient step emits at one position (draft x ~ q).

    r(y) = min(q(y), p(y)/l) + (1 - β) (p(y) - l q(y))_+ / (1 - l β), with
    β = Σ_y min(q(y), p(y)/l) the acceptance rate (module docstring). At l = 1 this is p.
    ``p`` and ``q`` [..., V] must broadcast; rows are normalised first. Returns float32
    (float64 if either input is float64).
    """
    lenience = _lenience(lenience)
    p, q = _pair(p, q)
    kept = torch.minimum(q, p / lenience)                                  # accept and emit y
    beta = kept.sum(dim=-1, keepdim=True)
    residual = (p - lenience * q).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)                              # = 1 - l β
    resampled = torch.where(mass > 0, residual / torch.where(mass > 0, mass, 1), 0)
    return kept + (1 - beta).clamp(min=0) * resampled


# ---------------------------------------------------------------------------------------
# Theory (Leviathan et al. 2023, section 3)


def _pair(p, q) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two probability tensors that must broadcast; return them normalised."""
    p, q = checks.probs_pair("p", p, "q", q)
    return normalised(p, p.dtype), normalised(q, q.dtype)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """α = Σ_x min(p(x), q(x)) = 1 - TV(p, q), over the last dimension.

    ``p`` and ``q`` [..., V] must broadcast (an empty batch gives an empty result).
    Returns float32, or float64 if either input is float64.
    """
    p, q = _pair(p, q)
    return torch.minimum(p, q).sum(dim=-1)


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _number(name: str, value, *, integer: bool) -> torch.Tensor:
    """A real (or, with ``integer``, an integer) scalar or tensor: no bool, str or None."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in _INTEGER_DTYPES):
            raise checks.InputTypeError(f"`{name}` must be a real tensor, got dtype {value.dtype}")
        t = value
    else:
        if isinstance(value, bool) or value is None or isinstance(value, (str, bytes)):
            raise checks.InputTypeError(f"`{name}` must be a number or a tensor, got {type(value).__name__}")
        if isinstance(value, numbers.Integral) and abs(int(value)) > 2**62:
            raise ValueError(f"`{name}` is too large: {value}")
        try:
            t = torch.as_tensor(value)
            if t.is_floating_point():
                t = torch.as_tensor(value, dtype=torch.float64)      # Python floats are doubles
        except (TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise ValueError(f"`{name}` is not a real number or array of them ({error})") from None
        if not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
            raise checks.InputTypeError(f"`{name}` must hold real numbers, got dtype {t.dtype}")
    if integer:
        if t.is_floating_point():
            raise ValueError(f"`{name}` must be a non-negative integer, got a floating value")
        if t.numel() and ((t < 0).any() or (t > MAX_GAMMA).any()):
            raise ValueError(f"`{name}` must be an integer in [0, {MAX_GAMMA}]")
        return t.to(torch.float64)
    t = t.to(torch.float64)
    if t.numel() and not torch.isfinite(t).all():
        raise ValueError(f"`{name}` must be finite")
    return t


def _alpha_gamma(alpha, gamma):
    alpha = _number("alpha", alpha, integer=False)
    if alpha.numel() and ((alpha < 0).any() or (alpha > 1).any()):
        raise ValueError("`alpha` must lie in [0, 1]")
    gamma = _number("gamma", gamma, integer=True)
    try:
        torch.broadcast_shapes(alpha.shape, gamma.shape)
    except RuntimeError:
        raise ValueError(f"the shapes of `alpha` {tuple(alpha.shape)} and `gamma` {tuple(gamma.shape)} "
                         "do not broadcast") from None
    return alpha, gamma


def _expected_tokens(alpha: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    one = alpha == 1
    safe = torch.where(one, torch.zeros_like(alpha), alpha)
    return torch.where(one, gamma + 1, (1 - safe ** (gamma + 1)) / (1 - safe))


def expected_tokens(alpha, gamma) -> torch.Tensor:
    """E[tokens per step] = (1 - α^{γ+1}) / (1 - α); γ + 1 at α = 1 (Leviathan et al. eq. 1).

    ``alpha`` in [0, 1] and ``gamma`` an integer in [0, MAX_GAMMA], numbers or tensors
    that broadcast; bools, strings and None are refused. Returns float64.
    """
    alpha, gamma = _alpha_gamma(alpha, gamma)
    return _expected_tokens(alpha, gamma)


def speedup(alpha, gamma, c) -> torch.Tensor:
    """Expected wall-time speed-up (1 - α^{γ+1}) / ((1 - α)(γc + 1)) (Leviathan et al. Thm 3.8).

    ``c`` >= 0 (finite) is the cost of one draft forward pass relative to one target pass.
    """
    alpha, gamma = _alpha_gamma(alpha, gamma)
    c = _number("c", c, integer=False)
    if c.numel() and (c < 0).any():
        raise ValueError("`c` must be >= 0")
    try:
        torch.broadcast_shapes(alpha.shape, gamma.shape, c.shape)
    except RuntimeError:
        raise ValueError("the shapes of `alpha`, `gamma` and `c` do not broadcast") from None
    return _expected_tokens(alpha, gamma) / (gamma * c + 1)


def optimal_gamma(alpha: float, c: float, max_gamma: int = 128) -> int:
    """The integer γ in 1..max_gamma that maximises :func:`speedup` (smallest on ties).

    ``max_gamma`` is at most :data:`MAX_GAMMA` (the search evaluates every γ).
    """
    max_gamma = checks.integer("max_gamma", max_gamma, low=1)
    if max_gamma > MAX_GAMMA:
        raise ValueError(f"`max_gamma` must be <= {MAX_GAMMA}, got {max_gamma}")
    alpha = checks.real("alpha", alpha, low=0.0, high=1.0)
    c = checks.real("c", c, low=0.0)
    gammas = torch.arange(1, max_gamma + 1, dtype=torch.float64)
    values = _expected_tokens(torch.tensor(alpha, dtype=torch.float64), gammas) / (gammas * c + 1)
    return int(values.argmax()) + 1
