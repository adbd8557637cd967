"""The static KV cache of the engine's models, and the arguments of a tree pass (chapter 4).

:class:`KVCache` holds keys and values of every layer, ``[n_layer, 2, B, n_head, max_len,
head_dim]``, and a per-row length ``[B]``. A forward pass writes its tokens' keys and
values at given slots; :meth:`KVCache.rollback` drops rejected tokens by lowering the
lengths (nothing is copied), and :meth:`KVCache.compact` moves an accepted tree path's
entries next to the committed prefix. :func:`check_tree` validates a tree pass's
``depths`` and ``ancestors`` (see :meth:`typsamp.model.GPT.forward`).

This module imports only ``torch`` and :mod:`typsamp.checks`, so every model module
(:mod:`typsamp.model`, :mod:`typsamp.gemma`) can build on it without importing another.
"""

from __future__ import annotations

import torch

from typsamp import checks

__all__ = ["KVCache", "check_tree"]


class KVCache:
    """Keys and values of every layer for ``batch_size`` rows of up to ``max_len`` positions.

    ``config`` gives ``n_layer``, ``n_head`` and ``head_dim`` (e.g. a
    :class:`typsamp.model.GPTConfig`).

    ``kv`` is ``[n_layer, 2, B, n_head, max_len, head_dim]`` (index 0 keys, 1 values);
    ``lengths`` ``[B]`` int64 says how many leading positions of each row are valid.
    """

    def __init__(self, config, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (config.n_layer, 2, batch_size, config.n_head, max_len, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[2]

    @property
    def max_len(self) -> int:
        return self.kv.shape[4]

    def rollback(self, lengths: torch.Tensor | int, *, check: bool = True) -> None:
        """Shorten each row to ``lengths`` (a [B] tensor or one int for all rows); no copying.

        A row can only be shortened: the positions beyond its current length hold nothing.
        ``check=False`` skips that check, which reads the lengths back to the host (a
        decode loop that computed them itself passes it).
        """
        lengths = self._check_lengths(lengths) if check else self._as_lengths(lengths)
        self.lengths.copy_(lengths)

    def _as_lengths(self, lengths) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, device=self.lengths.device)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise checks.InputTypeError(f"`lengths` must hold integers, got {lengths.dtype}")
        return lengths.to(torch.long).expand(self.batch_size)

    def _check_lengths(self, lengths) -> torch.Tensor:
        lengths = self._as_lengths(lengths)
        if ((lengths < 0) | (lengths > self.lengths)).any():
            raise ValueError(
                f"`lengths` must lie in [0, current length] for every row: got {lengths.tolist()} "
                f"for current lengths {self.lengths.tolist()}"
            )
        return lengths

    def compact(self, source: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, *,
                check: bool = True) -> None:
        """Move kept entries into consecutive slots, then set each row's length.

        For every row b and k < L, slot ``start[b] + k`` receives the keys and values held
        at slot ``source[b, k]`` (``source`` int64 [B, L]; all entries are read before any
        is written, so sources and destinations may overlap); then row b's length becomes
        ``lengths[b]`` (as :meth:`rollback`). This is the commit of a tree step: the
        accepted path's nodes, scored in scattered slots, move to the slots right after
        the committed prefix. A row with nothing to move passes ``source[b, k] = start[b]
        + k`` (a copy onto itself). ``check=False`` skips the value checks, which read
        the tensors back to the host.
        """
        if not isinstance(source, torch.Tensor) or source.dtype != torch.long or source.dim() != 2 \
                or source.shape[0] != self.batch_size:
            raise ValueError(f"`source` must be int64 of shape [{self.batch_size}, L], got "
                             f"{getattr(source, 'dtype', type(source).__name__)} of shape "
                             f"{tuple(getattr(source, 'shape', ()))}")
        start = torch.as_tensor(start, device=self.lengths.device)
        if start.dtype != torch.long:
            raise checks.InputTypeError(f"`start` must hold int64 slot indices, got {start.dtype}")
        start = start.expand(self.batch_size)
        L = source.shape[1]
        dest = start[:, None] + torch.arange(L, device=source.device)
        if check:
            if L and (((source < 0) | (source >= self.lengths[:, None])).any()
                      or ((start < 0) | (dest[:, -1] >= self.max_len)).any()):
                raise ValueError(
                    f"`source` {source.tolist()} must name held slots (lengths {self.lengths.tolist()}) and "
                    f"`start` {start.tolist()} + {L} must fit in max_len {self.max_len}")
            self._check_lengths(lengths)                 # before anything moves
        if L:
            n_layer, two, B, H, _, D = self.kv.shape
            shape = (n_layer, two, B, H, L, D)
            moved = self.kv.gather(4, source[None, None, :, None, :, None].expand(shape))
            self.kv.scatter_(4, dest[None, None, :, None, :, None].expand(shape), moved)
        self.rollback(lengths, check=False)

    def reset(self) -> None:
        """Empty every row."""
        self.lengths.zero_()

    def place(self, B: int, T: int, offsets: torch.Tensor | None, span: int | None):
        """Where a forward pass of ``T`` new tokens for ``B`` rows goes (the checks every
        model's forward shares). Returns ``(offsets, slots [B, T], S, lowest)``: the rows'
        offsets (default: their lengths, i.e. continue each text), the slots the new keys
        and values are written to, how many leading slots the pass attends to, and the
        smallest offset when it was read back to the host (else None).

        With ``span`` the caller vouches for the bounds (the decode loops know every
        offset's maximum on the host) and nothing is read back; without it one host
        synchronisation checks that the tokens fit and that no row skips positions it
        does not hold, and S becomes the furthest slot written + 1 (so the cost of a
        pass grows with the text, not with ``max_len``)."""
        if B != self.batch_size:
            raise ValueError(f"`tokens` has {B} rows but the cache was set up for {self.batch_size}")
        if offsets is None:
            offsets = self.lengths
        elif offsets.shape != (B,) or offsets.dtype != torch.long:
            raise ValueError(f"`offsets` must be int64 of shape [{B}], got {offsets.dtype} "
                             f"of shape {tuple(offsets.shape)}")
        slots = offsets[:, None] + torch.arange(T, device=offsets.device)          # [B, T]
        if span is not None:
            S = checks.integer("span", span, low=T)
            if S > self.max_len:
                raise ValueError(f"`span` {S} exceeds the cache's max_len {self.max_len}")
            return offsets, slots, S, None
        S, lowest, gap = torch.stack([slots[:, -1].max() + 1, offsets.min(),
                                      (offsets > self.lengths).any().long()]).tolist()
        if S > self.max_len or lowest < 0:
            raise ValueError(
                f"positions must lie in [0, max_len {self.max_len}): `offsets` {offsets.tolist()} "
                f"+ {T} new tokens do not fit")
        if gap:
            raise ValueError(
                f"`offsets` {offsets.tolist()} skip positions the cache does not hold "
                f"(lengths {self.lengths.tolist()}): a row can only continue or overwrite its text")
        return offsets, slots, S, lowest


def _described(value) -> str:
    return f"{getattr(value, 'dtype', type(value).__name__)} of shape {tuple(getattr(value, 'shape', ()))}"


def check_tree(T: int, depths, ancestors, checked: bool = True) -> None:
    """Shapes and dtypes of a tree pass's ``depths``/``ancestors``; their values too
    when ``checked`` (a host read, skipped when the loop passes ``span``)."""
    if depths is None or ancestors is None:
        raise ValueError("a tree pass needs both `depths` and `ancestors`")
    if not isinstance(depths, torch.Tensor) or depths.dtype != torch.long or depths.shape != (T,):
        raise ValueError(f"`depths` must be int64 of shape [{T}], got {_described(depths)}")
    if not isinstance(ancestors, torch.Tensor) or ancestors.dtype != torch.bool or ancestors.shape != (T, T):
        raise ValueError(f"`ancestors` must be bool of shape [{T}, {T}], got {_described(ancestors)}")
    if checked:
        index = torch.arange(T, device=depths.device)
        if not bool(ancestors.diagonal().all()):
            raise ValueError("`ancestors` must be True on its diagonal: every token sees itself")
        if bool(ancestors.triu(1).any()):
            raise ValueError("`ancestors` must be lower-triangular: a token's ancestors come before it")
        if bool(((depths < 0) | (depths > index)).any()):
            raise ValueError("`depths` must lie in [0, t] for token t (ancestors come first)")
