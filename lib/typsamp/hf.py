"""Everything in :mod:`typsamp` that touches ``transformers`` (install the ``hf`` extra).

* :class:`HFCausalLM`: a ``transformers`` causal LM behind the decoding engine's model
  interface, so :func:`typsamp.generate.autoregressive` and
  :func:`typsamp.generate.speculative` can drive it (chapter 4; chapter 8 uses it).
* :func:`to_hf`, :func:`from_hf`: the book's :class:`typsamp.model.GPT` as a
  ``GPT2LMHeadModel`` and back, weight for weight (chapter 4).
* :func:`auto_tokenizer`: a ``transformers`` tokenizer from local files (chapter 9's
  Gemma tokenizer).
* :func:`peer_generate` and :class:`ForwardCounter`: ``transformers``' own ``generate()``,
  with assisted generation when given a draft, as :mod:`typsamp.bench` runs it beside
  our engine on the same weights (chapter 8).

``transformers`` is imported when this module is, so the rest of the library (and
``import typsamp``) never needs it.
"""

from __future__ import annotations

import torch

try:
    import transformers
except ImportError as error:                       # say how to get it, not just that it is missing
    raise ImportError("typsamp.hf needs transformers: install the `hf` extra, "
                      "pip install -e '.[hf]' (or pip install 'transformers>=5.0')") from error

from typsamp import checks
from typsamp.model import GPT, GPTConfig

__all__ = ["HFCausalLM", "to_hf", "from_hf", "peer_generate", "ForwardCounter", "auto_tokenizer",
           "gemma3_config"]


# ---------------------------------------------------------------------------------------
# The engine's model interface over a transformers causal LM


class HFCausalLM:
    """A ``transformers`` causal LM behind the engine's model interface (batch 1).

    ``setup_cache(1, max_len)`` starts an empty ``DynamicCache``; ``adapter(tokens [1, T],
    offsets [1], span=None)`` crops the cache to ``offsets[0]`` (how rejected drafts are
    dropped), runs the T tokens at positions ``offsets[0] ..``, and returns their logits.
    Hugging Face caches share one length across the batch, so rows at different lengths
    are not supported: batch 1, as in ``transformers``' own assisted generation. Chains
    only: tree passes (``depths``/``ancestors``) are refused.

    Memory: the logits come back **in the model's own dtype** (bfloat16 for most LLMs),
    never converted to float32 here; the engine's warp promotes the positions it reads.
    ``logits_to_keep=k`` (k >= 1) computes the output projection for the last k positions
    only and returns [1, k, V]; the default 0 returns every position, as the engine's
    interface requires. With a 262k-token vocabulary a 1000-token prefill would otherwise
    materialise 1 GB of float32 logits that nobody reads.

    Attributes:
        model: the wrapped model (in eval mode).
        config: its config.
        vocab_size: the size of its logits' last dimension (its output embedding's rows),
            which the engine compares with the draft's.
    """

    def __init__(self, model):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise checks.InputTypeError(
                f"`model` must be a transformers causal LM (a torch.nn.Module with a config), got {type(model).__name__}")
        self.model = model.eval()
        self.config = model.config
        self.vocab_size = _vocab_size(model)
        self.cache: _HFCacheView | None = None

    def __repr__(self) -> str:
        return f"HFCausalLM({type(self.model).__name__}, vocab_size={self.vocab_size})"

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> "_HFCacheView":
        batch_size = checks.integer("batch_size", batch_size, low=1)
        if batch_size != 1:
            raise ValueError(f"HFCausalLM supports batch_size 1 (one shared cache length), got {batch_size}")
        self.cache = _HFCacheView(transformers.DynamicCache())
        return self.cache

    def __call__(self, tokens: torch.Tensor, offsets: torch.Tensor | None = None, span: int | None = None, *,
                 logits_to_keep: int = 0, **tree) -> torch.Tensor:
        if tree:
            raise ValueError(f"HFCausalLM scores chains only; tree arguments {sorted(tree)} are not supported")
        if self.cache is None:
            raise ValueError("HFCausalLM needs setup_cache() before a forward pass")
        checks.tensor("tokens", tokens)
        if tokens.dim() != 2 or tokens.dtype != torch.long or tokens.shape[0] != 1:
            raise ValueError(f"`tokens` must be int64 of shape [1, T], got {tokens.dtype} of shape {tuple(tokens.shape)}")
        keep = checks.integer("logits_to_keep", logits_to_keep, low=0)
        offset = self.cache.held if offsets is None else int(offsets.reshape(-1)[0])
        self.cache.rollback(offset, check=False)
        if self.cache.held != offset:
            raise ValueError(f"offset {offset} skips positions: the cache holds {self.cache.held}")
        positions = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)[None]
        with torch.inference_mode():
            out = self.model(input_ids=tokens, cache=self.cache.inner, position_ids=positions, use_cache=True,
                             logits_to_keep=keep)
        return out.logits


def _vocab_size(model) -> int:
    """The logits' width: the output embedding's rows (which may exceed the tokenizer's
    vocabulary when padded), else the config's ``vocab_size`` (or its text config's)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config
    size = getattr(config, "vocab_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "vocab_size", None)
    if size is None:
        raise ValueError("`model` does not say its vocabulary size (no output embedding, no config.vocab_size)")
    return int(size)


class _HFCacheView:
    """``lengths`` and ``rollback`` over a ``DynamicCache`` (the engine's cache interface)."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def held(self) -> int:
        return int(self.inner.get_seq_length())

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([self.held])

    def rollback(self, lengths, check: bool = True) -> None:
        length = int(torch.as_tensor(lengths).reshape(-1)[0])
        if check and not 0 <= length <= self.held:
            raise ValueError(f"cannot roll back to length {length}: the cache holds {self.held}")
        surplus = self.held - length
        if surplus > 0:
            self.inner.crop(-surplus)          # transformers >= 5: a negative count removes that many


# ---------------------------------------------------------------------------------------
# Conversion to and from transformers' GPT2LMHeadModel. Same parameter names; GPT-2's
# Conv1D stores [in, out] where nn.Linear stores [out, in], so those weights transpose.

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def to_hf(model: GPT) -> transformers.GPT2LMHeadModel:
    """The same network as a ``transformers.GPT2LMHeadModel`` (eval mode, same device and dtype)."""
    if not isinstance(model, GPT):
        raise checks.InputTypeError(f"`model` must be a typsamp.model.GPT, got {type(model).__name__}")
    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    weight = model.transformer.wte.weight
    hf = transformers.GPT2LMHeadModel(hf_config).to(device=weight.device, dtype=weight.dtype)
    state = {k: v.t() if k.endswith(_CONV1D) else v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 conversion mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def from_hf(hf) -> GPT:
    """Our :class:`typsamp.model.GPT` from a ``transformers.GPT2LMHeadModel`` with tied embeddings."""
    if not isinstance(hf, transformers.GPT2LMHeadModel):
        raise checks.InputTypeError(f"`hf` must be a transformers.GPT2LMHeadModel, got {type(hf).__name__}")
    hc = hf.config
    if hc.activation_function != "gelu_new" or not hc.tie_word_embeddings or hc.n_inner not in (None, 4 * hc.n_embd):
        raise ValueError("`hf` must be a GPT-2 with gelu_new, tied embeddings and a 4x MLP")
    config = GPTConfig(vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                       n_embd=hc.n_embd, block_size=hc.n_positions)
    weight = hf.transformer.wte.weight
    model = GPT(config).to(device=weight.device, dtype=weight.dtype)
    hf_state = hf.state_dict()
    model.load_state_dict({k: hf_state[k].t() if k.endswith(_CONV1D) else hf_state[k]
                           for k in model.state_dict()})
    return model.eval()


# ---------------------------------------------------------------------------------------
# The peer baseline: transformers' own generate(), assisted or not (chapter 8)


class ForwardCounter:
    """Counts forward passes of a ``transformers`` model (its verification steps when it
    is the target of assisted generation): read :attr:`n` before and after a call."""

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise checks.InputTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.n = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def remove(self) -> None:
        """Stop counting."""
        self.handle.remove()


def peer_generate(target_hf, draft_hf, prompt: torch.Tensor, tokens: int, temperature: float,
                  gamma: int | None = None, seed: int = 0) -> torch.Tensor:
    """``transformers``' ``generate()`` of ``tokens`` new tokens after ``prompt`` [1, P],
    with assisted generation when ``draft_hf`` is given; returns the new tokens [1, tokens].

    The assistant proposes a constant ``gamma`` tokens per step (no schedule, no
    confidence-based early stop); sampling applies the temperature only (top-k and top-p
    off, which ``transformers`` would otherwise default to top-k 50); T = 0 is greedy.
    ``seed`` seeds torch's global generator, which ``transformers`` samples from.
    """
    tokens = checks.integer("tokens", tokens, low=1)
    temperature = checks.real("temperature", temperature, low=0.0)
    seed = checks.integer("seed", seed, low=0)
    # transformers builds attention masks from the pad id (the assistant's generate()
    # does so even when an all-ones mask is passed), and a character vocabulary has no
    # spare id: id 0 is the newline. An id past the vocabulary never occurs in the text.
    kwargs = dict(max_new_tokens=tokens, top_k=0, top_p=1.0,
                  pad_token_id=target_hf.config.vocab_size, attention_mask=torch.ones_like(prompt))
    if temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature)
    if draft_hf is not None:
        gamma = checks.integer("gamma", gamma, low=1)
        config = draft_hf.generation_config
        config.num_assistant_tokens = gamma
        config.num_assistant_tokens_schedule = "constant"
        config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = draft_hf
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = target_hf.generate(prompt, **kwargs)
    return out[:, prompt.shape[1]:]


# ---------------------------------------------------------------------------------------
# Tokenizers


def auto_tokenizer(path, **kwargs):
    """``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)``:
    a tokenizer from files on disk only, never from the network (e.g. ``gguf_file=`` to
    convert a GGUF file's tokenizer, as :mod:`typsamp.gemma` does)."""
    from pathlib import Path

    if not isinstance(path, (str, Path)):
        raise checks.InputTypeError(f"`path` must be a str or Path, got {type(path).__name__}")
    kwargs.setdefault("local_files_only", True)
    return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)


def gemma3_config(c) -> transformers.Gemma3TextConfig:
    """``transformers``' ``Gemma3TextConfig`` for a :class:`typsamp.gemma.GemmaConfig` ``c``:
    the same shapes, window, layer types, RoPE bases and special tokens, a tied head and no
    soft-capping, so ``Gemma3ForCausalLM`` loads a :class:`typsamp.gemma.Gemma`'s state dict
    one-to-one (its ``lm_head`` is the tied embedding)."""
    return transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden, intermediate_size=c.ffn,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        head_dim=c.head_dim, sliding_window=c.sliding_window, rms_norm_eps=c.rms_eps,
        max_position_embeddings=c.context_length, query_pre_attn_scalar=c.query_pre_attn_scalar,
        layer_types=["full_attention" if i in c.global_layers else "sliding_attention" for i in range(c.n_layer)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local},
                         "full_attention": {"rope_type": "default", "rope_theta": c.rope_global}},
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
