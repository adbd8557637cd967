"""What every verification rule shares: the verdict, the input checks, the rule interface.

A verification rule looks at γ draft tokens x_1..x_γ, the target's distributions
p_1..p_{γ+1} at those positions (one pass of the target) and, for some rules, the draft's
distributions q_1..q_γ; it keeps a prefix of the drafts and adds one token of its own.
Chapter 3 introduces the first rule (speculative sampling), chapter 5 the exact-match
rule, chapter 6 Medusa's typical acceptance. The rules themselves live in
:mod:`typsamp.speculative` (:class:`~typsamp.speculative.RejectionSampling`,
:class:`~typsamp.speculative.ExactMatch`) and :mod:`typsamp.typical`
(:class:`~typsamp.typical.TypicalAcceptance`); this module holds what they have in common
and imports neither of them.

* :class:`Verdict`: the outcome of one step for a batch.
* :func:`check_step`: the shape, dtype, device and value checks of one step's inputs.
* :func:`normalised`: rows divided by their sum in the compute dtype, so a rule's output
  follows the normalised p exactly even when a 16-bit row sums to 1 only within rounding.
* :func:`accepted_prefix`: how many leading drafts passed (the cumprod idiom).
* :func:`emit`: accepted drafts, then the extra token, then -1 padding.
* :class:`Rule`: the interface the engine calls: ``name``, ``needs_draft_probs``,
  ``supports_tree``, a checked :meth:`Rule.verify` and the unchecked :meth:`Rule.kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from typsamp import checks

__all__ = ["Verdict", "check_step", "normalised", "row_sums", "accepted_prefix", "emit", "Rule"]


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification step for a batch of B rows.

    Attributes:
        tokens: int64 [B, γ+1]. Row b holds its accepted drafts, then the one token the
            rule adds (resampled at the first rejection, or the bonus token when all γ
            drafts were accepted), then -1 padding.
        accepted: int64 [B], how many drafts were accepted, 0..γ. Row b emits
            ``accepted[b] + 1`` tokens.
        path: int64 [B, D] for a verdict on a tree of depth D: the accepted candidates'
            indices (0-based, into the proposal's N candidates) from the root down, -1
            padding; ``tokens`` is then [B, D+1] and reads as for a chain. ``None`` for a
            chain, whose accepted candidates are simply the first ``accepted``.
    """

    tokens: torch.Tensor
    accepted: torch.Tensor
    path: torch.Tensor | None = None

    @property
    def emitted(self) -> torch.Tensor:
        """int64 [B]: tokens emitted per row, ``accepted + 1``."""
        return self.accepted + 1


def check_step(draft_tokens, draft_probs, target_probs, generator, validate: bool):
    """Validate one verification step's inputs (shared by every verification rule).

    Shapes, dtypes and devices are always checked (no synchronisation needed); values
    (token ids in range, probabilities non-negative and summing to 1) only when
    ``validate`` is true, because those checks read the tensors back to the host.
    ``generator`` may be ``None``, a ``torch.Generator`` or a
    :class:`typsamp.rng.RowSeeds` with one seed per row. Returns ``(B, gamma, V)``.
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
    checks.generator("generator", generator, target_probs.device, batch_size=B)
    if validate and B > 0:
        if int(draft_tokens.min()) < 0 or int(draft_tokens.max()) >= V:
            raise ValueError(f"`draft_tokens` must be token ids in [0, {V}), got values outside")
        checks.probs("target_probs", target_probs)
        if draft_probs is not None:
            checks.probs("draft_probs", draft_probs)
    return B, gamma, V


def normalised(probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``probs`` in ``dtype``, each row divided by its sum (computed in ``dtype``).

    Validation accepts rows that sum to 1 within the dtype's tolerance (2e-2 for 16-bit
    formats); a rule that used such rows as they are would follow p/Σp only by accident
    of how it spends the missing mass. Every rule therefore works on normalised rows: its
    output follows exactly the normalised target. A row of zeros (possible only with
    ``validate=False``) stays zeros.
    """
    p, total = row_sums(probs, dtype)
    return p / total


def row_sums(probs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of :func:`normalised`: ``probs`` in ``dtype`` and each row's sum
    [..., 1] (a zero sum read as 1). A kernel that reads only some rows or entries divides
    just those by their row's sum: the same divisions, so the same bits as normalised()."""
    p = probs.to(dtype)
    total = p.sum(dim=-1, keepdim=True)
    return p, torch.where(total > 0, total, torch.ones_like(total))


def accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """int64 [B]: how many leading entries of each row of ``ok`` (bool [B, γ]) are true.

    The cumulative product of the pass/fail flags is 1 up to the first failure and 0
    after it, so its sum is the length of the accepted prefix.
    """
    return ok.long().cumprod(dim=1).sum(dim=1)


def emit(draft_tokens: torch.Tensor, accepted: torch.Tensor, extra: torch.Tensor) -> Verdict:
    """Assemble a :class:`Verdict`: accepted drafts, the extra token, then -1 padding."""
    B, gamma = draft_tokens.shape
    position = torch.arange(gamma + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((B, 1), -1)], dim=1)
    n = accepted[:, None]
    tokens = torch.where(position < n, padded, torch.where(position == n, extra[:, None], -1))
    return Verdict(tokens=tokens, accepted=accepted)


def _check_parents(parents, draft_tokens) -> torch.Tensor:
    """``parents`` is a tensor of one entry per candidate (``draft_tokens`` [B, N]), so the
    shapes of the probabilities are :func:`check_step`'s: a tree of N candidates has N + 1
    rows of p. Its dtype and order (``-1 <= parents[i] < i``) are checked by the rule's
    tree kernel (:func:`typsamp.tree.topology`, once per tensor), which this module cannot
    import (the tree module builds on it)."""
    checks.tensor("parents", parents)
    if isinstance(draft_tokens, torch.Tensor) and draft_tokens.dim() == 2 and parents.dim() == 1:
        N = parents.numel()
        if draft_tokens.shape[1] != N:
            raise ValueError(f"a tree of {N} candidates needs `draft_tokens` of shape [B, {N}], got "
                             f"{tuple(draft_tokens.shape)}")
    return parents


class Rule:
    """A verification rule: the interface :func:`typsamp.generate.speculative` calls.

    Subclasses set the class attributes and implement :meth:`kernel`; they are frozen
    dataclasses whose fields are the rule's parameters, validated on construction, so a
    rule object is always valid and prints as what it is (``TypicalAcceptance(epsilon=0.09,
    delta=0.3, extra='greedy')``).

    Attributes:
        name: the rule's name everywhere (bench rows, transfer, chapters): ``"rejection"``,
            ``"match"`` or ``"typical"``. Method labels are ``f"{name}_sampled"`` or
            ``f"{name}_greedy"`` after how the drafts were made.
        needs_draft_probs: True when the rule reads the draft distributions q (the engine
            then samples drafts from q and passes q); False when token ids suffice.
        supports_tree: True when the rule can verify a tree of candidates: its kernel then
            takes ``parents=`` and returns a verdict with ``path`` (see :mod:`typsamp.generate`).
    """

    name: ClassVar[str] = ""
    needs_draft_probs: ClassVar[bool] = False
    supports_tree: ClassVar[bool] = False

    def verify(self, draft_tokens, draft_probs, target_probs, generator=None, *,
               parents=None, validate: bool = True) -> Verdict:
        """Check the inputs (:func:`check_step`), then run :meth:`kernel`.

        With ``parents`` (int64 [N], or anything with a ``parents`` tensor such as a
        :class:`typsamp.tree.TreeSpec`) the N candidates
        form a tree (:mod:`typsamp.tree`): ``target_probs`` is then [B, N+1, V] with row 0
        the distribution after the last committed token and row 1 + i the one after
        candidate i, and the verdict carries ``path``. A rule whose ``supports_tree`` is
        False refuses a tree with a ``ValueError``.

        Args:
            draft_tokens: int64 [B, γ].
            draft_probs: [B, γ, V] draft distributions, or ``None``. Rules that do not
                read q accept a tensor (checked as a tensor) and ignore it.
            target_probs: [B, γ+1, V], the target's warped distributions.
            generator: ``None``, a ``torch.Generator`` or a :class:`typsamp.rng.RowSeeds`.
            parents: None (a chain) or the tree's parents (see above).
            validate: check values too (reads them back to the host); shapes always.
        """
        if parents is not None:
            if not self.supports_tree:
                raise ValueError(f"the rule {self.name!r} does not verify trees (its supports_tree is False)")
            parents = _check_parents(getattr(parents, "parents", parents), draft_tokens)
        if self.needs_draft_probs:
            check_step(draft_tokens, draft_probs, target_probs, generator, validate)
        else:
            if draft_probs is not None and not isinstance(draft_probs, torch.Tensor):
                raise checks.InputTypeError(
                    f"`draft_probs` must be a tensor or None, got {type(draft_probs).__name__}")
            check_step(draft_tokens, None, target_probs, generator, validate)
        if parents is not None:
            return self.kernel(draft_tokens, draft_probs, target_probs, generator, parents=parents)
        return self.kernel(draft_tokens, draft_probs, target_probs, generator)

    def __call__(self, draft_tokens, draft_probs, target_probs, generator=None, *,
                 parents=None, validate: bool = True) -> Verdict:
        """Same as :meth:`verify`."""
        return self.verify(draft_tokens, draft_probs, target_probs, generator, parents=parents,
                           validate=validate)

    def kernel(self, draft_tokens, draft_probs, target_probs, generator) -> Verdict:
        """The rule itself, with no checks and no host synchronisation (the engine's hot path)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `kernel`")
