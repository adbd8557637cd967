"""Medusa heads for Gemma 3 270M: extra decoding heads on the frozen target (chapter 10).

    python -m typsamp.medusa data     [--split train|test] [--samples N] [--new-tokens N] [--seed S] [--threads N]
    python -m typsamp.medusa train    [--steps N] [--batch-size B] [--seed S] [--resume] [--stop-at N] [--threads N]
    python -m typsamp.medusa accuracy [--split train|test] [--record] [--threads N]

The heads (Medusa-1)
--------------------
Cai et al. (2024, §2.1) put K extra heads on the last hidden state of a frozen model. Head
k reads the target's final-normed hidden state h_t at position t, the state from which the
target's own head predicts token t+1, and predicts token t+k+1:

    r_k(h) = h + SiLU(W_k h + b_k),        logits_k = E r_k(h),

one residual block per head and then the target's *own* LM head E (Gemma's tied
embedding, frozen, shared: never copied into the weight file). W_k and b_k start at zero,
so every head starts as the target's head. Medusa's code (``ResBlock`` and ``MedusaModel``
in ``medusa/model/medusa_model.py`` of FasterDecoding/Medusa, commit 11af0aa) also
zero-initialises the block's linear weight (its bias keeps PyTorch's default) and adds the
block's output to its input, but gives every head its own trainable copy of the LM head,
initialised from the model's; here the LM head stays the target's, shared and frozen,
which is what keeps the weight file small. Only W_k and b_k learn: 4 x (640 x 640 + 640)
= 1.64M parameters, 3.3 MB in bfloat16.

The head's rows are a subset of the vocabulary: the 32,768 kept tokens of the trimmed
draft (:func:`typsamp.drafts.kept_tokens`), or the most frequent ``rows`` of them
(:meth:`MedusaHeads.restrict`). Medusa's candidates are each head's top-k tokens,
deterministic (q = None), so a head that can never propose a rare token costs only the
acceptance of that token, never correctness: verification (the rule) is what decides.
What smaller subsets cost in accuracy is measured by ``accuracy`` and recorded.

Self-distillation data (Medusa §2.3.2): ``python -m typsamp.medusa data``
-----------------------------------------------------------------------
The target (bfloat16) samples :data:`SAMPLES` continuations of :data:`NEW_TOKENS` tokens at
T = 1 after every *train-split* prompt of every category (:mod:`typsamp.prompts`; the test split is never used for
training), each prompt cut to BOS and its last :data:`PROMPT_TOKENS` - 1 tokens. At every
generated position j it keeps the hidden state h_j that the target's head read and the
target's top-:data:`TOP_K` log-probabilities and ids of that distribution. Cached outside
git (:func:`data_path`, under :func:`typsamp.gemma.cache_dir`), batch by batch, so an
interrupted run resumes. Head k trains on the pairs (h_j, distribution at j + k) within a
sequence: the distribution that token j + k + 1 was drawn from, conditioned on the
tokens the target itself sampled in between (Medusa's self-distillation).

Training: ``python -m typsamp.medusa train``
-------------------------------------------
The loss of head k at a pair is the cross-entropy of its distribution over the head's
rows against the target's top-k renormalised to those rows, i.e. KL(p~ || q_k) + H(p~)
with p~ the target's distribution truncated to its top :data:`TOP_K` tokens that are also
kept rows. What the approximation changes: the target's mass outside its top k (recorded
as ``teacher_topk_mass``) and outside the kept rows is dropped, so the heads learn a
slightly sharpened teacher and can never rank a token outside the rows; the top-1/top-5
candidates, all the proposer uses, hardly depend on that tail. The heads' losses are
summed with equal weights (as ``compute_loss`` in Medusa's ``medusa/train/train_legacy.py``,
commit 46f911e, sums them; the report weights head k by 0.8^k; with AdamW and heads that
share no parameter, a constant factor on one head's loss changes nearly nothing, since
Adam's step does not scale with the gradient's size). AdamW, warm-up then cosine decay,
gradient clipping at 1, bfloat16 autocast for the products (float32 master weights),
seeded, resumable from a checkpoint in ``_build/medusa/``. Every sample of every
:data:`VAL_EVERY`-th prompt is held out. The weights go in bfloat16 to
``lib/typsamp/weights/gemma_medusa.safetensors`` (W, b and the ranked kept ids only) with
the record ``gemma_medusa.json``: data (prompt counts, split, hashes, tokens), time, and
per-head top-1/top-5 accuracy on the held-out sequences.

Accuracy, and what Medusa published
----------------------------------
``accuracy`` reports, per head, top-1 and top-5: how often the token the target actually
produced k + 1 places ahead is the head's best guess, or among its five best. On the
held-out train-split sequences (sampled at T = 1) it is scored against the sampled token
and against the target's argmax there; on the test split the target's continuations are
greedy (T = 0), which is how Medusa's ``medusa/eval/heads_accuracy.py`` (FasterDecoding/
Medusa, commit 6294228) measures its heads: head k's top-k at step t against the greedy
token of step t + k + 1. :data:`PUBLISHED_ACCURACY` holds the per-head numbers the Medusa
authors published for Vicuna-7B (from their training log; see its comment for what they
measure). Also recorded: the same heads restricted to the first 16,384 ... 2,048 ranked
rows, and over the whole vocabulary (the full tied head).

The proposer
------------
:class:`MedusaProposer` (``MedusaProposer(heads, spec)``, ``spec`` a
:class:`typsamp.tree.TreeSpec`) follows the engine's proposer protocol
(:mod:`typsamp.generate`) and sets ``needs_hidden = True``: the engine hands it the
target's final-normed hidden states through ``observe(hidden, end)``, and every step it
proposes the tree's candidates from each head's top-k at ``hidden[b, end[b]]``.
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

from typsamp import checks, gemma, provenance, sampling
from typsamp.train import learning_rate   # warm-up, then cosine decay: the recipe as a preset

__all__ = ["HEADS", "TOP_K", "NEW_TOKENS", "PROMPT_TOKENS", "VAL_EVERY", "PUBLISHED_ACCURACY", "Recipe",
           "RECIPE", "MedusaHeads", "MedusaProposer", "make_data", "data_path", "save_data", "load_data",
           "test_data_path", "ranked_kept", "ROW_SUBSETS", "train", "accuracy", "save_heads", "load_heads",
           "HEADS_FILE"]

#: Heads (depths proposed) and the teacher's top-k kept per position.
HEADS = 4
TOP_K = 32
#: The data run's defaults.
SEED = 20_261_202
PROMPT_TOKENS = 64          # BOS and each prompt's last 63 tokens
NEW_TOKENS = 96             # tokens sampled per train-split prompt
SAMPLES = 3                 # continuations per train-split prompt (each its own draws)
BATCH_SIZE = 97             # rows per batch (the 3 x 291 train-split rows in nine batches)
#: Every VAL_EVERY-th sequence (in prompt order) is held out of training.
VAL_EVERY = 8
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
HEADS_FILE = WEIGHTS_DIR / "gemma_medusa.safetensors"
CHECKPOINT_DIR = provenance.ROOT / "_build" / "medusa"
FORMAT = "typsamp.gemma_medusa/1"
DATA_FORMAT = "typsamp.medusa.data/1"

#: Medusa's published per-head accuracy for Vicuna-7B v1.3: the last logged values of its
#: Medusa-1 training run ``train/medusa{k}_top1`` and ``..._top5``, k = 0..4 (head k
#: predicting the token k + 2 places ahead, the base head predicting the next one), as
#: exported from the authors' training log to ``assets/medusa_acc.csv`` of
#: FasterDecoding/Medusa (commit 5d374e9bf99f7bf6438cb40a4e0c2c29ff9ed7f7, run "7b",
#: 2023-08-13: 5 heads, 1 residual layer, lr 1e-3, ShareGPT data; rounded to 3 places
#: here). What the numbers are: ``compute_loss`` in ``medusa/train/train_legacy.py`` (same
#: repository, commit 46f911eb4a20c9f00182539b546a7385f1f56b52) compares head i's top-k at
#: position t with the label at t + 2 + i and logs the fraction of hits in each training
#: batch. So these are accuracies on *training batches* against the data's own tokens,
#: not on held-out text, and not the paper's: we did not find per-head numbers in the
#: arXiv report (2401.10774) itself, so none is quoted from it.
PUBLISHED_ACCURACY: dict = {
    "model": "Vicuna-7B v1.3, Medusa-1 (5 heads, 1 layer)",
    "source": "FasterDecoding/Medusa assets/medusa_acc.csv, commit 5d374e9bf99f7bf6438cb40a4e0c2c29ff9ed7f7, run '7b'",
    "measured_on": "training batches (ShareGPT), against the data's tokens; last logged value",
    "top1": [0.560, 0.316, 0.201, 0.147, 0.118],
    "top5": [0.780, 0.563, 0.417, 0.340, 0.300],
}


# ---------------------------------------------------------------------------------------
# Self-distillation data


def data_path(directory: Path | str | None = None) -> Path:
    """Where ``data`` stores the target's generations, hidden states and top-k (outside
    git): ``medusa/data.safetensors`` in the Gemma cache directory."""
    root = gemma.cache_dir() if directory is None else Path(directory)
    return root / "medusa" / "data.safetensors"


def _prompt_rows(tokenizer, split: str, prompt_tokens: int) -> tuple[list[str], list[list[int]]]:
    """``"category/id"`` names and token ids (BOS, then the last ``prompt_tokens - 1``
    tokens) of every prompt of ``split``, category by category in source order."""
    from typsamp import prompts

    names, rows = [], []
    for category in prompts.CATEGORIES:
        for p in prompts.load(category, split):
            ids = tokenizer(p.text).input_ids
            if len(ids) > prompt_tokens:
                ids = ids[:1] + ids[len(ids) - prompt_tokens + 1:]
            names.append(f"{category}/{p.id}")
            rows.append(ids)
    return names, rows


@torch.inference_mode()
def _generate_batch(target: gemma.Gemma, rows: list[list[int]], new_tokens: int, top_k: int,
                    temperature: float, generator: torch.Generator, bar=None) -> list[dict]:
    """Sample ``new_tokens`` tokens after each of the ragged ``rows``; per row the
    generated tokens (cut after the first end token) with, at each, the hidden state the
    target's head read and its top-k log-probabilities (of the untempered distribution)."""
    device = target.model.embed_tokens.weight.device
    W = target.model.embed_tokens.weight
    eos = target.config.eos_token_id
    B = len(rows)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    P = int(lengths.max())
    padded = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        padded[b, :len(r)] = torch.tensor(r)
    H = target.config.hidden
    hidden = torch.zeros(B, new_tokens, H, dtype=torch.bfloat16)
    ids = torch.zeros(B, new_tokens, top_k, dtype=torch.int32)
    logp_out = torch.zeros(B, new_tokens, top_k, dtype=torch.float16)
    out = torch.zeros(B, new_tokens, dtype=torch.long)
    target.setup_cache(B, P + new_tokens)
    h = target(padded, torch.zeros(B, dtype=torch.long, device=device), span=P, head=None)
    target.cache.rollback(lengths, check=False)
    h = h.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, H))[:, 0]
    logits = gemma._head(h, W)
    alive = torch.ones(B, dtype=torch.bool)
    for i in range(new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, index = logp.topk(top_k, dim=-1)
        hidden[:, i] = h.to("cpu", torch.bfloat16)
        ids[:, i] = index.int().cpu()
        logp_out[:, i] = values.half().cpu()
        if temperature == 0.0:
            token = index[:, 0]
        else:
            weights = logp.exp() if temperature == 1.0 else torch.softmax(logits.float() / temperature, dim=-1)
            token = sampling.sample_weights(weights, generator)
        out[:, i] = token.cpu()
        alive_before = alive.clone()
        alive = alive & (out[:, i] != eos)
        if bar is not None:
            bar.update(int(alive_before.sum()))
        if i + 1 == new_tokens or not bool(alive.any()):
            break
        logits, h = target(token[:, None], lengths + i, span=P + i + 1, return_hidden=True)
        logits, h = logits[:, -1], h[:, -1]
    target.clear_cache()
    result = []
    for b in range(B):
        gen = out[b]
        keep = new_tokens
        if (gen == eos).any():
            keep = int((gen == eos).nonzero()[0]) + 1
        result.append({"tokens": torch.tensor(rows[b] + gen[:keep].tolist(), dtype=torch.int32),
                       "prompt_length": len(rows[b]), "hidden": hidden[b, :keep].clone(),
                       "topk_ids": ids[b, :keep].clone(), "topk_logp": logp_out[b, :keep].clone()})
    return result


def make_data(target: gemma.Gemma, rows: list[list[int]], *, new_tokens: int = NEW_TOKENS, top_k: int = TOP_K,
              seed: int = SEED, batch_size: int = BATCH_SIZE, temperature: float = 1.0,
              parts: Path | str | None = None, progress: bool = True) -> dict:
    """The self-distillation data for ``rows`` (prompt token id lists), in input order.

    Rows are batched by prompt length (less padding); batch i is sampled with its own
    generator seeded ``seed + i``, and, when ``parts`` (a directory) is given, saved there
    as it finishes and reused by a later call with the same settings (a resumed run
    gives the same data). Returns a dict of

    * ``tokens`` int32 [total] (every sequence, prompt then generation, concatenated),
      ``starts`` int64 [S + 1], ``prompt_lengths`` int64 [S];
    * ``hidden`` bfloat16 [N, hidden], ``topk_ids`` int32 [N, k], ``topk_logp`` float16
      [N, k]: one row per generated token, in sequence order; row j of a sequence is the
      hidden state and the distribution from which its j-th generated token was drawn;
    * ``gen_starts`` int64 [S + 1]: sequence s owns rows ``gen_starts[s]:gen_starts[s + 1]``;
    * ``meta``: the settings.
    """
    new_tokens = checks.integer("new_tokens", new_tokens, low=2)
    top_k = checks.integer("top_k", top_k, low=1)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    temperature = checks.real("temperature", temperature, low=0.0)
    if not isinstance(target, gemma.Gemma):
        raise checks.InputTypeError(f"`target` must be a typsamp.gemma.Gemma, got {type(target).__name__}")
    if not rows or any(len(r) < 1 for r in rows):
        raise ValueError("`rows` must be a non-empty list of non-empty token id lists")
    V = target.config.vocab_size
    if any(t < 0 or t >= V for r in rows for t in r):
        raise ValueError(f"`rows` hold token ids outside the vocabulary [0, {V})")
    meta = {"new_tokens": new_tokens, "top_k": top_k, "seed": seed, "batch_size": batch_size,
            "temperature": temperature, "rows": len(rows),
            "rows_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest(),
            "target_dtype": str(target.model.embed_tokens.weight.dtype).replace("torch.", "")}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    done: dict[int, dict] = {}
    bar = tqdm(total=len(rows) * new_tokens, desc="medusa data", disable=not progress, dynamic_ncols=True,
               mininterval=2.0, unit="tok")
    for number, batch in enumerate(batches):
        part = None if parts is None else Path(parts) / f"part-{key}-{number}.pt"
        if part is not None and part.is_file():
            got = torch.load(part, weights_only=True)
            bar.update(len(batch) * new_tokens)
        else:
            generator = torch.Generator(device=target.model.embed_tokens.weight.device).manual_seed(seed + number)
            got = _generate_batch(target, [rows[i] for i in batch], new_tokens, top_k, temperature, generator, bar)
            if part is not None:
                part.parent.mkdir(parents=True, exist_ok=True)
                torch.save(got, part)
        for i, g in zip(batch, got):
            done[i] = g
    bar.close()
    seqs = [done[i] for i in range(len(rows))]
    lengths = torch.tensor([len(s["tokens"]) for s in seqs])
    generated = torch.tensor([s["hidden"].shape[0] for s in seqs])
    return {"tokens": torch.cat([s["tokens"] for s in seqs]),
            "starts": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "prompt_lengths": torch.tensor([s["prompt_length"] for s in seqs]),
            "gen_starts": torch.cat([torch.zeros(1, dtype=torch.long), generated.cumsum(0)]),
            "hidden": torch.cat([s["hidden"] for s in seqs]),
            "topk_ids": torch.cat([s["topk_ids"] for s in seqs]),
            "topk_logp": torch.cat([s["topk_logp"] for s in seqs]),
            "meta": meta}


def test_data_path(directory: Path | str | None = None) -> Path:
    """Where ``data --split test`` stores the test-split generations (for ``accuracy`` only)."""
    return data_path(directory).with_name("data_test.safetensors")


_DATA_TENSORS = ("tokens", "starts", "prompt_lengths", "gen_starts", "hidden", "topk_ids", "topk_logp")


def save_data(data: dict, path: Path | str | None = None, *, names: list[str] | None = None) -> Path:
    """Write ``data`` (from :func:`make_data`) as safetensors with its settings (and the
    prompts' names) in the metadata."""
    from safetensors.torch import save_file

    path = data_path() if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: data[k].contiguous() for k in _DATA_TENSORS}, str(path),
              metadata={"format": DATA_FORMAT, "meta": json.dumps(data["meta"]), "names": json.dumps(names or [])})
    return path


def load_data(path: Path | str | None = None) -> dict:
    """The stored data (see :func:`make_data`), with ``meta`` and ``names``."""
    path = data_path() if path is None else Path(path)
    out, metadata = provenance.read_safetensors(
        path, DATA_FORMAT, what="Medusa data", missing=f"{path} is missing: run `python -m typsamp.medusa data`")
    out["meta"] = json.loads(metadata["meta"])
    out["names"] = json.loads(metadata["names"])
    return out


# ---------------------------------------------------------------------------------------
# The heads


class MedusaHeads(nn.Module):
    """K Medusa-1 heads on a frozen tied head (see the module docstring).

    ``MedusaHeads(embedding [V, H], kept [M], n_heads=4)``: ``embedding`` is the
    target's own tensor (kept by reference, never trained, never saved); ``kept`` the
    token ids whose rows form the heads' output layer, most useful first (a smaller
    subset is a prefix, :meth:`restrict`). Parameters: ``weight`` [K, H, H] and ``bias``
    [K, H] (zero at the start: every head then *is* the target's head, over ``kept``).

    ``heads(h [..., H])`` returns logits [..., K, M] over ``kept`` (head k - 1 at index
    k - 1 predicts the token k + 1 places after the one h was computed at);
    :meth:`topk` returns vocabulary ids [..., K, k]. Computed in the heads' dtype.
    """

    def __init__(self, embedding: torch.Tensor, kept: torch.Tensor, n_heads: int = HEADS):
        super().__init__()
        checks.tensor("embedding", embedding, floating=True)
        if embedding.dim() != 2:
            raise ValueError(f"`embedding` must have shape [V, H], got {tuple(embedding.shape)}")
        checks.tensor("kept", kept)
        V, H = embedding.shape
        if kept.dim() != 1 or kept.dtype not in (torch.int32, torch.int64) or kept.numel() < 1:
            raise ValueError(f"`kept` must be a 1-D integer tensor of token ids, got {kept.dtype} "
                             f"of shape {tuple(kept.shape)}")
        kept = kept.to(device=embedding.device, dtype=torch.long)
        low, high, distinct = torch.stack([kept.min(), kept.max(), torch.tensor(torch.unique(kept).numel())]).tolist()
        if low < 0 or high >= V:
            raise ValueError(f"`kept` holds ids outside the vocabulary [0, {V}): min {low}, max {high}")
        if distinct != kept.numel():
            raise ValueError("`kept` must not repeat a token id")
        self.n_heads = checks.integer("n_heads", n_heads, low=1)
        self.vocab_size = V
        self.hidden = H
        self.embedding = embedding.detach()
        self.register_buffer("kept", kept, persistent=False)
        self.weight = nn.Parameter(torch.zeros(self.n_heads, H, H, device=embedding.device, dtype=embedding.dtype))
        self.bias = nn.Parameter(torch.zeros(self.n_heads, H, device=embedding.device, dtype=embedding.dtype))
        self.refresh_rows()

    def refresh_rows(self) -> None:
        """The output rows ``embedding[kept]`` again (in the heads' dtype)."""
        with torch.no_grad():
            self.rows = self.embedding[self.kept].to(self.weight.dtype).contiguous()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self.embedding = fn(self.embedding)
        self.refresh_rows()
        return out

    def __repr__(self) -> str:
        return (f"MedusaHeads(n_heads={self.n_heads}, hidden={self.hidden}, rows={self.kept.numel()} of "
                f"{self.vocab_size}, {self.weight.dtype})")

    def _check(self, h: torch.Tensor) -> torch.Tensor:
        checks.tensor("h", h, floating=True, min_dim=1)
        if h.shape[-1] != self.hidden:
            raise ValueError(f"`h` must end in the hidden size {self.hidden}, got shape {tuple(h.shape)}")
        return h.to(self.weight.dtype)

    def residual(self, h: torch.Tensor) -> torch.Tensor:
        """r_k(h) = h + SiLU(W_k h + b_k) for every head: [..., K, H]."""
        h = self._check(h)
        inner = torch.einsum("...i,koi->...ko", h, self.weight) + self.bias
        return h[..., None, :] + F.silu(inner)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [..., K, M] over the rows ``kept``."""
        return self.residual(h) @ self.rows.T

    def topk(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Each head's ``k`` best token ids (vocabulary ids, best first): int64 [..., K, k]."""
        k = checks.integer("k", k, low=1)
        if k > self.kept.numel():
            raise ValueError(f"`k` ({k}) exceeds the heads' {self.kept.numel()} rows")
        return self.kept[self(h).topk(k, dim=-1).indices]

    def restrict(self, rows: int) -> "MedusaHeads":
        """The same heads (shared parameters) over the first ``rows`` ids of ``kept``."""
        rows = checks.integer("rows", rows, low=1)
        if rows > self.kept.numel():
            raise ValueError(f"`rows` ({rows}) exceeds the heads' {self.kept.numel()} rows")
        out = MedusaHeads.__new__(MedusaHeads)
        nn.Module.__init__(out)
        out.n_heads, out.vocab_size, out.hidden, out.embedding = self.n_heads, self.vocab_size, self.hidden, self.embedding
        out.register_buffer("kept", self.kept[:rows], persistent=False)
        out.weight, out.bias = self.weight, self.bias
        out.rows = self.rows[:rows]
        return out


# ---------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Recipe:
    """How the heads are trained."""

    steps: int = 1200
    batch_size: int = 256               # anchor positions per step (every head at each)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 30
    weight_decay: float = 0.0
    eval_interval: int = 200
    autocast: bool = True               # bfloat16 matrix products (CPU AMX / GPU)


RECIPE = Recipe()


class _Pairs:
    """The data laid out for the heads: anchors (rows j with at least one later row in
    their sequence), the sequence each row belongs to, the teacher mapped onto the heads'
    rows, and the labels (sampled token, target argmax) of every row."""

    def __init__(self, data: dict, kept: torch.Tensor, vocab_size: int, n_heads: int, val_every: int = VAL_EVERY):
        gen = data["gen_starts"]
        S = gen.numel() - 1
        N = int(gen[-1])
        self.hidden = data["hidden"]
        self.n_heads = n_heads
        seq_of = torch.repeat_interleave(torch.arange(S), gen[1:] - gen[:-1])
        self.end = gen[1:][seq_of]                                              # [N]: the row after its sequence
        where = torch.full((vocab_size,), -1, dtype=torch.long)
        where[kept] = torch.arange(kept.numel())
        ids = data["topk_ids"].long()
        idx = where[ids]
        logp = data["topk_logp"].float().masked_fill(idx < 0, -math.inf)
        self.teacher_index = idx.clamp(min=0)
        self.teacher_p = torch.softmax(logp, dim=-1).nan_to_num(nan=0.0)
        self.topk_mass = float(data["topk_logp"].float().exp().sum(-1).mean())
        self.kept_mass = float((data["topk_logp"].float().exp() * (idx >= 0)).sum(-1).mean())
        self.argmax = ids[:, 0]
        # the token drawn from row j's distribution: the sequence's (P + j - gen_start)-th token
        tokens, starts, P = data["tokens"].long(), data["starts"], data["prompt_lengths"]
        offset = starts[:-1] + P - gen[:-1]                                      # token index = row + offset
        self.sampled = tokens[torch.arange(N) + offset[seq_of]]
        anchors = torch.arange(N)[torch.arange(N) + 1 < self.end]
        # held out by prompt: the samples of one prompt are consecutive sequences
        samples = int(data.get("meta", {}).get("samples_per_prompt", 1))
        prompt_of = torch.arange(S) // samples
        held_seq = (prompt_of % val_every) == val_every - 1
        held = held_seq[seq_of[anchors]]
        self.train, self.val = anchors[~held], anchors[held]
        self.val_sequences = int(held_seq.sum())
        self.train_sequences = S - self.val_sequences
        if self.train.numel() == 0:
            raise ValueError("the data hold too few positions to train on")

    def batch(self, anchors: torch.Tensor, device):
        """h [n, H], and per head k (dim 1): the teacher's row j + k (index [n, K, k],
        probs [n, K, k]), its labels [n, K], and which pairs exist [n, K]."""
        K = self.n_heads
        at = anchors[:, None] + torch.arange(1, K + 1)                           # [n, K]
        valid = at < self.end[anchors][:, None]
        at = torch.where(valid, at, anchors[:, None])
        return (self.hidden[anchors].to(device), self.teacher_index[at].to(device),
                self.teacher_p[at].to(device) * valid[..., None].to(device), valid.to(device),
                self.sampled[at].to(device), self.argmax[at].to(device))


def _loss(heads: MedusaHeads, pairs: _Pairs, anchors: torch.Tensor, device, autocast: bool):
    """(summed over heads of the mean cross-entropy, per-head [K] sums of cross-entropy,
    pair counts [K]) for ``anchors``."""
    h, index, p, valid, _, _ = pairs.batch(anchors, device)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        logits = heads(h.to(heads.weight.dtype))                                  # [n, K, M]
    logq = torch.log_softmax(logits.float(), dim=-1)
    cross = -(p * logq.gather(-1, index)).sum(-1)                                 # [n, K], 0 where invalid
    counts = valid.sum(0)
    per_head = cross.sum(0)
    loss = (per_head / counts.clamp(min=1)).sum()
    return loss, per_head.detach(), counts


@torch.no_grad()
def accuracy(heads: MedusaHeads, pairs: _Pairs, anchors: torch.Tensor | None = None, *, device="cpu",
             autocast: bool = True, batch_size: int = 256, rows: tuple[int, ...] = (),
             full_vocab: bool = False) -> dict:
    """Per head: mean cross-entropy against the teacher (nats), and top-1/top-5 accuracy
    against the token the target sampled there and against the target's argmax, on
    ``anchors`` (default: the held-out ones). ``rows``: also the accuracies when the
    heads keep only the first r of their rows, for each r; ``full_vocab``: also over the
    whole vocabulary (the full tied head, as Medusa's own heads)."""
    anchors = pairs.val if anchors is None else anchors
    K = heads.n_heads
    names = ["kept"] + [f"rows_{r}" for r in rows] + (["full_vocab"] if full_vocab else [])
    hits = {name: {label: torch.zeros(K, 2, dtype=torch.long) for label in ("sampled", "argmax")} for name in names}
    ce = torch.zeros(K, dtype=torch.float64)
    total = torch.zeros(K, dtype=torch.long)
    was = heads.training
    heads.eval()
    E = heads.embedding.to(torch.bfloat16 if autocast else heads.weight.dtype) if full_vocab else None
    for lo in range(0, anchors.numel(), batch_size):
        chunk = anchors[lo:lo + batch_size]
        h, index, p, valid, sampled, argmax = pairs.batch(chunk, device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            r = heads.residual(h)
            logits = r @ heads.rows.T                                             # [n, K, M]
        logq = torch.log_softmax(logits.float(), dim=-1)
        ce += (-(p * logq.gather(-1, index)).sum(-1)).sum(0).double().cpu()
        total += valid.sum(0).cpu()
        variants = [("kept", heads.kept[logits.topk(5, dim=-1).indices])]
        variants += [(f"rows_{m}", heads.kept[logits[..., :m].topk(5, dim=-1).indices]) for m in rows]
        if full_vocab:                                                        # one head at a time: [n, V]
            variants.append(("full_vocab", torch.stack([(r[:, k].to(E.dtype) @ E.T).topk(5, dim=-1).indices
                                                        for k in range(K)], dim=1)))
        for name, top in variants:
            for label, truth in (("sampled", sampled), ("argmax", argmax)):
                match = top == truth[..., None]                                   # [n, K, 5]
                one = (match[..., 0] & valid).sum(0).cpu()
                five = (match.any(-1) & valid).sum(0).cpu()
                hits[name][label] += torch.stack([one, five], dim=1)
    heads.train(was)
    n = total.clamp(min=1).double()
    out = {"pairs_per_head": total.tolist(), "cross_entropy": [round(float(x), 4) for x in ce / n]}
    for name in names:
        out[name] = {label: {"top1": [round(float(x), 4) for x in v[:, 0] / n],
                             "top5": [round(float(x), 4) for x in v[:, 1] / n]} for label, v in hits[name].items()}
    return out


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()


def train(embedding: torch.Tensor, data: dict, kept: torch.Tensor, *, recipe: Recipe = RECIPE,
          n_heads: int = HEADS, seed: int = 0, device: str = "cpu", resume: bool = False,
          stop_at: int | None = None, checkpoint_dir: Path | None = None,
          progress: bool = True) -> tuple[MedusaHeads, dict] | None:
    """Train ``n_heads`` heads over the rows ``kept`` (most useful first) on ``data``
    (from :func:`make_data`, made by the target whose tied head is ``embedding``).
    Returns the heads (float32) and the training record, or None when ``stop_at`` ended
    the run early (a checkpoint is left to ``resume``; the result equals an unbroken run's)."""
    if not isinstance(recipe, Recipe):
        raise checks.InputTypeError(f"`recipe` must be a Recipe, got {type(recipe).__name__}")
    checks.tensor("embedding", embedding, floating=True)
    if data["hidden"].shape[-1] != embedding.shape[-1]:
        raise ValueError(f"the data's hidden size {data['hidden'].shape[-1]} is not the embedding's "
                         f"{embedding.shape[-1]}")
    checkpoint = Path(checkpoint_dir or CHECKPOINT_DIR) / "checkpoint.pt"
    torch.manual_seed(seed)
    heads = MedusaHeads(embedding.detach().float().to(device), kept.long(), n_heads)
    pairs = _Pairs(data, kept.long().cpu(), embedding.shape[0], n_heads)
    params = [heads.weight, heads.bias]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, betas=(0.9, 0.99), weight_decay=recipe.weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    settings = {"recipe": asdict(recipe), "seed": seed, "n_heads": n_heads, "kept_sha256": _sha(kept.long()),
                "data_sha256": _sha(data["topk_ids"]) + _sha(data["hidden"].view(torch.int16))}
    start, elapsed, history, ema, queue = 0, 0.0, [], None, torch.zeros(0, dtype=torch.long)
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["settings"] != settings:
            raise ValueError(f"--resume: the checkpoint at {checkpoint} was made with other settings")
        heads.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        order_rng.set_state(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        start, elapsed, history, ema, queue = (state["step"], state["elapsed"], state["history"],
                                               state["ema"], state["queue"])
    if not history:
        history.append({"step": 0, **_summary(accuracy(heads, pairs, device=device, autocast=recipe.autocast))})

    def save_checkpoint(step: int) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"settings": settings, "step": step, "model": heads.state_dict(),
                    "optimizer": optimizer.state_dict(), "order_rng": order_rng.get_state(),
                    "torch_rng": torch.get_rng_state(), "elapsed": elapsed + time.perf_counter() - t0,
                    "history": history, "ema": ema, "queue": queue}, checkpoint)

    t0 = time.perf_counter()
    end = recipe.steps if stop_at is None else min(recipe.steps, checks.integer("stop_at", stop_at, low=1))
    heads.train()
    bar = tqdm(range(start, end), initial=start, total=recipe.steps, desc="medusa", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        if queue.numel() < recipe.batch_size:   # epochs: a fresh permutation of the training anchors
            queue = torch.cat([queue, pairs.train[torch.randperm(pairs.train.numel(), generator=order_rng)]])
        which, queue = queue[:recipe.batch_size], queue[recipe.batch_size:]
        loss, _, _ = _loss(heads, pairs, which, device, recipe.autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if (step + 1) % recipe.eval_interval == 0 and step + 1 < recipe.steps:
            val = _summary(accuracy(heads, pairs, device=device, autocast=recipe.autocast))
            history.append({"step": step + 1, "train_loss": round(ema, 4), **val})
            save_checkpoint(step + 1)
            bar.set_postfix(loss=f"{ema:.3f}", top1=val["top1_sampled"])
        elif step % 5 == 0:
            bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    bar.close()
    wall = elapsed + time.perf_counter() - t0
    save_checkpoint(max(end, start))
    if end < recipe.steps:
        return None
    heads.eval()
    after = accuracy(heads, pairs, device=device, autocast=recipe.autocast, rows=ROW_SUBSETS, full_vocab=True)
    history.append({"step": recipe.steps, "train_loss": round(ema, 4), **_summary(after)})
    record = {
        "format": FORMAT,
        "n_heads": n_heads,
        "hidden": heads.hidden,
        "rows": int(kept.numel()),
        "kept_sha256": settings["kept_sha256"],
        "parameters": sum(p.numel() for p in params),
        "parameters_shared_embedding": embedding.numel(),
        "training": {**asdict(recipe), "seed": seed, "optimizer": "AdamW(betas=(0.9, 0.99))",
                     "schedule": "linear warm-up, cosine decay to min_lr", "grad_clip": 1.0,
                     "loss": "sum over heads of the mean cross-entropy against the target's top-k "
                             "renormalised to the heads' rows (= KL(p~ || q_k) + H(p~)), equal head weights",
                     "init": "W_k = 0, b_k = 0 (every head starts as the target's own head)"},
        "teacher": {"top_k": int(data["topk_ids"].shape[1]), "teacher_topk_mass": round(pairs.topk_mass, 4),
                    "teacher_topk_mass_on_rows": round(pairs.kept_mass, 4),
                    "note": "mean target probability inside its stored top-k (and inside top-k and the heads' rows); "
                            "the loss renormalises the teacher to that part"},
        "data": {"positions": int(data["gen_starts"][-1]), "sequences": int(data["gen_starts"].numel() - 1),
                 "train_sequences": pairs.train_sequences, "val_sequences": pairs.val_sequences,
                 "train_anchors": int(pairs.train.numel()), "val_anchors": int(pairs.val.numel()),
                 "held_out": f"every sample of every {VAL_EVERY}-th prompt (in prompt order) of the train-split data",
                 "anchors_seen": recipe.steps * recipe.batch_size, "data_sha256": settings["data_sha256"],
                 **{k: v for k, v in data.get("meta", {}).items()}},
        "wall_time_s": round(wall, 1),
        "machine": provenance.machine(device),
        "versions": provenance.versions(),
        "val_before": history[0],
        "val_after": after,
        "history": history,
        "published": PUBLISHED_ACCURACY,
    }
    return heads, record


#: The smaller row subsets (prefixes of the ranked kept ids) whose accuracy is recorded.
ROW_SUBSETS = (16_384, 8_192, 4_096, 2_048)


def _summary(acc: dict) -> dict:
    """The numbers a progress line needs: per-head cross-entropy and top-1/top-5 over the kept rows."""
    kept = acc["kept"]
    return {"cross_entropy": acc["cross_entropy"], "top1_sampled": kept["sampled"]["top1"],
            "top5_sampled": kept["sampled"]["top5"], "top1_argmax": kept["argmax"]["top1"],
            "top5_argmax": kept["argmax"]["top5"]}


def ranked_kept(data: dict, kept: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``kept`` ordered by expected count in ``data`` (each token's probability summed
    over the positions where it is in the stored top-k), largest first, ties by id: a
    smaller head keeps a prefix of it."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    counts.index_add_(0, data["topk_ids"].long().flatten(), data["topk_logp"].double().exp().flatten())
    kept = kept.long().sort().values
    order = torch.argsort(-counts[kept], stable=True)
    return kept[order]


# ---------------------------------------------------------------------------------------
# Saving and loading


def save_heads(heads: MedusaHeads, path: Path | str = HEADS_FILE, record: dict | None = None) -> Path:
    """``weight`` and ``bias`` in bfloat16 and the ranked row ids (int32); no embedding.
    The training record goes to ``<stem>.json`` when given."""
    from safetensors.torch import save_file

    if not isinstance(heads, MedusaHeads):
        raise checks.InputTypeError(f"`heads` must be MedusaHeads, got {type(heads).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"weight": heads.weight.detach().to("cpu", torch.bfloat16).contiguous(),
             "bias": heads.bias.detach().to("cpu", torch.bfloat16).contiguous(),
             "kept": heads.kept.to("cpu", torch.int32).contiguous()}
    save_file(state, str(path), metadata={"format": FORMAT, "n_heads": str(heads.n_heads),
                                          "hidden": str(heads.hidden), "vocab_size": str(heads.vocab_size)})
    if record is not None:
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def load_heads(dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", *,
               target: gemma.Gemma | None = None, rows: int | None = None,
               path: Path | str = HEADS_FILE, embedding: torch.Tensor | None = None) -> MedusaHeads:
    """The committed heads in ``dtype`` on ``device`` (eval mode, no gradients), over the
    first ``rows`` ranked kept ids (default: all 32,768). The tied head is ``target``'s
    embedding when given, else ``embedding``, else read from the Gemma cache (``make install``)."""
    if dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"`dtype` must be one of {checks.FLOAT_DTYPES}, got {dtype}")
    path = Path(path)
    state, metadata = provenance.read_safetensors(
        path, FORMAT, what="a typsamp Medusa heads file",
        missing=f"no Medusa heads at {path}: train them with `python -m typsamp.medusa train`")
    if target is not None:
        if not isinstance(target, gemma.Gemma):
            raise checks.InputTypeError(f"`target` must be a typsamp.gemma.Gemma, got {type(target).__name__}")
        embedding = target.model.embed_tokens.weight
    elif embedding is None:
        embedding = gemma.load_embedding(dtype, device)
    checks.tensor("embedding", embedding, floating=True)
    V, H = int(metadata["vocab_size"]), int(metadata["hidden"])
    if tuple(embedding.shape) != (V, H):
        raise ValueError(f"the embedding has shape {tuple(embedding.shape)}, the heads need {(V, H)}")
    embedding = embedding.detach().to(device=device, dtype=dtype)
    heads = MedusaHeads(embedding, state["kept"].long().to(device), int(metadata["n_heads"]))
    with torch.no_grad():
        heads.weight.copy_(state["weight"].to(dtype))
        heads.bias.copy_(state["bias"].to(dtype))
    heads.requires_grad_(False)
    heads = heads.eval()
    return heads if rows is None else heads.restrict(rows)


# ---------------------------------------------------------------------------------------
# The proposer


class MedusaProposer:
    """Medusa's candidates for :func:`typsamp.generate.speculative`: a tree of each head's
    top-k tokens at the target's newest hidden state.

    ``MedusaProposer(heads, spec)``: ``heads`` a :class:`MedusaHeads` with at least
    ``spec.max_depth`` heads, ``spec`` a :class:`typsamp.tree.TreeSpec` (its ``parents``,
    ``top_k``, ``max_depth``, ``n_nodes`` and ``candidates``). The engine's proposer
    protocol (module docstring of :mod:`typsamp.generate`) plus ``needs_hidden = True`` and
    :meth:`observe`. Each step the heads read ``hidden[b, end[b]]`` of the last
    :meth:`observe` call, head k's top ``spec.top_k[k-1]`` ids fill the nodes at depth k
    (``spec.candidates``), and the proposal is deterministic (``q = None``): the rule
    alone decides what is kept, so correctness never depends on the heads. A row with
    no state yet (``end = -1``, or no call at all: every prompt of one token) proposes
    the heads' guesses at a zero state, valid tokens that verification judges as any.
    ``passes`` counts head evaluations (one batched evaluation per step); ``gamma`` is
    ignored (the tree fixes the width: ``width() = spec.n_nodes``).
    """

    needs_hidden = True

    def __init__(self, heads: MedusaHeads, spec):
        if not isinstance(heads, MedusaHeads):
            raise checks.InputTypeError(f"`heads` must be MedusaHeads, got {type(heads).__name__}")
        for name in ("parents", "candidates", "top_k", "max_depth", "n_nodes", "to"):
            if not hasattr(spec, name):
                raise checks.InputTypeError(f"`spec` must be a typsamp.tree.TreeSpec (it has no `{name}`), "
                                            f"got {type(spec).__name__}")
        if spec.max_depth > heads.n_heads:
            raise ValueError(f"the tree is {spec.max_depth} deep but there are only {heads.n_heads} heads")
        if max(spec.top_k) > heads.kept.numel():
            raise ValueError(f"the tree needs each head's top-{max(spec.top_k)}, more than its "
                             f"{heads.kept.numel()} rows")
        self.heads = heads
        self.spec = spec
        self.vocab_size = heads.vocab_size
        self.passes = 0
        self.k = max(spec.top_k)
        self.state = None
        self._spec = None

    def __repr__(self) -> str:
        return f"MedusaProposer({self.heads!r}, {self.spec!r})"

    def width(self, gamma: int) -> int:
        return self.spec.n_nodes

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp) -> None:
        device = prompt.device
        if self.heads.weight.device != device:
            raise ValueError(f"the heads are on {self.heads.weight.device} but the prompt on {device}")
        if self._spec is None or self._spec.parents.device != device:
            self._spec = self.spec if self.spec.parents.device == device else self.spec.to(device)
        self.passes = 0
        self.state = torch.zeros(prompt.shape[0], self.heads.hidden, dtype=self.heads.weight.dtype, device=device)

    def observe(self, hidden: torch.Tensor, end: torch.Tensor) -> None:
        """Keep ``hidden[b, end[b]]`` (zeros where ``end[b] = -1``) for the next proposal.
        ``hidden`` [B, T, H] floating, ``end`` int64 [B] in [-1, T); shapes are checked,
        values are not (no host read)."""
        checks.tensor("hidden", hidden, floating=True)
        checks.tensor("end", end)
        if self.state is None:
            raise RuntimeError("observe() before start()")
        B, H = self.state.shape
        if hidden.dim() != 3 or hidden.shape[0] != B or hidden.shape[2] != H:
            raise ValueError(f"`hidden` must have shape [{B}, T, {H}], got {tuple(hidden.shape)}")
        if end.dtype != torch.long or tuple(end.shape) != (B,):
            raise ValueError(f"`end` must be int64 of shape [{B}], got {end.dtype} of shape {tuple(end.shape)}")
        at = end.clamp(min=0)[:, None, None].expand(-1, 1, H)
        h = hidden.gather(1, at)[:, 0].to(self.state.dtype)
        self.state = torch.where((end >= 0)[:, None], h, 0)

    def propose(self, seq, n, top, generator):
        from typsamp import generate

        if self.state is None:
            raise RuntimeError("propose() before start()")
        spec = self._spec
        ids = self.heads.topk(self.state, self.k)[:, :spec.max_depth]             # [B, D, k]
        self.passes += 1
        return generate.Proposal(tokens=spec.candidates(ids), parents=spec.parents)

    def commit(self, n) -> None:
        pass


# ---------------------------------------------------------------------------------------
# The command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m typsamp.medusa", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="the target's own generations, hidden states and top-k (outside git)")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--top-k", type=int, default=TOP_K)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="train: the training data; test: held-out generations for `accuracy` only")
    p.add_argument("--samples", type=int, default=None,
                   help=f"continuations per prompt (default {SAMPLES} for train, 1 for test)")
    p.add_argument("--temperature", type=float, default=None,
                   help="default 1 for train (sampled), 0 for test (greedy, as Medusa's heads_accuracy.py)")
    p = sub.add_parser("train", help="train the heads on the cached data")
    p.add_argument("--steps", type=int, default=RECIPE.steps)
    p.add_argument("--batch-size", type=int, default=RECIPE.batch_size)
    p.add_argument("--heads", type=int, default=HEADS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HEADS_FILE)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-at", type=int)
    p = sub.add_parser("accuracy", help="per-head top-1/top-5 of the committed heads")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="train: the held-out train-split sequences; test: the test-split generations")
    p.add_argument("--heads", type=Path, default=HEADS_FILE)
    p.add_argument("--record", action="store_true", help="store the result in the heads' JSON record")
    p.add_argument("--untrained", action="store_true",
                   help="score zeroed heads instead (the baseline: the target's own head, k + 1 tokens early)")
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(checks.integer("threads", args.threads, low=1))
    command = "python -m typsamp.medusa " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.command == "data":
        t0 = time.perf_counter()
        target = gemma.load(torch.bfloat16)
        tokenizer = gemma.load_tokenizer()
        names, rows = _prompt_rows(tokenizer, args.split, checks.integer("prompt_tokens", args.prompt_tokens, low=2))
        if args.limit is not None:
            names, rows = names[:args.limit], rows[:args.limit]
        if args.samples is None:
            args.samples = SAMPLES if args.split == "train" else 1
        if args.temperature is None:
            args.temperature = 1.0 if args.split == "train" else 0.0
        samples = checks.integer("samples", args.samples, low=1)
        names = [f"{name}#{j}" if samples > 1 else name for name in names for j in range(samples)]
        rows = [row for row in rows for _ in range(samples)]
        data = make_data(target, rows, new_tokens=args.new_tokens, top_k=args.top_k, seed=args.seed,
                         temperature=args.temperature,
                         batch_size=args.batch_size, parts=data_path().parent / f"parts-{args.split}")
        data["meta"].update({"prompt_split": args.split, "samples_per_prompt": samples, "prompt_tokens": args.prompt_tokens, "limit": args.limit,
                             "seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
                             "command": command, "commit": provenance.git_commit(),
                             "dirty": provenance.git_dirty()})
        path = save_data(data, data_path() if args.split == "train" else test_data_path(), names=names)
        print(f"{len(rows)} sequences, {data['hidden'].shape[0]:,} generated positions -> {path}")
    elif args.command == "train":
        from typsamp import drafts

        data = load_data()
        embedding = gemma.load_embedding(torch.float32, "cpu")
        kept = ranked_kept(data, drafts.kept_tokens(), embedding.shape[0])
        recipe = replace(RECIPE, steps=args.steps, batch_size=args.batch_size)
        result = train(embedding, data, kept, recipe=recipe, n_heads=args.heads, seed=args.seed,
                       resume=args.resume, stop_at=args.stop_at)
        if result is None:
            print(f"stopped at step {args.stop_at}; continue with --resume")
            return 0
        heads, record = result
        record["kept_source"] = ("typsamp.drafts.kept_tokens() (lib/typsamp/weights/gemma_kept_tokens.safetensors), "
                                 "ranked by expected count in the Medusa data")
        record["data"]["prompts_per_category"] = _per_category(data["names"])
        record["command"] = command
        record["commit"] = provenance.git_commit()
        record["dirty"] = provenance.git_dirty()
        save_heads(heads, args.out, record)
        after = record["val_after"]["kept"]["sampled"]
        print(f"heads: top-1 {after['top1']}, top-5 {after['top5']} (held-out, sampled tokens), "
              f"{record['wall_time_s']:.0f} s -> {args.out}")
    else:
        heads = load_heads(torch.float32, path=args.heads)
        if args.untrained:                       # W = b = 0: the target's own head, k + 1 tokens early
            with torch.no_grad():
                heads.weight.zero_()
                heads.bias.zero_()
        data = load_data(data_path() if args.split == "train" else test_data_path())
        pairs = _Pairs(data, heads.kept.cpu(), heads.vocab_size, heads.n_heads)
        anchors = pairs.val if args.split == "train" else torch.cat([pairs.train, pairs.val]).sort().values
        acc = accuracy(heads, pairs, anchors, rows=ROW_SUBSETS, full_vocab=True)
        acc["anchors"] = ("held-out sequences of the train-split data" if args.split == "train"
                          else "every position of the test-split generations")
        acc["data"] = {k: data["meta"].get(k) for k in ("prompt_split", "rows", "new_tokens", "temperature", "seed",
                                                         "rows_sha256", "target_dtype")}
        acc["data"]["positions"] = int(data["gen_starts"][-1])
        acc["data"]["prompts_per_category"] = _per_category(data["names"])
        acc["heads_dtype"] = "float32 (from the bfloat16 file)"
        if args.untrained:
            acc["heads"] = "untrained (W = b = 0: every head is the target's own next-token head over the same rows)"
        acc["command"] = command
        print(json.dumps(acc, indent=1))
        if args.record:
            record_path = Path(args.heads).with_suffix(".json")
            record = json.loads(record_path.read_text())
            record[f"accuracy_{args.split}_split" + ("_untrained" if args.untrained else "")] = acc
            record_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _per_category(names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        category = name.split("/")[0]
        out[category] = out.get(category, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
