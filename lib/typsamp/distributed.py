"""Draft and target in two processes: speculative decoding over ``torch.distributed`` (chapter 7).

Rank 0 holds the draft, rank 1 the target; they talk through ``torch.distributed``
point-to-point messages (gloo on the CPU; NCCL where each rank has a GPU) and say
exactly what each rule's protocol of :mod:`typsamp.transfer` needs, nothing more. The
names are :data:`typsamp.transfer.RULES`:

==================================  ====================  ==========================================
protocol                            rule (drafts)         what travels, per step and row
==================================  ====================  ==========================================
``rejection_sampled``               rejection (sampled)   up: γ ids + γ rows of q; down: a, token
``rejection_sampled_two_round``     rejection (sampled)   up: γ ids + γ values q_i(x_i); down: a;
                                                          after a rejection up: q at it; down: token
``rejection_sampled_return_p``      rejection (sampled)   up: γ ids + γ values q_i(x_i) (+ the last
                                                          step's residual token); down: a, then the
                                                          bonus token, or p at the rejection (the
                                                          draft draws the residual itself)
``rejection_greedy``                rejection (greedy)    ids only: up γ ids; down a, token
``match_sampled``                   exact match (sampled) ids only
``typical_greedy``                  typical (greedy)      ids only
==================================  ====================  ==========================================

Ids are int32, probabilities travel in the dtype the rule computes in (float32 unless a
model runs in float64), so the bytes per step are exactly :func:`typsamp.transfer.payload`'s
(the loop counts them; :func:`step_bytes` gives the count for one step's outcome).

**Same tokens as one process.** Both ranks keep the engine's bookkeeping
(:func:`typsamp.generate.speculative`: the committed text, the rows' lengths, end tokens,
cache rollbacks) and hold one copy each of the same random generator (``seed`` an int
or a list of row seeds). Every random draw of the one-process engine happens on both
ranks in the same order: the rank that needs a number uses it, the other draws the same
shape and throws it away (the draft replays the rule's draws by running the rule on a
one-token vocabulary, whose draws have the same shapes; the target replays the draft's
γ draws of one uniform per row). So with the same seed the two-process loop emits
*the same tokens* as the one-process engine, at every temperature, which
``tests/test_distributed.py`` checks token for token. With ``seed=None`` each process uses
its own global generator: the law is the engine's, the tokens are not.

**Links.** :class:`Pair` starts the two processes, on loopback or in two network
namespaces joined by a veth pair (:class:`NetnsLink`, root only) whose bandwidth the
kernel shapes (``tc`` ``tbf``); a one-way delay is added by ``netem`` where the kernel
has it, otherwise by the transport step itself (:class:`Wire`: it waits the delay before
the first message of each one-way leg, busy-waiting the last 0.2 ms, and records the
delay it actually waited). ``python -m typsamp.distributed bench`` measures every
protocol on every link with the real pair of chapter 9 and writes
``notebooks/results/distributed_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import queue as _queue
import shutil
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from typsamp import checks, generate, rules, sampling, transfer
from typsamp.speculative import ExactMatch, RejectionSampling, expected_tokens
from typsamp.typical import TypicalAcceptance

__all__ = ["PROTOCOLS", "Protocol", "protocol", "Wire", "Traffic", "DistributedGeneration", "Pair",
           "NetnsLink", "LinkSpec", "LINKS", "step_bytes", "netem_available", "can_make_namespaces",
           "clean_namespaces", "speculative", "bench", "answer", "table", "main"]

ID = torch.int32
ID_BYTES = transfer.ID_BYTES


# ---------------------------------------------------------------------------------------
# Protocols


@dataclass(frozen=True)
class Protocol:
    """One way of running a rule across the two ranks.

    Attributes:
        name: a name of :data:`typsamp.transfer.RULES`.
        rule: the verification rule the target applies (the one-process engine's).
        greedy: the draft's drafts are greedy (``DraftModel(greedy=True)``).
        wire: ``"q"`` (all of q travels), ``"two_round"``, ``"return_p"`` or ``"ids"``.
    """

    name: str
    rule: rules.Rule
    greedy: bool
    wire: str

    def draft_model(self, model) -> generate.DraftModel:
        """The proposer the one-process engine uses for this protocol."""
        return generate.DraftModel(model, greedy=self.greedy)


#: Every protocol, by :data:`typsamp.transfer.RULES` name.
PROTOCOLS = {
    "rejection_sampled": Protocol("rejection_sampled", RejectionSampling(), False, "q"),
    "rejection_sampled_two_round": Protocol("rejection_sampled_two_round", RejectionSampling(), False, "two_round"),
    "rejection_sampled_return_p": Protocol("rejection_sampled_return_p", RejectionSampling(), False, "return_p"),
    "rejection_greedy": Protocol("rejection_greedy", RejectionSampling(), True, "ids"),
    "match_sampled": Protocol("match_sampled", ExactMatch(), False, "ids"),
    "typical_greedy": Protocol("typical_greedy", TypicalAcceptance(), True, "ids"),
}
assert tuple(PROTOCOLS) == transfer.RULES


def protocol(name, typical: TypicalAcceptance | None = None) -> Protocol:
    """The :class:`Protocol` called ``name``; ``typical`` replaces the default
    ``TypicalAcceptance()`` of ``"typical_greedy"`` (ε, δ, extra)."""
    if isinstance(name, Protocol):
        return name
    if not isinstance(name, str):
        raise checks.InputTypeError(f"`protocol` must be a string, got {type(name).__name__}")
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    found = PROTOCOLS[name]
    if typical is not None:
        if not isinstance(typical, TypicalAcceptance):
            raise checks.InputTypeError(f"`typical` must be a TypicalAcceptance, got {type(typical).__name__}")
        if name != "typical_greedy":
            raise ValueError("`typical` only applies to the 'typical_greedy' protocol")
        found = Protocol(name, typical, True, "ids")
    return found


def step_bytes(name: str, B: int, gamma: int, V: int, rejected: int, *, pending: int = 0,
               value_bytes: int = 4) -> tuple[int, int, int]:
    """(up, down, legs) of one step on the wire, given its outcome.

    ``rejected`` of the ``B`` rows still generating rejected a draft this step (rows that
    are done ride along in the batch, as in the engine: their ids travel, but no row of
    q or p is sent for them); ``pending`` rows had their
    residual token drawn by the draft in the previous step (``return_p`` only: it travels
    with this step's drafts). ``legs`` counts one-way legs (a direction change), which is
    what pays the latency; messages sent back to back in one direction share a leg.
    """
    i, d = ID_BYTES, value_bytes
    wire = protocol(name).wire
    if wire == "q":
        return B * gamma * (i + V * d), 2 * B * i, 2
    if wire == "ids":
        return B * gamma * i, 2 * B * i, 2
    if wire == "two_round":
        return B * gamma * (i + d) + rejected * V * d, 2 * B * i, 2 + 2 * (rejected > 0)
    return pending * i + B * gamma * (i + d), (2 * B - rejected) * i + rejected * V * d, 2


# ---------------------------------------------------------------------------------------
# The wire: counted, optionally delayed, point-to-point messages


@dataclass
class Traffic:
    """What one rank sent and received during one generation (counted by :class:`Wire`).

    ``steps`` holds, per decoding step, ``[bytes sent, bytes received, legs]`` where a leg
    is a run of messages in one direction (each leg pays the link's latency once).
    """

    sent: int = 0
    received: int = 0
    legs: int = 0
    messages: int = 0
    seconds: float = 0.0          # time inside send/recv (waiting for the peer included)
    delay: float = 0.0            # delay the transport step added (measured)
    steps: list = field(default_factory=list)


class Wire:
    """Point-to-point messages to one peer through ``torch.distributed``, counted.

    ``delay`` seconds are waited before the first message of every one-way leg this rank
    sends (the emulated one-way latency, for links whose kernel has no ``netem``); the
    last 0.2 ms of each wait are a busy loop so that sub-millisecond delays are kept.
    ``device``: where received tensors are put (the CPU for gloo).
    """

    def __init__(self, peer: int, delay: float = 0.0, device: torch.device | str = "cpu"):
        self.peer, self.delay, self.device = peer, float(delay), torch.device(device)
        self.traffic = Traffic()
        self._sending = False
        self._step = [0, 0, 0]

    def reset(self) -> Traffic:
        done, self.traffic, self._step, self._sending = self.traffic, Traffic(), [0, 0, 0], False
        return done

    def end_step(self) -> None:
        self.traffic.steps.append(self._step)
        self._step = [0, 0, 0]

    def _wait(self) -> None:
        if self.delay <= 0:
            return
        start = time.perf_counter()
        until = start + self.delay
        if self.delay > 3e-4:
            time.sleep(self.delay - 2e-4)
        while time.perf_counter() < until:
            pass
        self.traffic.delay += time.perf_counter() - start

    def send(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        start = time.perf_counter()
        if not self._sending:
            self._sending = True
            self.traffic.legs += 1
            self._step[2] += 1
            self._wait()
        tensor = tensor.contiguous()
        dist.send(tensor, dst=self.peer)
        n = tensor.numel() * tensor.element_size()
        self.traffic.sent += n
        self.traffic.messages += 1
        self._step[0] += n
        self.traffic.seconds += time.perf_counter() - start

    def recv(self, shape, dtype) -> torch.Tensor:
        import torch.distributed as dist

        start = time.perf_counter()
        if self._sending:
            self._sending = False
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if out.numel():
            dist.recv(out, src=self.peer)
        n = out.numel() * out.element_size()
        self.traffic.received += n
        self._step[1] += n
        self.traffic.seconds += time.perf_counter() - start
        return out

    def count_leg_received(self) -> None:
        """Count a leg that the peer sent (rank 0 keeps the per-step leg count of both)."""
        self._step[2] += 1


def _as_int(values: torch.Tensor) -> torch.Tensor:
    """Floating values as int32 words of the same bits (ids and values in one message)."""
    return values.contiguous().view(ID) if values.element_size() == 4 else values.contiguous().view(torch.int64).view(ID)


def _from_int(words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return words.contiguous().view(dtype)


# ---------------------------------------------------------------------------------------
# The bookkeeping both ranks keep (generate.speculative's, step 4 without the caches)


class _Book:
    def __init__(self, prompt, prompt_lengths, max_new_tokens, gamma, eos):
        B, P = prompt.shape
        device = prompt.device
        self.B, self.gamma, self.eos = B, gamma, eos
        self.prompt_lengths, self.max_new_tokens = prompt_lengths, max_new_tokens
        self.seq = torch.zeros(B, P + max_new_tokens + gamma, dtype=torch.long, device=device)
        self.seq[:, :P] = prompt
        self.n = prompt_lengths.clone()
        self.last_row = prompt_lengths + (max_new_tokens - 1)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.active = torch.ones(B, dtype=torch.bool, device=device)
        self.n_work = self.n
        self.positions = torch.arange(gamma + 1, device=device)
        self.accepted_lengths = []

    def sync(self) -> tuple[int, int]:
        top, live = torch.stack([self.n_work.max(), self.active.sum()]).tolist()
        return top, live

    def commit(self, tokens: torch.Tensor, a: torch.Tensor) -> None:
        positions, active = self.positions, self.active
        emitted = a + 1
        if self.eos is not None:
            hit = torch.isin(tokens, self.eos) & (positions <= a[:, None])
            ended = hit.any(dim=1)
            emitted = torch.where(ended, hit.byte().argmax(dim=1) + 1, emitted)
            self.finished = self.finished | (ended & active)
        keep = (positions < emitted[:, None]) & active[:, None]
        index = self.n_work[:, None] + positions
        self.seq.scatter_(1, index, torch.where(keep, tokens, self.seq.gather(1, index)))
        self.accepted_lengths.append(torch.where(active, a, -1))
        self.n = torch.where(active, self.n + emitted, self.n)
        self.active = (self.n - self.prompt_lengths) < self.max_new_tokens
        if self.eos is not None:
            self.active = self.active & ~self.finished
        self.n_work = torch.minimum(self.n, self.last_row)

    def generation(self, target_passes: int, draft_passes: int, wall: float,
                   prefill: float | None = None) -> generate.Generation:
        B, gamma, max_new = self.B, self.gamma, self.max_new_tokens
        steps = torch.stack(self.accepted_lengths).cpu() if self.accepted_lengths else torch.zeros(0, B, dtype=torch.long)
        live = steps >= 0
        column = torch.arange(max_new, device=self.seq.device)
        lengths = (self.n - self.prompt_lengths).clamp(max=max_new)
        tokens = self.seq.gather(1, (self.prompt_lengths[:, None] + column).clamp(max=self.seq.shape[1] - 1))
        tokens = tokens.masked_fill(column >= lengths[:, None], -1)
        codes = torch.where(steps == gamma, 3, 2)
        origin = generate._origin(steps, codes, max_new, lengths).to(self.seq.device)
        return generate.Generation(tokens=tokens, lengths=lengths, origin=origin, steps=len(self.accepted_lengths),
                                   target_passes=target_passes, draft_passes=draft_passes,
                                   drafted=gamma * int(live.sum()), accepted=int(steps[live].sum()), gamma=gamma,
                                   accepted_lengths=steps, wall_time=wall, prefill_time=prefill,
                                   decoded_tokens=int((self.n - self.prompt_lengths).sum()))


def _replay_draft_draws(gamma: int, B: int, generator, device) -> None:
    """The random numbers a sampled :class:`typsamp.generate.DraftModel` draws in one
    propose: one uniform per row for each of its γ drafts (``sample_weights`` on [B, V])."""
    ones = torch.ones(B, 1, dtype=torch.float64, device=device)
    for _ in range(gamma):
        sampling.sample_weights(ones, generator)


def _replay_rule_draws(rule, B: int, gamma: int, dtype, sampled: bool, generator, device) -> None:
    """The rule's random draws of one step, by running it on a one-token vocabulary: every
    shipped rule draws shapes [B, ...] that do not depend on V."""
    x = torch.zeros(B, gamma, dtype=torch.long, device=device)
    q = torch.ones(B, gamma, 1, dtype=dtype, device=device) if sampled else None
    rule.kernel(x, q, torch.ones(B, gamma + 1, 1, dtype=dtype, device=device), generator)


def _model_dtype(model) -> torch.dtype:
    """The dtype a model's probabilities are computed in (float64 models: float64)."""
    for owner in (model, getattr(model, "model", None)):
        params = getattr(owner, "parameters", None)
        if callable(params):
            for p in params():
                return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


_DTYPES = {0: torch.float32, 1: torch.float64}


def _dtype_code(dtype) -> int:
    return 1 if dtype == torch.float64 else 0


def _not_finite(model: str, step: int) -> ValueError:
    return generate._not_finite(model, step)


# ---------------------------------------------------------------------------------------
# Rank 0: the draft


def _draft_loop(wire: Wire, draft, job: dict, V: int, p_dtype) -> dict:
    spec = protocol(job["protocol"], job.get("typical"))
    prompt, prompt_lengths = job["prompt"], job["prompt_lengths"]
    gamma, max_new, warp = job["gamma"], job["max_new_tokens"], job["warp"]
    eos = generate._eos(job["eos_token_id"], V, prompt.device)
    B = prompt.shape[0]
    generator = generate._generator(job["seed"], B, prompt.device)
    proposer = spec.draft_model(draft)
    sampled = not spec.greedy
    start = time.perf_counter()
    compute = 0.0
    with torch.inference_mode():
        proposer.start(prompt, prompt_lengths, max_new_tokens=max_new, gamma=gamma, warp=warp)
        prefill = time.perf_counter() - start
        book = _Book(prompt, prompt_lengths, max_new, gamma, eos)
        pending = None                                   # return_p: (rows, tokens) drawn last step
        decode_start = time.perf_counter()
        step = 0
        while True:
            top, live = book.sync()
            if not live:
                break
            step += 1
            t = time.perf_counter()
            proposal = proposer.propose(book.seq, book.n_work, top, generator)
            x, q = proposal.tokens, proposal.q
            fine = bool(proposal.finite) if proposal.finite is not None else True
            ids = x.to(ID)
            if not fine:
                ids[0, 0] = -1                           # tells the target to stop with the same error
            if spec.wire in ("two_round", "return_p"):
                qn = rules.normalised(q, p_dtype)
                q_x = qn.gather(-1, x[..., None]).squeeze(-1)
            compute += time.perf_counter() - t
            # up
            if pending is not None:
                wire.send(pending[1].to(ID))
                pending = None
            if spec.wire == "q":
                wire.send(ids)
                if fine:
                    wire.send(q)
            elif spec.wire == "ids":
                wire.send(ids)
            else:
                wire.send(torch.cat([ids.flatten(), _as_int(q_x.to(p_dtype)).flatten()]))
            if not fine:
                raise _not_finite("draft", step)
            # down
            wire.count_leg_received()
            a = wire.recv((B,), ID).long()
            if int(a.min()) < 0:
                raise _not_finite("target", step)
            rejected = a < gamma
            need = rejected & book.active                # rows done already commit nothing: no rows for them
            if spec.wire in ("q", "ids"):
                extra = wire.recv((B,), ID).long()
                t = time.perf_counter()                  # compute from here on (the messages are in)
                _replay_rule_draws(spec.rule, B, gamma, p_dtype, sampled, generator, prompt.device)
            elif spec.wire == "two_round":
                k = int(need.sum())
                if k:
                    rows = need.nonzero().squeeze(1)
                    wire.send(qn[rows, a[rows]])
                    wire.count_leg_received()
                extra = wire.recv((B,), ID).long()
                t = time.perf_counter()
                _replay_rule_draws(spec.rule, B, gamma, p_dtype, sampled, generator, prompt.device)
            else:                                        # return_p
                k = int(need.sum())
                extra = torch.full((B,), -1, dtype=torch.long, device=prompt.device)
                kept = (~need).nonzero().squeeze(1)
                rows = need.nonzero().squeeze(1)
                if B - k:
                    extra[kept] = wire.recv((B - k,), ID).long()
                p_rows = _from_int(wire.recv((k * V * p_dtype.itemsize // 4,), ID), p_dtype).view(k, V) if k else None
                t = time.perf_counter()
                sampling.uniform((B, gamma), dtype=p_dtype, device=prompt.device, generator=generator)
                weights = torch.ones(B, V if k else 1, dtype=p_dtype, device=prompt.device)
                if k:
                    p_n = p_rows
                    q_n = qn[rows, a[rows]]
                    residual = (p_n - q_n).clamp(min=0)
                    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
                    weights[rows] = residual
                drawn = sampling.sample_weights(weights, generator)
                if k:
                    extra[rows] = drawn[rows]
                    pending = (rows, drawn[rows])
            tokens = rules.emit(x, a, extra).tokens
            book.commit(tokens, a)
            proposer.commit(book.n_work)
            compute += time.perf_counter() - t
            wire.end_step()
        if pending is not None:                          # the last residual tokens, for the target's text
            wire.send(pending[1].to(ID))
            wire.end_step()
    end = time.perf_counter()
    out = book.generation(0, proposer.passes, end - start, prefill=decode_start - start)
    return {"generation": out, "compute": compute, "prefill_compute": prefill, "decode_seconds": end - decode_start,
            "prefill_seconds": decode_start - start}


# ---------------------------------------------------------------------------------------
# Rank 1: the target


def _target_loop(wire: Wire, target, job: dict, V: int, p_dtype) -> dict:
    spec = protocol(job["protocol"], job.get("typical"))
    prompt, prompt_lengths = job["prompt"], job["prompt_lengths"]
    gamma, max_new, warp = job["gamma"], job["max_new_tokens"], job["warp"]
    eos = generate._eos(job["eos_token_id"], V, prompt.device)
    B, P = prompt.shape
    device = prompt.device
    generator = generate._generator(job["seed"], B, device)
    sampled = not spec.greedy
    ragged = bool((prompt_lengths != P).any())
    needed = P + max_new + gamma - 1
    generate._fits(target, "target", needed, "for the target, the longest prompt + max_new_tokens + gamma - 1")
    compute = 0.0
    passes = 0
    start = time.perf_counter()
    with torch.inference_mode():
        target.setup_cache(B, needed)
        if P > 1:
            target(prompt[:, :-1], torch.zeros(B, dtype=torch.long, device=device), span=P - 1)
            passes += 1
            if ragged:
                target.cache.rollback(prompt_lengths - 1, check=False)
        prefill = time.perf_counter() - start
        book = _Book(prompt, prompt_lengths, max_new, gamma, eos)
        pending = None                                   # return_p: (a, kept-row tokens, rejected rows)
        step = 0
        while True:
            if pending is not None:                      # return_p: the draft's residual tokens arrive first
                a, extra, rows = pending
                extra[rows] = wire.recv((rows.numel(),), ID).long()
                t = time.perf_counter()
                book.commit(rules.emit(x, a, extra).tokens, a)
                target.cache.rollback(book.n_work - 1, check=False)
                compute += time.perf_counter() - t
                pending = None
            top, live = book.sync()
            if not live:
                break
            step += 1
            if spec.wire in ("two_round", "return_p"):
                words = wire.recv((B * gamma * (1 + p_dtype.itemsize // 4),), ID)
                ids = words[:B * gamma].view(B, gamma)
                q_x = _from_int(words[B * gamma:], p_dtype).view(B, gamma)
                q = None
            else:
                ids = wire.recv((B, gamma), ID)
                q = None
            if int(ids.min()) < 0:
                raise _not_finite("draft", step)
            if spec.wire == "q":
                q = wire.recv((B, gamma, V), _DTYPES[job["q_dtype"]])
            t = time.perf_counter()
            x = ids.long()
            last = book.seq.gather(1, (book.n_work - 1)[:, None])
            logits = target(torch.cat([last, x], dim=1), book.n_work - 1, span=top + gamma)
            passes += 1
            fine = bool(generate._finite(logits))
            p = warp(logits)
            if sampled:
                _replay_draft_draws(gamma, B, generator, device)
            compute += time.perf_counter() - t
            if not fine:
                wire.send(torch.full((B,), -1, dtype=ID, device=device))
                raise _not_finite("target", step)
            if spec.wire in ("q", "ids"):
                t = time.perf_counter()
                verdict = spec.rule.kernel(x, q, p, generator)
                compute += time.perf_counter() - t
                a, extra = verdict.accepted, verdict.tokens.gather(1, verdict.accepted[:, None]).squeeze(1)
                wire.send(a.to(ID))
                wire.send(extra.to(ID))
            else:
                t = time.perf_counter()
                pn = rules.normalised(p, p_dtype)
                p_x = pn[:, :gamma].gather(-1, x[..., None]).squeeze(-1)
                u = sampling.uniform((B, gamma), dtype=p_dtype, device=device, generator=generator)
                a = rules.accepted_prefix(u * q_x < p_x)
                rows_b = torch.arange(B, device=device)
                p_n = pn[rows_b, a]
                rejected = a < gamma
                need = rejected & book.active            # rows done already commit nothing: no rows for them
                k = int(need.sum())
                rows = need.nonzero().squeeze(1)
                compute += time.perf_counter() - t
                if spec.wire == "two_round":
                    wire.send(a.to(ID))
                    q_n = torch.zeros_like(p_n)
                    if k:
                        q_n[rows] = wire.recv((k, V), p_dtype)
                    t = time.perf_counter()
                    residual = torch.where(rejected[:, None], (p_n - q_n).clamp(min=0), p_n)
                    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
                    extra = sampling.sample_weights(residual, generator)
                    compute += time.perf_counter() - t
                    wire.send(extra.to(ID))
                else:                                    # return_p: bonus tokens here, p at rejections
                    t = time.perf_counter()
                    extra = sampling.sample_weights(p_n, generator)
                    compute += time.perf_counter() - t
                    kept = (~need).nonzero().squeeze(1)
                    wire.send(a.to(ID))
                    if B - k:
                        wire.send(extra[kept].to(ID))
                    if k:
                        wire.send(_as_int(p_n[rows].to(p_dtype)).flatten())
                        extra = extra.clone()
                        pending = (a, extra, rows)
                        continue
            t = time.perf_counter()
            book.commit(rules.emit(x, a, extra).tokens, a)
            target.cache.rollback(book.n_work - 1, check=False)
            compute += time.perf_counter() - t
    return {"compute": compute, "prefill_compute": prefill, "target_passes": passes,
            "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------
# The two processes


def _enter_netns(name: str) -> None:
    """Move this process into the network namespace ``name`` (``ip netns`` keeps its
    handle in /run/netns); Python 3.11 has no os.setns, so libc's is called."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:                  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name!r} failed")
    finally:
        os.close(fd)


def _build(spec):
    """A model from what the caller gave: a model, or a zero-argument callable making one."""
    if callable(spec) and not hasattr(spec, "setup_cache"):
        spec = spec()
    if not (callable(spec) and hasattr(spec, "setup_cache")):
        raise checks.InputTypeError(f"expected a model with setup_cache, or a callable returning one, got "
                                    f"{type(spec).__name__}")
    if hasattr(spec, "eval"):
        spec.eval()
    return spec


def _pack(result: dict, wire: Wire) -> dict:
    """A rank's answer in plain Python values (nothing shared between processes)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, generate.Generation):
            value = {f: (getattr(value, f).tolist() if isinstance(getattr(value, f), torch.Tensor)
                         else getattr(value, f)) for f in value.__dataclass_fields__}
        out[key] = value
    t = wire.reset()
    out["traffic"] = {"sent": t.sent, "received": t.received, "legs": t.legs, "messages": t.messages,
                      "seconds": t.seconds, "delay": t.delay, "steps": t.steps}
    return out


def _unpack_generation(d: dict) -> generate.Generation:
    tensors = {"tokens": torch.long, "lengths": torch.long, "origin": torch.int8, "accepted_lengths": torch.long}
    kw = {k: (torch.tensor(v, dtype=tensors[k]) if k in tensors else v) for k, v in d.items()}
    if kw["accepted_lengths"].dim() == 1:
        kw["accepted_lengths"] = kw["accepted_lengths"].view(0, kw["tokens"].shape[0])
    return generate.Generation(**kw)


def _pingpong(wire: Wire, rank: int, job: dict) -> dict:
    import torch.distributed as dist  # noqa: F401  (the wire uses it)

    reply = torch.zeros(job["reply_bytes"], dtype=torch.uint8, device=wire.device)
    timed = []
    for n in job["sizes"]:
        message = torch.zeros(n, dtype=torch.uint8, device=wire.device)
        samples = []
        for _ in range(job["warmup"] + job["repeats"]):
            if rank == 0:
                start = time.perf_counter()
                wire.send(message)
                wire.recv(reply.shape, torch.uint8)
                samples.append(time.perf_counter() - start)
            else:
                wire.recv(message.shape, torch.uint8)
                wire.send(reply)
        timed.append(samples[job["warmup"]:])
    return {"samples": timed}


def _warm(model, rank: int, job: dict) -> dict:
    """Run every pass shape one batch-1 generation of this length can meet (each span with
    each pass width: 1 and 2 tokens for the draft, γ + 1 for the target) once, so that
    kernels built on first use of a shape (oneDNN on the CPU) are built before timing."""
    P, n, g = job["prompt_tokens"], job["max_new_tokens"], job["gamma"]
    limit = P + n + g + 1
    widths = (1, 2) if rank == 0 else (g + 1,)
    start = time.perf_counter()
    with torch.inference_mode():
        model.setup_cache(1, limit)
        for span in range(max(1, P - 2), limit + 1):
            for T in widths:
                if span >= T:
                    model(torch.zeros(1, T, dtype=torch.long, device=job["device"]),
                          torch.tensor([span - T], device=job["device"]), span=span)
    return {"seconds": time.perf_counter() - start}


def _worker(rank: int, init: str, backend: str, env: dict, netns: str | None, spec, delay: float, device: str,
            control, results, timeout: float) -> None:
    """One rank: join the group, build its model, then serve jobs until told to stop."""
    try:
        torch.set_num_threads(1)
        if netns:
            _enter_netns(netns)
        os.environ.update(env)
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=init, rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=timeout))
        model = _build(spec)
        V = generate._vocab_size(model)
        mine = torch.tensor([V if V is not None else -1, _dtype_code(_model_dtype(model))], dtype=ID,
                            device=device)
        theirs = torch.empty(2, dtype=ID, device=device)
        if rank == 0:
            dist.send(mine, dst=1)
            dist.recv(theirs, src=1)
        else:
            dist.recv(theirs, src=0)
            dist.send(mine, dst=0)
        draft_info, target_info = (mine.tolist(), theirs.tolist()) if rank == 0 else (theirs.tolist(), mine.tolist())
        results.put((rank, "ready", {"draft_vocab": draft_info[0], "target_vocab": target_info[0],
                                     "p_dtype": target_info[1], "q_dtype": draft_info[1]}))
        wire = Wire(1 - rank, delay, device)
        import multiprocessing

        parent = multiprocessing.parent_process()
        while True:
            while not control.poll(1.0):                 # idle for as long as the parent lives
                if parent is not None and not parent.is_alive():
                    raise RuntimeError(f"rank {rank}: the parent process is gone")
            job = control.recv()
            if job is None:
                break
            try:
                if job["kind"] == "pingpong":
                    out = _pingpong(wire, rank, job)
                elif job["kind"] == "warm":
                    out = _warm(model, rank, {**job, "device": device})
                else:
                    job = {**job, "prompt": job["prompt"].to(device), "prompt_lengths": job["prompt_lengths"].to(device)}
                    V = target_info[0]
                    p_dtype = _DTYPES[target_info[1]]
                    job["q_dtype"] = draft_info[1]
                    if rank == 0:
                        out = _draft_loop(wire, model, job, V, p_dtype)
                    else:
                        out = _target_loop(wire, model, job, V, p_dtype)
                results.put((rank, "ok", _pack(out, wire)))
            except Exception as error:  # the peer sees the marker or a closed connection
                results.put((rank, "error", (type(error).__name__, str(error), traceback.format_exc())))
                break
        dist.destroy_process_group()
    except BaseException as error:  # report anything to the parent rather than dying silently
        results.put((rank, "error", (type(error).__name__, str(error), traceback.format_exc())))


@dataclass
class DistributedGeneration:
    """One generation by the two ranks, and what it took.

    Attributes:
        generation: the :class:`typsamp.generate.Generation` (rank 0's bookkeeping; the
            target's pass count filled in from rank 1).
        protocol: the protocol's name.
        up, down, legs: int64 [steps'] per decoding step: bytes draft -> target, bytes
            target -> draft, one-way legs (``return_p`` may add a last entry: the final
            residual tokens travelling alone).
        draft_compute, target_compute: seconds of forward passes and rule arithmetic after
            the prefill, on each rank.
        prefill_seconds, decode_seconds: rank 0's wall time of its prefill and of the loop.
        transport_seconds: rank 0's time inside send/recv (waiting for the target included).
        added_delay: seconds the transport step waited to emulate the link's delay (both ranks).
    """

    generation: generate.Generation
    protocol: str
    up: torch.Tensor
    down: torch.Tensor
    legs: torch.Tensor
    draft_compute: float
    target_compute: float
    prefill_seconds: float
    decode_seconds: float
    transport_seconds: float
    added_delay: float

    @property
    def tokens(self) -> torch.Tensor:
        return self.generation.tokens

    @property
    def bytes(self) -> int:
        return int(self.up.sum() + self.down.sum())

    @property
    def new_tokens(self) -> int:
        return int(self.generation.lengths.sum())

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.new_tokens, 1)

    @property
    def transfer_seconds(self) -> float:
        """Decode wall time not spent computing on either rank: the links' share."""
        return max(0.0, self.decode_seconds - self.draft_compute - self.target_compute)


class Pair:
    """Two processes, rank 0 the draft and rank 1 the target, joined by ``torch.distributed``.

    ``target`` and ``draft`` are models (small ones are pickled to the processes) or
    zero-argument callables that build one inside its process (``functools.partial(
    gemma.load, torch.bfloat16)``). ``link``: None for loopback (127.0.0.1), or a
    :class:`NetnsLink` that is already set up (``with NetnsLink(spec) as link:``).
    ``timeout`` bounds every wait (the group's, each job's). Use as a context manager; one
    pair serves many generations, each as :meth:`generate`.
    """

    def __init__(self, target, draft, *, link: NetnsLink | None = None, timeout: float = 120.0,
                 device: str = "cpu"):
        import multiprocessing

        self.timeout = checks.real("timeout", timeout, low=0.0, low_open=True)
        if link is not None and not isinstance(link, NetnsLink):
            raise checks.InputTypeError(f"`link` must be a NetnsLink or None, got {type(link).__name__}")
        if link is not None and not link.ready:
            raise ValueError("`link` is not set up: use it as `with NetnsLink(spec) as link:`")
        device = str(torch.device(device))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.link = link
        port = _free_port()
        if link is None:
            addr, envs, spaces, delay = "127.0.0.1", [{}, {}], [None, None], 0.0
            if "lo" in {name for _, name in socket.if_nameindex()}:
                envs = [{"GLOO_SOCKET_IFNAME": "lo"}, {"GLOO_SOCKET_IFNAME": "lo"}]
        else:
            addr = link.addresses[0]
            envs = [{"GLOO_SOCKET_IFNAME": link.interfaces[r], "NCCL_SOCKET_IFNAME": link.interfaces[r]} for r in (0, 1)]
            spaces, delay = list(link.namespaces), link.transport_delay
        self.controls, self.procs = [], []
        for rank, spec in ((0, draft), (1, target)):
            parent, child = ctx.Pipe()
            self.controls.append(parent)
            self.procs.append(ctx.Process(target=_worker, daemon=True,
                                          args=(rank, f"tcp://{addr}:{port}", backend, envs[rank], spaces[rank], spec,
                                                delay, device, child, self.results, self.timeout)))
        for p in self.procs:
            p.start()
        try:
            ready = self._collect("ready")
        except BaseException:
            self.close()
            raise
        info = ready[0]
        if info["draft_vocab"] >= 0 and info["target_vocab"] >= 0 and info["draft_vocab"] != info["target_vocab"]:
            self.close()
            raise ValueError(f"draft and target vocabularies differ: the draft has {info['draft_vocab']} tokens, "
                             f"the target {info['target_vocab']}")
        self.vocab_size = info["target_vocab"] if info["target_vocab"] >= 0 else info["draft_vocab"]
        self.value_bytes = _DTYPES[info["p_dtype"]].itemsize

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _collect(self, expect: str) -> dict:
        got = {}
        deadline = time.monotonic() + self.timeout
        while len(got) < 2:
            try:
                rank, status, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except _queue.Empty:
                self.close()
                raise RuntimeError(f"the two ranks did not answer within {self.timeout:g} s") from None
            if status == "error":
                name, message, trace = value
                self.close(wait=1.0)                     # the peer may be stuck in a recv: do not wait long
                if name in ("ValueError", "InputTypeError", "TypeError"):
                    raise ValueError(f"rank {rank}: {message}")
                raise RuntimeError(f"rank {rank} failed: {name}: {message}\n{trace}")
            got[rank] = value
        return got

    def _run(self, job: dict) -> dict:
        if not self.procs:
            raise RuntimeError("this Pair is closed")
        for c in self.controls:
            c.send(job)
        return self._collect("ok")

    def generate(self, prompt, max_new_tokens: int, *, protocol: str = "typical_greedy", gamma: int = 4,
                 warp: sampling.Warp = sampling.Warp(), eos_token_id=None, seed=None,
                 typical: TypicalAcceptance | None = None) -> DistributedGeneration:
        """One generation, as :func:`typsamp.generate.speculative` with the protocol's rule
        and drafts (``PROTOCOLS[protocol].rule``, greedy or sampled), the same arguments
        and the same seed semantics."""
        spec = globals()["protocol"](protocol, typical)
        warp = generate._check_warp(warp)
        prompt, lengths, _ = generate._prompt(prompt)
        max_new_tokens = checks.integer("max_new_tokens", max_new_tokens, low=1)
        gamma = checks.integer("gamma", gamma, low=1)
        generate._check_ids(prompt, self.vocab_size)
        generate._eos(eos_token_id, self.vocab_size, prompt.device)
        generate._generator(seed, prompt.shape[0], prompt.device)
        job = {"kind": "generate", "protocol": spec.name, "typical": typical, "prompt": prompt.cpu(),
               "prompt_lengths": lengths.cpu(), "max_new_tokens": max_new_tokens, "gamma": gamma, "warp": warp,
               "eos_token_id": eos_token_id, "seed": seed}
        got = self._run(job)
        d, t = got[0], got[1]
        generation = _unpack_generation(d["generation"])
        generation.target_passes = t["target_passes"]
        steps = torch.tensor(d["traffic"]["steps"], dtype=torch.long).view(-1, 3)
        return DistributedGeneration(
            generation=generation, protocol=spec.name, up=steps[:, 0], down=steps[:, 1], legs=steps[:, 2],
            draft_compute=d["compute"], target_compute=t["compute"], prefill_seconds=d["prefill_seconds"],
            decode_seconds=d["decode_seconds"], transport_seconds=d["traffic"]["seconds"],
            added_delay=d["traffic"]["delay"] + t["traffic"]["delay"])

    def pingpong(self, sizes, repeats: int = 10, *, warmup: int = 2,
                 reply_bytes: int = 2 * ID_BYTES) -> transfer.Measurement:
        """A ping-pong on this pair's link (delays included), as
        :func:`typsamp.transfer.measure_loopback` measures one; fit it with
        :func:`typsamp.transfer.fit_link`."""
        sizes = transfer._check_sizes(sizes)
        repeats = checks.integer("repeats", repeats, low=1)
        warmup = checks.integer("warmup", warmup, low=0)
        reply_bytes = checks.integer("reply_bytes", reply_bytes, low=1)
        got = self._run({"kind": "pingpong", "sizes": sizes, "repeats": repeats, "warmup": warmup,
                         "reply_bytes": reply_bytes})
        what = "loopback" if self.link is None else self.link.spec.describe()
        return transfer.Measurement(f"gloo send/recv ping-pong between the pair's ranks ({what})", sizes,
                                    tuple(tuple(s) for s in got[0]["samples"]), messages=2, reply_bytes=reply_bytes)

    def warm(self, prompt_tokens: int, max_new_tokens: int, gamma: int) -> float:
        """Run every pass shape a batch-1 generation of these sizes can meet once on each
        rank (see :func:`_warm`); returns the slower rank's seconds."""
        job = {"kind": "warm", "prompt_tokens": checks.integer("prompt_tokens", prompt_tokens, low=1),
               "max_new_tokens": checks.integer("max_new_tokens", max_new_tokens, low=1),
               "gamma": checks.integer("gamma", gamma, low=1)}
        got = self._run(job)
        return max(got[0]["seconds"], got[1]["seconds"])

    def close(self, wait: float = 5.0) -> None:
        """Stop both processes: ask them to leave, wait up to ``wait`` s each, then terminate."""
        for c in self.controls:
            with contextlib.suppress(Exception):
                c.send(None)
        for p in self.procs:
            p.join(timeout=wait)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for c in self.controls:
            with contextlib.suppress(Exception):
                c.close()
        self.procs, self.controls = [], []


def speculative(target, draft, prompt, max_new_tokens: int, *, protocol: str = "typical_greedy", gamma: int = 4,
                warp: sampling.Warp = sampling.Warp(), eos_token_id=None, seed=None,
                typical: TypicalAcceptance | None = None, timeout: float = 120.0) -> DistributedGeneration:
    """One generation on a fresh loopback :class:`Pair` (start-up included: for many
    generations keep one pair)."""
    with Pair(target, draft, timeout=timeout) as pair:
        return pair.generate(prompt, max_new_tokens, protocol=protocol, gamma=gamma, warp=warp,
                             eos_token_id=eos_token_id, seed=seed, typical=typical)


def _free_port() -> int:
    return transfer._free_port()


# ---------------------------------------------------------------------------------------
# Emulated links: two network namespaces and a veth pair


@dataclass(frozen=True)
class LinkSpec:
    """A link to emulate: ``rate`` in bit/s (None: unshaped) and a one-way ``delay`` in s."""

    name: str
    rate: float | None
    delay: float

    def __post_init__(self):
        if self.rate is not None:
            checks.real("rate", self.rate, low=0.0, low_open=True)
        checks.real("delay", self.delay, low=0.0)

    def describe(self) -> str:
        rate = "unshaped" if self.rate is None else f"{self.rate / 1e6:g} Mbit/s"
        return f"veth between two network namespaces, {rate}, one-way delay {self.delay * 1e3:g} ms"

    def nominal(self, base: transfer.Link) -> transfer.Link:
        """The link this spec should give: its rate (or ``base``'s bandwidth when unshaped)
        and ``base``'s latency plus the added delay."""
        bandwidth = base.bandwidth if self.rate is None else min(base.bandwidth, self.rate / 8)
        return transfer.Link(f"nominal {self.name}", bandwidth, base.latency + self.delay)


#: The shaped links the benchmark emulates.
LINKS = (
    LinkSpec("1gbit_0.2ms", 1e9, 0.2e-3),
    LinkSpec("100mbit_5ms", 100e6, 5e-3),
)


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


def can_make_namespaces() -> tuple[bool, str]:
    """(True, "") when this process may create network namespaces and shape them (root,
    ``ip`` and ``tc`` present), else (False, why)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "not root: creating network namespaces and veth pairs needs root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    return True, ""


def netem_available() -> tuple[bool, str]:
    """Whether ``tc`` can add a ``netem`` qdisc here, probed inside a throwaway namespace
    (the host's own interfaces are never touched). Returns (available, tc's message)."""
    ok, why = can_make_namespaces()
    if not ok:
        return False, why
    name = f"tsprobe{os.getpid()}"
    try:
        _ip("ip", "netns", "add", name)
        _ip("ip", "link", "set", "lo", "up", netns=name)
        done = _ip("tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", netns=name, check=False)
        return done.returncode == 0, (done.stderr or done.stdout).strip()
    finally:
        _ip("ip", "netns", "del", name, check=False)


class NetnsLink:
    """Two network namespaces joined by a veth pair, shaped as ``spec`` says.

    ``with NetnsLink(spec) as link:`` creates namespaces ``typsamp<pid>a`` and ``...b``,
    a veth pair with 10.213.0.1/30 on the draft's side and 10.213.0.2/30 on the target's,
    and shapes each direction's egress with ``tc``: ``netem delay ... rate ...`` where the
    kernel has netem, else ``tbf`` at the rate (the delay is then added by the transport
    step: :attr:`transport_delay`). Leaving the block deletes both namespaces (and with
    them the veth pair). Raises ``PermissionError`` when not root.
    """

    def __init__(self, spec: LinkSpec):
        if not isinstance(spec, LinkSpec):
            raise checks.InputTypeError(f"`spec` must be a LinkSpec, got {type(spec).__name__}")
        self.spec = spec
        tag = os.getpid()
        self.namespaces = (f"typsamp{tag}a", f"typsamp{tag}b")
        self.interfaces = (f"tsa{tag}", f"tsb{tag}")
        self.addresses = ("10.213.0.1", "10.213.0.2")
        self.ready = False
        self.delay_by = "none"
        self.transport_delay = 0.0
        self.commands: list[str] = []

    def _run(self, *args: str, netns: str | None = None) -> None:
        self.commands.append(" ".join((["ip netns exec", netns] if netns else []) + list(args)))
        done = _ip(*args, netns=netns, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"`{self.commands[-1]}` failed: {(done.stderr or done.stdout).strip()}")

    def __enter__(self) -> NetnsLink:
        ok, why = can_make_namespaces()
        if not ok:
            raise PermissionError(f"cannot emulate the link {self.spec.name!r}: {why}")
        netem, _ = netem_available()
        try:
            for ns in self.namespaces:
                self._run("ip", "netns", "add", ns)
            a, b = self.interfaces
            self._run("ip", "link", "add", a, "netns", self.namespaces[0], "type", "veth", "peer", "name", b,
                      "netns", self.namespaces[1])
            for ns, dev, addr in zip(self.namespaces, self.interfaces, self.addresses):
                self._run("ip", "addr", "add", f"{addr}/30", "dev", dev, netns=ns)
                self._run("ip", "link", "set", dev, "up", netns=ns)
                self._run("ip", "link", "set", "lo", "up", netns=ns)
                if netem and (self.spec.delay > 0 or self.spec.rate is not None):
                    args = ["tc", "qdisc", "add", "dev", dev, "root", "netem", "limit", "100000"]
                    if self.spec.delay > 0:
                        args += ["delay", f"{self.spec.delay * 1e6:.0f}us"]
                    if self.spec.rate is not None:
                        args += ["rate", f"{self.spec.rate:.0f}bit"]
                    self._run(*args, netns=ns)
                elif self.spec.rate is not None:
                    # burst: at least one 64 KiB GSO segment and 4 ms at the rate
                    burst = max(131072, int(self.spec.rate / 8 * 4e-3))
                    self._run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.spec.rate:.0f}bit",
                              "burst", str(burst), "latency", "400ms", netns=ns)
            if self.spec.delay > 0:
                self.delay_by = "netem" if netem else "transport"
                self.transport_delay = 0.0 if netem else self.spec.delay
            self.shaped_by = "netem" if netem else ("tbf" if self.spec.rate is not None else "none")
            self.ready = True
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("ip", "netns", "del", ns, check=False)
        self.ready = False


def clean_namespaces() -> list[str]:
    """Delete namespaces a killed benchmark left behind (``typsamp<pid>a|b`` whose process
    is gone); returns their names."""
    import re

    listed = _ip("ip", "netns", "list", check=False).stdout.split()
    removed = []
    for name in listed:
        match = re.fullmatch(r"typsamp(\d+)[ab]", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _ip("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------
# The benchmark: every protocol on every link with the real pair of chapter 9

#: Settings of ``python -m typsamp.distributed bench`` (``--quick`` overrides with QUICK).
BENCH_SETTINGS = {
    "tokens": 32,             # new tokens per generation
    "prompts": 2,             # test prompts (bench.llm_prompts: round robin over its categories)
    "prompt_tokens": 64,      # prompt length (BOS + the prompt's last tokens)
    "gamma": 4,
    "temperature": 0.7,       # every protocol at this T (greedy drafts are exact at any T)
    "seed": 0,
    "draft": "distil",        # "distil" (distil.load_draft) or "trimmed" (drafts.trimmed_draft)
    "target_dtype": "bfloat16",
    "pingpong_sizes": (8, 1024, 65536, 1048576, 4194304),   # up to one step's q (gamma 4, V 262k, float32)
    "pingpong_repeats": 5,
}
QUICK = {"tokens": 16, "prompts": 1, "pingpong_repeats": 3}
#: The links ``--quick`` measures (loopback is always first).
QUICK_LINKS = ("100mbit_5ms",)
DRAFT_DESCRIPTIONS = {
    "distil": "a 2-layer Gemma draft on the target's embedding, trimmed head, distilled (typsamp.distil.load_draft)",
    "trimmed": "the target in bfloat16 with its head trimmed to the kept tokens (typsamp.drafts.trimmed_draft)",
}


def _loaders(draft: str, target_dtype: str):
    import functools

    from typsamp import distil, drafts, gemma

    dtype = getattr(torch, target_dtype)
    target = functools.partial(gemma.load, dtype)
    if draft == "distil":
        return target, functools.partial(distil.load_draft, torch.bfloat16)
    if draft == "trimmed":
        return target, functools.partial(drafts.trimmed_draft, torch.bfloat16)
    raise ValueError(f"`draft` must be 'distil' or 'trimmed', got {draft!r}")


def _measure_link(pair: Pair, name: str, s: dict) -> tuple[dict, transfer.Link | None]:
    m = pair.pingpong(s["pingpong_sizes"], s["pingpong_repeats"], warmup=1)
    record = {"sizes": list(m.sizes), "fastest_s": [round(t, 7) for t in m.fastest],
              "median_s": [round(t, 7) for t in m.median]}
    try:
        link = transfer.fit_link(m, name)
        record.update(bandwidth_bytes_per_s=link.bandwidth, latency_s=link.latency)
    except ValueError as error:
        link = None
        record["fit_error"] = str(error)
    return record, link


def _aggregate(runs: list[DistributedGeneration], gamma: int) -> dict:
    steps = sum(r.generation.steps for r in runs)
    tokens = sum(r.new_tokens for r in runs)
    accepted = sum(r.generation.accepted for r in runs)
    examined = sum(r.generation.examined for r in runs)
    decode = sum(r.decode_seconds for r in runs)
    return {
        "generations": len(runs), "new_tokens": tokens, "steps": steps,
        "tokens_per_step": tokens / steps, "alpha": accepted / examined if examined else float("nan"),
        "decode_seconds": decode, "whole_seconds": decode + sum(r.prefill_seconds for r in runs),
        "draft_compute_s": sum(r.draft_compute for r in runs), "target_compute_s": sum(r.target_compute for r in runs),
        "bytes": sum(r.bytes for r in runs), "up_bytes": sum(int(r.up.sum()) for r in runs),
        "down_bytes": sum(int(r.down.sum()) for r in runs), "legs": sum(int(r.legs.sum()) for r in runs),
        "added_delay_s": sum(r.added_delay for r in runs), "transport_s": sum(r.transport_seconds for r in runs),
    }


def _row(name: str, link_name: str, agg: dict, base: dict, link: transfer.Link | None,
         nominal: transfer.Link | None, V: int, gamma: int, value_bytes: int) -> dict:
    """One (protocol, link) row: measured, counted, and the chapter's model."""
    steps, tokens = agg["steps"], agg["new_tokens"]
    alpha = base["alpha"]                                 # this protocol's α on loopback (same tokens)
    E = float(expected_tokens(min(max(alpha, 0.0), 1.0), gamma))
    load = transfer.payload(name, V, gamma, value_bytes, alpha=min(max(alpha, 0.0), 1.0))
    compute_step = (base["draft_compute_s"] + base["target_compute_s"]) / base["steps"]
    measured_transfer_step = max(0.0, agg["decode_seconds"] - agg["draft_compute_s"] - agg["target_compute_s"]) / steps
    row = {
        "protocol": name, "link": link_name,
        "tokens_per_s": tokens / agg["decode_seconds"],
        "tokens_per_s_with_prefill": tokens / agg["whole_seconds"],
        "ms_per_token": 1e3 * agg["decode_seconds"] / tokens,
        "bytes_per_token": agg["bytes"] / tokens,
        "bytes_per_step": agg["bytes"] / steps,
        "model_bytes_per_step": load.bytes,
        "legs_per_step": agg["legs"] / steps,
        "model_messages_per_step": load.messages,
        "alpha": alpha, "tokens_per_step": tokens / steps, "model_tokens_per_step": E,
        "draft_compute_ms_per_step": 1e3 * agg["draft_compute_s"] / steps,
        "target_compute_ms_per_step": 1e3 * agg["target_compute_s"] / steps,
        "transfer_ms_per_step": 1e3 * measured_transfer_step,
        "transfer_fraction": measured_transfer_step / (agg["decode_seconds"] / steps),
        "added_delay_ms_per_step": 1e3 * agg["added_delay_s"] / steps,
        **{k: agg[k] for k in ("generations", "new_tokens", "steps", "bytes", "up_bytes", "down_bytes", "legs",
                               "decode_seconds")},
    }
    for label, model_link in (("", link), ("_nominal_link", nominal)):
        if model_link is None:
            continue
        transfer_step = model_link.seconds(load.bytes, load.messages)
        predicted = E / (compute_step + transfer_step)
        row[f"model_transfer_ms_per_step{label}"] = 1e3 * transfer_step
        row[f"predicted_tokens_per_s{label}"] = predicted
        row[f"measured_over_predicted{label}"] = row["tokens_per_s"] / predicted
        row[f"predicted_tokens_per_s{label}_measured_tokens_per_step"] = (tokens / steps) / (compute_step + transfer_step)
    return row


def bench(*, quick: bool = False, settings: dict | None = None, links: tuple[str, ...] | None = None,
          out: Path | str | None = None, progress: bool = True) -> dict:
    """Every protocol on loopback and on each emulated link with the real pair (Gemma 3
    270M target, a real draft), measured end to end; writes ``out`` (default
    ``notebooks/results/distributed_bench.json``) and returns the record."""
    from tqdm.auto import tqdm

    from typsamp import bench as _bench
    from typsamp import gemma, provenance

    s = {**BENCH_SETTINGS, **(QUICK if quick else {}), **(settings or {})}
    unknown = set(s) - set(BENCH_SETTINGS)
    if unknown:
        raise ValueError(f"`settings` has unknown keys {sorted(unknown)}; use {sorted(BENCH_SETTINGS)}")
    known = {spec.name: spec for spec in LINKS}
    links = tuple(links) if links is not None else (QUICK_LINKS if quick else tuple(known))
    for name in links:
        if name not in known:
            raise ValueError(f"unknown link {name!r}; choose among {', '.join(known)}")
    torch.set_num_threads(1)
    clock = time.perf_counter()
    where = provenance.machine("cpu")
    names, rows_prompt = _bench.llm_prompts(gemma.load_tokenizer(), s["prompts"], s["prompt_tokens"])
    target_loader, draft_loader = _loaders(s["draft"], s["target_dtype"])
    allowed, why = can_make_namespaces()
    netem, netem_message = netem_available() if allowed else (False, why)
    if not allowed:
        print(f"distributed bench: {why}; measuring loopback only", file=sys.stderr)
    plan = [("loopback", None)] + ([(n, known[n]) for n in links] if allowed else [])
    bar = tqdm(total=len(plan) * (len(PROTOCOLS) * len(rows_prompt) + 2), desc="distributed bench",
               disable=not progress)
    warp = sampling.Warp(temperature=s["temperature"])
    result_links, rows, base_runs, base_tokens = [], [], {}, {}
    loopback_link = None
    for link_name, spec in plan:
        with contextlib.ExitStack() as stack:
            netns = stack.enter_context(NetnsLink(spec)) if spec is not None else None
            pair = stack.enter_context(Pair(target_loader, draft_loader, link=netns, timeout=900.0))
            V, d = pair.vocab_size, pair.value_bytes
            bar.set_postfix_str(f"{link_name}: ping-pong")
            measured, fitted = _measure_link(pair, link_name, s)
            if spec is None:
                loopback_link = fitted
            nominal = (spec.nominal(loopback_link) if spec is not None and loopback_link is not None
                       else fitted)
            bar.update(1)
            bar.set_postfix_str(f"{link_name}: warm-up")
            warm_seconds = pair.warm(s["prompt_tokens"], s["tokens"], s["gamma"])
            pair.generate(rows_prompt[:1], s["tokens"], protocol="rejection_sampled_return_p", gamma=s["gamma"],
                          warp=warp, seed=s["seed"])
            bar.update(1)
            for name in PROTOCOLS:
                bar.set_postfix_str(f"{link_name}: {name}")
                runs = []
                for i in range(rows_prompt.shape[0]):
                    runs.append(pair.generate(rows_prompt[i:i + 1], s["tokens"], protocol=name, gamma=s["gamma"],
                                              warp=warp, seed=s["seed"] + i))
                    bar.update(1)
                agg = _aggregate(runs, s["gamma"])
                tokens = [r.tokens.tolist() for r in runs]
                if spec is None:
                    base_runs[name], base_tokens[name] = agg, tokens
                row = _row(name, link_name, agg, base_runs[name], fitted, nominal, V, s["gamma"], d)
                row["same_tokens_as_loopback"] = tokens == base_tokens[name]
                rows.append(row)
            entry = {"name": link_name, "ping_pong": measured, "warm_up_seconds": round(warm_seconds, 1),
                     "fitted": None if fitted is None else {"bandwidth_bytes_per_s": fitted.bandwidth,
                                                            "latency_s": fitted.latency},
                     "nominal": None if nominal is None else {"bandwidth_bytes_per_s": nominal.bandwidth,
                                                              "latency_s": nominal.latency}}
            if spec is None:
                entry["what"] = "loopback: gloo over TCP on 127.0.0.1 between two processes"
            else:
                entry.update(what=spec.describe(), rate_bit_per_s=spec.rate, delay_s=spec.delay,
                             delay_by=netns.delay_by, shaped_by=netns.shaped_by, commands=list(netns.commands))
            result_links.append(entry)
    bar.close()
    fastest = {}
    for link_name, _ in plan:
        here = sorted((r for r in rows if r["link"] == link_name), key=lambda r: -r["tokens_per_s"])
        fastest[link_name] = [r["protocol"] for r in here]
    record = {
        "benchmark": "speculative decoding with the draft and the target in two processes over torch.distributed "
                     "(gloo), every protocol of typsamp.transfer on loopback and on emulated links",
        "command": "python -m typsamp.distributed bench" + (" --quick" if quick else ""),
        "method": (
            f"target: Gemma 3 270M in {s['target_dtype']} (typsamp.gemma.load), rank 1; draft: "
            f"{DRAFT_DESCRIPTIONS[s['draft']]}, rank 0; one torch thread per process. {len(names)} test prompt(s) "
            f"of {s['prompt_tokens']} tokens (typsamp.bench.llm_prompts), {s['tokens']} new tokens each, gamma "
            f"{s['gamma']}, T = {s['temperature']}, seed {s['seed']} + prompt index; per link, every pass shape of a generation run once on each rank "
            "(Pair.warm: oneDNN builds a kernel per new shape) and one warm-up generation. "
            "tokens_per_s = new tokens / decode wall time on rank 0 (prefill excluded; with_prefill includes it). "
            "Bytes and legs (one-way runs of messages) counted by the loop itself. compute = forward passes and rule "
            "arithmetic on each rank; transfer_ms_per_step = decode time minus both ranks' compute. Model: "
            "E(alpha, gamma) / (compute per step on loopback + m*lambda + bytes/beta), with alpha this protocol's "
            "measured acceptance rate (identical tokens on every link), payload from typsamp.transfer.payload, and "
            "lambda, beta fitted (typsamp.transfer.fit_link, fastest of the repeats) to a ping-pong on the same "
            "link; _nominal_link uses the link's rate and loopback's latency plus the added delay. E(alpha, gamma) "
            "assumes independent acceptances and ignores that a generation's last step is cut at the token "
            "budget; predicted_*_measured_tokens_per_step puts the measured tokens per step in its place. "
            "Shaped links: "
            "two network namespaces joined by a veth pair; rate by tc (netem where available, else tbf); one-way "
            "delay by netem where available, else waited by the transport step before each leg (delay_by)."),
        "machine": where,
        "versions": provenance.versions(),
        "settings": {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "prompts": names,
                     "threads_per_process": 1},
        "netem": {"available": netem, "message": netem_message},
        "namespaces": {"allowed": allowed, "why_not": why},
        "vocab_size": V,
        "links": result_links,
        "rows": rows,
        "fastest_first": fastest,
        "seconds": round(time.perf_counter() - clock, 1),
    }
    path = Path(out) if out is not None else provenance.ROOT / provenance.RESULTS / "distributed_bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def answer(record: dict) -> dict:
    """The chapter's one-table answer from a bench record, per link: the protocols fastest
    first, whether shipping q costs more than it buys (the plain ``rejection_sampled``
    slower than the better lazy protocol), and each ids-only protocol's and return-p's
    tokens/s relative to the plain protocol."""
    if not isinstance(record, dict) or not isinstance(record.get("rows"), list):
        raise ValueError("`record` must be a distributed bench record (a dict with 'rows')")
    out = {}
    links = list(dict.fromkeys(r["link"] for r in record["rows"]))
    for link in links:
        rows = {r["protocol"]: r for r in record["rows"] if r["link"] == link}
        missing = set(PROTOCOLS) - set(rows)
        if missing:
            raise ValueError(f"link {link!r} lacks rows for {sorted(missing)}")
        rate = {name: rows[name]["tokens_per_s"] for name in PROTOCOLS}
        plain = rate["rejection_sampled"]
        lazy = max(rate["rejection_sampled_two_round"], rate["rejection_sampled_return_p"])
        out[link] = {
            "fastest_first": sorted(rate, key=lambda n: -rate[n]),
            "shipping_q_costs_more_than_it_buys": plain < max(lazy, rate["rejection_greedy"], rate["typical_greedy"]),
            "relative_to_shipping_q": {n: rate[n] / plain for n in PROTOCOLS},
            "measured_over_predicted": {n: rows[n].get("measured_over_predicted") for n in PROTOCOLS},
        }
    return out


def table(record: dict) -> str:
    """The bench record as a text table: per (link, protocol) measured and predicted
    tokens/s, bytes per token, alpha, and the transfer share of the decode time."""
    answer(record)                                       # checks the record
    lines = [f"{'link':<12} {'protocol':<28} {'tok/s':>6} {'model':>6} {'meas/model':>10} {'bytes/token':>12} "
             f"{'alpha':>6} {'transfer':>8}"]
    for r in record["rows"]:
        pred = r.get("predicted_tokens_per_s")
        model = "-" if pred is None else f"{pred:.2f}"
        ratio = "-" if pred is None else f"{r['tokens_per_s'] / pred:.2f}"
        lines.append(f"{r['link']:<12} {r['protocol']:<28} {r['tokens_per_s']:6.2f} {model:>6} {ratio:>10} "
                     f"{r['bytes_per_token']:12,.0f} {r['alpha']:6.3f} {r['transfer_fraction']:8.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m typsamp.distributed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="every protocol on loopback and emulated links with the real pair (root "
                                     "for the emulated links); writes notebooks/results/distributed_bench.json")
    p.add_argument("--quick", action="store_true", help=f"fewer tokens and prompts, links loopback + {QUICK_LINKS}")
    p.add_argument("--out", default=None, help="where to write the JSON (default notebooks/results/distributed_bench.json)")
    p.add_argument("--draft", choices=("distil", "trimmed"), default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--links", default=None, help=f"comma-separated, among {', '.join(s.name for s in LINKS)}")
    p.add_argument("--no-progress", action="store_true")
    sub.add_parser("clean", help="delete network namespaces that a killed benchmark left behind (root)")
    args = parser.parse_args(argv)
    if args.command == "clean":
        print("removed: " + (", ".join(clean_namespaces()) or "nothing"))
        return 0
    settings = {k: v for k, v in (("draft", args.draft), ("tokens", args.tokens), ("prompts", args.prompts))
                if v is not None}
    links = tuple(x for x in args.links.split(",") if x) if args.links else None
    record = bench(quick=args.quick, settings=settings, links=links, out=args.out, progress=not args.no_progress)
    print(table(record))
    same = all(r["same_tokens_as_loopback"] for r in record["rows"])
    print(f"same tokens on every link: {same}; {record['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
