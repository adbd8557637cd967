"""Where every random number in :mod:`typsamp` comes from (chapter 4's engine, per-row seeds).

Every kernel that needs randomness (sampling a token, a rule's coin flips) asks
:func:`uniform` for it, passing what the caller gave as ``generator``:

* ``None``: torch's global generator;
* a ``torch.Generator``: one stream shared by the whole batch, exactly ``torch.rand``;
* a :class:`RowSeeds`: one independent stream per row, so that what a row draws depends
  only on its own seed and on how many numbers it has drawn so far, never on which
  other rows share its batch (what vLLM offers with a seed per request).

:class:`RowSeeds` is counter-based: number ``i`` of row ``b`` is a fixed hash of
``(seed_b, i)``, SplitMix64's output function applied to ``key_b + i * 0x9E3779B97F4A7C15``
(Steele, Lea and Flood 2014). The hash runs on int64 tensors on the data's device, for
all rows at once: no Python loop over rows and no host synchronisation, so per-row
seeds cost the decode loop nothing extra.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

__all__ = ["RowSeeds", "uniform"]

# SplitMix64's constants, written as the signed int64 values of their 64-bit patterns
# (torch has no uint64 arithmetic; int64 multiplication wraps modulo 2**64 the same way).
_GOLDEN = -7046029254386353131          # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687            # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685            # 0x94D049BB133111EB
_KEY = 0x5EED5EED5EED5EED               # keys a row's stream away from its raw seed


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function: a bijection of 64-bit words that scrambles every bit."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


class RowSeeds:
    """One independent random stream per batch row, seeded by ``seeds`` (one int per row).

    Pass it wherever :mod:`typsamp` takes a ``generator``. Draws of shape ``[B, ...]``
    take ``prod(...)`` consecutive numbers from each row's stream, in row-major order.
    """

    def __init__(self, seeds: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"):
        if isinstance(seeds, torch.Tensor):
            if seeds.dtype != torch.int64 or seeds.dim() != 1:
                raise TypeError(f"`seeds` as a tensor must be 1-D int64, got {seeds.dtype} of shape {tuple(seeds.shape)}")
            values = seeds.tolist()
        elif isinstance(seeds, (list, tuple)):
            values = list(seeds)
        else:
            raise TypeError(f"`seeds` must be a list of ints or a 1-D int64 tensor, got {type(seeds).__name__}")
        if not values:
            raise ValueError("`seeds` must hold at least one seed (one per batch row)")
        for i, s in enumerate(values):
            if isinstance(s, bool) or not isinstance(s, numbers.Integral):
                raise TypeError(f"`seeds[{i}]` must be an integer, got {type(s).__name__}")
            if not 0 <= int(s) < 2 ** 63:
                raise ValueError(f"`seeds[{i}]` must lie in [0, 2**63), got {s}")
        self.device = torch.device(device)
        self.seeds = torch.tensor([int(s) for s in values], dtype=torch.int64, device=self.device)
        self._keys = _mix(self.seeds ^ _KEY)
        self.counters = torch.zeros(len(values), dtype=torch.int64, device=self.device)

    @property
    def batch_size(self) -> int:
        return self.seeds.shape[0]

    def __repr__(self) -> str:
        return f"RowSeeds({self.seeds.tolist()}, device={str(self.device)!r})"

    def words(self, shape: Sequence[int]) -> torch.Tensor:
        """The next ``prod(shape[1:])`` 64-bit words of each row, as int64 of ``shape``."""
        shape = tuple(shape)
        if not shape or shape[0] != self.batch_size:
            raise ValueError(f"a RowSeeds for {self.batch_size} rows can only draw shapes [{self.batch_size}, ...], "
                             f"got {list(shape)}")
        per_row = 1
        for n in shape[1:]:
            per_row *= n
        index = self.counters[:, None] + torch.arange(1, per_row + 1, device=self.device)
        self.counters += per_row
        return _mix(self._keys[:, None] + index * _GOLDEN).reshape(shape)


def uniform(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str,
            generator: torch.Generator | RowSeeds | None = None) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape`` and ``dtype`` (float32 or float64).

    With ``None`` or a ``torch.Generator`` this is exactly ``torch.rand``. With a
    :class:`RowSeeds` the numbers use the top 24 (float32) or 53 (float64) bits of each
    word, so every value is exactly representable and strictly below 1.
    """
    if not isinstance(generator, RowSeeds):
        return torch.rand(tuple(shape), dtype=dtype, device=device, generator=generator)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be float32 or float64, got {dtype}")
    if torch.device(device).type != generator.device.type:
        raise ValueError(f"the RowSeeds live on {generator.device.type} but the data is on {torch.device(device).type}")
    bits = 24 if dtype == torch.float32 else 53
    words = _shift_right(generator.words(shape), 64 - bits)
    return words.to(dtype) * (2.0 ** -bits)
