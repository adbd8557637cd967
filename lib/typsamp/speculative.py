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

:func:`verify` is vectorised over batch and draft positions, with no Python loop over
positions, rows or the vocabulary and no host synchronisation once inputs are checked
(pass ``validate=False`` in a hot loop whose inputs you built yourself), so it runs under
``torch.compile`` and CUDA graphs. :func:`verify_reference` is the same rule written
as plainly as possible, one row and one position at a time; the chapter shows it and
the tests use it as the oracle.

Also the theory of Leviathan et al. §3: :func:`acceptance_rate`,
:func:`expected_tokens`, :func:`speedup`, :func:`optimal_gamma`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from typsamp import checks
from typsamp.sampling import sample_weights

__all__ = [
    "Verdict",
    "verify",
    "verify_reference",
    "verify_match",
    "acceptance_rate",
    "expected_tokens",
    "speedup",
    "optimal_gamma",
]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification step for a batch of B rows.

    Attributes:
        tokens: int64 [B, γ+1]. Row b holds its accepted drafts, then the one token the
            rule adds (resampled at the first rejection, or the bonus token when all γ
            drafts were accepted), then -1 padding.
        accepted: int64 [B], how many drafts were accepted, 0..γ. Row b emits
            ``accepted[b] + 1`` tokens.
    """

    tokens: torch.Tensor
    accepted: torch.Tensor

    @property
    def emitted(self) -> torch.Tensor:
        """int64 [B]: tokens emitted per row, ``accepted + 1``."""
        return self.accepted + 1


def check_step(draft_tokens, draft_probs, target_probs, generator, validate: bool):
    """Validate one verification step's inputs (shared by every verification rule).

    Shapes, dtypes and devices are always checked (no synchronisation needed); values
    (token ids in range, probabilities non-negative and summing to 1) only when
    ``validate`` is true, because those checks read the tensors back to the host.
    Returns ``(B, gamma, V)``.
    """
    checks.tensor("draft_tokens", draft_tokens)
    if draft_tokens.dtype != torch.int64:
        raise checks.InputTypeError(f"`draft_tokens` must be int64, got {draft_tokens.dtype}")
    if draft_tokens.dim() != 2:
        raise ValueError(f"`draft_tokens` must have shape [B, gamma], got {tuple(draft_tokens.shape)}")
    B, gamma = draft_tokens.shape
    if gamma < 1:
        raise ValueError("`draft_tokens` must hold at least one draft token (gamma >= 1)")
    checks.tensor("target_probs", target_probs, floating=True)
    if target_probs.dim() != 3 or tuple(target_probs.shape[:2]) != (B, gamma + 1):
        raise ValueError(
            f"`target_probs` must have shape [B, gamma + 1, V] = [{B}, {gamma + 1}, V], "
            f"got {tuple(target_probs.shape)}"
        )
    V = target_probs.shape[-1]
    if V < 1:
        raise ValueError("`target_probs` has an empty vocabulary dimension")
    devices = {"draft_tokens": draft_tokens.device, "target_probs": target_probs.device}
    if draft_probs is not None:
        checks.tensor("draft_probs", draft_probs, floating=True)
        if draft_probs.dim() != 3 or tuple(draft_probs.shape[:2]) != (B, gamma):
            raise ValueError(
                f"`draft_probs` must have shape [B, gamma, V] = [{B}, {gamma}, V], "
                f"got {tuple(draft_probs.shape)}"
            )
        if draft_probs.shape[-1] != V:
            raise ValueError(
                f"draft and target vocabularies differ: `draft_probs` has V = {draft_probs.shape[-1]}, "
                f"`target_probs` has V = {V}"
            )
        devices["draft_probs"] = draft_probs.device
    if len(set(devices.values())) > 1:
        where = ", ".join(f"`{name}` on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {where}")
    checks.generator("generator", generator, target_probs.device)
    if validate:
        if B > 0 and (int(draft_tokens.min()) < 0 or int(draft_tokens.max()) >= V):
            raise ValueError(f"`draft_tokens` must be token ids in [0, {V}), got values outside")
        if B > 0:
            checks.probs("target_probs", target_probs)
            if draft_probs is not None:
                checks.probs("draft_probs", draft_probs)
    return B, gamma, V


def emit(draft_tokens: torch.Tensor, accepted: torch.Tensor, extra: torch.Tensor) -> Verdict:
    """Assemble a :class:`Verdict`: accepted drafts, the extra token, then -1 padding."""
    B, gamma = draft_tokens.shape
    position = torch.arange(gamma + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    n = accepted[:, None]
    tokens = torch.where(position < n, padded, torch.where(position == n, extra[:, None], -1))
    return Verdict(tokens=tokens, accepted=accepted)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    validate: bool = True,
) -> Verdict:
    """Speculative sampling's verification, batched.

    Args:
        draft_tokens: int64 [B, γ], the drafts x_1..x_γ of each row.
        draft_probs: [B, γ, V], the draft distributions the drafts were sampled from
            (already warped: temperature and truncation applied), or ``None`` when the
            drafts were deterministic (q_i is the point mass on x_i).
        target_probs: [B, γ+1, V], the target's warped distributions at each draft
            position plus one more (for the bonus token).
        generator: optional ``torch.Generator`` on the tensors' device.
        validate: check values too (see :func:`check_step`); shapes are always checked.

    Returns:
        :class:`Verdict`. All arithmetic is float32 (float64 stays float64).
    """
    B, gamma, V = check_step(draft_tokens, draft_probs, target_probs, generator, validate)
    dtype = checks.compute_dtype(target_probs)
    p = target_probs.to(dtype)
    x = draft_tokens[..., None]
    p_x = p[:, :gamma].gather(-1, x).squeeze(-1)                          # p_i(x_i)  [B, γ]
    if draft_probs is None:
        q_x = torch.ones_like(p_x)                                         # point mass
    else:
        q = draft_probs.to(dtype)
        q_x = q.gather(-1, x).squeeze(-1)                                  # q_i(x_i)  [B, γ]

    # Accept x_i with probability min(1, p/q): u < p/q, written u*q < p to avoid 0/0.
    u = torch.rand(B, gamma, dtype=dtype, device=p.device, generator=generator)
    ok = u * q_x < p_x
    accepted = ok.long().cumprod(dim=1).sum(dim=1)                         # [B]

    # The distribution of the extra token, at position n = accepted: the residual
    # max(0, p_n - q_n) after a rejection, or p_{γ+1} itself when all γ passed.
    rows = torch.arange(B, device=p.device)
    p_n = p[rows, accepted]                                                # [B, V]
    rejected = (accepted < gamma)[:, None]
    at = accepted.clamp(max=gamma - 1)
    if draft_probs is None:
        q_n = torch.zeros_like(p_n).scatter_(-1, draft_tokens[rows, at][:, None], 1.0)
    else:
        q_n = q[rows, at]
    residual = torch.where(rejected, (p_n - q_n).clamp(min=0), p_n)
    # A residual with no mass means p_n = q_n (for a point mass: p_n one-hot on x_n),
    # where a rejection has probability 0; fall back to p_n rather than divide by 0.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    extra = sample_weights(residual, generator)
    return emit(draft_tokens, accepted, extra)


def verify_reference(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """The same rule as :func:`verify`, one row and one position at a time.

    Deliberately plain: it reads like the algorithm in the paper and serves as the
    oracle in the tests. Slow; do not use it to generate text.
    """
    B, gamma, V = check_step(draft_tokens, draft_probs, target_probs, generator, True)
    device = target_probs.device

    def uniform() -> float:
        return float(torch.rand((), dtype=torch.float64, device=device, generator=generator))

    def draw(weights: torch.Tensor) -> int:
        """One token from unnormalised weights, by inverting the cumulative sum."""
        cdf = weights.cumsum(0)
        return int((cdf <= uniform() * float(cdf[-1])).sum().clamp(max=V - 1))

    tokens = torch.full((B, gamma + 1), -1, dtype=torch.int64)
    accepted = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        for i in range(gamma + 1):
            p = target_probs[b, i].double().cpu()
            if i == gamma:                                    # every draft accepted:
                tokens[b, i] = draw(p)                        # bonus token from p_{γ+1}
                break
            x = int(draft_tokens[b, i])
            if draft_probs is None:
                q = torch.zeros(V, dtype=torch.float64)
                q[x] = 1.0                                    # deterministic draft
            else:
                q = draft_probs[b, i].double().cpu()
            if uniform() * q[x] < p[x]:                       # accept with prob min(1, p/q)
                tokens[b, i] = x
                accepted[b] += 1
                continue
            residual = (p - q).clamp(min=0)                   # reject: draw from norm(max(0, p - q))
            tokens[b, i] = draw(residual if residual.sum() > 0 else p)
            break
    return Verdict(tokens=tokens.to(draft_tokens.device), accepted=accepted.to(draft_tokens.device))


def verify_match(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    draft_probs: torch.Tensor | None = None,
    validate: bool = True,
) -> Verdict:
    """The exact-match rule: keep draft x_i while the target's own sample y_i ~ p_i equals it.

    The target samples y_1..y_{γ+1} (one uniform per position); drafts are kept up to
    the first i with y_i != x_i, and y_i is emitted there (y_{γ+1} when all match). Every
    emitted token is the target's own sample given a prefix equal to its own earlier
    samples, so the output is exactly p, like :func:`verify`; but a draft x ~ q is kept
    with probability sum_x p(x) q(x) instead of sum_x min(p(x), q(x)), which is smaller
    (chapter 5). ``draft_probs`` is accepted and ignored so the rule plugs into
    :func:`typsamp.generate.speculative`.
    """
    if draft_probs is not None and not isinstance(draft_probs, torch.Tensor):
        raise checks.InputTypeError(f"`draft_probs` must be a tensor or None, got {type(draft_probs).__name__}")
    B, gamma, V = check_step(draft_tokens, None, target_probs, generator, validate)
    dtype = checks.compute_dtype(target_probs)
    y = sample_weights(target_probs.to(dtype), generator)                 # [B, γ+1]
    accepted = (y[:, :gamma] == draft_tokens).long().cumprod(dim=1).sum(dim=1)
    return emit(draft_tokens, accepted, y.gather(1, accepted[:, None]).squeeze(1))


# ---------------------------------------------------------------------------------------
# Theory (Leviathan et al. 2023, section 3)


def acceptance_rate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """α = Σ_x min(p(x), q(x)) = 1 - TV(p, q), over the last dimension."""
    checks.probs("p", p)
    checks.probs("q", q)
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"`p` and `q` have different vocabularies: {p.shape[-1]} vs {q.shape[-1]}")
    dtype = checks.compute_dtype(p, q)
    return torch.minimum(p.to(dtype), q.to(dtype)).sum(dim=-1)


def _alpha_gamma(alpha, gamma):
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    if torch.isnan(alpha).any() or (alpha < 0).any() or (alpha > 1).any():
        raise ValueError("`alpha` must lie in [0, 1]")
    gamma_t = torch.as_tensor(gamma)
    if gamma_t.is_floating_point() or gamma_t.dtype == torch.bool or (gamma_t < 0).any():
        raise ValueError("`gamma` must be a non-negative integer")
    return alpha, gamma_t.to(torch.float64)


def expected_tokens(alpha, gamma) -> torch.Tensor:
    """E[tokens per step] = (1 - α^{γ+1}) / (1 - α); γ + 1 at α = 1 (Leviathan et al. eq. 1).

    Broadcasts over tensors of α and γ; returns float64.
    """
    alpha, gamma = _alpha_gamma(alpha, gamma)
    one = alpha == 1
    safe = torch.where(one, torch.zeros_like(alpha), alpha)
    return torch.where(one, gamma + 1, (1 - safe ** (gamma + 1)) / (1 - safe))


def speedup(alpha, gamma, c) -> torch.Tensor:
    """Expected wall-time speed-up (1 - α^{γ+1}) / ((1 - α)(γc + 1)) (Leviathan et al. Thm 3.8).

    ``c`` is the cost of one draft forward pass relative to one target pass.
    """
    if isinstance(c, bool) or (isinstance(c, torch.Tensor) and c.dtype == torch.bool):
        raise checks.InputTypeError("`c` must be a real number or tensor, got a bool")
    c = torch.as_tensor(c, dtype=torch.float64)
    if torch.isnan(c).any() or (c < 0).any():
        raise ValueError("`c` must be >= 0")
    _, g = _alpha_gamma(alpha, gamma)
    return expected_tokens(alpha, gamma) / (g * c + 1)


def optimal_gamma(alpha: float, c: float, max_gamma: int = 128) -> int:
    """The integer γ in 1..max_gamma that maximises :func:`speedup` (smallest on ties)."""
    max_gamma = checks.integer("max_gamma", max_gamma, low=1)
    alpha = checks.real("alpha", alpha, low=0.0, high=1.0)
    c = checks.real("c", c, low=0.0)
    gammas = torch.arange(1, max_gamma + 1)
    return int(gammas[speedup(alpha, gammas, c).argmax()])
