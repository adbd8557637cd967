"""The statistics the chapters and tests measure with, in one place.

Every chapter that checks a sampler against a law, compares two distributions, or
reports an acceptance rate with its error bar uses these functions instead of its own
copy. Each docstring names the chapter that introduces the idea.

* :func:`chi_square`, :func:`chi_square_two_sample`: Pearson's goodness-of-fit and
  homogeneity tests, with one pooling rule for small cells (chapter 3).
* :func:`tv`, :func:`kl`: total variation and Kullback-Leibler divergence (chapters 3, 6).
* :func:`accepted_length_law`: Leviathan et al.'s capped geometric law of the accepted
  length (chapter 3).
* :func:`teacher_forced_logits`: a model's logits at every position of given text, in
  one batched pass (chapter 4).
* :func:`token_origin`, :func:`tested_positions`: where each emitted token came from,
  and which positions a rule actually judged (chapter 4).
* :func:`row_alpha`, :func:`bernoulli_mean_se`, :func:`proportion_z`: acceptance rates
  with standard errors (chapters 4, 5, 8).
* :func:`mean_se`, :func:`distinct_n`: means with standard errors, and distinct-n
  diversity of generated text (chapter 6).

This module imports only ``torch`` and :mod:`typsamp.checks`, so any other module may
import it without an import circle.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from typsamp import checks

__all__ = [
    "MIN_EXPECTED",
    "ChiSquare",
    "chi_square",
    "chi_square_two_sample",
    "tv",
    "kl",
    "accepted_length_law",
    "teacher_forced_logits",
    "ORIGIN",
    "token_origin",
    "tested_positions",
    "RowAlpha",
    "row_alpha",
    "bernoulli_mean_se",
    "proportion_z",
    "mean_se",
    "distinct_n",
]

F64 = torch.float64

#: Cells of a chi-square test expected to hold fewer draws than this are pooled: the
#: chi-square approximation to Pearson's statistic needs expected counts of about 5.
MIN_EXPECTED = 5.0


# ---------------------------------------------------------------------------------------
# Chi-square tests (chapter 3)


class ChiSquare(NamedTuple):
    """Result of a chi-square test: Pearson's statistic, degrees of freedom, upper-tail p-value.

    A tuple, so ``stat, dof, p = chi_square(...)`` works.
    """

    statistic: float
    dof: int
    p_value: float


def _upper_tail(statistic: float, dof: int) -> float:
    """P(χ²_dof ≥ statistic): the regularised upper incomplete gamma function Q(dof/2, x/2)."""
    if dof == 0:
        return 1.0
    if math.isinf(statistic):
        return 0.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=F64), torch.tensor(statistic / 2, dtype=F64)))


def _pool(observed: torch.Tensor, expected: torch.Tensor, small: torch.Tensor):
    """The pooling rule (one for the whole library): the cells flagged ``small`` become one
    cell; if that cell is itself still small (expected < MIN_EXPECTED, measured by the
    caller's own ``small`` criterion on the pooled row) it is folded into the remaining
    cell with the smallest expectation. ``observed`` and ``expected`` are [k, cells]."""
    if not small.any():
        return observed, expected
    pooled_obs = observed[:, small].sum(dim=1, keepdim=True)
    pooled_exp = expected[:, small].sum(dim=1, keepdim=True)
    observed, expected = observed[:, ~small], expected[:, ~small]
    if observed.shape[1] == 0 or (pooled_exp >= MIN_EXPECTED).all():
        return torch.cat([observed, pooled_obs], dim=1), torch.cat([expected, pooled_exp], dim=1)
    smallest = expected.min(dim=0).values.argmin()
    observed, expected = observed.clone(), expected.clone()
    observed[:, smallest] += pooled_obs[:, 0]
    expected[:, smallest] += pooled_exp[:, 0]
    return observed, expected


def _counts(name: str, value) -> torch.Tensor:
    checks.tensor(name, value)
    if value.dtype == torch.bool or value.is_complex():
        raise checks.InputTypeError(f"`{name}` must hold integer or real counts, got {value.dtype}")
    value = value.detach().to("cpu", F64).flatten()
    if value.numel() == 0:
        raise ValueError(f"`{name}` is empty")
    if not torch.isfinite(value).all() or (value < 0).any():
        raise ValueError(f"`{name}` must hold finite, non-negative counts")
    if (value != value.round()).any():
        raise ValueError(f"`{name}` must hold whole numbers (counts of draws)")
    return value


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> ChiSquare:
    """Pearson's chi-square test of ``counts`` (draws per cell) against the law ``probs``.

    Introduced in chapter 3, where it checks that speculative sampling's output has the
    target's distribution; every statistical test of the book uses it.

    Both are flattened, so a joint law over several positions can be tested as one table.
    ``probs`` must sum to 1 within the tolerance of its dtype (:data:`typsamp.checks.SUM_TOLERANCE`)
    and is then normalised in float64, so 16-bit probabilities are tested as what they
    encode. With n = Σ counts and expected counts e = n·probs:

    * **Impossible draws.** A count in a cell of probability 0 refutes the law outright:
      the statistic is ``inf`` and the p-value 0 (Pearson's sum would skip the cell).
    * **Pooling** (the one rule of the library). Cells with e < :data:`MIN_EXPECTED`
      (including every cell of probability 0, which then holds no draws) are pooled into
      one cell; if the pool's expected count is itself below :data:`MIN_EXPECTED`, it
      joins the remaining cell with the smallest e.
    * The statistic Σ (o - e)² / e over the k cells left has k - 1 degrees of freedom;
      with one cell (dof 0) there is nothing to test and the result is ``(0.0, 0, 1.0)``.

    The p-value is the regularised upper incomplete gamma function Q(dof/2, χ²/2)
    (:func:`torch.special.gammaincc`), computed in float64.

    Raises ``ValueError`` for mismatched sizes, negative or fractional counts, no draws
    at all, or a ``probs`` that is not a distribution.
    """
    obs = _counts("counts", counts)
    checks.tensor("probs", probs, floating=True)
    flat = probs.detach().flatten()
    if flat.numel() != obs.numel():
        raise ValueError(f"`counts` has {obs.numel()} cells but `probs` has {flat.numel()}")
    checks.probs("probs", flat)
    law = flat.to("cpu", F64)
    law = law / law.sum()
    n = obs.sum()
    if n == 0:
        raise ValueError("`counts` holds no draws: there is nothing to test")
    if obs[law == 0].sum() > 0:
        return ChiSquare(math.inf, int((law > 0).sum()) - 1, 0.0)
    expected = n * law
    o, e = _pool(obs[None], expected[None], expected < MIN_EXPECTED)
    o, e = o[0], e[0]
    o, e = o[e > 0], e[e > 0]
    dof = o.numel() - 1
    if dof == 0:
        return ChiSquare(0.0, 0, 1.0)
    statistic = float(((o - e) ** 2 / e).sum())
    return ChiSquare(statistic, dof, _upper_tail(statistic, dof))


def chi_square_two_sample(counts_a: torch.Tensor, counts_b: torch.Tensor) -> ChiSquare:
    """Pearson's chi-square test that two samples, ``counts_a`` and ``counts_b`` (draws
    per cell, same cells), come from one law (chapter 3's test, for two samplers whose
    common law is unknown, such as batched against one-by-one decoding).

    The law is estimated from both samples pooled, π = (a + b) / (n_a + n_b), and the
    expected counts are n_a·π and n_b·π. The same pooling rule as :func:`chi_square`:
    cells whose *smaller* expected count is below :data:`MIN_EXPECTED` are pooled (cells
    no sample hit included), and a pool still below it joins the cell with the
    smallest expectation. k cells left give k - 1 degrees of freedom.
    """
    a, b = _counts("counts_a", counts_a), _counts("counts_b", counts_b)
    if a.numel() != b.numel():
        raise ValueError(f"`counts_a` has {a.numel()} cells but `counts_b` has {b.numel()}")
    na, nb = a.sum(), b.sum()
    if na == 0 or nb == 0:
        raise ValueError("`counts_a` and `counts_b` must each hold at least one draw")
    share = (a + b) / (na + nb)
    observed = torch.stack([a, b])
    expected = torch.stack([na * share, nb * share])
    o, e = _pool(observed, expected, expected.min(dim=0).values < MIN_EXPECTED)
    keep = e[0] > 0
    o, e = o[:, keep], e[:, keep]
    dof = o.shape[1] - 1
    if dof == 0:
        return ChiSquare(0.0, 0, 1.0)
    statistic = float(((o - e) ** 2 / e).sum())
    return ChiSquare(statistic, dof, _upper_tail(statistic, dof))


# ---------------------------------------------------------------------------------------
# Distances between distributions (chapters 3 and 6)


def tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total variation distance ½ Σ_x |a(x) - b(x)| over the last dimension, in [0, 1].

    Introduced in chapter 3 (how far a broken verification moves the output from the
    target), used again in chapter 6 for typical acceptance's bias. ``a`` and ``b`` are
    probability rows [..., V] that broadcast; returns [...] in float32 (float64 if
    either input is).
    """
    a, b = checks.probs_pair("a", a, "b", b)
    return 0.5 * (a - b).abs().sum(dim=-1)


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kullback-Leibler divergence KL(a ‖ b) = Σ_x a(x) log(a(x) / b(x)) in nats, over the
    last dimension (chapter 6: how much information typical acceptance's output loses
    against the target).

    0·log 0 counts as 0; the result is ``inf`` in a row where some a(x) > 0 = b(x).
    Rows [..., V] that broadcast; returns [...] in float32 (float64 if either input is).
    """
    a, b = checks.probs_pair("a", a, "b", b)
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(dim=-1)


# ---------------------------------------------------------------------------------------
# The accepted length (chapter 3)


def accepted_length_law(alpha, gamma) -> torch.Tensor:
    """Leviathan et al.'s law of the number of drafts accepted in one step (chapter 3).

    When each of the γ drafts is accepted with probability α, independently, the step
    stops at the first rejection: P(accepted = k) = α^k (1 - α) for k < γ, and
    P(accepted = γ) = α^γ (a capped geometric law). Returns float64 [γ + 1], indexed by
    k = 0..γ; its mean is :func:`typsamp.speculative.expected_tokens` (α, γ) - 1.
    """
    alpha = checks.real("alpha", alpha, low=0.0, high=1.0)
    gamma = checks.integer("gamma", gamma, low=1)
    if gamma > 1_000_000:
        raise ValueError(f"`gamma` must be at most 1000000, got {gamma}")
    k = torch.arange(gamma + 1, dtype=F64)
    law = torch.tensor(alpha, dtype=F64) ** k * (1 - alpha)
    law[gamma] = alpha ** gamma
    return law


# ---------------------------------------------------------------------------------------
# Teacher forcing (chapter 4)


def _check_tokens(tokens) -> torch.Tensor:
    checks.tensor("tokens", tokens)
    if tokens.dtype != torch.long or tokens.dim() != 2:
        raise ValueError(f"`tokens` must be int64 of shape [B, L], got {tokens.dtype} of shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"`tokens` must have at least one row and one position, got shape {tuple(tokens.shape)}")
    return tokens


def teacher_forced_logits(model, tokens: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """The logits a model gives at every position of ``tokens`` [B, L]: [B, L, V] (chapter 4).

    Position j holds the model's prediction for the token after ``tokens[:, :j + 1]``.
    One batched forward pass over all rows (or passes of ``batch_size`` rows, to bound
    memory), under :func:`torch.inference_mode`, in the model's own dtype. Works with:

    * a :class:`typsamp.model.GPT` (anything with ``clear_cache``): its KV cache is set
      aside for the pass, which then uses plain causal attention, and put back after;
    * any model of the engine's interface (``setup_cache(B, max_len)`` and
      ``__call__(tokens, offsets, span=)``, such as :class:`typsamp.hf.HFCausalLM`):
      a fresh cache for the pass, every row from offset 0;
    * any other callable ``model(tokens)`` returning logits [B, L, V], or an object with
      a ``logits`` attribute (a ``transformers`` model's output).
    """
    tokens = _check_tokens(tokens)
    B, L = tokens.shape
    step = B if batch_size is None else checks.integer("batch_size", batch_size, low=1)
    if not callable(model):
        raise checks.InputTypeError(f"`model` must be callable, got {type(model).__name__}")

    def run(chunk: torch.Tensor) -> torch.Tensor:
        if hasattr(model, "clear_cache") and hasattr(model, "cache"):
            saved = model.cache
            model.cache = None
            try:
                out = model(chunk)
            finally:
                model.cache = saved
        elif hasattr(model, "setup_cache"):
            model.setup_cache(chunk.shape[0], L)
            offsets = torch.zeros(chunk.shape[0], dtype=torch.long, device=chunk.device)
            out = model(chunk, offsets, span=L)
        else:
            out = model(chunk)
        out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(chunk.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"`model` must return logits of shape [{chunk.shape[0]}, {L}, V], got {shape}")
        return out

    with torch.inference_mode():
        return torch.cat([run(tokens[i:i + step]) for i in range(0, B, step)])


# ---------------------------------------------------------------------------------------
# Where tokens came from, and what was tested (chapter 4)

#: Codes of :func:`token_origin` (and of the engine's ``Generation.origin``).
ORIGIN = {"pad": -1, "autoregressive": 0, "accepted": 1, "rejection": 2, "bonus": 3}


def _check_lengths(accepted_lengths, gamma) -> tuple[torch.Tensor, int]:
    checks.tensor("accepted_lengths", accepted_lengths)
    if accepted_lengths.dim() != 2 or accepted_lengths.dtype not in (torch.int64, torch.int32):
        raise ValueError("`accepted_lengths` must be an integer tensor [steps, B] "
                         f"(a Generation's accepted_lengths), got {accepted_lengths.dtype} of shape "
                         f"{tuple(accepted_lengths.shape)}")
    gamma = checks.integer("gamma", gamma, low=1)
    lengths = accepted_lengths.detach().to("cpu", torch.long)
    if ((lengths < -1) | (lengths > gamma)).any():
        raise ValueError(f"`accepted_lengths` must lie in [-1, gamma = {gamma}] (-1 once a row is done)")
    done = lengths < 0
    if lengths.shape[0] > 1 and (done[:-1] & ~done[1:]).any():
        raise ValueError("`accepted_lengths` has a row that resumes after -1 (done rows stay done)")
    return lengths, gamma


def token_origin(accepted_lengths: torch.Tensor, gamma: int, max_new_tokens: int,
                 lengths: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Where each emitted token of a speculative run came from: int8 [B, max_new_tokens].

    Introduced in chapter 4. ``accepted_lengths`` [steps, B] is a ``Generation``'s (drafts
    accepted per row and step, -1 once a row is done). A step that accepted a < γ drafts
    emitted a accepted drafts (code 1) and the token the rule put in place of the
    rejected one (2: the residual sample, or typical acceptance's extra); a step that
    accepted all γ emitted them and the bonus token from the target's last distribution
    (3). Positions past ``max_new_tokens`` are cut; positions past a row's own length
    (``lengths`` [B], e.g. a row that stopped at an end token; default: every row is
    full) are -1. Codes: :data:`ORIGIN`.
    """
    steps, gamma = _check_lengths(accepted_lengths, gamma)
    N = checks.integer("max_new_tokens", max_new_tokens, low=1)
    B = steps.shape[1]
    out = torch.full((B, N), -1, dtype=torch.int8)
    for b in range(B):
        n = 0
        for a in steps[:, b].tolist():
            if a < 0 or n >= N:
                break
            out[b, n:n + a] = ORIGIN["accepted"]
            if n + a < N:
                out[b, n + a] = ORIGIN["rejection"] if a < gamma else ORIGIN["bonus"]
            n += a + 1
    if lengths is not None:
        row_lengths = torch.as_tensor(lengths).to("cpu")
        if row_lengths.shape != (B,) or row_lengths.is_floating_point() or row_lengths.dtype == torch.bool:
            raise ValueError(f"`lengths` must be {B} integers, one per row")
        if ((row_lengths < 0) | (row_lengths > N)).any():
            raise ValueError(f"`lengths` must lie in [0, max_new_tokens = {N}]")
        out[torch.arange(N) >= row_lengths[:, None]] = ORIGIN["pad"]
    return out


def tested_positions(accepted_lengths: torch.Tensor, gamma: int, prompt_length, max_new_tokens: int,
                     lengths=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row, the sequence indices of the drafts the rule judged, and whether each passed.

    Introduced in chapter 4 (and used in chapter 5) to set each measured acceptance
    beside the probability the rule had of accepting that very draft. A step tests its
    accepted drafts and, if it stopped early, the one rejected draft, whose place the
    extra token takes (:func:`token_origin` codes 1 and 2); the drafts after it are never
    looked at. Indices count from the start of the text ``prompt + tokens``:
    ``prompt_length`` (an int, or one per row for ragged prompts) plus the position in
    the generated tokens; only tests inside the returned text are kept.

    Returns a list of B pairs ``(index int64 [t], accepted float64 [t])``.
    """
    origin = token_origin(accepted_lengths, gamma, max_new_tokens, lengths)
    B = origin.shape[0]
    if isinstance(prompt_length, numbers.Integral) and not isinstance(prompt_length, bool):
        starts = [checks.integer("prompt_length", prompt_length, low=0)] * B
    else:
        starts = [checks.integer("prompt_length[]", p, low=0) for p in prompt_length]
        if len(starts) != B:
            raise ValueError(f"`prompt_length` gives {len(starts)} lengths for {B} rows")
    rows = []
    for b in range(B):
        tested = ((origin[b] == ORIGIN["accepted"]) | (origin[b] == ORIGIN["rejection"])).nonzero().flatten()
        rows.append((tested + starts[b], (origin[b, tested] == ORIGIN["accepted"]).to(F64)))
    return rows


# ---------------------------------------------------------------------------------------
# Acceptance rates and their errors (chapters 4, 5 and 8)


@dataclass(frozen=True)
class RowAlpha:
    """Acceptance counts of a batch of independent rows, and α estimated from them.

    Attributes:
        alpha: pooled α = Σ accepted / Σ examined (what ``Generation.alpha`` reports).
        se: its standard error with the rows as independent units (the ratio estimator's
            between-row variance); ``nan`` with fewer than two rows.
        accepted, examined: int64 [B], per row.
    """

    alpha: float
    se: float
    accepted: torch.Tensor
    examined: torch.Tensor

    @property
    def per_row(self) -> torch.Tensor:
        """float64 [B]: each row's own α = accepted / examined (nan where nothing was examined)."""
        examined = self.examined.to(F64)
        return torch.where(examined > 0, self.accepted / examined.clamp(min=1), torch.nan)

    @property
    def per_row_se(self) -> torch.Tensor:
        """float64 [B]: binomial standard error √(α(1 - α) / examined) of each row's α.

        Within a row the tests follow one another, so this treats them as independent
        trials with a common α: an approximation, unlike :attr:`se`."""
        a = self.per_row
        return (a * (1 - a) / self.examined.to(F64)).sqrt()


def row_alpha(accepted_lengths: torch.Tensor, gamma: int) -> RowAlpha:
    """α and its standard error from a ``Generation``'s ``accepted_lengths`` [steps, B].

    Introduced in chapter 5, where α is measured at every temperature. Per row,
    accepted = Σ a over the row's live steps, and examined = accepted + the steps that
    stopped early (a < γ): drafts after a rejection are never judged. Rows are
    independent (separate prompts and random streams), steps within a row are not, so
    the error bar comes from the spread between rows: with A_b and E_b a row's counts
    and α̂ = ΣA / ΣE, SE = √(Σ (A_b - α̂ E_b)² / (B (B - 1))) / mean(E), the usual
    standard error of a ratio estimator.
    """
    lengths, gamma = _check_lengths(accepted_lengths, gamma)
    live = lengths >= 0
    accepted = torch.where(live, lengths, 0).sum(dim=0)
    examined = accepted + (live & (lengths < gamma)).sum(dim=0)
    total = int(examined.sum())
    alpha = int(accepted.sum()) / total if total else math.nan
    B = accepted.numel()
    if B < 2 or not total:
        se = math.nan
    else:
        a, e = accepted.to(F64), examined.to(F64)
        se = float(((a - alpha * e).pow(2).sum() / (B * (B - 1))).sqrt() / e.mean())
    return RowAlpha(alpha, se, accepted, examined)


def bernoulli_mean_se(probs: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the share of successes in independent trials with
    success probabilities ``probs`` (any shape): (mean p, √(Σ p(1 - p)) / n).

    Introduced in chapter 4: the predicted α at the positions actually tested, and how
    far the measured share of acceptances may fall from it by chance alone (chapters
    5 and 6 use it the same way).
    """
    checks.tensor("probs", probs, floating=True)
    p = probs.detach().to("cpu", F64).flatten()
    if p.numel() == 0:
        raise ValueError("`probs` is empty")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("`probs` must hold probabilities in [0, 1]")
    return float(p.mean()), float((p * (1 - p)).sum().sqrt()) / p.numel()


def proportion_z(p1, n1, p2, n2) -> float:
    """|p1 - p2| in standard errors, for two proportions measured on n1 and n2 independent
    trials: |p1 - p2| / √(p1(1 - p1)/n1 + p2(1 - p2)/n2) (chapter 8: our α against the
    peer's, and a live run against the committed one).

    0 when both are equal, ``inf`` when they differ with zero variance (both 0 or 1).
    """
    p1 = checks.real("p1", p1, low=0.0, high=1.0)
    p2 = checks.real("p2", p2, low=0.0, high=1.0)
    n1 = checks.real("n1", n1, low=0.0, low_open=True)
    n2 = checks.real("n2", n2, low=0.0, low_open=True)
    gap = abs(p1 - p2)
    var = p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2
    if var == 0:
        return 0.0 if gap == 0 else math.inf
    return gap / math.sqrt(var)


# ---------------------------------------------------------------------------------------
# Summaries of generated text (chapter 6)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean of independent values (chapter 6, comparing
    decoding methods row by row): (mean, s / √n) with s the sample standard deviation
    (n - 1 in its denominator). The error is ``nan`` for a single value."""
    if isinstance(values, torch.Tensor):
        checks.tensor("values", values)
        if values.dtype == torch.bool or values.is_complex():
            raise checks.InputTypeError(f"`values` must be real numbers, got {values.dtype}")
        x = values.detach().to("cpu", F64).flatten()
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise checks.InputTypeError(f"`values` must be a tensor or a sequence of numbers, got {type(values).__name__}")
        x = torch.tensor([checks.real("values[]", v) for v in values], dtype=F64)
    if x.numel() == 0:
        raise ValueError("`values` is empty")
    if not torch.isfinite(x).all():
        raise ValueError("`values` must be finite")
    n = x.numel()
    return float(x.mean()), (float(x.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan)


def distinct_n(texts, n: int) -> torch.Tensor:
    """Per text, distinct n-grams / n-grams: 1 when no n-gram repeats (chapter 6's measure
    of how repetitive decoded text is).

    ``texts`` is a sequence of strings, whose n-grams are of whitespace-separated words,
    or of token sequences (lists, or 1-D integer tensors such as the rows of
    ``Generation.tokens``; -1 padding is dropped), whose n-grams are of tokens. Returns
    float64 [len(texts)]; ``nan`` for a text with fewer than n words or tokens.
    """
    n = checks.integer("n", n, low=1)
    if isinstance(texts, (str, bytes)):
        raise checks.InputTypeError("`texts` must be a sequence of texts, not one string; wrap it in a list")
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2:
            raise ValueError(f"`texts` as a tensor must be [B, L] token ids, got shape {tuple(texts.shape)}")
        texts = list(texts)
    if not isinstance(texts, Sequence):
        raise checks.InputTypeError(f"`texts` must be a sequence, got {type(texts).__name__}")
    shares = []
    for i, text in enumerate(texts):
        if isinstance(text, str):
            units = text.split()
        elif isinstance(text, torch.Tensor):
            if text.dim() != 1 or text.is_floating_point() or text.dtype == torch.bool:
                raise ValueError(f"`texts[{i}]` must be a 1-D integer tensor of token ids")
            units = [t for t in text.tolist() if t >= 0]
        elif isinstance(text, Sequence) and not isinstance(text, bytes):
            units = list(text)
        else:
            raise checks.InputTypeError(f"`texts[{i}]` must be a string or a sequence of tokens, "
                                        f"got {type(text).__name__}")
        grams = [tuple(units[j:j + n]) for j in range(len(units) - n + 1)]
        shares.append(len(set(grams)) / len(grams) if grams else math.nan)
    return torch.tensor(shares, dtype=F64)
