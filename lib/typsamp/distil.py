"""A small trained draft for Gemma 3 270M, distilled from the target itself (chapter 9).

    python -m typsamp.distil targets [--prompts-per-category N] [--new-tokens N] [--seed S] [--threads N]
    python -m typsamp.distil train   [--steps N] [--seed S] [--out FILE] [--resume] [--stop-at N] [--threads N]
    python -m typsamp.distil alpha   [--prompts N] [--new-tokens N] [--gamma G] [--threads N]

The draft
---------
Two Gemma 3 layers, initialised from the target's layers 0 and 17 (:data:`LAYERS`; the
first is a sliding-window layer, the second a global one, as in the target), then the
target's final norm, on top of the target's own token embedding, which is *shared*, not
copied: the draft keeps a reference to the target's tensor and its weight file holds only
the two layers, the final norm and the kept token ids. The head is trimmed: logits are
computed for the 32,768 kept tokens only (rows of the tied embedding,
:func:`typsamp.drafts.kept_tokens` when that module exists, else the list made by
:func:`temporary_kept_tokens`), and the engine sees logits [B, T, 262144] that are -inf
outside them, so q = 0 there and rejection sampling stays exact.

The targets
-----------
``targets`` samples the target (bfloat16, T = 1) after the training-split prompts of
every category (:mod:`typsamp.prompts`) and keeps, at every generated position, the
target's top-:data:`TOP_K` log-probabilities and their ids (and per token its
probability summed over the positions where it is in the top k, which ranks tokens for
:func:`temporary_kept_tokens`). Done once and cached outside git (:func:`targets_path`):
training then never runs the target.

Training
--------
The loss at each generated position is the cross-entropy of the draft's distribution over
the kept tokens against the target's top-k renormalised to the kept tokens, which is the
KL divergence KL(p || q) up to p's entropy; the record reports the KL itself (on held-out
sequences: every :data:`VAL_EVERY`-th sequence is never trained on) and how often the
draft's argmax equals the target's. Only the two layers and the final norm learn; the
embedding stays the target's. AdamW, linear warm-up, cosine decay, gradient clipping at
1, bfloat16 autocast for the matrix products (float32 master weights), seeded and
resumable exactly as :mod:`typsamp.train` (a float32 checkpoint every
``eval_interval`` steps in ``_build/distil/``). The weights go in bfloat16 to
``lib/typsamp/weights/gemma_draft.safetensors`` with the training record
``gemma_draft.json`` beside them.

:func:`load_draft` returns the committed draft with the engine's model interface, ready
for ``generate.speculative(target, draft, ...)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from typsamp import checks, gemma, provenance
from typsamp.train import learning_rate   # warm-up, then cosine decay: the recipe as a preset

__all__ = ["LAYERS", "KEEP", "TOP_K", "Recipe", "RECIPE", "Draft", "build_draft", "make_targets",
           "targets_path", "temporary_kept_tokens", "kept_tokens", "train", "evaluate", "save_draft",
           "load_draft", "DRAFT_FILE", "measure_alpha"]

#: The target layers the draft's layers start from (a local one, then a global one).
LAYERS = (0, 17)
#: Kept tokens (the trimmed head) and the size of the target's top-k kept per position.
KEEP = 32_768
TOP_K = 64
#: Every VAL_EVERY-th sequence of the targets is held out for the validation KL.
VAL_EVERY = 16
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DRAFT_FILE = WEIGHTS_DIR / "gemma_draft.safetensors"
CHECKPOINT_DIR = provenance.ROOT / "_build" / "distil"
FORMAT = "typsamp.gemma_draft/1"


@dataclass(frozen=True)
class Recipe:
    """How the draft is trained (and how its targets were made)."""

    steps: int = 180
    batch_size: int = 8                 # sequences per step
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup: int = 15
    weight_decay: float = 0.0
    eval_interval: int = 45
    autocast: bool = True               # bfloat16 matrix products (CPU AMX / GPU)


RECIPE = Recipe()


# ---------------------------------------------------------------------------------------
# The model


class Draft(nn.Module):
    """A few Gemma layers on a shared embedding, with a trimmed head.

    ``draft(tokens [B, T], offsets, span=)`` follows the engine's model interface
    (:mod:`typsamp.generate`) and returns logits [B, T, vocab_size], -inf outside
    ``kept``; :meth:`kept_logits` returns the [B, T, K] logits over ``kept`` alone."""

    def __init__(self, body: gemma.Gemma, kept: torch.Tensor, layers: tuple[int, ...]):
        super().__init__()
        V = body.config.vocab_size
        kept = checks.tensor("kept", kept)
        if kept.dim() != 1 or kept.dtype != torch.long or kept.numel() < 1:
            raise ValueError(f"`kept` must be int64 of shape [K], got {kept.dtype} of shape {tuple(kept.shape)}")
        if int(kept.min()) < 0 or int(kept.max()) >= V or torch.unique(kept).numel() != kept.numel():
            raise ValueError(f"`kept` must hold distinct token ids in [0, {V})")
        self.body = body
        self.layers_from = tuple(layers)
        self.register_buffer("kept", kept.to(body.model.embed_tokens.weight.device), persistent=False)
        self.refresh_head()

    def refresh_head(self) -> None:
        """Take the head's rows from the (shared) embedding again."""
        with torch.no_grad():
            self.head_rows = self.body.model.embed_tokens.weight[self.kept].detach()

    @property
    def model(self) -> gemma.Gemma:
        """The network itself (a :class:`typsamp.gemma.Gemma` of ``len(layers_from)``
        layers whose embedding is the target's); ``model(tokens, head=draft.head_rows)``
        gives the kept logits."""
        return self.body

    @property
    def config(self) -> gemma.GemmaConfig:
        return self.body.config

    @property
    def vocab_size(self) -> int:
        return self.body.config.vocab_size

    @property
    def cache(self):
        return self.body.cache

    def setup_cache(self, batch_size: int, max_len: int = 2048, device=None, dtype=None):
        return self.body.setup_cache(batch_size, max_len, device=device, dtype=dtype)

    def clear_cache(self) -> None:
        self.body.clear_cache()

    def kept_logits(self, tokens, offsets=None, *, span=None) -> torch.Tensor:
        return self.body(tokens, offsets, span=span, head=self.head_rows)

    def forward(self, tokens, offsets=None, *, span=None) -> torch.Tensor:
        small = self.kept_logits(tokens, offsets, span=span)
        out = small.new_full((*small.shape[:-1], self.vocab_size), -math.inf)
        return out.index_copy_(-1, self.kept, small)

    def trainable(self) -> dict[str, torch.Tensor]:
        """The parameters the draft owns (everything but the shared embedding)."""
        return {k: v for k, v in self.body.state_dict().items() if k != "model.embed_tokens.weight"}


def _draft_config(target_config: gemma.GemmaConfig, layers: tuple[int, ...]) -> gemma.GemmaConfig:
    """The target's configuration with ``len(layers)`` layers whose local/global types
    are those of the target layers they come from."""
    if not layers or any(not 0 <= i < target_config.n_layer for i in layers):
        raise ValueError(f"`layers` must name layers of the target (0..{target_config.n_layer - 1}), got {layers}")
    kinds = [i in target_config.global_layers for i in layers]
    for every in range(1, len(layers) + 2):
        if kinds == [(j + 1) % every == 0 for j in range(len(layers))]:
            return replace(target_config, n_layer=len(layers), global_every=every)
    raise ValueError(f"the target layers {layers} (global: {kinds}) cannot be laid out as a Gemma 3 stack")


def build_draft(target: gemma.Gemma, kept: torch.Tensor, layers: tuple[int, ...] = LAYERS) -> Draft:
    """A draft whose layers are float32 copies of the target's ``layers`` and whose
    embedding *is* the target's (the same tensor, frozen)."""
    if not isinstance(target, gemma.Gemma):
        raise checks.InputTypeError(f"`target` must be a typsamp.gemma.Gemma, got {type(target).__name__}")
    config = _draft_config(target.config, tuple(layers))
    body = gemma.Gemma(config)
    source = target.state_dict()
    state = {}
    for j, i in enumerate(layers):
        prefix = f"model.layers.{i}."
        state.update({f"model.layers.{j}.{k[len(prefix):]}": v.detach().float().clone()
                      for k, v in source.items() if k.startswith(prefix)})
    state["model.norm.weight"] = source["model.norm.weight"].detach().float().clone()
    embedding = target.model.embed_tokens.weight
    state["model.embed_tokens.weight"] = embedding
    body.load_state_dict(state, assign=True, strict=True)
    body.model.embed_tokens.weight.requires_grad_(False)
    body.to(embedding.device)
    return Draft(body, kept, tuple(layers))


# ---------------------------------------------------------------------------------------
# The teacher's targets


def targets_path(directory: Path | str | None = None) -> Path:
    """Where ``targets`` caches the target's generations and top-k (outside git)."""
    root = gemma.cache_dir() if directory is None else Path(directory)
    return root / "distil" / "targets.pt"


@torch.inference_mode()
def make_targets(target: gemma.Gemma, prompts: list[list[int]], *, new_tokens: int = 96,
                 top_k: int = TOP_K, seed: int = 0, batch_size: int = 16, temperature: float = 1.0,
                 eos_token_id: int | None = None, progress: bool = True) -> dict:
    """Sample ``new_tokens`` tokens from ``target`` after each prompt (token id lists) at
    ``temperature`` and keep the target's top-``top_k`` log-probabilities (of the
    untempered distribution) at every generated position.

    Returns a dict: ``sequences`` (list of int64 tensors: prompt + generation, cut after
    an end token), ``prompt_lengths`` (int64 [S]), ``topk_ids`` (int32 [N, k]) and
    ``topk_logp`` (float16 [N, k]) for the N generated positions in sequence order (the
    distribution that token ``P + i`` was drawn from), ``expected_counts`` (float64 [V]:
    each token's probability summed over the positions where it is in the top k), and
    ``meta``."""
    new_tokens = checks.integer("new_tokens", new_tokens, low=1)
    top_k = checks.integer("top_k", top_k, low=1)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    temperature = checks.real("temperature", temperature, low=0.0, low_open=True)
    if not prompts or any(len(p) < 1 for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of non-empty token id lists")
    V = target.config.vocab_size
    device = target.model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    counts = torch.zeros(V, dtype=torch.float64, device=device)   # over the top-k only
    sequences, prompt_lengths, ids_out, logp_out = [], [], [], []
    bar = tqdm(total=len(prompts) * new_tokens, desc="targets", disable=not progress, dynamic_ncols=True,
               mininterval=1.0, unit="tok")
    for lo in range(0, len(prompts), batch_size):
        rows = prompts[lo:lo + batch_size]
        B, P = len(rows), max(len(r) for r in rows)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        padded = torch.zeros(B, P, dtype=torch.long, device=device)
        for b, r in enumerate(rows):
            padded[b, :len(r)] = torch.tensor(r)
        target.setup_cache(B, P + new_tokens)
        # the prefill's hidden states, and the head only at each row's last prompt token
        hidden = target(padded, torch.zeros(B, dtype=torch.long, device=device), span=P, head=None)
        hidden = hidden.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
        logits = gemma._head(hidden, target.model.embed_tokens.weight)
        target.cache.rollback(lengths, check=False)
        out = torch.zeros(B, new_tokens, dtype=torch.long, device=device)
        ids = torch.zeros(B, new_tokens, top_k, dtype=torch.int32, device=device)
        logp = torch.zeros(B, new_tokens, top_k, dtype=torch.float16, device=device)
        for i in range(new_tokens):
            # The top-k and the log normaliser; the sample is drawn exactly from the whole
            # distribution without a pass over it in most rows: u < (top-k mass) picks
            # within the top k, the other rows draw from the rest (one host read).
            values, index = logits.topk(top_k, dim=-1)
            scaled = logits.float() / temperature
            lse = torch.logsumexp(scaled, dim=-1, keepdim=True)
            ids[:, i] = index.int()
            logp[:, i] = (values.float() - (lse if temperature == 1.0 else
                                            torch.logsumexp(logits.float(), -1, keepdim=True))).half()
            counts.index_add_(0, index.flatten(), logp[:, i].double().exp().flatten())
            top_p = (values.float() / temperature - lse).exp()                 # [B, k], tempered
            u = torch.rand(B, 1, generator=generator, device=device)
            cum = top_p.cumsum(-1)
            inside = u[:, 0] < cum[:, -1]
            token = index.gather(1, (cum <= u).sum(-1, keepdim=True).clamp(max=top_k - 1))[:, 0]
            rest = (~inside).nonzero()[:, 0]
            if rest.numel():
                tail = (scaled[rest] - lse[rest]).exp().scatter_(1, index[rest], 0.0)
                token[rest] = torch.multinomial(tail, 1, generator=generator)[:, 0]
            out[:, i] = token
            bar.update(B)
            if i + 1 < new_tokens:
                logits = target(token[:, None], lengths + i, span=P + i + 1)[:, -1]
        target.clear_cache()
        for b, r in enumerate(rows):
            gen = out[b].cpu()
            keep = new_tokens
            if eos_token_id is not None and (gen == eos_token_id).any():
                keep = int((gen == eos_token_id).nonzero()[0]) + 1
            sequences.append(torch.cat([torch.tensor(r, dtype=torch.long), gen[:keep]]))
            prompt_lengths.append(len(r))
            ids_out.append(ids[b, :keep].cpu())
            logp_out.append(logp[b, :keep].cpu())
    bar.close()
    return {"sequences": sequences, "prompt_lengths": torch.tensor(prompt_lengths),
            "topk_ids": torch.cat(ids_out), "topk_logp": torch.cat(logp_out),
            "expected_counts": counts.cpu(),
            "meta": {"new_tokens": new_tokens, "top_k": top_k, "seed": seed, "temperature": temperature,
                     "batch_size": batch_size, "prompts": len(prompts),
                     "target_dtype": str(target.model.embed_tokens.weight.dtype).replace("torch.", "")}}


def temporary_kept_tokens(targets: dict, keep: int = KEEP) -> torch.Tensor:
    """The ``keep`` tokens with the largest expected counts in ``targets`` (ties to the
    lower id), sorted: a stand-in for :func:`typsamp.drafts.kept_tokens`."""
    counts = targets["expected_counts"]
    keep = checks.integer("keep", keep, low=1)
    if keep > counts.numel():
        raise ValueError(f"`keep` ({keep}) exceeds the vocabulary ({counts.numel()})")
    order = torch.argsort(-counts, stable=True)
    return order[:keep].sort().values


def kept_tokens(targets: dict | None = None) -> tuple[torch.Tensor, str]:
    """The kept token ids and where they come from: :func:`typsamp.drafts.kept_tokens`
    when that module is there, else :func:`temporary_kept_tokens` of ``targets``."""
    try:
        from typsamp import drafts
        return drafts.kept_tokens().long(), "typsamp.drafts.kept_tokens()"
    except (ImportError, AttributeError, FileNotFoundError):
        if targets is None:
            raise
        return temporary_kept_tokens(targets), "typsamp.distil.temporary_kept_tokens(targets)"


# ---------------------------------------------------------------------------------------
# Training


class _Data:
    """The targets laid out for training: per sequence its tokens, the rows of its
    positions in ``topk_*``, and the teacher distribution mapped onto kept indices."""

    def __init__(self, targets: dict, kept: torch.Tensor, vocab_size: int):
        self.sequences = targets["sequences"]
        lengths = torch.tensor([len(s) for s in self.sequences])
        generated = lengths - targets["prompt_lengths"]
        self.prompt_lengths = targets["prompt_lengths"]
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), generated.cumsum(0)])
        where = torch.full((vocab_size,), -1, dtype=torch.long)
        where[kept] = torch.arange(kept.numel())
        idx = where[targets["topk_ids"].long()]                              # [N, k], -1 outside
        logp = targets["topk_logp"].float().masked_fill(idx < 0, -math.inf)
        self.teacher_index = idx.clamp(min=0)
        # renormalised on kept ∩ top-k; a position whose top k holds no kept token weighs 0
        self.teacher_p = torch.softmax(logp, dim=-1).nan_to_num(nan=0.0)
        self.teacher_argmax = idx[:, 0]                                      # -1 when not kept
        S = len(self.sequences)
        self.val = [s for s in range(S) if s % VAL_EVERY == VAL_EVERY - 1]
        self.train = [s for s in range(S) if s % VAL_EVERY != VAL_EVERY - 1]
        if not self.train:
            raise ValueError("the targets hold too few sequences to train on")

    def batch(self, which: list[int], device):
        """tokens [B, L] (right-padded), positions (b, t) of the generated distributions,
        teacher index/probs [N, k], teacher argmax [N]."""
        L = max(len(self.sequences[s]) - 1 for s in which)
        tokens = torch.zeros(len(which), L, dtype=torch.long)
        rows, cols, spans = [], [], []
        for b, s in enumerate(which):
            seq = self.sequences[s]
            tokens[b, :len(seq) - 1] = seq[:-1]
            P, G = int(self.prompt_lengths[s]), len(seq) - int(self.prompt_lengths[s])
            rows.append(torch.full((G,), b))
            cols.append(torch.arange(P - 1, P - 1 + G))
            spans.append(torch.arange(int(self.starts[s]), int(self.starts[s]) + G))
        at = torch.cat(spans)
        return (tokens.to(device), torch.cat(rows).to(device), torch.cat(cols).to(device),
                self.teacher_index[at].to(device), self.teacher_p[at].to(device),
                self.teacher_argmax[at].to(device))


def _loss(draft: Draft, data: _Data, which: list[int], device, autocast: bool):
    """(mean cross-entropy, summed KL, argmax matches, positions) for sequences ``which``."""
    tokens, rows, cols, index, p, argmax = data.batch(which, device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        hidden = draft.body(tokens, head=None)[rows, cols]                   # [N, C]
        logits = hidden @ draft.head_rows.to(hidden.dtype).T                 # [N, K]
    logq = torch.log_softmax(logits.float(), dim=-1)
    picked = logq.gather(1, index)
    cross = -(p * picked).sum(-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    kl = (cross - entropy).sum()
    matches = ((logq.argmax(-1) == argmax) & (argmax >= 0)).sum()
    return cross.mean(), kl, matches, rows.numel()


@torch.no_grad()
def evaluate(draft: Draft, data: _Data, which: list[int] | None = None, *, device="cpu",
             autocast: bool = True, batch_size: int = 8) -> dict:
    """Mean KL(p || q) in nats over the teacher's top-k on ``which`` (default: the
    held-out sequences), and the fraction of positions where the draft's argmax is the
    target's."""
    which = data.val if which is None else which
    was = draft.body.training
    draft.body.eval()
    kl = matches = n = 0
    for lo in range(0, len(which), batch_size):
        _, k, m, count = _loss(draft, data, which[lo:lo + batch_size], device, autocast)
        kl, matches, n = kl + float(k), matches + int(m), n + count
    draft.body.train(was)
    return {"kl": kl / max(n, 1), "argmax_agreement": matches / max(n, 1), "positions": n}


def train(target: gemma.Gemma, targets: dict, kept: torch.Tensor, *, recipe: Recipe = RECIPE,
          layers: tuple[int, ...] = LAYERS, seed: int = 0, device: str = "cpu", resume: bool = False,
          stop_at: int | None = None, checkpoint_dir: Path | None = None,
          progress: bool = True) -> tuple[Draft, dict] | None:
    """Distil a draft from ``targets`` (made by :func:`make_targets` on ``target``);
    returns the draft and its training record, or None when ``stop_at`` ended the run
    early (a checkpoint is left to ``resume``: the result equals an unbroken run's)."""
    if not isinstance(recipe, Recipe):
        raise checks.InputTypeError(f"`recipe` must be a Recipe, got {type(recipe).__name__}")
    checkpoint = Path(checkpoint_dir or CHECKPOINT_DIR) / "checkpoint.pt"
    torch.manual_seed(seed)
    draft = build_draft(target, kept.long(), layers)
    draft.body.to(device)
    draft.kept = draft.kept.to(device)
    draft.refresh_head()
    data = _Data(targets, kept.long().cpu(), target.config.vocab_size)
    params = [p for name, p in draft.body.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=recipe.weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    settings = {"recipe": asdict(recipe), "seed": seed, "layers": list(layers),
                "kept_sha256": hashlib.sha256(kept.long().cpu().numpy().tobytes()).hexdigest()}
    start, elapsed, history, ema, queue = 0, 0.0, [], None, []
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["settings"] != settings:
            raise ValueError(f"--resume: the checkpoint at {checkpoint} was made with {state['settings']}, "
                             f"not these settings {settings}")
        draft.body.load_state_dict({**state["model"], "model.embed_tokens.weight": draft.body.model.embed_tokens.weight})
        optimizer.load_state_dict(state["optimizer"])
        order_rng.set_state(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, elapsed, history, ema, queue = (state["step"], state["elapsed"], state["history"],
                                               state["ema"], state["queue"])
    before = history[0] if history else None
    if before is None:
        before = {"step": 0, **evaluate(draft, data, device=device, autocast=recipe.autocast)}
        history.append(before)

    def save_checkpoint(step: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": settings, "step": step, "model": draft.trainable(),
                    "optimizer": optimizer.state_dict(), "order_rng": order_rng.get_state(),
                    "torch_rng": torch.get_rng_state(), "elapsed": elapsed + time.perf_counter() - t0,
                    "history": history, "ema": ema, "queue": queue}, checkpoint)

    t0 = time.perf_counter()
    end = recipe.steps if stop_at is None else min(recipe.steps, checks.integer("stop_at", stop_at, low=1))
    draft.body.train()
    bar = tqdm(range(start, end), initial=start, total=recipe.steps, desc="distil", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        if len(queue) < recipe.batch_size:   # epochs: a fresh permutation of the training sequences
            queue = queue + [data.train[i] for i in torch.randperm(len(data.train), generator=order_rng).tolist()]
        which, queue = queue[:recipe.batch_size], queue[recipe.batch_size:]
        loss, _, _, _ = _loss(draft, data, which, device, recipe.autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % recipe.eval_interval == 0 and step + 1 < recipe.steps:
            val = evaluate(draft, data, device=device, autocast=recipe.autocast)
            history.append({"step": step + 1, "train_cross_entropy": round(ema, 4), **val})
            save_checkpoint(step + 1)
            bar.set_postfix(loss=f"{ema:.3f}", kl=f"{val['kl']:.3f}")
        elif step % 5 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    bar.close()
    wall = elapsed + time.perf_counter() - t0
    save_checkpoint(max(end, start))
    if end < recipe.steps:
        return None
    after = evaluate(draft, data, device=device, autocast=recipe.autocast)
    history.append({"step": recipe.steps, "train_cross_entropy": round(ema, 4), **after})
    n_train_positions = int(sum(len(data.sequences[s]) - int(data.prompt_lengths[s]) for s in data.train))
    record = {
        "format": FORMAT,
        "layers_from_target": list(layers),
        "config": asdict(draft.config),
        "kept_tokens": int(kept.numel()),
        "kept_sha256": settings["kept_sha256"],
        "parameters_owned": sum(v.numel() for v in draft.trainable().values()),
        "parameters_shared_embedding": draft.body.model.embed_tokens.weight.numel(),
        "training": {**asdict(recipe), "seed": seed, "optimizer": "AdamW(betas=(0.9, 0.99))",
                     "schedule": "linear warm-up, cosine decay to min_lr", "grad_clip": 1.0,
                     "loss": "cross-entropy against the target's top-k renormalised to the kept tokens "
                             "(= KL(p || q) + H(p))"},
        "targets": {**targets.get("meta", {}), "sequences": len(data.sequences), "train_sequences": len(data.train),
                    "val_sequences": len(data.val), "train_positions": n_train_positions,
                    "sequences_seen": recipe.steps * recipe.batch_size},
        "wall_time_s": round(wall, 1),
        "machine": provenance.machine(device),
        "versions": provenance.versions(),
        "val_before": before,
        "val_after": after,
        "history": history,
    }
    return draft, record


# ---------------------------------------------------------------------------------------
# Saving and loading


def save_draft(draft: Draft, path: Path | str = DRAFT_FILE, record: dict | None = None,
               kept_source: str = "") -> Path:
    """The draft's own tensors in bfloat16 (no embedding) and its kept ids (int32), with
    the training record as ``<stem>.json`` when given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in draft.trainable().items()}
    state["kept_tokens"] = draft.kept.to("cpu", torch.int32).contiguous()
    save_file(state, str(path), metadata={"format": FORMAT, "config": json.dumps(asdict(draft.config)),
                                          "layers_from_target": json.dumps(list(draft.layers_from)),
                                          "kept_source": kept_source})
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_draft(dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", *,
               target: gemma.Gemma | None = None, path: Path | str = DRAFT_FILE) -> Draft:
    """The committed draft in ``dtype`` on ``device``, in eval mode, with the engine's
    model interface. Its embedding is ``target``'s own tensor when ``target`` (of the same
    dtype and device) is given, else read from the Gemma cache (``make install``)."""
    if dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"`dtype` must be one of {checks.FLOAT_DTYPES}, got {dtype}")
    path = Path(path)
    state, metadata = provenance.read_safetensors(
        path, FORMAT, what="a typsamp Gemma draft",
        missing=f"no draft at {path}: train one with `python -m typsamp.distil train`")
    config = gemma.GemmaConfig(**json.loads(metadata["config"]))
    layers = tuple(json.loads(metadata["layers_from_target"]))
    kept = state.pop("kept_tokens").long().to(device)
    if target is not None:
        if not isinstance(target, gemma.Gemma):
            raise checks.InputTypeError(f"`target` must be a typsamp.gemma.Gemma, got {type(target).__name__}")
        embedding = target.model.embed_tokens.weight
        if embedding.shape != (config.vocab_size, config.hidden):
            raise ValueError(f"`target`'s embedding has shape {tuple(embedding.shape)}, the draft needs "
                             f"{(config.vocab_size, config.hidden)}")
        if embedding.dtype != dtype or embedding.device != torch.device(device):
            embedding = embedding.detach().to(device=device, dtype=dtype)
    else:
        embedding = gemma.load_embedding(dtype, device)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    state["model.embed_tokens.weight"] = embedding
    with torch.device("meta"):
        body = gemma.Gemma(config)
    body.load_state_dict(state, assign=True, strict=True)
    for name in ("inv_freq_local", "inv_freq_global"):
        setattr(body, name, getattr(body, name).to(device))
    body.requires_grad_(False)
    return Draft(body.eval(), kept, layers).eval()


# ---------------------------------------------------------------------------------------
# Measuring it


def measure_alpha(target, draft, prompts: list[torch.Tensor], *, temperatures=(0.0, 0.7, 1.0),
                  gamma: int = 4, new_tokens: int = 100, seed: int = 0) -> dict:
    """α of ``draft`` against ``target`` under rejection sampling with sampled drafts
    (``generate.speculative``'s default), per temperature: accepted / examined summed
    over ``prompts`` (each decoded alone), with the counts."""
    from typsamp import generate, sampling
    from typsamp.speculative import RejectionSampling

    out = {}
    for T in temperatures:
        accepted = examined = 0
        for i, prompt in enumerate(prompts):
            g = generate.speculative(target, generate.DraftModel(draft), prompt[None], new_tokens, gamma=gamma,
                                     rule=RejectionSampling(), warp=sampling.Warp(temperature=T),
                                     seed=seed + i)
            accepted, examined = accepted + g.accepted, examined + g.examined
        out[str(T)] = {"alpha": accepted / examined if examined else float("nan"), "accepted": accepted,
                       "examined": examined}
    return out


# ---------------------------------------------------------------------------------------
# The command line


def _train_prompt_ids(tokenizer, per_category: int | None, max_prompt: int) -> list[list[int]]:
    from typsamp import prompts

    out = []
    for category in prompts.CATEGORIES:
        items = prompts.load(category, "train")
        if per_category is not None:
            items = items[:per_category]
        for p in items:
            ids = tokenizer(p.text)["input_ids"]
            out.append(ids[:max_prompt])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m typsamp.distil", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("targets", help="sample the target and cache its top-k (outside git)")
    p.add_argument("--prompts-per-category", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--max-prompt", type=int, default=160, help="prompt tokens kept (the first ones)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train", help="distil the draft from the cached targets")
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DRAFT_FILE)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-at", type=int)
    p = sub.add_parser("alpha", help="measure the committed draft's alpha on test prompts")
    p.add_argument("--prompts", type=int, default=4, help="test prompts (spread over the categories)")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--gamma", type=int, default=4)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(checks.integer("threads", args.threads, low=1))
    if args.command == "targets":
        target = gemma.load(torch.bfloat16)
        tokenizer = gemma.load_tokenizer()
        ids = _train_prompt_ids(tokenizer, args.prompts_per_category, args.max_prompt)
        t0 = time.perf_counter()
        targets = make_targets(target, ids, new_tokens=args.new_tokens, seed=args.seed,
                               batch_size=args.batch_size, eos_token_id=target.config.eos_token_id)
        targets["meta"].update({"max_prompt": args.max_prompt, "prompts_per_category": args.prompts_per_category,
                                "prompt_split": "train", "seconds": round(time.perf_counter() - t0, 1),
                                "torch_threads": torch.get_num_threads()})
        path = targets_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(targets, path)
        print(f"{len(targets['sequences'])} sequences, {targets['topk_ids'].shape[0]:,} positions -> {path}")
    elif args.command == "train":
        targets = torch.load(targets_path(), weights_only=False)
        target = gemma.load(torch.float32)
        kept, source = kept_tokens(targets)
        result = train(target, targets, kept, recipe=replace(RECIPE, steps=args.steps, batch_size=args.batch_size),
                       seed=args.seed, resume=args.resume, stop_at=args.stop_at)
        if result is None:
            print(f"stopped at step {args.stop_at}; continue with --resume")
            return
        draft, record = result
        record["kept_source"] = source
        record["command"] = "python -m typsamp.distil " + " ".join(argv if argv is not None else sys.argv[1:])
        save_draft(draft, args.out, record, kept_source=source)
        print(f"draft: KL {record['val_before']['kl']:.3f} -> {record['val_after']['kl']:.3f} nats, argmax "
              f"agreement {record['val_before']['argmax_agreement']:.3f} -> {record['val_after']['argmax_agreement']:.3f}, "
              f"{record['wall_time_s']:.0f} s -> {args.out}")
    else:
        from typsamp import prompts
        target = gemma.load(torch.bfloat16)
        draft = load_draft(torch.bfloat16, target=target)
        tokenizer = gemma.load_tokenizer()
        chosen = []
        for k in range(args.prompts):
            category = prompts.CATEGORIES[k % len(prompts.CATEGORIES)]
            chosen.append(prompts.load(category, "test")[k // len(prompts.CATEGORIES)])
        ids = [torch.tensor(tokenizer(p.text)["input_ids"][:160]) for p in chosen]
        print(json.dumps(measure_alpha(target, draft, ids, gamma=args.gamma, new_tokens=args.new_tokens), indent=2))


if __name__ == "__main__":
    main()
