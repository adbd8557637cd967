"""The decoding engine: autoregressive and speculative generation (chapter 4).

Both loops are batched and KV-cached, and both warp logits with
:func:`typsamp.sampling.probs`, so the target and the draft always see the same
temperature and truncation. :func:`speculative` is one loop in which the verification
rule is a parameter: any function called as
``verify(draft_tokens=..., draft_probs=..., target_probs=..., generator=...)`` that
returns a :class:`typsamp.speculative.Verdict` plugs in, :func:`typsamp.speculative.verify`
(the default) and the typical-acceptance rule alike.

Cache bookkeeping, per row, with ``n`` committed tokens (prompt plus generated):

* the target's cache holds positions ``0 .. n-2``; a verification feeds the last
  committed token and the γ drafts at positions ``n-1 .. n+γ-1`` (γ + 1 new positions,
  one forward pass) and so scores p_1 .. p_{γ+1};
* the draft's cache holds at least ``0 .. n-3``; a round of drafting first feeds the
  last two committed tokens at ``n-2, n-1`` (re-writing position n-2 when the draft had
  already seen it, which changes nothing), then one token per pass;
* after a verdict with ``a`` drafts accepted, ``n`` grows by ``a + 1`` and both caches
  are rolled back to the accepted prefix: only lengths change, nothing is copied.

Models are anything with ``setup_cache(batch_size, max_len)``, a ``cache`` with
``lengths`` and ``rollback(lengths, check=)``, and
``__call__(tokens [B, T], offsets [B], span=max(offsets) + T) -> logits [B, T, V]``
writing its cache at the given offsets: :class:`typsamp.model.GPT`, or a
``transformers`` causal LM wrapped in :class:`HFCausalLM`. The loops know every
offset's maximum on the host (one synchronisation per step reads it), so the models
never read their offsets back themselves.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch

from typsamp import checks, sampling, speculative as spec

__all__ = ["Generation", "autoregressive", "speculative", "HFCausalLM"]


@dataclass
class Generation:
    """Generated tokens and what it took to make them.

    Attributes:
        tokens: int64 [B, max_new_tokens], the new tokens of each row (prompt excluded).
        steps: decoding steps (one target pass each after the prefill).
        target_passes, draft_passes: forward passes, prefill included.
        drafted, accepted: draft tokens proposed and accepted, summed over rows, counting
            only steps in which a row still needed tokens (0 for autoregressive).
        gamma: draft tokens per step (0 for autoregressive).
        accepted_lengths: int64 [steps, B], drafts accepted per row and step (-1 once a
            row is done); empty for autoregressive.
        wall_time: seconds, prefill included.
    """

    tokens: torch.Tensor
    steps: int = 0
    target_passes: int = 0
    draft_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    gamma: int = 0
    accepted_lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))
    wall_time: float = 0.0

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


def _check_prompt(prompt: torch.Tensor, minimum: int) -> torch.Tensor:
    checks.tensor("prompt", prompt)
    if prompt.dtype != torch.long or prompt.dim() != 2:
        raise ValueError(f"`prompt` must be int64 of shape [B, P], got {prompt.dtype} of shape {tuple(prompt.shape)}")
    if prompt.shape[0] < 1 or prompt.shape[1] < minimum:
        raise ValueError(f"`prompt` needs at least one row and {minimum} token(s), got shape {tuple(prompt.shape)}")
    return prompt


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(checks.integer("seed", seed, low=0))


def _block_size(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None) or getattr(config, "n_positions", None)


def _fits(model, name: str, needed: int) -> None:
    limit = _block_size(model)
    if limit is not None and needed > limit:
        raise ValueError(f"prompt + max_new_tokens (+ gamma + 1 for speculative) = {needed} positions "
                         f"exceed the `{name}` model's block_size {limit}")


def autoregressive(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                   top_k=None, top_p=None, min_p=None, eta=None, typical_p=None, epsilon=None,
                   seed: int | None = None) -> Generation:
    """Sample ``max_new_tokens`` tokens after each row of ``prompt`` [B, P], one pass each."""
    prompt = _check_prompt(prompt, 1)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eta=eta,
                typical_p=typical_p, epsilon=epsilon)
    B, P = prompt.shape
    _fits(model, "model", P + max_new_tokens)
    generator = _generator(seed, prompt.device)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.setup_cache(B, P + max_new_tokens)
        offsets = torch.zeros(B, dtype=torch.long, device=prompt.device)
        logits = model(prompt, offsets, span=P)[:, -1]
        for i in range(max_new_tokens):
            token = sampling.sample_weights(sampling.probs(logits, **warp, validate=False), generator)
            out[:, i] = token
            if i + 1 < max_new_tokens:
                logits = model(token[:, None], torch.full_like(offsets, P + i), span=P + i + 1)[:, -1]
    return Generation(tokens=out, steps=max_new_tokens, target_passes=max_new_tokens,
                      wall_time=time.perf_counter() - start)


#: speculative.verify without per-step value checks: the loop builds its inputs itself.
trusted_verify = functools.partial(spec.verify, validate=False)


def speculative(target, draft, prompt: torch.Tensor, max_new_tokens: int, *, gamma: int = 4,
                verify=trusted_verify, draft_mode: str = "sample", temperature: float = 1.0,
                top_k=None, top_p=None, min_p=None, eta=None, typical_p=None, epsilon=None,
                seed: int | None = None) -> Generation:
    """Speculative decoding of ``max_new_tokens`` tokens after each row of ``prompt`` [B, P].

    Args:
        target, draft: models sharing one vocabulary.
        gamma: draft tokens per step.
        verify: the verification rule (see the module docstring); default
            :func:`typsamp.speculative.verify` with ``validate=False``.
        draft_mode: ``"sample"`` draws drafts from the draft's warped distribution q and
            passes q to ``verify``; ``"greedy"`` takes the draft's argmax and passes
            ``draft_probs=None`` (a point mass), the way Medusa-style candidates are made.
        temperature, top_k, ...: the warping, applied identically to both models.
        seed: seeds the one generator used for drafting and verification.
    """
    prompt = _check_prompt(prompt, 2)
    max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
    gamma = checks.integer("gamma", gamma, low=1)
    if draft_mode not in ("sample", "greedy"):
        raise ValueError(f"`draft_mode` must be 'sample' or 'greedy', got {draft_mode!r}")
    warp = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eta=eta,
                typical_p=typical_p, epsilon=epsilon)
    sampling.probs(torch.zeros(1, 1), **warp)            # validate the warping arguments once
    B, P = prompt.shape
    device = prompt.device
    length = P + max_new_tokens + gamma + 1              # the last step may overshoot by γ
    _fits(target, "target", length)
    _fits(draft, "draft", length)
    generator = _generator(seed, device)
    seq = torch.zeros(B, length, dtype=torch.long, device=device)
    seq[:, :P] = prompt
    n = torch.full((B,), P, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    steps_positions = torch.arange(gamma + 1, device=device)
    last_row = P + max_new_tokens - 1                    # where a finished row is parked
    accepted_lengths = []
    target_passes = draft_passes = 0

    # Greedy drafts are the argmax of the warped q, which is the argmax of the logits
    # (lowest index on ties, as at T = 0) for every warping except locally typical
    # sampling, the one rule that can drop the most likely token.
    greedy_logits = draft_mode == "greedy" and typical_p is None

    def warped(logits):
        return sampling.probs(logits, **warp, validate=False)

    start = time.perf_counter()
    with torch.inference_mode():
        target.setup_cache(B, length)
        draft.setup_cache(B, length)
        # Finished rows ride along (batched passes) parked at a harmless position, n_work;
        # nothing they compute is committed. Active rows have n_work = n.
        n_work = n.clamp(max=last_row)
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        target(prompt[:, :-1], zeros, span=P - 1)        # prefill: the target sees 0 .. P-2,
        target_passes += 1
        if P > 2:                                         # the draft 0 .. P-3
            draft(prompt[:, :-2], zeros, span=P - 2)
            draft_passes += 1
        while True:
            active = (n - P) < max_new_tokens
            # The loop's one host synchronisation per step: are rows left, and how far
            # does the longest reach (every pass's attention span follows from it).
            any_active, top = torch.stack([active.any().long(), n_work.max()]).tolist()
            if not any_active:
                break
            # Draft γ tokens: the last two committed tokens, then one token per pass.
            context = seq.gather(1, (n_work - 2)[:, None] + torch.arange(2, device=device))
            q_logits = draft(context, n_work - 2, span=top)[:, -1]
            draft_passes += 1
            drafts, q_rows = [], []
            for i in range(gamma):
                if greedy_logits:                         # warping keeps the argmax: skip it
                    x = q_logits.argmax(dim=-1)
                else:
                    q = warped(q_logits)
                    x = q.argmax(dim=-1) if draft_mode == "greedy" else sampling.sample_weights(q, generator)
                    q_rows.append(q)
                drafts.append(x)
                if i + 1 < gamma:
                    q_logits = draft(x[:, None], n_work + i, span=top + i + 1)[:, -1]
                    draft_passes += 1
            x = torch.stack(drafts, dim=1)                # [B, γ]
            q = torch.stack(q_rows, dim=1) if draft_mode == "sample" else None
            # Verify: one target pass over the last committed token and the γ drafts.
            last = seq[rows, n_work - 1][:, None]
            p = warped(target(torch.cat([last, x], dim=1), n_work - 1, span=top + gamma))   # [B, γ+1, V]
            target_passes += 1
            verdict = verify(draft_tokens=x, draft_probs=q, target_probs=p, generator=generator)
            a = verdict.accepted
            # Commit the accepted drafts and the extra token; finished rows stay as they are.
            keep = (steps_positions <= a[:, None]) & active[:, None]
            index = n_work[:, None] + steps_positions
            seq.scatter_(1, index, torch.where(keep, verdict.tokens, seq.gather(1, index)))
            accepted_lengths.append(torch.where(active, a, -1))      # statistics: summed at the end
            n = torch.where(active, n + a + 1, n)
            n_work = n.clamp(max=last_row)
            target.cache.rollback(n_work - 1, check=False)
            draft.cache.rollback(torch.minimum(draft.cache.lengths.to(device), n_work - 2), check=False)
    lengths = torch.stack(accepted_lengths).cpu() if accepted_lengths else torch.zeros(0, B, dtype=torch.long)
    live = lengths >= 0
    return Generation(
        tokens=seq[:, P:P + max_new_tokens].clone(),
        steps=len(accepted_lengths),
        target_passes=target_passes,
        draft_passes=draft_passes,
        drafted=gamma * int(live.sum()),
        accepted=int(lengths[live].sum()),
        gamma=gamma,
        accepted_lengths=lengths,
        wall_time=time.perf_counter() - start,
    )


class HFCausalLM:
    """A ``transformers`` causal LM behind the engine's model interface (batch 1).

    Keeps the model's own ``DynamicCache`` and crops it to the given offset before each
    forward pass, which is how rejected tokens are dropped. Hugging Face caches share one
    length across the batch, so rows at different lengths are not supported: batch 1,
    as in ``transformers``' own assisted generation.
    """

    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config
        self.cache = None

    def setup_cache(self, batch_size: int, max_len: int | None = None):
        from transformers import DynamicCache

        if batch_size != 1:
            raise ValueError(f"HFCausalLM supports batch_size 1 (one shared cache length), got {batch_size}")
        self.cache = _HFCacheView(DynamicCache())
        return self.cache

    def __call__(self, tokens: torch.Tensor, offsets: torch.Tensor, span: int | None = None) -> torch.Tensor:
        offset = int(offsets[0])
        self.cache.rollback(offset)
        held = self.cache.inner.get_seq_length()
        if held != offset:
            raise ValueError(f"offset {offset} skips positions: the cache holds {held}")
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)[None]
        out = self.model(input_ids=tokens, cache=self.cache.inner, position_ids=positions, use_cache=True)
        return out.logits.float()


class _HFCacheView:
    """Exposes ``lengths``/``rollback`` over a ``DynamicCache`` (cropping happens lazily)."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([self.inner.get_seq_length()])

    def rollback(self, lengths, check: bool = True) -> None:
        length = int(torch.as_tensor(lengths).reshape(-1)[0])
        surplus = self.inner.get_seq_length() - length
        if surplus > 0:
            self.inner.crop(-surplus)          # transformers >= 5: a negative count to remove
