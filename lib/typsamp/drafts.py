"""Drafts for Gemma 3 270M and its 262,144-token vocabulary (chapter 9).

The LM head (262,144 x 640, 62.6% of the parameters) is read in every pass, so a draft
that keeps the whole head cannot be much cheaper than the target. This module builds
three proposers that avoid it, and the failure case:

* **A frequency-trimmed head** (:class:`TrimmedHead`, :func:`trimmed_draft`): the target
  itself, usually in bfloat16, whose head keeps only the :data:`KEEP` = 32,768 tokens the
  target emits most often (:func:`kept_tokens`); every other token gets logit -inf, so
  q = 0 there and rejection sampling stays exact (the target can still emit those
  tokens: they are what the rule's residual draw supplies). The idea is FR-Spec's
  (Zhao et al. 2025).
* **Prompt lookup** (:class:`PromptLookup`): no model; the γ tokens that followed the
  latest earlier occurrence of the row's last n-gram in its own text.
* **Layer skipping** (:class:`LayerSkip`): the first k layers, the final norm and the
  full head; untrained, it predicts almost nothing (the failure case).

The kept tokens: ``python -m typsamp.drafts frequencies``
----------------------------------------------------------
The target (bfloat16) samples continuations at T = 1 of every train-split prompt of
every category (:func:`typsamp.prompts.load`), batched and seeded. Tokens are ranked by
their *expected* count: the sum over every generated position of the target's
probability of the token there (an unbiased estimate of how often it is emitted, with
far less variance than the sampled counts, and one that ranks every token, not only the
few thousand ever drawn). The top :data:`KEEP` ids (sorted) are committed as
``lib/typsamp/weights/gemma_kept_tokens.safetensors`` with the record
``gemma_kept_tokens.json`` (tokens generated, coverage of the kept set on those
generations and on held-out text: the test-split prompts' own tokens, and generations
from them when ``--test-new-tokens`` > 0; seed, threads, versions, command). The
defaults (:data:`NEW_TOKENS` per prompt after its last :data:`PROMPT_TOKENS` tokens) are
what fits in about ten minutes on two shared CPU cores.

The generations themselves go to the Gemma cache (outside git,
:func:`generations_path`) for the distilled draft (:mod:`typsamp.distil`) to train on;
see :func:`load_generations` for the format.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from typsamp import checks, gemma, generate, prompts, provenance, sampling

__all__ = ["KEEP", "KEPT_FILE", "generations_path", "load_generations", "kept_tokens", "frequencies",
           "TrimmedHead", "trimmed_draft", "PromptLookup", "LayerSkip"]

#: How many token ids the trimmed head keeps.
KEEP = 32_768
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
KEPT_FILE = WEIGHTS_DIR / "gemma_kept_tokens.safetensors"
RECORD_FILE = WEIGHTS_DIR / "gemma_kept_tokens.json"
GENERATIONS_FILE = "drafts_generations.safetensors"
GENERATIONS_FORMAT = "typsamp.drafts.generations/1"

# The frequency run's defaults (the committed kept set was made with these).
SEED = 20_261_201
BATCH_SIZE = 146            # the 291 train-split prompts in two batches
PROMPT_TOKENS = 64          # each prompt's last 63 tokens (after BOS) start a generation
NEW_TOKENS = 32             # tokens sampled per train-split prompt
TEST_NEW_TOKENS = 0         # per test-split prompt (0: held-out coverage on the prompts' text only)


# ---------------------------------------------------------------------------------------
# The target's own generations and the kept set


def generations_path(directory: Path | str | None = None) -> Path:
    """Where the frequency run stores the generated token ids: ``drafts_generations.safetensors``
    in the Gemma cache directory (:func:`typsamp.gemma.cache_dir`, outside git)."""
    return (gemma.cache_dir() if directory is None else Path(directory)) / GENERATIONS_FILE


def load_generations(path: Path | str | None = None) -> dict:
    """The stored generations, as a dict:

    * ``tokens`` int32 [total]: every sequence (its truncated prompt, BOS first, then the
      generated tokens) concatenated;
    * ``starts`` int64 [N + 1]: sequence i is ``tokens[starts[i]:starts[i + 1]]``;
    * ``prompt_lengths`` int64 [N]: how many of its first tokens are prompt;
    * ``split`` int8 [N]: 0 for a train-split prompt, 1 for a test-split one;
    * ``prompts``: list of N ``"category/id"`` strings; ``meta``: the run's settings.

    Sampled at T = 1 from the bfloat16 target; a row that emitted EOS (id 1) ends with it.
    """
    path = generations_path() if path is None else Path(path)
    out, meta = provenance.read_safetensors(
        path, GENERATIONS_FORMAT, what="a generations file",
        missing=f"{path} is missing: run `python -m typsamp.drafts frequencies`")
    out["prompts"] = json.loads(meta["prompts"])
    out["meta"] = json.loads(meta["settings"])
    return out


def _sample_batch(model: gemma.Gemma, rows: list[list[int]], new_tokens: int, generator: torch.Generator,
                  mass: torch.Tensor | None) -> list[list[int]]:
    """Sample ``new_tokens`` tokens at T = 1 after each of the ragged ``rows`` (a row stops
    after EOS); add each live position's probabilities to ``mass`` (float64 [V]) when given.

    The prefill returns hidden states only (``head=None``) and applies the head at each
    row's last prompt position: the full head over every prompt position would cost more
    than the whole generation."""
    B = len(rows)
    lengths = torch.tensor([len(r) for r in rows])
    P = int(lengths.max())
    prompt = torch.zeros(B, P, dtype=torch.long)
    for b, r in enumerate(rows):
        prompt[b, :len(r)] = torch.tensor(r)
    W = model.model.embed_tokens.weight
    eos = model.config.eos_token_id
    out = torch.full((B, new_tokens), -1, dtype=torch.long)
    alive = torch.ones(B, dtype=torch.bool)
    model.setup_cache(B, P + new_tokens)
    h = model(prompt, torch.zeros(B, dtype=torch.long), span=P, head=None)
    model.cache.rollback(lengths, check=False)
    h = h.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
    logits = (W @ h.T).T
    for i in range(new_tokens):
        p = torch.softmax(logits.float(), dim=-1)
        if mass is not None:
            mass += p[alive].sum(0, dtype=torch.float64)
        token = sampling.sample_weights(p, generator)
        out[:, i] = torch.where(alive, token, -1)
        alive = alive & (token != eos)
        if i + 1 == new_tokens or not bool(alive.any()):
            break
        logits = model(token[:, None], lengths + i, span=P + i + 1)[:, -1]
    model.clear_cache()
    return [r + [t for t in o.tolist() if t >= 0] for r, o in zip(rows, out)]


def _prompt_rows(tokenizer, split: str, prompt_tokens: int) -> tuple[list[str], list[list[int]]]:
    names, rows = [], []
    for category in prompts.CATEGORIES:
        for p in prompts.load(category, split):
            ids = tokenizer(p.text).input_ids
            if len(ids) > prompt_tokens:
                ids = ids[:1] + ids[len(ids) - prompt_tokens + 1:]          # BOS, then the last tokens
            names.append(f"{category}/{p.id}")
            rows.append(ids)
    return names, rows


def _generate(model, rows, new_tokens, batch_size, seed, mass, desc, progress):
    """Generations for every row, batched by prompt length (less padding), in input order."""
    from tqdm.auto import tqdm

    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    generator = torch.Generator().manual_seed(seed)
    done: dict[int, list[int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0):
        for i, seq in zip(batch, _sample_batch(model, [rows[i] for i in batch], new_tokens, generator, mass)):
            done[i] = seq
    return [done[i] for i in range(len(rows))]


def _coverage(sequences, lengths, kept_mask) -> tuple[int, float]:
    generated = torch.tensor([t for s, n in zip(sequences, lengths) for t in s[n:]], dtype=torch.long)
    return generated.numel(), float(kept_mask[generated].double().mean()) if generated.numel() else math.nan


def frequencies(*, seed: int = SEED, batch_size: int = BATCH_SIZE, prompt_tokens: int = PROMPT_TOKENS,
                new_tokens: int = NEW_TOKENS, test_new_tokens: int = TEST_NEW_TOKENS, keep: int = KEEP,
                out: Path | str = WEIGHTS_DIR, generations: Path | str | None = None,
                limit: int | None = None, progress: bool = True) -> dict:
    """Run the frequency count (see the module docstring); returns the record.

    ``limit`` uses only the first ``limit`` prompts of each split (for quick checks)."""
    from safetensors.torch import save_file

    seed = checks.integer("seed", seed, low=0)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    prompt_tokens = checks.integer("prompt_tokens", prompt_tokens, low=2)
    new_tokens = checks.integer("new_tokens", new_tokens, low=1)
    test_new_tokens = checks.integer("test_new_tokens", test_new_tokens, low=0)
    keep = checks.integer("keep", keep, low=1)
    start = time.perf_counter()
    model = gemma.load(torch.bfloat16)
    tokenizer = gemma.load_tokenizer()
    V = model.config.vocab_size
    if keep > V:
        raise ValueError(f"`keep` ({keep}) exceeds the vocabulary ({V})")
    names, rows = _prompt_rows(tokenizer, "train", prompt_tokens)
    test_names, test_rows = _prompt_rows(tokenizer, "test", prompt_tokens)
    if limit is not None:
        limit = checks.integer("limit", limit, low=1)
        names, rows, test_names, test_rows = names[:limit], rows[:limit], test_names[:limit], test_rows[:limit]
    mass = torch.zeros(V, dtype=torch.float64)
    with torch.inference_mode():
        train = _generate(model, rows, new_tokens, batch_size, seed, mass, "train prompts", progress)
        test = (_generate(model, test_rows, test_new_tokens, batch_size, seed + 1, None, "test prompts", progress)
                if test_new_tokens else [])
    wall = time.perf_counter() - start
    # Rank by expected count; ties (tokens of equal mass) by id, so the set is deterministic.
    order = torch.sort(mass, descending=True, stable=True).indices
    kept = order[:keep].sort().values
    kept_mask = torch.zeros(V, dtype=torch.bool)
    kept_mask[kept] = True
    train_lengths = [len(r) for r in rows]
    test_lengths = [len(r) for r in test_rows]
    n_train, cov_train = _coverage(train, train_lengths, kept_mask)
    n_test, cov_test = _coverage(test, test_lengths, kept_mask)
    # Held-out text the set never saw: the test-split prompts themselves (BOS dropped).
    text_test = [ids[1:] for _, ids in zip(*_prompt_rows(tokenizer, "test", 10 ** 9))]
    text_train = [ids[1:] for _, ids in zip(*_prompt_rows(tokenizer, "train", 10 ** 9))]
    n_text_test, cov_text_test = _coverage(text_test, [0] * len(text_test), kept_mask)
    n_text_train, cov_text_train = _coverage(text_train, [0] * len(text_train), kept_mask)
    generated = torch.tensor([t for s, n in zip(train, train_lengths) for t in s[n:]], dtype=torch.long)
    counts = torch.bincount(generated, minlength=V)

    settings = {"seed": seed, "threads": torch.get_num_threads(), "batch_size": batch_size, "prompt_tokens": prompt_tokens,
                "new_tokens": new_tokens, "test_new_tokens": test_new_tokens, "temperature": 1.0,
                "target_dtype": "bfloat16", "limit": limit}
    sequences = train + test
    flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int32)
    starts = torch.tensor([0] + [len(s) for s in sequences], dtype=torch.long).cumsum(0)
    path = generations_path(generations)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": flat, "starts": starts,
               "prompt_lengths": torch.tensor(train_lengths + test_lengths, dtype=torch.long),
               "split": torch.tensor([0] * len(train) + [1] * len(test), dtype=torch.int8)},
              str(path), metadata={"format": GENERATIONS_FORMAT, "prompts": json.dumps(names + test_names),
                                   "settings": json.dumps(settings)})
    record = {
        "what": f"the {keep} token ids of Gemma 3 270M with the largest expected count in the target's "
                "own T=1 generations from the train-split prompts (sum of the target's probabilities "
                "over every generated position), sorted",
        "command": "python -m typsamp.drafts frequencies" + ("" if limit is None else f" --limit {limit}"),
        "settings": settings,
        "prompts": {"train": len(rows), "test": len(test_rows), "categories": list(prompts.CATEGORIES)},
        "tokens_generated": {"train": n_train, "test": n_test},
        "distinct_tokens_sampled_train": int((counts > 0).sum()),
        "coverage": {
            "train_generations": round(cov_train, 5),
            "test_generations": round(cov_test, 5) if n_test else None,
            "expected_train": round(float(mass[kept].sum() / mass.sum()), 5),
            "test_prompt_text": round(cov_text_test, 5),
            "train_prompt_text": round(cov_text_train, 5),
            "prompt_text_tokens": {"train": n_text_train, "test": n_text_test},
            "note": "fraction of sampled tokens (train: the generations the set was ranked on; test: "
                    "generations from the held-out test-split prompts) inside the kept set; expected_train: "
                    "the target's probability mass inside it, averaged over the train positions; "
                    "*_prompt_text: the prompts' own tokens (real text, BOS dropped, untruncated)",
        },
        "sampled_count_of_least_kept": int(counts[order[keep - 1]]),
        "wall_time_s": round(wall, 1),
        "machine": provenance.machine("cpu"),
        "versions": provenance.versions(),
        "commit": provenance.git_commit(),
        "generations_file": str(path.name),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept_path = out / KEPT_FILE.name
    save_file({"kept": kept.to(torch.int32)}, str(kept_path), metadata={"format": "typsamp.drafts.kept/1"})
    (out / RECORD_FILE.name).write_text(json.dumps(record, indent=2) + "\n")
    return record


def kept_tokens(path: Path | str | None = None) -> torch.Tensor:
    """The committed kept token ids: int64 [32768], sorted ascending, distinct."""
    from safetensors.torch import load_file

    path = KEPT_FILE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m typsamp.drafts frequencies`")
    return load_file(str(path))["kept"].long()


# ---------------------------------------------------------------------------------------
# The trimmed head


class TrimmedHead:
    """A model with the engine's interface whose logits are -inf outside ``kept``.

    ``TrimmedHead(model, kept)`` wraps a :class:`typsamp.gemma.Gemma` (any dtype): a pass
    runs the whole network but multiplies the final hidden states only by the K embedding
    rows of the kept ids (a [K, hidden] copy made once, in the model's dtype), and scatters
    those K logits into a float32 [B, T, vocab_size] tensor of -inf. So the draft's warped
    q is 0 outside the kept set, at every temperature and truncation, and rejection
    sampling stays exact: what the target puts there is what the residual max(p - q, 0)
    supplies. The call's ``offsets``, ``span``, ``depths`` and ``ancestors`` are the
    wrapped model's; the KV cache is the draft's own (:meth:`setup_cache`), so the wrapped
    model may also be the target itself (shared weights, separate caches).
    """

    def __init__(self, model: gemma.Gemma, kept: torch.Tensor):
        if not isinstance(model, gemma.Gemma):
            raise checks.InputTypeError(f"`model` must be a typsamp.gemma.Gemma, got {type(model).__name__}")
        checks.tensor("kept", kept)
        V = model.config.vocab_size
        if kept.dim() != 1 or kept.dtype not in (torch.int32, torch.int64) or kept.numel() < 1:
            raise ValueError(f"`kept` must be a 1-D integer tensor of token ids, got {kept.dtype} "
                             f"of shape {tuple(kept.shape)}")
        weight = model.model.embed_tokens.weight
        kept = kept.to(device=weight.device, dtype=torch.long)
        low, high, distinct = torch.stack([kept.min(), kept.max(),
                                           (kept[1:] > kept[:-1]).all().long()]).tolist()
        if low < 0 or high >= V:
            raise ValueError(f"`kept` holds ids outside the vocabulary [0, {V}): min {low}, max {high}")
        if not distinct:
            raise ValueError("`kept` must be sorted ascending without repeats")
        self.model = model
        self.kept = kept
        self.rows = weight[kept].contiguous()
        self.config = model.config
        self.vocab_size = V
        self._cache = None

    def __repr__(self) -> str:
        return f"TrimmedHead({self.rows.dtype}, kept={self.kept.numel()} of {self.vocab_size})"

    def setup_cache(self, batch_size: int, max_len: int = 2048, **kwargs):
        """A KV cache of this draft's own (the wrapped model's current cache is left in
        place, so the draft may share its weights with the target)."""
        saved = self.model.cache
        try:
            self._cache = self.model.setup_cache(batch_size, max_len, **kwargs)
        finally:
            self.model.cache = saved
        return self._cache

    @property
    def cache(self):
        return self._cache

    def clear_cache(self) -> None:
        self._cache = None

    def __call__(self, tokens: torch.Tensor, offsets: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        saved, self.model.cache = self.model.cache, self._cache
        try:
            small = self.model(tokens, offsets, head=self.rows, **kwargs)            # [B, T, K]
        finally:
            self.model.cache = saved
        B, T, _ = small.shape
        out = torch.full((B, T, self.vocab_size), -math.inf, dtype=torch.float32, device=small.device)
        return out.index_copy_(2, self.kept, small.float())


def trimmed_draft(dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                  kept: torch.Tensor | None = None) -> TrimmedHead:
    """The target itself in ``dtype`` with the head trimmed to ``kept`` (default
    :func:`kept_tokens`): the draft "target in 16 bit with a trimmed head"."""
    return TrimmedHead(gemma.load(dtype, device), kept_tokens() if kept is None else kept)


# ---------------------------------------------------------------------------------------
# Prompt lookup


class PromptLookup:
    """A proposer without a model: n-gram lookup in each row's own committed text.

    For each row with ``n`` committed tokens (prompt and generated), the last m tokens
    are looked up among its earlier text, for m = ``ngram`` down to ``min_ngram``; the
    longest m that matches wins, and among its matches the *latest* one (the start j
    largest with j + m <= n - 1, so at least one token follows it). The proposal is the
    γ tokens that followed it: ``seq[j + m], seq[j + m + 1], ...``; where they run into
    the end of the text (d = n - j - m < γ tokens follow), the pattern repeats with
    period d (token k is ``seq[j + m + k mod d]``), as a copying continuation would.
    A row with no match proposes its last committed token γ times: valid, free, and
    right in runs of a repeated token.

    Deterministic drafts (``q=None``): with :class:`typsamp.speculative.RejectionSampling`
    a draft is a point mass, kept with probability p(x). ``vocab_size`` is None (any
    vocabulary) and ``passes`` stays 0. Batched over rows; per step one compare of every
    window of each size m against the row's suffix ([B, L, m], L the longest text), and
    no host synchronisation at all (the engine's ``top`` gives L).
    """

    vocab_size = None

    def __init__(self, ngram: int = 3, min_ngram: int = 1):
        self.ngram = checks.integer("ngram", ngram, low=1)
        self.min_ngram = checks.integer("min_ngram", min_ngram, low=1)
        if self.min_ngram > self.ngram:
            raise ValueError(f"`min_ngram` ({min_ngram}) must not exceed `ngram` ({ngram})")
        self.passes = 0
        self.gamma = None

    def __repr__(self) -> str:
        return f"PromptLookup(ngram={self.ngram}, min_ngram={self.min_ngram})"

    def width(self, gamma: int) -> int:
        return gamma

    def start(self, prompt, prompt_lengths, *, max_new_tokens, gamma, warp) -> None:
        self.gamma = checks.integer("gamma", gamma, low=1)
        self.passes = 0
        self.parents = torch.arange(-1, self.gamma - 1, device=prompt.device)
        self.steps = torch.arange(self.gamma, device=prompt.device)

    def lookup(self, seq: torch.Tensor, n: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(drafts int64 [B, γ], found bool [B]) for rows ``seq[b, :n[b]]``, ``top = max(n)``."""
        gamma = self.gamma
        text = seq[:, :top]
        B = text.shape[0]
        best = torch.full((B,), -1, dtype=torch.long, device=seq.device)      # j + m of the match
        for m in range(self.ngram, self.min_ngram - 1, -1):
            if top < m + 1:
                continue
            suffix = text.gather(1, (n[:, None] - m + torch.arange(m, device=seq.device)).clamp(min=0))
            windows = text.unfold(1, m, 1)                                     # [B, top - m + 1, m]
            starts = torch.arange(windows.shape[1], device=seq.device)
            hit = (windows == suffix[:, None, :]).all(dim=-1) & (starts <= (n - 1 - m)[:, None])
            latest = torch.where(hit, starts, -1).amax(dim=1)
            best = torch.where((best < 0) & (latest >= 0), latest + m, best)
        found = best >= 0
        follow = (n - best).clamp(min=1)                                       # d >= 1 tokens follow
        index = torch.where(found[:, None], best[:, None] + self.steps % follow[:, None],
                            (n - 1)[:, None].expand(-1, gamma))
        return text.gather(1, index), found

    def propose(self, seq, n, top, generator):
        drafts, _ = self.lookup(seq, n, top)
        return generate.Proposal(tokens=drafts, parents=self.parents)

    def commit(self, n) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Layer skipping


class LayerSkip(gemma.Gemma):
    """The first ``layers`` layers of ``model``, its final norm and its full head: an
    untrained early exit, the failure case of chapter 9.

    A :class:`typsamp.gemma.Gemma` of ``layers`` layers whose parameters *are* the
    target's (shared tensors, no copy), with its own KV cache. Same dtype and device.
    """

    def __init__(self, model: gemma.Gemma, layers: int):
        if not isinstance(model, gemma.Gemma):
            raise checks.InputTypeError(f"`model` must be a typsamp.gemma.Gemma, got {type(model).__name__}")
        layers = checks.integer("layers", layers, low=1)
        if layers > model.config.n_layer:
            raise ValueError(f"`layers` ({layers}) exceeds the model's {model.config.n_layer} layers")
        from dataclasses import replace

        with torch.device("meta"):
            super().__init__(replace(model.config, n_layer=layers))
        keep = {f"model.layers.{i}." for i in range(layers)}
        state = {k: v for k, v in model.state_dict(keep_vars=True).items()
                 if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)}
        self.load_state_dict({k: v.data for k, v in state.items()}, assign=True, strict=True)
        device = model.model.embed_tokens.weight.device
        for name in ("inv_freq_local", "inv_freq_global"):
            setattr(self, name, getattr(model, name).to(device))
        self.eval()

    def __repr__(self) -> str:
        return f"LayerSkip(layers={self.config.n_layer})"


# ---------------------------------------------------------------------------------------
# The command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m typsamp.drafts", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("frequencies", help="count the target's own generations; save the kept token ids")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--test-new-tokens", type=int, default=TEST_NEW_TOKENS)
    p.add_argument("--keep", type=int, default=KEEP)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each split")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--generations", type=Path, default=None, help="directory for the generations file")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = frequencies(seed=args.seed, batch_size=args.batch_size, prompt_tokens=args.prompt_tokens,
                         new_tokens=args.new_tokens, test_new_tokens=args.test_new_tokens, keep=args.keep,
                         out=args.out, generations=args.generations, limit=args.limit)
    print(json.dumps({k: record[k] for k in ("tokens_generated", "coverage", "wall_time_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
