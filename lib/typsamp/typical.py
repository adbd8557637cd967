"""Typical acceptance: Medusa's verification rule (chapters 5 and 6).

Cai et al. (2024, §2.3.1) replace speculative sampling's coin flip by a threshold on the
target's own distribution. With p_i the target's warped distribution at draft position
i and H(p_i) its entropy in nats, draft x_i is accepted when

    p_i(x_i) > τ_i = min(ε, δ · exp(−H(p_i)))

which is η-sampling's threshold (Hewitt et al. 2022) with ε = η and δ = √η; Medusa's
defaults ε = 0.09, δ = 0.3 are exactly that pair. The accepted prefix stops at the first
failure; one extra token is then drawn at the first failing position (or at position
γ+1 when every draft passed), as speculative sampling does.

Where the extra token comes from is a choice:

* ``extra="target"`` (default, as DESIGN.md specifies): from p_n itself;
* ``extra="truncated"``: from p_n restricted to {x : p_n(x) >= τ_n} and renormalised,
  which is what Medusa's code does (``get_typical_one_token``); then no token below
  the threshold is ever emitted. If nothing clears the threshold (possible only when
  δ > 1), p_n is used.

The rule never looks at q: with deterministic drafts it needs only the token ids, which
is the point of chapter 7. It is *not* exact: the output is not p. For one position with
drafts x ~ q and the accepted set A = {x : p(x) > τ}, the emitted token has law

    r(y) = q(y) 1[y ∈ A] + (1 − q(A)) e(y)

with e the extra token's distribution (p, or p truncated); for a deterministic draft x̂,
r = one-hot(x̂) when p(x̂) > τ and e otherwise. :func:`output_distribution` computes r,
:func:`acceptance_rate` computes q(A). A bonus token (all γ accepted) is drawn from e at
position γ+1, so text generated with γ drafts per step mixes positions drawn from r
and from e.

Entropy is the exact −Σ p log p. Medusa's code computes −Σ p log(p + 1e-5), a slightly
smaller entropy and so a slightly larger threshold; chapter 2 compares the decisions of
the two forms on real distributions.
"""

from __future__ import annotations

import torch

from typsamp import checks
from typsamp.speculative import Verdict, check_step, emit
from typsamp.sampling import sample_weights

__all__ = ["verify", "threshold", "acceptance_rate", "output_distribution", "EXTRA"]

#: Where the extra token is drawn from (see the module docstring).
EXTRA = ("target", "truncated")


def _params(epsilon, delta) -> tuple[float, float]:
    epsilon = checks.real("epsilon", epsilon, low=0.0, high=1.0)
    delta = checks.real("delta", delta, low=0.0)
    return epsilon, delta


def _extra(extra) -> str:
    if not isinstance(extra, str) or extra not in EXTRA:
        raise ValueError(f"`extra` must be one of {EXTRA}, got {extra!r}")
    return extra


def _threshold(p: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """τ = min(ε, δ exp(−H(p))) over the last dimension; no checks (hot path)."""
    entropy = torch.special.entr(p).sum(dim=-1)
    return torch.clamp(delta * torch.exp(-entropy), max=epsilon)


def _extra_weights(p: torch.Tensor, tau: torch.Tensor, extra: str) -> torch.Tensor:
    """Unnormalised weights of the extra token's distribution e, rows [..., V]."""
    if extra == "target":
        return p
    kept = p * (p >= tau[..., None])
    return torch.where(kept.sum(dim=-1, keepdim=True) > 0, kept, p)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(checks.compute_dtype(x))


def threshold(probs: torch.Tensor, epsilon: float = 0.09, delta: float = 0.3) -> torch.Tensor:
    """Medusa's acceptance threshold τ = min(ε, δ · exp(−H(p))) for each row of ``probs``.

    ``probs`` [..., V] are warped target distributions; returns float32 (float64 for
    float64 input) of shape [...]. A draft token x is accepted when p(x) > τ.
    """
    checks.probs("probs", probs)
    epsilon, delta = _params(epsilon, delta)
    return _threshold(_float(probs), epsilon, delta)


def verify(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    epsilon: float = 0.09,
    delta: float = 0.3,
    generator: torch.Generator | None = None,
    *,
    draft_probs: torch.Tensor | None = None,
    extra: str = "target",
    validate: bool = True,
) -> Verdict:
    """Typical acceptance of γ draft tokens, batched, with no host synchronisation.

    Args:
        draft_tokens: int64 [B, γ].
        target_probs: [B, γ+1, V], the target's warped distributions at each draft
            position plus one more.
        epsilon, delta: the threshold's parameters, ε in [0, 1] and δ >= 0 (Medusa's
            ``posterior_threshold`` and ``posterior_alpha``; note the swapped names).
        generator: optional ``torch.Generator`` for the extra token.
        draft_probs: accepted and ignored, so that this function plugs into
            :func:`typsamp.generate.speculative` unchanged; the rule never reads q.
        extra: ``"target"`` or ``"truncated"`` (see the module docstring).
        validate: check values (token range, rows summing to 1); shapes always.

    Returns:
        :class:`typsamp.speculative.Verdict`, as :func:`typsamp.speculative.verify` does.
    """
    epsilon, delta = _params(epsilon, delta)
    extra = _extra(extra)
    if draft_probs is not None and not isinstance(draft_probs, torch.Tensor):
        raise checks.InputTypeError(f"`draft_probs` must be a tensor or None, got {type(draft_probs).__name__}")
    B, gamma, V = check_step(draft_tokens, None, target_probs, generator, validate)
    p = _float(target_probs)
    tau = _threshold(p, epsilon, delta)                                   # [B, γ+1]
    p_x = p[:, :gamma].gather(-1, draft_tokens[..., None]).squeeze(-1)    # p_i(x_i)
    ok = p_x > tau[:, :gamma]
    accepted = ok.long().cumprod(dim=1).sum(dim=1)                        # [B]
    rows = torch.arange(B, device=p.device)
    weights = _extra_weights(p[rows, accepted], tau[rows, accepted], extra)
    return emit(draft_tokens, accepted, sample_weights(weights, generator))


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
    return draft.to(p.dtype)


def acceptance_rate(p: torch.Tensor, draft: torch.Tensor, epsilon: float = 0.09,
                    delta: float = 0.3) -> torch.Tensor:
    """Probability that one draft is accepted: q(A), A = {x : p(x) > τ}.

    ``draft`` is either int64 token ids [...] (a deterministic draft: the result is
    1 or 0) or draft probabilities q [..., V]. Returns [...] (float32, or float64).
    """
    checks.probs("p", p)
    epsilon, delta = _params(epsilon, delta)
    p = _float(p)
    q = _draft(p, draft)
    keep = p > _threshold(p, epsilon, delta)[..., None]
    return (q * keep).sum(dim=-1)


def output_distribution(p: torch.Tensor, draft: torch.Tensor, epsilon: float = 0.09,
                        delta: float = 0.3, *, extra: str = "target") -> torch.Tensor:
    """The exact law r of the token typical acceptance emits at one draft position.

    r(y) = q(y) 1[p(y) > τ] + (1 − q(A)) e(y), with e = p (``extra="target"``) or p
    truncated to {p >= τ} (``"truncated"``); ``draft`` as in :func:`acceptance_rate`.
    ``typsamp.proofs.typical_one_position`` derives it, the tests check it by simulation.
    Returns [..., V] (float32, or float64 for float64 input).
    """
    checks.probs("p", p)
    epsilon, delta = _params(epsilon, delta)
    extra = _extra(extra)
    p = _float(p)
    q = _draft(p, draft)
    tau = _threshold(p, epsilon, delta)
    accepted = q * (p > tau[..., None])
    e = _extra_weights(p, tau, extra)
    e = e / e.sum(dim=-1, keepdim=True)
    return accepted + (1 - accepted.sum(dim=-1, keepdim=True)).clamp(min=0) * e
