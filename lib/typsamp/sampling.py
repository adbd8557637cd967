"""Temperature, truncation and sampling (chapters 1 and 2).

:func:`probs` turns logits into the distribution a decoder samples from: divide by the
temperature, cut away the tail by one or more truncation rules, renormalise. Each rule
gives the same result as the Hugging Face ``transformers`` warper of the same name run
in float32 (the tests check this token for token), and the rules run in the order
``generate()`` applies them:

==================  ===========================  ==========================================
argument            transformers warper          keeps token x when ...
==================  ===========================  ==========================================
``temperature``     ``TemperatureLogitsWarper``  (all tokens; logits become z / T)
``top_k``           ``TopKLogitsWarper``         z(x) is at least the k-th largest logit
``top_p``           ``TopPLogitsWarper``         x is in the smallest head of mass >= top_p
``min_p``           ``MinPLogitsWarper``         p(x) >= min_p * max p
``typical_p``       ``TypicalLogitsWarper``      |-log p(x) - H| is among the smallest,
                                                 up to mass typical_p (Meister et al.)
``epsilon_cutoff``  ``EpsilonLogitsWarper``      p(x) >= epsilon_cutoff
``eta``             ``EtaLogitsWarper``          p(x) >= min(eta, sqrt(eta) * exp(-H))
==================  ===========================  ==========================================

Every rule keeps at least one token. All but one also always keep the most likely
token; locally typical sampling (``typical_p``) can drop it, because it keeps tokens
whose surprisal is close to the entropy (chapter 2 shows when). ``temperature=0`` means greedy: a
one-hot vector on the argmax. That is a convention: as T -> 0+ the distribution tends to
the uniform distribution over the tied maxima, while T = 0 picks the lowest index among
them (the rule of ``torch.argmax``). The truncation arguments are still validated but
cannot change a one-hot result.

:class:`Warp` holds one setting, validated once; calling it is the unchecked kernel the
decoding engine uses every step. :func:`probs` is the checked convenience.

All functions work on any number of leading (batch) dimensions, compute in float32
whatever the input dtype (float16, bfloat16, float32; float64 stays float64), and run
on whatever device the input lives on.
"""

from __future__ import annotations

from dataclasses import dataclass

import functools

import torch

from typsamp import checks
from typsamp.rng import RowSeeds, uniform

__all__ = ["Warp", "probs", "entropy", "sample", "sample_weights", "uniform", "RowSeeds"]


@functools.lru_cache(maxsize=64)
def _rounds_to_zero(temperature: float, dtype: torch.dtype) -> bool:
    """Whether a positive ``temperature`` becomes 0 when an op casts it to ``dtype``."""
    return float(torch.tensor(temperature, dtype=dtype)) == 0.0


@dataclass(frozen=True)
class Warp:
    """One sampling setting: a temperature and any truncation rules, validated once.

    ``Warp(temperature=0.7, top_p=0.9)(logits)`` returns the warped probabilities. The
    call is the unchecked hot-path kernel (decode loops call it on a model's own
    logits every step); :func:`probs` is the checked convenience for everyone else. The
    fields are the arguments of :func:`probs`:

    * ``temperature`` T >= 0 (T = 1 leaves the model's distribution unchanged; T = 0 is
      greedy, a convention that breaks ties at the lowest index: the limit T -> 0+ is
      uniform over tied maxima);
    * ``top_k`` >= 1; ``top_p`` in (0, 1]; ``min_p`` in [0, 1];
    * ``typical_p`` in (0, 1) (locally typical sampling);
    * ``epsilon_cutoff`` in (0, 1) (epsilon-sampling, transformers' ``epsilon_cutoff``;
      not Medusa's epsilon, which is :class:`typsamp.typical.TypicalAcceptance`'s);
    * ``eta`` in (0, 1) (eta-sampling, transformers' ``eta_cutoff``).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    eta: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("temperature", checks.real("temperature", self.temperature, low=0.0))
        if self.top_k is not None:
            put("top_k", checks.integer("top_k", self.top_k, low=1))
        if self.top_p is not None:
            put("top_p", checks.real("top_p", self.top_p, low=0.0, high=1.0, low_open=True))
        if self.min_p is not None:
            put("min_p", checks.real("min_p", self.min_p, low=0.0, high=1.0))
        for name in ("eta", "typical_p", "epsilon_cutoff"):
            value = getattr(self, name)
            if value is not None:
                put(name, checks.real(name, value, low=0.0, high=1.0, low_open=True, high_open=True))

    @property
    def greedy(self) -> bool:
        """True at T = 0: the warp is a one-hot vector on the argmax."""
        return self.temperature == 0.0

    @property
    def keeps_argmax(self) -> bool:
        """True when the most likely token always keeps positive probability, so a greedy
        draft may take the logits' argmax without warping. Every rule but locally typical
        sampling keeps it (chapter 2); at T = 0 the warp is the argmax itself."""
        return self.typical_p is None or self.greedy

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Warp ``logits`` [..., V] into probabilities [..., V], with no value checks."""
        dtype = checks.compute_dtype(logits)
        shape = logits.shape
        z = logits.to(dtype).reshape(-1, shape[-1])

        if self.temperature == 0.0:
            out = torch.zeros_like(z)
            out.scatter_(-1, z.argmax(dim=-1, keepdim=True), 1.0)
            return out.reshape(shape)

        if self.temperature != 1.0:
            # (z - max z) / T: the same distribution as z / T (softmax ignores shifts), but
            # every entry is <= 0, so a tiny temperature (or one that rounds to 0 in float32)
            # underflows to a one-hot instead of overflowing to inf and NaN. The maxima give
            # 0/0 only when T rounds to 0 in the compute dtype (a host-side fact about T), and
            # are then read as 0; otherwise NaN can only come from NaN, +inf or all -inf
            # rows, which the decode loops certify from the logits' maxima. No data-dependent
            # branch: the decode loop stays free of host synchronisation. The shifted copy is
            # divided in place (on [rows, 262144] every pass and every fresh buffer shows).
            shifted = torch.sub(z, z.amax(dim=-1, keepdim=True))
            z = shifted.div_(self.temperature)
            if _rounds_to_zero(self.temperature, z.dtype):
                z = torch.where(torch.isnan(z), torch.zeros_like(z), z)
        if self.top_k is not None:
            z = _top_k(z, self.top_k)
        if self.top_p is not None and self.top_p < 1.0:
            z = _top_p(z, self.top_p)
        if self.min_p is not None:
            z = _min_p(z, self.min_p)
        if self.typical_p is not None:
            z = _typical(z, self.typical_p)
        if self.epsilon_cutoff is not None:
            z = _epsilon(z, self.epsilon_cutoff)
        if self.eta is not None:
            z = _eta(z, self.eta)
        return torch.softmax(z, dim=-1).reshape(shape)


def probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    eta: float | None = None,
    typical_p: float | None = None,
    epsilon_cutoff: float | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Warp ``logits`` [..., V] into probabilities [..., V]: ``Warp(...)(logits)``, checked.

    Args:
        logits: floating tensor; ``-inf`` marks a token that must never be chosen.
        temperature, top_k, top_p, min_p, eta, typical_p, epsilon_cutoff: see :class:`Warp`.
        validate: check the logits' values (NaN, +inf, rows with no finite entry), which
            reads them back to the host. Arguments, shapes and dtypes are always checked.

    Returns:
        float32 probabilities (float64 for float64 input), same shape as ``logits``.
    """
    if validate:
        checks.logits("logits", logits)
    else:
        checks.tensor("logits", logits, floating=True, min_dim=1)
    warp = Warp(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eta=eta,
                typical_p=typical_p, epsilon_cutoff=epsilon_cutoff)
    return warp(logits)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H(p) = -sum p log p in nats, over the last dimension.

    Zero-probability entries contribute 0 (the limit of -x log x), so truncated
    distributions are fine. Returns float32 (float64 for float64 input), shape [...].
    """
    checks.probs("probs", probs)
    dtype = checks.compute_dtype(probs)
    return torch.special.entr(probs.to(dtype)).sum(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token index from each row of ``probs`` [..., V]; returns int64 [...].

    Inverse-CDF sampling with one uniform number per row (see :func:`sample_weights`):
    no host synchronisation, and a zero-probability token is never returned.
    """
    checks.probs("probs", probs)
    batch = probs.shape[0] if probs.dim() >= 2 else None
    generator = checks.generator("generator", generator, probs.device, batch)
    return sample_weights(probs, generator)


def sample_weights(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`sample` for non-negative ``weights`` [..., V] that need not sum to 1.

    Row x is drawn with probability weights[x] / sum(weights): the first index whose
    cumulative weight exceeds u * total, with u uniform in [0, 1). The cumulative sum
    runs in float64, so even a 256k-token vocabulary of float32 probabilities keeps its
    tiny entries distinct (a float32 running sum near 0.5 cannot resolve steps below
    6e-8), and u * total is kept strictly below the total, so the chosen index always
    has positive weight. One random number per row, no host synchronisation and no
    input checks: this is the kernel the verification rules call in their hot path, on
    weights they built themselves. A row of zeros returns index 0.
    """
    cdf = weights.to(torch.float64).cumsum(dim=-1)
    total = cdf[..., -1:]
    u = uniform(total.shape, dtype=torch.float64, device=weights.device, generator=generator) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return torch.where(index < weights.shape[-1], index, 0)


# ---------------------------------------------------------------------------------------
# The truncation rules, on 2-D float scores [N, V]. Each returns the scores with the
# removed tokens set to -inf, exactly as the transformers warper of the same name does.


def _keep_top1(remove: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Never remove the token(s) holding the largest score."""
    return remove & (z < z.amax(dim=-1, keepdim=True))


def _top_k(z: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, z.shape[-1])
    kth = torch.topk(z, k, dim=-1).values[..., -1:]
    return z.masked_fill(z < kth, float("-inf"))


def _top_p(z: torch.Tensor, top_p: float) -> torch.Tensor:
    # Sort ascending and drop the low tail whose mass is at most 1 - top_p; the rest is
    # the smallest set of top tokens whose mass reaches top_p.
    sorted_z, order = torch.sort(z, descending=False)
    tail = sorted_z.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
    tail[..., -1] = False
    remove = tail.scatter(-1, order, tail)
    return z.masked_fill(remove, float("-inf"))


def _min_p(z: torch.Tensor, min_p: float) -> torch.Tensor:
    p = torch.softmax(z, dim=-1)
    remove = p < min_p * p.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, p.argmax(dim=-1, keepdim=True), False)
    return z.masked_fill(remove, float("-inf"))


def _typical(z: torch.Tensor, mass: float) -> torch.Tensor:
    # Locally typical sampling: rank tokens by how far their surprisal -log p(x) lies
    # from the entropy H, keep the closest ones until their mass reaches `mass`.
    logp = torch.log_softmax(z, dim=-1)
    h = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
    distance = (-logp - h).abs()
    sorted_distance, order = torch.sort(distance, descending=False)
    cum = z.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp_(max=z.shape[-1] - 1)
    sorted_remove = sorted_distance > sorted_distance.gather(-1, last)
    sorted_remove[..., 0] = False
    remove = sorted_remove.scatter(-1, order, sorted_remove)
    return z.masked_fill(remove, float("-inf"))


def _epsilon(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    remove = _keep_top1(z.softmax(dim=-1) < epsilon, z)
    return z.masked_fill(remove, float("-inf"))


def _eta(z: torch.Tensor, eta: float) -> torch.Tensor:
    # Hewitt et al.'s eta-sampling: the cutoff falls with the entropy H of the row,
    # min(eta, sqrt(eta) * exp(-H)). Entropy computed the way torch.distributions does.
    logp = z - z.logsumexp(dim=-1, keepdim=True)
    p = torch.softmax(logp, dim=-1)
    h = -(logp.clamp(min=torch.finfo(z.dtype).min) * p).sum(dim=-1, keepdim=True)
    eps = torch.tensor(eta, dtype=z.dtype, device=z.device)
    cutoff = torch.minimum(eps, eps.sqrt() * torch.exp(-h))
    remove = _keep_top1(z.softmax(dim=-1) < cutoff, z)
    return z.masked_fill(remove, float("-inf"))
