"""The decoding engine: autoregressive and speculative generation (chapter 4).

:func:`autoregressive` samples one token per target pass. :func:`speculative` runs the
loop of speculative decoding as four named steps, each batched over rows:

1. **propose**: a *proposer* offers candidate tokens (a :class:`Proposal`): a chain of
   γ drafts from a small model (:class:`DraftModel`), and later Medusa's heads or
   prompt lookup, whose candidates may form a tree;
2. **score**: one target pass over the last committed token and every candidate, with
   positions and an attention mask derived from the candidates' ``parents``;
3. **verify**: the rule (:class:`typsamp.rules.Rule`: ``RejectionSampling()``,
   ``ExactMatch()``, ``TypicalAcceptance()``) keeps a prefix (a path) of the candidates
   and adds one token of its own;
4. **commit**: the kept tokens join each row's text, and the caches follow: for a chain
   only their lengths change, for a tree the accepted nodes' keys and values are moved
   next to the committed prefix (:meth:`typsamp.model.KVCache.compact`).

Both loops warp logits with the same :class:`typsamp.sampling.Warp`, so target and
draft always see the same temperature and truncation, and both read the device once
per step (one host synchronisation: which rows are left, how far the longest reaches,
and whether every model returned finite logits).

Cache bookkeeping, per row, with ``n`` committed tokens (prompt plus generated):

* the target's cache holds positions ``0 .. n-2``; a step feeds the last committed
  token and the N candidates into slots ``n-1 .. n+N-1`` (one forward pass) and so
  scores p_1 .. p_{N+1}: for a chain (N = γ) p_i is the target's distribution at draft
  i, for a tree p at index 1 + i is the distribution *after* node i (index 0: after the
  last committed token);
* a :class:`DraftModel`'s cache holds at least ``0 .. n-3``; a round of drafting first
  feeds the last two committed tokens at ``n-2, n-1`` (re-writing position n-2 when the
  draft had already seen it, which changes nothing; a row with a one-token prompt feeds
  position 0 and one placeholder), then one token per pass;
* after a verdict with ``a`` candidates accepted, ``n`` grows by ``a + 1`` (less when an
  end token comes first) and the caches are rolled back to the accepted prefix.

Rows stop at ``max_new_tokens`` or at their first end token (``eos_token_id``); a row
that is done rides along in the batched passes, parked where its passes write nothing
that is read, and nothing it computes is committed. Prompts may be ragged (a list of
1-D tensors): every row keeps its own length, and is decoded as if it were alone.

Randomness: ``seed=None`` uses torch's global generator, an int seeds one generator for
the batch, and a list of ints gives every row its own stream
(:class:`typsamp.sampling.RowSeeds`), so a row's output does not depend on its
batch-mates.

**Models** are anything with ``setup_cache(batch_size, max_len)``, a ``cache`` with
``lengths`` and ``rollback(lengths, check=)``, and
``__call__(tokens [B, T], offsets [B], span=max(offsets) + T) -> logits [B, T, V]``
writing its cache at the given offsets (:class:`typsamp.model.GPT`, or a
``transformers`` causal LM behind :class:`typsamp.hf.HFCausalLM`: batch 1, chains
only). The loops know every offset's maximum on the host, so the models never read
their offsets back themselves. A target that
scores trees also takes ``depths`` (int64 [T], each token's position relative to its
row's offset) and ``ancestors`` (bool [T, T], which new tokens each one sees: itself
and its ancestors), and its cache has ``compact(source [B, L], start [B], lengths [B],
check=)``; :class:`typsamp.model.GPT` documents both. Chains use neither.

**Proposers** (the propose step) implement four methods and two attributes:

* ``vocab_size``: int, or None when unknown (compared with the target's up front);
* ``passes``: forward passes made since :meth:`start` (``Generation.draft_passes``);
* ``width(gamma) -> int``: the most candidates N one proposal holds (sizes the caches);
* ``start(prompt, prompt_lengths, *, max_new_tokens, gamma, warp) -> None``: check
  limits (raise ``ValueError`` before any work), allocate, prefill. ``prompt`` is
  int64 [B, P] padded on the right, ``prompt_lengths`` int64 [B];
* ``propose(seq, n, top, generator) -> Proposal``: ``seq`` [B, L] holds each row's
  committed tokens in ``seq[b, :n[b]]``, ``n`` int64 [B] on the device, ``top`` the
  host int ``max(n)``; ``generator`` as the loop's;
* ``commit(n) -> None``: row b now holds ``n[b]`` committed tokens (roll back state).

A proposer that reads the target's hidden states (Medusa's heads) sets
``needs_hidden = True`` and implements ``observe(hidden [B, T, H], end [B]) -> None``; the
target must then have ``returns_hidden = True`` and return ``(logits, hidden)`` from
``__call__(..., return_hidden=True)`` (:class:`typsamp.gemma.Gemma` does), the final-normed
states its head reads. The engine calls ``observe`` after the prefill (the prefill's states,
``end = prompt_lengths - 2``; -1 for rows of a one-token prompt; no call when every prompt
has one token) and after every verify (the scored pass's states, index 0 the last committed
token and 1 + i candidate i; ``end`` the index of the last accepted candidate, 0 when none
was). ``hidden[b, end[b]]`` is the state whose distribution gave row b's newest committed
token, so a head that predicts k tokens past it proposes the candidate at depth k; ``end =
-1`` means there is no such state yet.

**Tree rules** (``rule.supports_tree``) are called as ``rule.kernel(tokens [B, N], q,
p [B, N+1, V], generator, parents=parents)`` and return a verdict whose ``tokens``
[B, D+1] and ``accepted`` [B] read as for a chain (accepted path, then the rule's
extra token, then -1) and whose ``path`` int64 [B, D] names the accepted nodes in order
(-1 padding); D is the tree's depth. A tree proposal with a rule whose
``supports_tree`` is False is refused with a ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from typsamp import checks, sampling, stats
from typsamp import tree as tree_tables
from typsamp.speculative import RejectionSampling

__all__ = ["Generation", "Proposal", "Proposer", "DraftModel", "Tree", "tree", "autoregressive",
           "speculative"]

#: Largest seed of one ``torch.Generator`` (its seeds are unsigned 64-bit words).
MAX_SEED = 2 ** 64 - 1


@dataclass
class Generation:
    """Generated tokens and what it took to make them.

    Attributes:
        tokens: int64 [B, max_new_tokens], the new tokens of each row (prompt excluded),
            -1 after the row's end (its first end token, kept, or max_new_tokens).
        lengths: int64 [B], each row's number of new tokens.
        origin: int8 [B, max_new_tokens], where each token came from
            (:data:`typsamp.stats.ORIGIN`): 0 autoregressive, 1 an accepted draft, 2 the
            rule's token at a rejection, 3 the bonus token after every draft passed,
            -1 padding.
        steps: decoding steps (one target pass each after the prefill).
        target_passes, draft_passes: forward passes, prefill included.
        drafted, accepted: candidates proposed and accepted, summed over rows, counting
            only steps in which a row still needed tokens (0 for autoregressive).
        gamma: most candidates a step can accept (γ for a chain, the depth of a tree;
            0 for autoregressive).
        accepted_lengths: int64 [steps, B], candidates accepted per row and step (-1
            once a row is done); empty for autoregressive.
        wall_time: seconds, prefill included.
        prefill_time: seconds of the prefill, the first part of ``wall_time``: the
            target's pass over the prompt (speculative decoding: over all of it but the
            last token, none for a one-token prompt) and the proposer's start; None where
            the maker of the Generation kept no such clock.
        decoded_tokens: tokens the passes after the prefill committed, summed over rows
            (None where not counted): autoregressive decoding, each row's tokens but its
            first (the prefill's logits give it); speculative decoding, every committed
            token, the last step's tokens past ``max_new_tokens`` included. Those were
            verified and a longer run keeps them; leaving them out would charge the last
            step's whole cost to part of its tokens and understate the steady rate.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    steps: int = 0
    target_passes: int = 0
    draft_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    gamma: int = 0
    accepted_lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    wall_time: float = 0.0
    prefill_time: float | None = None
    decoded_tokens: int | None = None

    @property
    def decode_rate(self) -> float | None:
        """Tokens per second after the prefill: ``decoded_tokens`` / (``wall_time`` −
        ``prefill_time``); None without the clock or when nothing was decoded after it."""
        if self.prefill_time is None or not self.decoded_tokens:
            return None
        seconds = self.wall_time - self.prefill_time
        return self.decoded_tokens / seconds if seconds > 0 else None

    @property
    def examined(self) -> int:
        """Drafts the rule actually judged: the accepted ones plus one rejection per step
        that stopped early. Drafts after a rejection are thrown away unexamined."""
        lengths = self.accepted_lengths
        live = lengths >= 0
        return self.accepted + int((live & (lengths < self.gamma)).sum())

    @property
    def alpha(self) -> float:
        """Measured per-draft acceptance rate α: accepted / examined.

        This is the α of Leviathan et al. (the chance that a draft the rule looks at is
        accepted). accepted / drafted would be smaller, counting the drafts discarded
        after a rejection as failures. nan when nothing was examined.
        """
        examined = self.examined
        return self.accepted / examined if examined else float("nan")

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per row and step (accepted + 1 for speculative decoding)."""
        lengths = self.accepted_lengths
        live = lengths >= 0
        return float((lengths[live] + 1).double().mean()) if live.any() else float("nan")

    def _row_alpha(self):
        if self.gamma < 1 or self.accepted_lengths.numel() == 0:
            return None
        return stats.row_alpha(self.accepted_lengths, self.gamma)

    @property
    def row_alpha(self) -> torch.Tensor:
        """float64 [B]: each row's own α (accepted / examined; nan where nothing was
        examined, and for autoregressive decoding). See :func:`typsamp.stats.row_alpha`."""
        r = self._row_alpha()
        return torch.full((self.tokens.shape[0],), math.nan, dtype=torch.float64) if r is None else r.per_row

    @property
    def row_alpha_se(self) -> torch.Tensor:
        """float64 [B]: the binomial standard error of each row's α
        (:attr:`typsamp.stats.RowAlpha.per_row_se`)."""
        r = self._row_alpha()
        return torch.full((self.tokens.shape[0],), math.nan, dtype=torch.float64) if r is None else r.per_row_se


# ---------------------------------------------------------------------------------------
# Proposals and the trees they form


@dataclass(frozen=True)
class Proposal:
    """Candidates offered by a proposer for one step.

    Attributes:
        tokens: int64 [B, N], the candidate tokens of each row.
        parents: int64 [N], shared by all rows: ``parents[i]`` is the candidate that
            node i follows, or -1 for a child of the last committed token. Parents come
            before their children. A chain is ``parents[i] = i - 1``. Return the same
            tensor object every step when the shape does not change: the engine derives
            positions and masks from it once (:func:`tree`).
        q: [B, N, V] the warped distributions the candidates were sampled from, or None
            (deterministic candidates: point masses).
        finite: bool [] tensor, False when the proposer's model returned NaN or infinite
            logits this step (the engine reads it in its one synchronisation per step
            and raises), or None when there is nothing to check.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    q: torch.Tensor | None = None
    finite: torch.Tensor | None = None


@dataclass(frozen=True)
class Tree:
    """What the engine derives once from a proposal's ``parents`` (see :func:`tree`).

    Index 0 is the last committed token, index 1 + i candidate i.

    Attributes:
        parents: int64 [N], as given.
        chain: True when ``parents[i] = i - 1`` for every i (the plain causal pass).
        depths: int64 [N + 1], positions relative to the last committed token.
        ancestors: bool [N + 1, N + 1], ``ancestors[t, u]``: u is t or an ancestor of t.
        leaf: bool [N + 1], nodes without children.
        depth: the longest root path, in candidates (D).
    """

    parents: torch.Tensor
    chain: bool
    depths: torch.Tensor
    ancestors: torch.Tensor
    leaf: torch.Tensor
    depth: int


def tree(parents: torch.Tensor) -> Tree:
    """Check ``parents`` (int64 [N], N >= 1, ``-1 <= parents[i] < i``) and derive the
    positions, ancestor mask and leaves of the candidates, from the tree rules' own
    :func:`typsamp.tree.topology` (one host read, shared with them)."""
    topo = tree_tables.topology(parents)
    N = parents.numel()
    ancestors = torch.zeros(N + 1, N + 1, dtype=torch.bool, device=parents.device)
    ancestors[:, 0] = True                                   # every node sees the root
    rows = torch.arange(N + 1, device=parents.device)[:, None].expand_as(topo.root_paths)
    on_path = topo.root_paths >= 0
    ancestors[rows[on_path], topo.root_paths[on_path] + 1] = True
    return Tree(parents=parents, chain=topo.chain, depths=topo.depth, ancestors=ancestors,
                leaf=topo.children[:, 0] < 0, depth=topo.max_depth)


def _clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Proposer(Protocol):
    """What :func:`speculative` needs from a proposer (see the module docstring)."""

    vocab_size: int | None
    passes: int

    def width(self, gamma: int) -> int: ...

    def start(self, prompt: torch.Tensor, prompt_lengths: torch.Tensor, *, max_new_tokens: int,
              gamma: int, warp: sampling.Warp) -> None: ...

    def propose(self, seq: torch.Tensor, n: torch.Tensor, top: int, generator) -> Proposal: ...

    def commit(self, n: torch.Tensor) -> None: ...


def _vocab_size(model) -> int | None:
    size = getattr(model, "vocab_size", None)
    if size is None:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, numbers.Integral) and not isinstance(size, bool) else None


def _block_size(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None) or getattr(config, "n_positions", None)


def _fits(model, name: str, needed: int, how: str) -> None:
    """Raise unless the ``name`` model has ``needed`` positions (``how`` says which)."""
    limit = _block_size(model)
    if limit is not None and needed > limit:
        raise ValueError(f"{how} = {needed} positions exceed the `{name}` model's block_size {limit}")


class DraftModel:
    """The proposer of classic speculative decoding: a small model drafts a chain.

    Each step drafts γ tokens one pass at a time after feeding the last two committed
    tokens (see the module docstring). ``greedy=False`` samples each draft from the
    warped draft distribution q and hands q to the rule; ``greedy=True`` takes q's
    argmax (the logits' own argmax, skipping the warp, whenever ``warp.keeps_argmax``)
    and hands ``q=None``, deterministic drafts as Medusa makes them.
    """

    def __init__(self, model, greedy: bool = False):
        if not callable(model) or not hasattr(model, "setup_cache"):
            raise checks.InputTypeError(
                f"`model` must be a model with setup_cache() and a cache, got {type(model).__name__}")
        if not isinstance(greedy, bool):
            raise checks.InputTypeError(f"`greedy` must be a bool, got {type(greedy).__name__}")
        self.model = model
        self.greedy = greedy
        self.vocab_size = _vocab_size(model)
        self.passes = 0

    def __repr__(self) -> str:
        return f"DraftModel({type(self.model).__name__}, greedy={self.greedy})"

    def width(self, gamma: int) -> int:
        return gamma

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp) -> None:
        B, P = prompt.shape
        # Positions written: up to the longest row's n - 1 + γ - 2 with n <= P + max_new - 1
        # (drafts x_1 .. x_{γ-1} are fed; x_γ never is); a one-token prompt writes one
        # placeholder at position 1.
        needed = max(P + max_new_tokens + gamma - 2, 2)
        _fits(self.model, "draft", needed, "for the draft, the longest prompt + max_new_tokens + gamma - 2")
        self.gamma, self.warp, self.passes = gamma, warp, 0
        self.take_argmax = self.greedy and warp.keeps_argmax
        device = prompt.device
        self.parents = torch.arange(-1, gamma - 1, device=device)
        self.two = torch.arange(2, device=device)
        # Rows shorter than two committed tokens need the clamped re-feed: always for a
        # row parked at position 1 (prompt 1, max_new_tokens 1), else only at the start.
        self.short_start = int(prompt_lengths.min()) < 2
        self.short_always = self.short_start and max_new_tokens == 1
        self.model.setup_cache(B, needed)
        if P > 2:                                        # the draft sees 0 .. P-3
            self.model(prompt[:, :P - 2], torch.zeros(B, dtype=torch.long, device=device), span=P - 2)
            self.passes += 1
            self.model.cache.rollback((prompt_lengths - 2).clamp(min=0), check=False)

    def propose(self, seq, n, top, generator) -> Proposal:
        model, warp, gamma = self.model, self.warp, self.gamma
        if self.short_start or self.short_always:
            self.short_start = False
            start = (n - 2).clamp(min=0)
            logits = model(seq.gather(1, start[:, None] + self.two), start, span=max(top, 2))
            at = (n - 1 - start)[:, None, None].expand(-1, 1, logits.shape[-1])
            q_logits = logits.gather(1, at).squeeze(1)
        else:
            q_logits = model(seq.gather(1, (n - 2)[:, None] + self.two), n - 2, span=top)[:, -1]
        self.passes += 1
        # Each pass's largest logit per row certifies its logits (finite iff no NaN, no
        # +inf and some finite entry; checked in the engine's one sync per step). Greedy
        # drafts get it with the argmax; the warp cannot tell (it returns such rows
        # without a flag), so sampled drafts take it separately.
        drafts, q_rows, maxima = [], [], []
        for i in range(gamma):
            if self.take_argmax:                         # the warp keeps the argmax: skip it
                top_value, x = q_logits.max(dim=-1)
                maxima.append(top_value)
            else:
                maxima.append(q_logits.amax(dim=-1))
                q = warp(q_logits)
                if self.greedy:
                    x = q.argmax(dim=-1)
                else:
                    x = sampling.sample_weights(q, generator)
                    q_rows.append(q)
            drafts.append(x)
            if i + 1 < gamma:
                q_logits = model(x[:, None], n + i, span=top + i + 1)[:, -1]
                self.passes += 1
        return Proposal(tokens=torch.stack(drafts, dim=1), parents=self.parents,
                        q=torch.stack(q_rows, dim=1) if q_rows else None,
                        finite=torch.isfinite(torch.stack(maxima)).all())

    def commit(self, n) -> None:
        keep = n - 2 if not self.short_always else (n - 2).clamp(min=0)
        self.model.cache.rollback(torch.minimum(self.model.cache.lengths.to(n.device), keep), check=False)


# ---------------------------------------------------------------------------------------
# Checking the arguments (all before the first forward pass)


def _prompt(prompt) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(padded int64 [B, P], lengths int64 [B], ragged) from a tensor or a list of rows."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dtype != torch.long or prompt.dim() != 2:
            raise ValueError(f"`prompt` must be int64 of shape [B, P] (or a list of 1-D int64 tensors), "
                             f"got {prompt.dtype} of shape {tuple(prompt.shape)}")
        if prompt.shape[0] < 1 or prompt.shape[1] < 1:
            raise ValueError(f"`prompt` needs at least one row and one token, got shape {tuple(prompt.shape)}")
        return prompt, torch.full((prompt.shape[0],), prompt.shape[1], device=prompt.device), False
    if not isinstance(prompt, (list, tuple)):
        raise checks.InputTypeError(
            f"`prompt` must be an int64 tensor [B, P] or a list of 1-D int64 tensors, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("`prompt` needs at least one row, got an empty list")
    for i, row in enumerate(prompt):
        if not isinstance(row, torch.Tensor) or row.dtype != torch.long or row.dim() != 1 or row.numel() < 1:
            raise ValueError(f"`prompt[{i}]` must be a 1-D int64 tensor of at least one token, got "
                             f"{getattr(row, 'dtype', type(row).__name__)} of shape {tuple(getattr(row, 'shape', ()))}")
        if row.device != prompt[0].device:
            raise ValueError(f"`prompt[{i}]` is on {row.device} but `prompt[0]` on {prompt[0].device}")
    sizes = [row.numel() for row in prompt]
    padded = torch.zeros(len(prompt), max(sizes), dtype=torch.long, device=prompt[0].device)
    for i, row in enumerate(prompt):
        padded[i, :sizes[i]] = row
    return padded, torch.tensor(sizes, device=padded.device), len(set(sizes)) > 1


def _check_ids(prompt: torch.Tensor, vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    low, high = torch.stack([prompt.min(), prompt.max()]).tolist()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"`prompt` holds token ids outside the vocabulary [0, {vocab_size}): "
                         f"min {low}, max {high}")


def _check_warp(warp) -> sampling.Warp:
    if not isinstance(warp, sampling.Warp):
        raise checks.InputTypeError(
            f"`warp` must be a typsamp.sampling.Warp (e.g. Warp(temperature=0.7, top_p=0.9)), "
            f"got {type(warp).__name__}")
    return warp


def _eos(eos_token_id, vocab_size: int | None, device) -> torch.Tensor | None:
    """The end tokens as an int64 tensor, or None."""
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool):
        ids = [eos_token_id]
    elif isinstance(eos_token_id, (set, frozenset, list, tuple)):
        ids = sorted(eos_token_id) if all(isinstance(i, numbers.Integral) for i in eos_token_id) else list(eos_token_id)
        if not ids:
            raise ValueError("`eos_token_id` must hold at least one token id, got an empty collection")
    else:
        raise checks.InputTypeError(
            f"`eos_token_id` must be an int, a set of ints or None, got {type(eos_token_id).__name__}")
    ids = [checks.integer("eos_token_id", i, low=0) for i in ids]
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(f"`eos_token_id` {max(ids)} lies outside the vocabulary [0, {vocab_size})")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _generator(seed, batch_size: int, device: torch.device):
    """None, one torch.Generator (an int seed), or RowSeeds (a list: one seed per row)."""
    if seed is None:
        return None
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"`seed` gives {len(seed)} row seeds for a batch of {batch_size} rows")
        for i, s in enumerate(seed):
            s = checks.integer(f"seed[{i}]", s, low=0)
            if s >= 2 ** 63:
                raise ValueError(f"`seed[{i}]` must be < 2**63, got {s}")
        return sampling.RowSeeds([int(s) for s in seed], device)
    seed = checks.integer("seed", seed, low=0)
    if seed > MAX_SEED:
        raise ValueError(f"`seed` must be <= 2**64 - 1, got {seed}")
    return torch.Generator(device=device).manual_seed(seed)


def _check_rule(rule):
    if rule is None or not callable(getattr(rule, "kernel", None)) \
            or not hasattr(rule, "needs_draft_probs") or not hasattr(rule, "supports_tree"):
        raise checks.InputTypeError(
            "`rule` must be a verification rule object such as typsamp.speculative.RejectionSampling(), "
            f"ExactMatch() or typsamp.typical.TypicalAcceptance(), got {rule!r}")
    return rule


def _proposer(proposer_or_draft, rule):
    if all(callable(getattr(proposer_or_draft, name, None)) for name in ("start", "propose", "commit", "width")):
        return proposer_or_draft
    if callable(proposer_or_draft) and hasattr(proposer_or_draft, "setup_cache"):
        return DraftModel(proposer_or_draft, greedy=not rule.needs_draft_probs)
    raise checks.InputTypeError(
        "`proposer_or_draft` must be a proposer (e.g. typsamp.generate.DraftModel(model)) or a draft model, "
        f"got {type(proposer_or_draft).__name__}")


def _not_finite(model: str, step: int) -> ValueError:
    return ValueError(
        f"the {model} model returned NaN or infinite logits at step {step} (step 0 is the prefill): "
        "NaN, +inf, or a row whose entries are all -inf (-inf alone is allowed: it masks a token)")


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """bool []: no NaN, no +inf and at least one finite entry in every row (one reduction)."""
    return torch.isfinite(logits.amax(dim=-1)).all()


def _origin(accepted_lengths: torch.Tensor, codes: torch.Tensor, width: int, lengths: torch.Tensor) -> torch.Tensor:
    """int8 [B, width] origin codes from the per-step accepted counts [S, B] and the code
    (2 or 3) of each step's extra token [S, B]; -1 at and after each row's length."""
    S, B = accepted_lengths.shape
    live = accepted_lengths >= 0
    a = accepted_lengths.clamp(min=0)
    emitted = torch.where(live, a + 1, 0)
    start = emitted.cumsum(0) - emitted
    at = torch.where(live & (start + a < width), start + a, width)       # [S, B]; width = discard
    out = torch.ones(B, width + 1, dtype=torch.int8)
    out.scatter_(1, at.t(), codes.t().to(torch.int8))
    out = out[:, :width]
    return out.masked_fill(torch.arange(width) >= lengths.cpu()[:, None], -1)


# ---------------------------------------------------------------------------------------
# Autoregressive decoding


def autoregressive(model, prompt, max_new_tokens: int, *, warp: sampling.Warp = sampling.Warp(),
                   eos_token_id=None, seed=None) -> Generation:
    """Sample ``max_new_tokens`` tokens after each row of ``prompt``, one pass each.

    Args:
        model: see the module docstring.
        prompt: int64 [B, P], or a list of B 1-D int64 tensors (ragged prompts).
        max_new_tokens: tokens to generate per row (fewer when a row ends early).
        warp: the :class:`typsamp.sampling.Warp` applied to every step's logits.
        eos_token_id: None, an int or a set of ints; a row stops after its first one.
        seed: None, an int (one generator) or a list of B ints (one stream per row).
    """
    prompt, prompt_lengths, ragged = _prompt(prompt)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    warp = _check_warp(warp)
    B, P = prompt.shape
    device = prompt.device
    V = _vocab_size(model)
    _check_ids(prompt, V)
    eos = _eos(eos_token_id, V, device)
    # The prompt fills positions 0 .. P-1 and step i feeds its token at P + i for
    # i < max_new_tokens - 1 (the last token is never fed).
    needed = P + max_new_tokens - 1
    _fits(model, "model", needed, "the longest prompt + max_new_tokens - 1")
    generator = _generator(seed, B, device)
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    maxima = None                                         # each step's largest logit per row
    steps = 0
    start = time.perf_counter()
    with torch.inference_mode():
        model.setup_cache(B, needed)
        logits = model(prompt, torch.zeros(B, dtype=torch.long, device=device), span=P)
        if ragged:
            logits = logits.gather(1, (prompt_lengths - 1)[:, None, None].expand(-1, 1, logits.shape[-1]))
            model.cache.rollback(prompt_lengths, check=False)
        logits = logits[:, -1]
        prefilled = _clock(device)
        maxima = torch.empty(max_new_tokens, B, dtype=logits.dtype, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device) if eos is not None else None
        for i in range(max_new_tokens):
            # NaN, +inf or a row of -inf make the row's maximum non-finite: recorded here
            # (one op), checked at the end, or at each step's sync when rows can end early.
            torch.amax(logits, dim=-1, out=maxima[i])
            # T = 0: the warp is a one-hot vector on the argmax, so sampling it returns the
            # argmax; taken directly (no one-hot, no cumulative sum over the vocabulary).
            token = logits.argmax(dim=-1) if warp.greedy else sampling.sample_weights(warp(logits), generator)
            out[:, i] = token
            steps += 1
            if i + 1 == max_new_tokens:
                break
            if eos is not None:                          # the one sync per step, only to stop early
                done = done | torch.isin(token, eos)
                all_done, ok = torch.stack([done.all(), torch.isfinite(maxima[i]).all()]).tolist()
                if not ok:
                    raise _not_finite("target", i)
                if all_done:
                    break
            logits = model(token[:, None], prompt_lengths + i, span=P + i + 1)[:, -1]
    bad = (~torch.isfinite(maxima[:steps]).all(dim=1)).nonzero()
    if bad.numel():
        raise _not_finite("target", int(bad[0]))
    lengths = torch.full((B,), steps, dtype=torch.long, device=device)
    if eos is not None:
        hit = torch.isin(out[:, :steps], eos)
        lengths = torch.where(hit.any(1), hit.byte().argmax(1) + 1, lengths)
    column = torch.arange(max_new_tokens, device=device)
    tokens = out.masked_fill(column >= lengths[:, None], -1)
    origin = torch.zeros(B, max_new_tokens, dtype=torch.int8, device=device).masked_fill(column >= lengths[:, None], -1)
    return Generation(tokens=tokens, lengths=lengths, origin=origin, steps=steps, target_passes=steps,
                      wall_time=time.perf_counter() - start, prefill_time=prefilled - start,
                      decoded_tokens=int(lengths.sum()) - B)


# ---------------------------------------------------------------------------------------
# Speculative decoding: propose -> score -> verify -> commit

_DEFAULT_RULE = RejectionSampling()


def speculative(target, proposer_or_draft, prompt, max_new_tokens: int, *, gamma: int = 4,
                rule=_DEFAULT_RULE, warp: sampling.Warp = sampling.Warp(), eos_token_id=None,
                seed=None) -> Generation:
    """Speculative decoding of ``max_new_tokens`` tokens after each row of ``prompt``.

    Args:
        target: the model whose distribution is decoded (see the module docstring).
        proposer_or_draft: a proposer (:class:`DraftModel` or anything following the
            module docstring's interface), or a bare draft model, which is wrapped as
            ``DraftModel(model, greedy=not rule.needs_draft_probs)``: sampled drafts for
            rules that read q, greedy drafts for rules that read only token ids.
        prompt: int64 [B, P] (P >= 1), or a list of B 1-D int64 tensors (ragged prompts).
        max_new_tokens: tokens to generate per row (fewer when a row ends early).
        gamma: drafts per step, for proposers that take it (a DraftModel does).
        rule: the verification rule object (:class:`typsamp.rules.Rule`), default
            ``RejectionSampling()``.
        warp: the :class:`typsamp.sampling.Warp` applied identically to target and draft.
        eos_token_id: None, an int or a set of ints; a row stops after its first one.
        seed: None, an int (one generator for drafting and verification) or a list of B
            ints (one stream per row: a row's output does not depend on its batch-mates).
    """
    rule = _check_rule(rule)
    proposer = _proposer(proposer_or_draft, rule)
    hidden = bool(getattr(proposer, "needs_hidden", False))
    if hidden and not getattr(target, "returns_hidden", False):
        raise ValueError(f"the proposer {type(proposer).__name__} reads the target's hidden states, but the "
                         f"target {type(target).__name__} does not return them (no `returns_hidden`)")
    warp = _check_warp(warp)
    prompt, prompt_lengths, ragged = _prompt(prompt)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    gamma = checks.integer("gamma", gamma, low=1)
    B, P = prompt.shape
    device = prompt.device
    V = _vocab_size(target)
    if V is not None and proposer.vocab_size is not None and proposer.vocab_size != V:
        raise ValueError(f"draft and target vocabularies differ: the draft has {proposer.vocab_size} tokens, "
                         f"the target {V}")
    _check_ids(prompt, V if V is not None else proposer.vocab_size)
    eos = _eos(eos_token_id, V, device)
    N = checks.integer("proposer width", proposer.width(gamma), low=1)
    if P + max_new_tokens + N >= 2 ** 31:
        raise ValueError(f"`max_new_tokens` ({max_new_tokens}) + `gamma` ({gamma}) are too large")
    # The target writes slots up to n - 1 + N with n <= P + max_new_tokens - 1 (a row
    # that is done is parked there); the text needs one more for the extra token.
    needed = P + max_new_tokens + N - 1
    _fits(target, "target", needed, "for the target, the longest prompt + max_new_tokens + gamma - 1")
    generator = _generator(seed, B, device)
    seq = torch.zeros(B, P + max_new_tokens + N, dtype=torch.long, device=device)
    seq[:, :P] = prompt
    n = prompt_lengths.clone()
    last_row = prompt_lengths + (max_new_tokens - 1)       # where a finished row is parked
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    accepted_lengths, extra_codes = [], []
    target_passes = 0
    layout = None                                          # the Tree of the last parents seen
    ok_target = ok_draft = torch.ones((), dtype=torch.bool, device=device)

    start = time.perf_counter()
    with torch.inference_mode():
        proposer.start(prompt, prompt_lengths, max_new_tokens=max_new_tokens, gamma=gamma, warp=warp)
        target.setup_cache(B, needed)
        if P > 1:                                          # prefill: the target sees 0 .. P-2
            zeros = torch.zeros(B, dtype=torch.long, device=device)
            if hidden:
                _, states = target(prompt[:, :-1], zeros, span=P - 1, return_hidden=True)
                proposer.observe(states, prompt_lengths - 2)
            else:
                target(prompt[:, :-1], zeros, span=P - 1)
            target_passes += 1
            if ragged:
                target.cache.rollback(prompt_lengths - 1, check=False)
        prefilled = _clock(device)
        n_work = n
        active = torch.ones(B, dtype=torch.bool, device=device)
        step = 0
        while True:
            # The loop's one host synchronisation per step: how far the longest row
            # reaches (every pass's span follows from it), whether rows are left, and
            # whether the last step's logits were finite.
            top, live, fine_t, fine_d = torch.stack(
                [n_work.max(), active.sum(), ok_target.long(), ok_draft.long()]).tolist()
            if not fine_t:
                raise _not_finite("target", step)
            if not fine_d:
                raise _not_finite("draft", step)
            if not live:
                break
            step += 1

            # 1. propose
            proposal = proposer.propose(seq, n_work, top, generator)
            x, q = proposal.tokens, proposal.q
            if layout is None or proposal.parents is not layout.parents:
                layout = _layout(proposal, rule, B, V, N)
                positions = torch.arange(layout.depth + 1, device=device)
            if proposal.finite is not None:
                ok_draft = proposal.finite

            # 2. score: one target pass over the last committed token and the candidates
            last = seq.gather(1, (n_work - 1)[:, None])
            fed = torch.cat([last, x], dim=1)
            tree_args = {} if layout.chain else {"depths": layout.depths, "ancestors": layout.ancestors}
            if hidden:
                logits, states = target(fed, n_work - 1, span=top + x.shape[1], return_hidden=True, **tree_args)
            else:
                logits = target(fed, n_work - 1, span=top + x.shape[1], **tree_args)
            target_passes += 1
            ok_target = _finite(logits)
            p = warp(logits)

            # 3. verify
            if layout.chain:
                verdict = rule.kernel(x, q, p, generator)
            else:
                verdict = rule.kernel(x, q, p, generator, parents=layout.parents)
            a = verdict.accepted

            # 4. commit the accepted candidates and the rule's token; done rows stay put
            emitted = a + 1
            if eos is not None:                            # stop at the first end token
                hit = torch.isin(verdict.tokens, eos) & (positions <= a[:, None])
                ended = hit.any(dim=1)
                emitted = torch.where(ended, hit.byte().argmax(dim=1) + 1, emitted)
                finished = finished | (ended & active)
            keep = (positions < emitted[:, None]) & active[:, None]
            index = n_work[:, None] + positions
            seq.scatter_(1, index, torch.where(keep, verdict.tokens, seq.gather(1, index)))
            accepted_lengths.append(torch.where(active, a, -1))
            if not layout.chain:
                code, end = _tree_commit(target, layout, verdict, a, active, n_work, positions)
                extra_codes.append(code)
            else:
                end = a
            if hidden:
                proposer.observe(states, end)
            n = torch.where(active, n + emitted, n)
            active = (n - prompt_lengths) < max_new_tokens
            if eos is not None:
                active = active & ~finished
            n_work = torch.minimum(n, last_row)
            target.cache.rollback(n_work - 1, check=False)
            proposer.commit(n_work)

    lengths_steps = torch.stack(accepted_lengths).cpu() if accepted_lengths else torch.zeros(0, B, dtype=torch.long)
    live_steps = lengths_steps >= 0
    depth = layout.depth if layout is not None else gamma
    width = layout.parents.numel() if layout is not None else N
    column = torch.arange(max_new_tokens, device=device)
    lengths = (n - prompt_lengths).clamp(max=max_new_tokens)
    tokens = seq.gather(1, (prompt_lengths[:, None] + column).clamp(max=seq.shape[1] - 1))
    tokens = tokens.masked_fill(column >= lengths[:, None], -1)
    if extra_codes:
        codes = torch.stack(extra_codes).cpu()
    else:
        codes = torch.where(lengths_steps == depth, 3, 2)
    origin = _origin(lengths_steps, codes, max_new_tokens, lengths).to(device)
    return Generation(
        tokens=tokens,
        lengths=lengths,
        origin=origin,
        steps=len(accepted_lengths),
        target_passes=target_passes,
        draft_passes=proposer.passes,
        drafted=width * int(live_steps.sum()),
        accepted=int(lengths_steps[live_steps].sum()),
        gamma=depth,
        accepted_lengths=lengths_steps,
        wall_time=time.perf_counter() - start,
        prefill_time=prefilled - start,
        decoded_tokens=int((n - prompt_lengths).sum()),
    )


def _layout(proposal: Proposal, rule, B: int, V: int | None, N: int) -> Tree:
    """The Tree of a proposal with new ``parents``, after checking the proposal's shapes
    against the batch, the vocabulary, the proposer's width and the rule."""
    x, q = proposal.tokens, proposal.q
    layout = tree(proposal.parents)
    count = layout.parents.numel()
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or tuple(x.shape) != (B, count):
        raise ValueError(f"the proposal's `tokens` must be int64 of shape [{B}, {count}], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if count > N:
        raise ValueError(f"the proposal holds {count} candidates, more than the proposer's width {N}")
    if q is not None and (q.dim() != 3 or tuple(q.shape[:2]) != (B, count) or (V is not None and q.shape[-1] != V)):
        raise ValueError(f"draft and target vocabularies differ, or `q` is misshapen: `q` has shape "
                         f"{tuple(q.shape)}, expected [{B}, {count}, {V}]")
    if not layout.chain and not rule.supports_tree:
        raise ValueError(f"the proposer gave a tree of {count} candidates, but the rule "
                         f"{getattr(rule, 'name', type(rule).__name__)!r} does not verify trees "
                         "(its supports_tree is False)")
    return layout


def _tree_commit(target, layout: Tree, verdict, a, active, n_work, positions) -> torch.Tensor:
    """Move the accepted path's keys and values next to the committed prefix; return the
    origin code of each row's extra token (3 when the path ended at a leaf) and the index
    (into the scored pass, 0 the last committed token) of the path's last node."""
    path = verdict.path                                      # [B, D], -1 padding
    k = positions[:-1]
    move = (k < a[:, None]) & active[:, None]
    dest = n_work[:, None] + k
    source = torch.where(move, n_work[:, None] + path.clamp(min=0), dest)
    target.cache.compact(source, n_work, n_work + a, check=False)
    end = torch.where(a > 0, path.gather(1, (a - 1).clamp(min=0)[:, None]).squeeze(1) + 1, 0)
    return torch.where(layout.leaf[end], 3, 2), end
