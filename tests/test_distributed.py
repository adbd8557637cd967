"""Tests for :mod:`typsamp.distributed`: the two-process loop against the one-process engine.

Two tiny float32 GPTs (a 2-layer target, a 1-layer draft) on loopback. Every protocol, at
T = 0 and T > 0, with one seed and with per-row seeds, ragged prompts and an end token,
must give exactly the tokens (and origins, accepted lengths, pass counts) of
:func:`typsamp.generate.speculative` with the same rule, drafts and seed. The bytes the
loop counts must be :func:`typsamp.distributed.step_bytes` of each step's outcome, whose
expectation is :func:`typsamp.transfer.payload`. Shaped links need root and run only then.
Every wait is bounded (the pair's timeout), so no test can hang.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from typsamp import distributed, generate, transfer
from typsamp.distributed import PROTOCOLS, LinkSpec, NetnsLink, Pair, step_bytes
from typsamp.model import GPT, GPTConfig
from typsamp.sampling import Warp
from typsamp.typical import TypicalAcceptance

V = 11
GAMMA = 3
TIMEOUT = 60.0
FIELDS = ("tokens", "lengths", "origin", "accepted_lengths", "steps", "target_passes", "draft_passes",
          "drafted", "accepted", "gamma")


def tiny(seed: int, n_layer: int, n_embd: int, vocab: int = V, scale: float = 3.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=96))
    with torch.no_grad():                       # sharper logits: some drafts pass, some fail
        model.transformer.wte.weight.mul_(scale)
    return model.float().eval()


TARGET, DRAFT = tiny(0, 2, 32), tiny(1, 1, 16)
#: Medusa's ε = 0.09 passes nearly every draft of an 11-token vocabulary; a stricter
#: threshold makes typical acceptance reject some, so the comparisons exercise both paths.
STRICT = TypicalAcceptance(epsilon=0.4, delta=0.9)


def typical_kw(name: str) -> dict:
    return {"typical": STRICT} if name == "typical_greedy" else {}


@pytest.fixture(scope="module")
def pair():
    with Pair(TARGET, DRAFT, timeout=TIMEOUT) as p:
        yield p


def prompts(B: int, P: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))


def one_process(name: str, prompt, n: int, **kw) -> generate.Generation:
    spec = distributed.protocol(name, kw.pop("typical", None))
    return generate.speculative(TARGET, spec.draft_model(DRAFT), prompt, n, rule=spec.rule, **kw)


def assert_same(out: distributed.DistributedGeneration, ref: generate.Generation) -> None:
    for f in FIELDS:
        a, b = getattr(out.generation, f), getattr(ref, f)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.cpu(), b.cpu()), f"{out.protocol}: `{f}` differs:\n{a}\n{b}"
        else:
            assert a == b, f"{out.protocol}: `{f}` differs: {a} != {b}"


# ---------------------------------------------------------------------------------------
# The same tokens as the one-process engine


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_equals_one_process_engine(pair, name, temperature):
    prompt = prompts(3, 6)
    kw = dict(gamma=GAMMA, warp=Warp(temperature=temperature), seed=11, **typical_kw(name))
    out = pair.generate(prompt, 24, protocol=name, **kw)
    assert_same(out, one_process(name, prompt, 24, **kw))


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_equals_engine_row_seeds_ragged_eos_top_p(pair, name):
    rows = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (1, 4, 7)]
    kw = dict(gamma=4, warp=Warp(temperature=1.0, top_p=0.9), seed=[3, 1, 4], eos_token_id={2, 5}, **typical_kw(name))
    out = pair.generate(rows, 20, protocol=name, **kw)
    ref = one_process(name, rows, 20, **kw)
    assert_same(out, ref)
    assert (ref.lengths < 20).any(), "the end token never fired: the test does not exercise it"


def test_typical_parameters_travel(pair):
    prompt = prompts(2, 5, seed=3)
    rule = TypicalAcceptance(epsilon=0.3, delta=0.6, extra="target")
    kw = dict(gamma=GAMMA, warp=Warp(temperature=0.9), seed=2)
    out = pair.generate(prompt, 16, protocol="typical_greedy", typical=rule, **kw)
    ref = generate.speculative(TARGET, generate.DraftModel(DRAFT, greedy=True), prompt, 16, rule=rule, **kw)
    assert_same(out, ref)


def test_every_protocol_sees_rejections(pair):
    """The comparisons above mean something only if drafts are both accepted and rejected."""
    prompt = prompts(3, 6)
    for name in PROTOCOLS:
        out = pair.generate(prompt, 24, protocol=name, gamma=GAMMA, warp=Warp(temperature=0.8), seed=11,
                            **typical_kw(name))
        a = out.generation.accepted_lengths
        live = a >= 0
        assert (a[live] < GAMMA).any() and (a[live] > 0).any(), name


def test_unseeded_runs_and_emits_valid_tokens(pair):
    out = pair.generate(prompts(2, 4), 12, protocol="rejection_sampled_return_p", gamma=2,
                        warp=Warp(temperature=1.0))
    assert out.generation.lengths.tolist() == [12, 12]
    assert ((out.tokens >= 0) & (out.tokens < V)).all()


# ---------------------------------------------------------------------------------------
# Bytes on the wire


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_counted_bytes_are_step_bytes(pair, name):
    out = pair.generate(prompts(1, 6, seed=4), 30, protocol=name, gamma=GAMMA, warp=Warp(temperature=0.8), seed=9,
                        **typical_kw(name))
    a = out.generation.accepted_lengths[:, 0]
    rejected = (a < GAMMA).long().tolist()
    expected, pending = [], 0
    for r in rejected:
        expected.append(step_bytes(name, 1, GAMMA, V, r, pending=pending))
        pending = r if PROTOCOLS[name].wire == "return_p" else 0
    if pending:                                   # return_p: the last residual token travels alone
        expected.append((pending * transfer.ID_BYTES, 0, 1))
    got = list(zip(out.up.tolist(), out.down.tolist(), out.legs.tolist()))
    assert got == [tuple(e) for e in expected]
    assert out.bytes == sum(u + d for u, d, _ in expected)


@pytest.mark.parametrize("name", ["rejection_sampled_two_round", "rejection_sampled_return_p", "match_sampled"])
def test_counted_bytes_in_a_batch_whose_rows_end_apart(pair, name):
    """Rows that are done ride along (their ids travel) but get no row of q or p."""
    rows = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (2, 5, 3)]
    out = pair.generate(rows, 18, protocol=name, gamma=GAMMA, warp=Warp(temperature=0.9), seed=[5, 6, 7],
                        eos_token_id=4, **typical_kw(name))
    a = out.generation.accepted_lengths
    assert ((a < 0).any(dim=1)).any(), "no step with a finished row: the test does not exercise it"
    rejected = ((a >= 0) & (a < GAMMA)).sum(dim=1).tolist()
    lazy = PROTOCOLS[name].wire == "return_p"
    expected, pending = [], 0
    for r in rejected:
        expected.append(step_bytes(name, 3, GAMMA, V, r, pending=pending))
        pending = r if lazy else 0
    if pending:
        expected.append((pending * transfer.ID_BYTES, 0, 1))
    assert list(zip(out.up.tolist(), out.down.tolist(), out.legs.tolist())) == [tuple(e) for e in expected]


@pytest.mark.parametrize("name", list(PROTOCOLS))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9])
def test_step_bytes_average_to_the_payload_model(name, alpha):
    """With one row, a step rejects with probability r = 1 - α^γ; averaging step_bytes over
    that (and, for return_p, over the previous step's rejection) gives transfer.payload."""
    gamma, vocab = 4, 1000
    r = 1 - alpha ** gamma
    model = transfer.payload(name, vocab, gamma, torch.float32, alpha=alpha)
    mean = [0.0, 0.0, 0.0]
    for rej, w in ((0, 1 - r), (1, r)):
        for pend, v in ((0, 1 - r), (1, r)):
            pend = pend if PROTOCOLS[name].wire == "return_p" else 0
            for k, x in enumerate(step_bytes(name, 1, gamma, vocab, rej, pending=pend)):
                mean[k] += w * v * x
    assert mean[0] == pytest.approx(model.up)
    assert mean[1] == pytest.approx(model.down)
    assert mean[2] == pytest.approx(model.messages)


def test_ids_only_protocols_move_no_probabilities(pair):
    prompt = prompts(2, 5)
    for name in ("rejection_greedy", "match_sampled", "typical_greedy"):
        out = pair.generate(prompt, 10, protocol=name, gamma=GAMMA, warp=Warp(temperature=0.8), seed=1)
        steps = out.generation.steps
        assert out.bytes == steps * 2 * (GAMMA + 2) * transfer.ID_BYTES


# ---------------------------------------------------------------------------------------
# Bad input, failures, links


def test_protocol_lookup_errors():
    with pytest.raises(ValueError, match="unknown protocol"):
        distributed.protocol("rejection")
    with pytest.raises(TypeError, match="string"):
        distributed.protocol(3)
    with pytest.raises(ValueError, match="only applies"):
        distributed.protocol("rejection_greedy", TypicalAcceptance())
    with pytest.raises(TypeError, match="TypicalAcceptance"):
        distributed.protocol("typical_greedy", "eps")
    assert tuple(PROTOCOLS) == transfer.RULES


def test_generate_rejects_bad_arguments_before_any_work(pair):
    with pytest.raises(ValueError, match="unknown protocol"):
        pair.generate(prompts(1, 3), 4, protocol="nope")
    with pytest.raises(ValueError, match="gamma"):
        pair.generate(prompts(1, 3), 4, gamma=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pair.generate(torch.full((1, 3), V), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pair.generate(prompts(1, 3), 0)
    with pytest.raises(TypeError, match="Warp"):
        pair.generate(prompts(1, 3), 4, warp=0.7)
    with pytest.raises(ValueError, match="seed"):
        pair.generate(prompts(2, 3), 4, seed=[1])
    # the pair still works after refusing
    assert pair.generate(prompts(1, 3), 4, seed=0).generation.lengths.tolist() == [4]


def test_too_long_for_the_models_is_a_value_error():
    with Pair(TARGET, DRAFT, timeout=TIMEOUT) as p:
        with pytest.raises(ValueError, match="block_size"):
            p.generate(prompts(1, 4), 200, seed=0)


def test_speculative_one_call_equals_engine():
    prompt = prompts(1, 4, seed=5)
    kw = dict(gamma=2, warp=Warp(temperature=0.6), seed=8)
    out = distributed.speculative(TARGET, DRAFT, prompt, 10, protocol="rejection_sampled", timeout=TIMEOUT, **kw)
    assert_same(out, one_process("rejection_sampled", prompt, 10, **kw))


def test_pair_rejects_bad_construction():
    with pytest.raises(ValueError, match="timeout"):
        Pair(TARGET, DRAFT, timeout=0)
    with pytest.raises(TypeError, match="NetnsLink"):
        Pair(TARGET, DRAFT, link="lo")
    with pytest.raises(ValueError, match="vocabularies differ"):
        Pair(TARGET, tiny(2, 1, 16, vocab=V + 1), timeout=TIMEOUT)
    with pytest.raises(ValueError, match="setup_cache"):
        Pair(TARGET, 42, timeout=TIMEOUT)


def test_nan_draft_is_an_error_on_both_sides():
    bad = tiny(1, 1, 16)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan")) if hasattr(bad, "lm_head") else bad.transformer.wte.weight.fill_(float("nan"))
    with Pair(TARGET, bad, timeout=TIMEOUT) as p:
        with pytest.raises(ValueError, match="NaN or infinite"):
            p.generate(prompts(1, 4), 8, protocol="rejection_sampled", warp=Warp(temperature=1.0), seed=0)


def test_warm_runs_and_leaves_generation_unchanged(pair):
    prompt = prompts(1, 5, seed=2)
    kw = dict(gamma=GAMMA, warp=Warp(temperature=0.8), seed=4)
    assert pair.warm(5, 12, GAMMA) > 0
    assert_same(pair.generate(prompt, 12, protocol="match_sampled", **kw), one_process("match_sampled", prompt, 12, **kw))
    with pytest.raises(ValueError, match="gamma"):
        pair.warm(5, 12, 0)


def test_pingpong_returns_a_measurement(pair):
    """Timings are not asserted (the machine is shared); only their shape and sign."""
    m = pair.pingpong([8, 65536], repeats=3, warmup=1)
    assert isinstance(m, transfer.Measurement) and m.sizes == (8, 65536) and m.messages == 2
    assert [len(s) for s in m.samples] == [3, 3] and all(t > 0 for s in m.samples for t in s)


def test_not_root_says_so(monkeypatch):
    monkeypatch.setattr(distributed.os, "geteuid", lambda: 1000)
    ok, why = distributed.can_make_namespaces()
    assert not ok and "not root" in why
    with pytest.raises(PermissionError, match="not root"):
        with NetnsLink(LinkSpec("x", 1e8, 0.0)):
            pass
    assert distributed.netem_available() == (False, why)


def test_link_spec_validation():
    with pytest.raises(ValueError, match="rate"):
        LinkSpec("x", 0.0, 0.0)
    with pytest.raises(ValueError, match="delay"):
        LinkSpec("x", 1e9, -1.0)
    base = transfer.Link("base", 1e9, 1e-5)
    nominal = LinkSpec("x", 1e8, 2e-3).nominal(base)
    assert nominal.bandwidth == pytest.approx(1e8 / 8) and nominal.latency == pytest.approx(2e-3 + 1e-5)


needs_root = pytest.mark.skipif(not distributed.can_make_namespaces()[0],
                                reason=distributed.can_make_namespaces()[1] or "root")


@needs_root
def test_shaped_link_gives_the_same_tokens_and_cleans_up(pair):
    prompt = prompts(1, 5, seed=7)
    kw = dict(protocol="rejection_sampled_two_round", gamma=GAMMA, warp=Warp(temperature=0.8), seed=3)
    spec = LinkSpec("test", 100e6, 1e-3)
    with NetnsLink(spec) as link:
        names = link.namespaces
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(n in listed for n in names)
        with Pair(TARGET, DRAFT, link=link, timeout=TIMEOUT) as shaped:
            out = shaped.generate(prompt, 12, **kw)
    assert_same(out, one_process(kw.pop("protocol"), prompt, 12, **kw))
    if link.delay_by == "transport":
        legs = int(out.legs.sum())
        assert out.added_delay >= 0.9 * legs * spec.delay
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)


def fake_record() -> dict:
    rates = dict(zip(PROTOCOLS, (2.0, 5.0, 6.0, 9.0, 8.0, 12.0)))
    rows = [{"protocol": n, "link": "slow", "tokens_per_s": r, "predicted_tokens_per_s": r / 0.9,
             "measured_over_predicted": 0.9, "bytes_per_token": 10.0, "alpha": 0.5, "transfer_fraction": 0.25}
            for n, r in rates.items()]
    return {"rows": rows}


def test_answer_and_table_read_a_record():
    record = fake_record()
    got = distributed.answer(record)["slow"]
    assert got["fastest_first"][0] == "typical_greedy" and got["fastest_first"][-1] == "rejection_sampled"
    assert got["shipping_q_costs_more_than_it_buys"] is True
    assert got["relative_to_shipping_q"]["rejection_sampled_return_p"] == pytest.approx(3.0)
    text = distributed.table(record)
    assert len(text.splitlines()) == 1 + len(PROTOCOLS) and "0.90" in text
    with pytest.raises(ValueError, match="lacks rows"):
        distributed.answer({"rows": record["rows"][:-1]})
    with pytest.raises(ValueError, match="bench record"):
        distributed.table([])
