"""A GPT-2 language model with a static KV cache (chapter 4).

GPT-2's architecture, top to bottom in one file (after nanoGPT's ``model.py``): token
plus learned position embeddings, ``n_layer`` pre-LayerNorm blocks of causal
self-attention and a 4x-wide MLP with GPT-2's tanh-approximated GELU (``gelu_new``), a
final LayerNorm, and logits from the token embedding matrix itself (tied embeddings,
no output bias). Module names and biases are GPT-2's, so :func:`typsamp.hf.to_hf`
converts the weights one-to-one into ``transformers``' ``GPT2LMHeadModel``.

Decoding uses a static, preallocated KV cache (as in gpt-fast; :class:`KVCache`, which
lives in :mod:`typsamp.cache`). :meth:`GPT.setup_cache` allocates keys and values for
every layer, ``[n_layer, 2, B, n_head, max_len, head_dim]``, and a per-row length
``[B]``. A forward pass writes the keys and values of its T new tokens at positions
``offsets[b], ..., offsets[b] + T - 1`` of row b (by default ``offsets`` is the row's
current length), each query attends to the cache positions up to and including its
own, and the row's length becomes ``offsets[b] + T``. The same call therefore serves a prefill (T = prompt length), a
one-token decode step (T = 1) and a verification of gamma drafted tokens (T = gamma + 1),
with rows at different lengths in one batch. Rolling back rejected tokens is
:meth:`KVCache.rollback`: it only lowers the lengths; the stale entries beyond them are
masked out and overwritten by the next forward pass, never copied. Prompts of different
lengths are prefilled the same way: pad them to one length, run them, then roll each row
back to its own prompt length (the padding sits after every real token, so no real
token ever attended to it).

A pass can also score a *tree* of candidate tokens (Medusa's tree attention; the engine's
``score`` step, :mod:`typsamp.generate`). ``depths`` [T] gives each new token's position
relative to its row's offset (so a chain is ``0, 1, ..., T-1``) and ``ancestors`` [T, T]
says which new tokens each one sees (itself and its ancestors). The T tokens still occupy
T consecutive cache slots ``offsets[b] .. offsets[b] + T - 1``, but token t sits at
position ``offsets[b] + depths[t]`` and attends to the row's cached prefix and its own
ancestors only. After verification :meth:`KVCache.compact` moves the keys and values of
the accepted path into consecutive slots, which leaves the cache exactly as if the path
had been fed as a chain.

Weights are stored as float16 ``safetensors`` under ``lib/typsamp/weights/`` with the
model's config and tokenizer in the file's metadata; :func:`load` reads them by preset
name. float16 rather than bfloat16: trained weights of these small models lie far
inside float16's range (|w| < 65504; :func:`save` checks), where float16 keeps 10
mantissa bits to bfloat16's 7, i.e. eight times finer rounding (weights below float16's
smallest normal number, 6e-5, keep an absolute error under 3e-8).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from typsamp import checks
from typsamp.cache import KVCache, check_tree
from typsamp.data import CharTokenizer

__all__ = ["GPTConfig", "GPT", "KVCache", "WEIGHTS_DIR", "save", "load", "load_tokenizer",
           "load_record", "register"]

#: Where the committed weights and their training records live.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

FORMAT = "typsamp.gpt/1"


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT-2 model. ``dropout`` only matters in training."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            checks.integer(name, getattr(self, name), low=1)
        checks.real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.n_embd % self.n_head:
            raise ValueError(f"`n_embd` ({self.n_embd}) must be divisible by `n_head` ({self.n_head})")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                span: int = 0) -> torch.Tensor:
        """``x`` [B, T, C]. Without ``kv``: plain causal attention over the T tokens. With
        ``kv`` (this layer's [2, B, H, max_len, D] cache slice), ``slots`` [B, T],
        ``span`` S and ``mask`` [B, 1, T, S] (or None: every query sees all S): write k
        and v at ``slots``, attend to the first S cache slots where allowed."""
        B, T, C = x.shape
        H = self.n_head
        # Functional calls rather than submodule calls: at batch 1 a decode step is
        # overhead-bound, and each nn.Module call costs about as much as a small kernel.
        qkv = F.linear(x, self.c_attn.weight, self.c_attn.bias).view(B, T, 3, H, C // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                               # each [B, H, T, D]
        if kv is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            index = slots[:, None, :, None].expand_as(k)
            kv[0].scatter_(2, index, k)
            kv[1].scatter_(2, index, v)
            y = F.scaled_dot_product_attention(q, kv[0, :, :, :span], kv[1, :, :, :span], attn_mask=mask)
        y = F.linear(y.transpose(1, 2).reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)
        return self.resid_dropout(y) if self.training else y


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.c_fc.weight, self.c_fc.bias), approximate="tanh")
        y = F.linear(h, self.c_proj.weight, self.c_proj.bias)
        return self.dropout(y) if self.training else y


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, slots=None, mask=None, span=0):
        ln_1, ln_2 = self.ln_1, self.ln_2
        x = x + self.attn.forward(F.layer_norm(x, ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps),
                                  kv, slots, mask, span)
        return x + self.mlp.forward(F.layer_norm(x, ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps))


class GPT(nn.Module):
    """GPT-2. ``model(tokens)`` returns logits [B, T, vocab_size] for int64 tokens [B, T]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
        ))
        self.cache: KVCache | None = None
        # GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied output matrix counted once); optionally without
        the embeddings, the count that scales compute per token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def setup_cache(self, batch_size: int, max_len: int | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """Allocate an empty KV cache (default: the model's device and dtype, ``max_len =
        block_size``); from now on every forward pass reads and writes it."""
        batch_size = checks.integer("batch_size", batch_size, low=1)
        max_len = self.config.block_size if max_len is None else checks.integer("max_len", max_len, low=1)
        if max_len > self.config.block_size:
            raise ValueError(
                f"`max_len` ({max_len}) exceeds the model's block_size ({self.config.block_size}): "
                "there are no learned positions beyond it")
        weight = self.transformer.wte.weight
        with torch.inference_mode(False):  # normal tensors: updatable in and out of inference mode
            self.cache = KVCache(self.config, batch_size, max_len,
                                 weight.device if device is None else device,
                                 weight.dtype if dtype is None else dtype)
        return self.cache

    def clear_cache(self) -> None:
        """Drop the KV cache: forward passes go back to plain causal attention."""
        self.cache = None

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor | None = None, *,
                span: int | None = None, depths: torch.Tensor | None = None,
                ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] for ``tokens`` [B, T].

        Without a cache the tokens sit at positions 0..T-1 and attention is causal.
        With a cache (:meth:`setup_cache`), row b's tokens sit at positions
        ``offsets[b] + 0..T-1`` (default: the row's current cache length), attend to
        every cached position before them, and the row's length becomes ``offsets[b] + T``.
        Cached passes are for inference: they run without autograd.

        ``span`` is for decode loops that already know ``max(offsets) + T`` on the host:
        passing it skips the bounds checks, which read ``offsets`` back from the device
        (one synchronisation per pass). The caller vouches that ``span`` is exactly
        ``max(offsets) + T`` and that no row skips a cached position.

        ``depths`` (int64 [T]) and ``ancestors`` (bool [T, T]) make the pass a tree pass
        (see the module docstring; cache only, both or neither): token t is written to
        slot ``offsets[b] + t`` as always, but sits at position ``offsets[b] + depths[t]``
        and sees the cached prefix ``0 .. offsets[b] - 1`` and the new tokens u with
        ``ancestors[t, u]`` (itself and its ancestors). A chain (``depths = arange(T)``,
        ``ancestors`` lower-triangular) gives exactly the plain pass.
        """
        checks.tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"`tokens` must be int64 of shape [B, T], got {tokens.dtype} of shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        cache = self.cache
        tree = depths is not None or ancestors is not None
        if tree:
            self._check_tree(T, depths, ancestors, checked=span is None)
        if cache is None:
            if offsets is not None or tree:
                raise ValueError(f"`{'offsets' if offsets is not None else 'depths'}` needs a KV cache: "
                                 "call setup_cache() first")
            if T > self.config.block_size:
                raise ValueError(f"`tokens` has {T} positions, more than block_size {self.config.block_size}")
            positions = torch.arange(T, device=tokens.device)
            layer_kv, slots, mask, S = [None] * self.config.n_layer, None, None, 0
        else:
            offsets, slots, S, _ = cache.place(B, T, offsets, span)
            key = torch.arange(S, device=tokens.device)
            if tree:
                positions = offsets[:, None] + depths
                # Slot j of row b is visible to new token t when it holds the cached prefix
                # (j < offsets[b]) or one of t's ancestors (j = offsets[b] + u, ancestors[t, u]).
                rel = key - offsets[:, None]                                        # [B, S]
                new = (rel >= 0) & (rel < T)
                seen = ancestors[None].expand(B, T, T).gather(
                    2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))            # [B, T, S]
                mask = ((rel < 0)[:, None, :] | (new[:, None, :] & seen))[:, None]
            else:
                positions = slots
                # One row decoding one token sees every position up to S: no mask needed,
                # and SDPA's unmasked path is the faster one.
                mask = None if B == 1 and T == 1 else (key <= slots[..., None])[:, None]
            layer_kv = cache.kv
        with torch.set_grad_enabled(cache is None and torch.is_grad_enabled()):
            wte = self.transformer.wte
            x = self.transformer.drop(wte(tokens) + self.transformer.wpe(positions))
            for block, kv in zip(self.transformer.h, layer_kv):
                x = block.forward(x, kv, slots, mask, S)
            x = self.transformer.ln_f(x)
            if cache is not None:
                cache.lengths.copy_(slots[:, -1] + 1)
            return F.linear(x, wte.weight)

    #: The tree arguments' checks (kept here too for models that reuse GPT's).
    _check_tree = staticmethod(check_tree)


# ---------------------------------------------------------------------------------------
# Saving and loading (float16 safetensors, config and tokenizer in the metadata)


def save(model: GPT, tokenizer: CharTokenizer, path_stem: str | Path, record: dict | None = None) -> Path:
    """Write ``<path_stem>.safetensors`` (float16 weights; config and tokenizer as JSON in
    the metadata) and, when given, the training ``record`` as ``<path_stem>.json``."""
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"`tokenizer` has {tokenizer.vocab_size} characters but the model "
                         f"expects vocab_size {model.config.vocab_size}")
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    limit = torch.finfo(torch.float16).max
    for name, value in state.items():
        if not torch.isfinite(value).all() or value.abs().max() > limit:
            raise ValueError(f"`model` weight {name} is not finite or exceeds float16's range ({limit:g})")
    path = Path(f"{path_stem}.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "config": json.dumps(asdict(model.config)), "tokenizer": tokenizer.to_json()}
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    if record is not None:
        Path(f"{path_stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def _weights_path(name: str | Path) -> Path:
    """A preset name ("target") maps to WEIGHTS_DIR/<name>.safetensors; a path is itself."""
    path = Path(name)
    if path.suffix == ".safetensors" or len(path.parts) > 1:
        path = path if path.suffix == ".safetensors" else Path(f"{path}.safetensors")
    else:
        path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        # No import of typsamp.train here: it imports this module (no import circles).
        raise FileNotFoundError(
            f"no weights for {str(name)!r} at {path}; train a preset with "
            f"`python -m typsamp.train --preset {name}` (`python -m typsamp.train --help` lists the presets)")
    return path


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a typsamp GPT file (format {metadata.get('format')!r})")
    return metadata


#: Models that live in other modules, by name: ``name -> (load(device=, dtype=),
#: load_tokenizer())``. A module registers its models when it is imported
#: (:func:`register`), so this module never imports it (no import circles).
LOADERS: dict[str, tuple] = {}

#: Where the registered models come from, to say what to import when one is missing.
KNOWN_ELSEWHERE = {"gemma-3-270m": "typsamp.gemma"}


def register(name: str, load_model, load_tokenizer) -> None:
    """Make :func:`load` and :func:`load_tokenizer` serve ``name`` through the given
    functions (``load_model(device=, dtype=)``, ``load_tokenizer()``)."""
    if not isinstance(name, str) or not name:
        raise checks.InputTypeError(f"`name` must be a non-empty str, got {name!r}")
    if not callable(load_model) or not callable(load_tokenizer):
        raise checks.InputTypeError("`load_model` and `load_tokenizer` must be callable")
    LOADERS[name] = (load_model, load_tokenizer)


def _registered(name) -> tuple | None:
    if not isinstance(name, str):
        return None
    if name in LOADERS:
        return LOADERS[name]
    if name in KNOWN_ELSEWHERE:
        raise ValueError(f"{name!r} is defined in {KNOWN_ELSEWHERE[name]}: `import {KNOWN_ELSEWHERE[name]}` "
                         f"first (or call its load() directly)")
    return None


def load(name: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The model saved under preset ``name`` (or at a ``.safetensors`` path), in eval mode;
    a registered name (:data:`LOADERS`, e.g. ``"gemma-3-270m"`` once :mod:`typsamp.gemma`
    is imported) is loaded by its own module."""
    if dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"`dtype` must be one of {checks.FLOAT_DTYPES}, got {dtype}")
    other = _registered(name)
    if other is not None:
        return other[0](device=device, dtype=dtype)
    path = _weights_path(name)
    config = GPTConfig(**json.loads(_metadata(path)["config"]))
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys()}
    # Built on the CPU and overwritten: a few ms for these sizes (a "meta"-device build would
    # skip the random initialisation but its first use imports torch._dynamo, over a second).
    model = GPT(config)
    model.load_state_dict(state, assign=True)
    return model.eval()


def load_tokenizer(name: str | Path):
    """The tokenizer stored with the weights of preset ``name`` (or a ``.safetensors`` path),
    or a registered model's own tokenizer."""
    other = _registered(name)
    if other is not None:
        return other[1]()
    return CharTokenizer.from_json(_metadata(_weights_path(name))["tokenizer"])


def load_record(name: str | Path) -> dict:
    """The training record (``<name>.json`` beside the weights) of preset ``name``."""
    path = _weights_path(name)
    return json.loads(path.with_suffix(".json").read_text())
