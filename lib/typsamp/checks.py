"""Input validation shared by every public function of :mod:`typsamp`.

Each check raises a :class:`ValueError` (or :class:`InputTypeError`, which is both a
``TypeError`` and a ``ValueError``) whose message names the offending argument, so bad
input fails loudly instead of producing NaN further down.
"""

from __future__ import annotations

import math
import numbers

import torch

from typsamp.rng import RowSeeds

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# How far a row of probabilities may sum from 1 and still count as a distribution.
# 16-bit formats round every entry (relative error 2**-8 for bfloat16) and flush the
# tiniest probabilities to zero, so they get a looser bound than float32 and float64.
SUM_TOLERANCE = {
    torch.float16: 2e-2,
    torch.bfloat16: 2e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-6,
}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the library computes in: float64 if any input is float64, else float32
    (16-bit inputs are promoted, so sums and comparisons do not round to 8 bits)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class InputTypeError(TypeError, ValueError):
    """An argument has the wrong Python type or tensor dtype.

    It subclasses both ``TypeError`` (what Python raises for wrong types) and
    ``ValueError`` (what the rest of :mod:`typsamp` raises for bad input), so callers
    can catch either.
    """


def tensor(name: str, value, *, floating: bool = False, min_dim: int = 0) -> torch.Tensor:
    """Check that ``value`` is a tensor (of a floating dtype when asked) with enough dims."""
    if not isinstance(value, torch.Tensor):
        raise InputTypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise InputTypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32 or float64), "
            f"got {value.dtype}"
        )
    if value.dim() < min_dim:
        raise ValueError(f"`{name}` must have at least {min_dim} dimension(s), got shape {tuple(value.shape)}")
    if min_dim >= 1 and value.shape[-1] == 0:
        raise ValueError(f"`{name}` has an empty last (vocabulary) dimension")
    return value


def logits(name: str, value) -> torch.Tensor:
    """Logits: floating, at least 1-D, no NaN, no +inf, and at least one finite entry per row.

    ``-inf`` is allowed: it is how a token is masked out.
    """
    tensor(name, value, floating=True, min_dim=1)
    if torch.isnan(value).any():
        raise ValueError(f"`{name}` contains NaN")
    if torch.isposinf(value).any():
        raise ValueError(f"`{name}` contains +inf")
    if (~torch.isfinite(value)).all(dim=-1).any():
        raise ValueError(f"`{name}` has a row in which every entry is -inf: no token can be sampled")
    return value


def probs(name: str, value) -> torch.Tensor:
    """Probabilities: floating, at least 1-D, finite, non-negative, rows summing to 1."""
    tensor(name, value, floating=True, min_dim=1)
    if not torch.isfinite(value).all():
        raise ValueError(f"`{name}` contains NaN or infinite entries")
    if (value < 0).any():
        raise ValueError(f"`{name}` contains negative probabilities")
    if value.numel() == 0:
        return value
    sums = value.sum(dim=-1, dtype=torch.float64).reshape(-1)
    tol = SUM_TOLERANCE[value.dtype]
    worst = int((sums - 1).abs().argmax())
    if abs(float(sums[worst]) - 1) > tol:
        raise ValueError(
            f"`{name}` has a row that sums to {float(sums[worst]):.6g}, "
            f"not 1 (tolerance {tol:g} for {value.dtype})"
        )
    return value


def real(name: str, value, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) inside the given interval; returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"`{name}` must lie in {left}{lo}, {hi}{right}, got {value:g}")
    return value


def integer(name: str, value, *, low: int) -> int:
    """An integer (not a bool) at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}")
    return value


def generator(name: str, value, device: torch.device, batch_size: int | None = None):
    """``None``, a ``torch.Generator`` or a :class:`typsamp.rng.RowSeeds` on the data's
    device type; a ``RowSeeds`` must have one seed per row when ``batch_size`` is given."""
    if value is None:
        return None
    if isinstance(value, RowSeeds):
        if value.device.type != device.type:
            raise ValueError(f"`{name}` (RowSeeds) lives on {value.device.type} but the tensors are on {device.type}")
        if batch_size is not None and value.batch_size != batch_size:
            raise ValueError(f"`{name}` holds {value.batch_size} row seeds but the batch has {batch_size} rows")
        return value
    if not isinstance(value, torch.Generator):
        raise InputTypeError(
            f"`{name}` must be a torch.Generator, a typsamp RowSeeds or None, got {type(value).__name__}")
    if value.device.type != device.type:
        raise ValueError(f"`{name}` lives on {value.device.type} but the tensors are on {device.type}")
    return value


def probs_pair(name_a: str, a, name_b: str, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two probability tensors that are compared entry by entry: each a distribution
    over its last dimension, the same vocabulary, shapes that broadcast, one device.
    Returns both in the compute dtype (:func:`compute_dtype`)."""
    probs(name_a, a)
    probs(name_b, b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"`{name_a}` and `{name_b}` have different vocabularies: their vocabulary "
                         f"(last) dimensions are {a.shape[-1]} and {b.shape[-1]}")
    try:
        torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(f"the shapes of `{name_a}` {tuple(a.shape)} and `{name_b}` {tuple(b.shape)} "
                         "do not broadcast") from None
    if a.device != b.device:
        raise ValueError(f"`{name_a}` is on {a.device} but `{name_b}` is on {b.device}")
    dtype = compute_dtype(a, b)
    return a.to(dtype), b.to(dtype)
