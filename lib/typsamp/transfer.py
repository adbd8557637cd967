"""What draft and target must exchange per verification step, in bytes and time (chapter 7).

When the draft and the target run on different devices (two GPUs, a CPU and a GPU, two
machines), every verification step is a conversation between them. The draft sends its
γ proposed tokens; the target verifies them and answers with how many it accepted and
the one token it adds. What else must travel depends on the rule:

``"rejection_sampled"``
    Speculative sampling with drafts *sampled* from q (Leviathan et al., Chen et al.).
    The test min(1, p_i(x_i) / q_i(x_i)) needs q_i(x_i), and the residual
    norm(max(0, p_i - q_i)) after a rejection needs all of q_i, so the plain protocol
    ships q for every drafted position with the drafts: γ·V values, one round trip.
``"rejection_sampled_two_round"``
    The same rule, lazily. Round one carries the γ ids and the γ numbers q_i(x_i); only if
    some draft is rejected (probability 1 - α^γ when each is accepted independently with
    probability α) does the target ask for the full q at the rejected position, which
    costs V values and a second round trip.
``"rejection_sampled_return_p"``
    The same rule again, with the residual drawn on the *draft's* side: round one as in
    the two-round protocol, but after a rejection the target's answer carries p at the
    rejected position (V values) instead of a token; the draft, which holds q there,
    draws from norm(max(0, p - q)) itself and sends the result with its next drafts
    (one more id). Same expected bytes as the two-round protocol, one round trip always.
``"rejection_greedy"``
    Rejection sampling with *deterministic* drafts (greedy, or any fixed rule): q is a
    point mass on x_i, so the target needs nothing but the ids.
``"match_sampled"``
    Exact match with sampled drafts: the target draws its own token y_i from p_i and keeps
    the draft while x_i = y_i (:class:`typsamp.speculative.ExactMatch`). The test never
    reads q, so only the ids travel.
``"typical_greedy"``
    Medusa's typical acceptance (Cai et al.) of greedy drafts: accept x_i when
    p_i(x_i) > min(ε, δ·exp(-H(p_i))), a test on the target's distribution alone. Ids only.

The names are the method labels used everywhere in the project (``bench``, the
chapters): ``f"{rule.name}_{'sampled' | 'greedy'}"`` for a rule and how its drafts are
made, as :data:`typsamp.bench.METHODS` spells them; the two lazy variants of
``rejection_sampled`` add a suffix naming their protocol.

All three sampled protocols compute the same rule, so their output has exactly the
target's distribution; they differ only in what travels when. One step, one sequence (a batch
of B sequences moves B times as much in the same number of messages):

    up   (draft -> target)   γ·i  [+ γ·V·d | + γ·d, + r·(V·d) or + r·i]
    down (target -> draft)   2·i  (accepted count, added token) [return_p: + r·(V·d - i)]

with V the vocabulary, d the bytes per probability (2 for 16-bit, 4 for 32-bit), i the
bytes per token id (4: int32 holds any vocabulary below 2^31, as serving engines use),
and r = 1 - α^γ the probability that the step rejects a draft.

Time is modelled per message, sent one after the other (no overlap with compute):

    t = m·λ + bytes / β

for m one-way messages over a link with one-way latency λ and bandwidth β. Expected
bytes and messages are linear in r, so this is also the expected time. Per generated
token, divide by the expected tokens per step E = (1 - α^{γ+1}) / (1 - α)
(:func:`typsamp.speculative.expected_tokens`); :func:`break_even` says how much compute
per step makes a rule that accepts more, but moves more, the faster one.

The model is checked against the real thing by :mod:`typsamp.distributed`, which runs
each protocol with the draft and the target in two processes and counts the bytes each
step moves (they are exactly this payload for the step's outcome).

:data:`LINKS` holds nominal figures for common links; :func:`measure_loopback` measures a
real socket between two processes with ``torch.distributed`` (gloo over TCP on
127.0.0.1), :func:`measure_pcie` a host-to-GPU copy where CUDA is present, and
:func:`fit_link` turns either into a :class:`Link` with fitted λ and β.
"""

from __future__ import annotations

import datetime
import math
import os
import queue as _queue
import socket
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Sequence

import torch

from typsamp import checks, speculative

__all__ = [
    "RULES",
    "ID_BYTES",
    "Link",
    "LINKS",
    "Payload",
    "StepCost",
    "Measurement",
    "value_bytes",
    "payload",
    "step_cost",
    "break_even",
    "measure_loopback",
    "measure_pcie",
    "fit_link",
]

RULES = (
    "rejection_sampled",
    "rejection_sampled_two_round",
    "rejection_sampled_return_p",
    "rejection_greedy",
    "match_sampled",
    "typical_greedy",
)
#: The protocols that ship nothing but token ids.
_IDS_ONLY = ("rejection_greedy", "match_sampled", "typical_greedy")
ID_BYTES = 4  # int32 token ids
_NEEDS_ALPHA = ("rejection_sampled_two_round", "rejection_sampled_return_p")


@dataclass(frozen=True)
class Link:
    """A link between the draft's device and the target's.

    Attributes:
        name: what it is.
        bandwidth: bytes per second, one direction.
        latency: seconds for one message to arrive, one way, before its first byte counts.
    """

    name: str
    bandwidth: float
    latency: float

    def __post_init__(self):
        checks.real("bandwidth", self.bandwidth, low=0.0, low_open=True)
        checks.real("latency", self.latency, low=0.0)

    def seconds(self, nbytes: float, messages: float = 1.0) -> float:
        """Modelled time m·λ + bytes/β to send ``nbytes`` in ``messages`` messages."""
        return messages * self.latency + nbytes / self.bandwidth


# Nominal per-direction bandwidths; latencies are assumptions (order of magnitude of
# one message through the usual software stack), not measurements. Chapter 7 measures
# a loopback socket, and a host-to-GPU copy where a GPU is present, to set beside them.
LINKS = (
    # NVLink 4 (H100 SXM): 900 GB/s both directions together; ~2 µs assumed.
    Link("NVLink 4", 450e9, 2e-6),
    # PCIe: 32 GT/s (5.0) or 16 GT/s (4.0) per lane, x16, 128b/130b coding; ~5 µs assumed
    # (a DMA copy issued through a driver).
    Link("PCIe 5.0 x16", 63e9, 5e-6),
    Link("PCIe 4.0 x16", 31.5e9, 5e-6),
    # Ethernet line rates; latencies assumed for TCP through the kernel within one
    # datacentre (RDMA fabrics do better, links across buildings or sites far worse).
    Link("100 GbE", 12.5e9, 10e-6),
    Link("25 GbE", 3.125e9, 20e-6),
    Link("10 GbE", 1.25e9, 30e-6),
    Link("1 GbE", 125e6, 50e-6),
)


def value_bytes(dtype) -> int:
    """Bytes per probability: a floating ``torch.dtype``, or 1, 2, 4 or 8 directly."""
    if isinstance(dtype, torch.dtype):
        if dtype not in checks.FLOAT_DTYPES and dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise checks.InputTypeError(f"`dtype` must be a floating dtype, got {dtype}")
        return dtype.itemsize
    checks.integer("dtype", dtype, low=1)
    if dtype not in (1, 2, 4, 8):
        raise ValueError(f"`dtype` in bytes must be 1, 2, 4 or 8, got {dtype}")
    return int(dtype)


@dataclass(frozen=True)
class Payload:
    """Expected traffic of one verification step of one sequence.

    Attributes:
        up: bytes from the draft to the target.
        down: bytes from the target to the draft.
        messages: one-way messages (2 per round trip).
    """

    up: float
    down: float
    messages: float

    @property
    def bytes(self) -> float:
        return self.up + self.down

    @property
    def round_trips(self) -> float:
        return self.messages / 2


def _check_rule(rule) -> str:
    if not isinstance(rule, str):
        raise checks.InputTypeError(f"`rule` must be a string, got {type(rule).__name__}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    return rule


def payload(rule: str, V: int, gamma: int, dtype=torch.float32, *, alpha: float | None = None,
            id_bytes: int = ID_BYTES) -> Payload:
    """Expected bytes each way, and messages, for one verification step of ``rule``.

    With d = :func:`value_bytes` (``dtype``), i = ``id_bytes`` and r = 1 - α^γ:

    ====================================  =====================  ===================  ========
    rule                                  up                     down                 messages
    ====================================  =====================  ===================  ========
    rejection_sampled                     γ·i + γ·V·d            2·i                  2
    rejection_sampled_two_round           γ·i + γ·d + r·V·d      2·i                  2 + 2r
    rejection_sampled_return_p            γ·i + γ·d + r·i        (2 - r)·i + r·V·d    2
    ids only (see below)                  γ·i                    2·i                  2
    ====================================  =====================  ===================  ========

    The ids-only protocols are ``rejection_greedy``, ``match_sampled`` and ``typical_greedy``.

    ``alpha`` (the probability that a draft is accepted, the same at every position and
    independent across them) is needed by the two lazy protocols only.
    """
    rule = _check_rule(rule)
    V = checks.integer("V", V, low=1)
    gamma = checks.integer("gamma", gamma, low=1)
    d = value_bytes(dtype)
    i = checks.integer("id_bytes", id_bytes, low=1)
    if alpha is None:
        if rule in _NEEDS_ALPHA:
            raise ValueError(f"rule {rule!r} needs `alpha`: its traffic depends on how often a draft is rejected")
    else:
        alpha = checks.real("alpha", alpha, low=0.0, high=1.0)

    if rule == "rejection_sampled":
        return Payload(up=gamma * i + gamma * V * d, down=2 * i, messages=2)
    if rule in _IDS_ONLY:
        return Payload(up=gamma * i, down=2 * i, messages=2)
    r = 1 - alpha ** gamma
    if rule == "rejection_sampled_two_round":
        return Payload(up=gamma * (i + d) + r * V * d, down=2 * i, messages=2 + 2 * r)
    return Payload(up=gamma * (i + d) + r * i, down=(2 - r) * i + r * V * d, messages=2)


@dataclass(frozen=True)
class StepCost:
    """:func:`payload` on a :class:`Link`, per step and per generated token.

    Attributes:
        rule, link: what was costed.
        payload: the expected traffic of one step.
        seconds: modelled time of one step's messages, m·λ + bytes/β.
        tokens: expected tokens one step emits, (1 - α^{γ+1}) / (1 - α).
    """

    rule: str
    link: Link
    payload: Payload
    seconds: float
    tokens: float

    @property
    def bytes(self) -> float:
        return self.payload.bytes

    @property
    def round_trips(self) -> float:
        return self.payload.round_trips

    @property
    def bytes_per_token(self) -> float:
        return self.payload.bytes / self.tokens

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / self.tokens

    def time_per_token(self, compute: float = 0.0) -> float:
        """(compute + seconds) / tokens: wall time per generated token when each step also
        spends ``compute`` seconds on forward passes (γ draft passes and one target pass)."""
        compute = checks.real("compute", compute, low=0.0)
        return (compute + self.seconds) / self.tokens


def break_even(a: StepCost, b: StepCost) -> float:
    """The compute time per step from which ``a`` is at least as fast per token as ``b``.

    With c the transfer time and E the tokens per step of each,
    (t + c_a) / E_a <= (t + c_b) / E_b  holds for every t >= t* when E_a > E_b, with

        t* = max(0, (c_a·E_b - c_b·E_a) / (E_a - E_b)).

    A rule that accepts more but moves more is worth it once the forward passes it saves
    outweigh its transfers. Returns 0.0 when ``a`` is never slower, and ``math.inf`` when
    compute never makes ``a`` win (E_a < E_b, or E_a = E_b and c_a > c_b).
    """
    for name, cost in (("a", a), ("b", b)):
        if not isinstance(cost, StepCost):
            raise checks.InputTypeError(f"`{name}` must be a StepCost, got {type(cost).__name__}")
    gain = a.tokens - b.tokens
    if gain < 0 or (gain == 0 and a.seconds > b.seconds):
        return math.inf
    if gain == 0:
        return 0.0
    return max(0.0, (a.seconds * b.tokens - b.seconds * a.tokens) / gain)


def step_cost(rule: str, V: int, gamma: int, dtype, alpha: float, link: Link, *,
              id_bytes: int = ID_BYTES) -> StepCost:
    """Bytes, messages and modelled time of one step of ``rule`` over ``link``, and per token.

    ``alpha`` is the acceptance probability *of this rule* for the draft/target pair
    (rules differ: Σ min(p, q) for sampled drafts, E[p(x)] for deterministic ones, the
    rate of the typical test for typical acceptance).
    """
    if not isinstance(link, Link):
        raise checks.InputTypeError(f"`link` must be a Link, got {type(link).__name__}")
    alpha = checks.real("alpha", alpha, low=0.0, high=1.0)
    load = payload(rule, V, gamma, dtype, alpha=alpha, id_bytes=id_bytes)
    tokens = float(speculative.expected_tokens(alpha, gamma))
    return StepCost(rule, link, load, link.seconds(load.bytes, load.messages), tokens)


# ---------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class Measurement:
    """Times of exchanging messages of given sizes over a real link.

    Attributes:
        what: how it was measured.
        sizes: bytes per measured message.
        samples: for each size, the time of every timed exchange (after warm-up), seconds.
        messages: one-way messages per exchange (2 for a ping-pong, 1 for a copy);
            all but the first carry ``reply_bytes``.
        reply_bytes: size of the answer in a ping-pong (0 for a copy).

    Two summaries per size: :attr:`fastest` (the minimum: the cost when nothing else on
    the machine got in the way) and :attr:`median` (what a typical exchange saw). On a
    busy machine they differ by the time the processes waited for a CPU.
    """

    what: str
    sizes: tuple[int, ...]
    samples: tuple[tuple[float, ...], ...]
    messages: int
    reply_bytes: int

    @property
    def repeats(self) -> int:
        return min(len(s) for s in self.samples)

    @property
    def fastest(self) -> tuple[float, ...]:
        return tuple(min(s) for s in self.samples)

    @property
    def median(self) -> tuple[float, ...]:
        return tuple(statistics.median(s) for s in self.samples)


def _check_sizes(sizes) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError("`sizes` must be a non-empty sequence of message sizes in bytes")
    return tuple(checks.integer("sizes[]", n, low=1) for n in sizes)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pingpong(rank: int, port: int, sizes, repeats: int, warmup: int, reply_bytes: int,
              timeout: float, results) -> None:
    """One of the two processes of :func:`measure_loopback` (module level, so spawn can import it)."""
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        if "lo" in {name for _, name in socket.if_nameindex()}:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # keep gloo's own sockets on loopback
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=timeout))
        reply = torch.zeros(reply_bytes, dtype=torch.uint8)
        timed = []
        for n in sizes:
            message = torch.zeros(n, dtype=torch.uint8)
            samples = []
            for k in range(warmup + repeats):
                if rank == 0:
                    start = time.perf_counter()
                    dist.send(message, dst=1)
                    dist.recv(reply, src=1)
                    samples.append(time.perf_counter() - start)
                else:
                    dist.recv(message, src=0)
                    dist.send(reply, dst=0)
            timed.append(tuple(samples[warmup:]))
        dist.barrier()
        dist.destroy_process_group()
        if rank == 0:
            results.put(("ok", tuple(timed)))
    except BaseException:  # report anything to the parent rather than dying silently
        results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def measure_loopback(sizes: Sequence[int], repeats: int = 20, *, warmup: int = 3,
                     reply_bytes: int = 2 * ID_BYTES, timeout: float = 60.0) -> Measurement:
    """Time a real exchange between two processes through ``torch.distributed`` (gloo).

    Two processes are spawned and joined in a gloo group over TCP on 127.0.0.1: a real
    socket through the operating system's network stack, without a network card.
    Rank 0 plays the draft: for each size n it sends n bytes and waits for rank 1's
    reply of ``reply_bytes`` (by default the accepted count and the added token, two
    int32), ``warmup + repeats`` times, and times the last ``repeats`` round trips. The
    exchange is exactly one step of a one-round protocol whose up message has n bytes.

    Raises ``RuntimeError`` if a process fails or the whole run exceeds ``timeout``
    seconds (the processes are then terminated).
    """
    sizes = _check_sizes(sizes)
    repeats = checks.integer("repeats", repeats, low=1)
    warmup = checks.integer("warmup", warmup, low=0)
    reply_bytes = checks.integer("reply_bytes", reply_bytes, low=1)
    timeout = checks.real("timeout", timeout, low=0.0, low_open=True)

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_pingpong, args=(rank, port, sizes, repeats, warmup, reply_bytes, timeout, results),
                         daemon=True) for rank in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        try:
            status, value = results.get(timeout=timeout)
        except _queue.Empty:
            raise RuntimeError(f"the loopback measurement did not finish within {timeout:g} s") from None
        if status != "ok":
            raise RuntimeError(f"a loopback process failed: {value}")
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        results.close()
    return Measurement("gloo send/recv ping-pong between two processes over TCP on 127.0.0.1",
                       sizes, value, messages=2, reply_bytes=reply_bytes)


def measure_pcie(sizes: Sequence[int], repeats: int = 20, *, warmup: int = 3,
                 device: str | torch.device = "cuda") -> Measurement | None:
    """Time copies of pinned host memory to a CUDA device; ``None`` when CUDA is absent.

    Each copy is timed on the host from issue to ``torch.cuda.synchronize()`` (what a
    program waiting for the data sees), ``repeats`` times after ``warmup``.
    """
    sizes = _check_sizes(sizes)
    repeats = checks.integer("repeats", repeats, low=1)
    warmup = checks.integer("warmup", warmup, low=0)
    if not torch.cuda.is_available():
        return None
    device = torch.device(device)
    timed = []
    for n in sizes:
        host = torch.zeros(n, dtype=torch.uint8).pin_memory()
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        samples = []
        for _ in range(warmup + repeats):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        timed.append(tuple(samples[warmup:]))
    return Measurement(f"pinned host to {torch.cuda.get_device_name(device)} copy", sizes, tuple(timed),
                       messages=1, reply_bytes=0)


def fit_link(measurement: Measurement, name: str | None = None, *, statistic: str = "fastest") -> Link:
    """The :class:`Link` whose model best explains ``measurement``.

    Fits t = c + n/β to one summary per size (``statistic``: ``"fastest"``, the default,
    which is robust to other work on the machine, or ``"median"``) by least squares on *relative* error (each size
    weighs the same, small ones included), where n is the bytes in flight (the message
    plus any reply); the one-way latency is λ = c / messages. Raises ``ValueError`` if
    the fit is not physical (c < 0 or β <= 0), which means the model does not describe
    the data.
    """
    if not isinstance(measurement, Measurement):
        raise checks.InputTypeError(f"`measurement` must be a Measurement, got {type(measurement).__name__}")
    if len(measurement.sizes) < 2 or len(set(measurement.sizes)) < 2:
        raise ValueError("fitting a latency and a bandwidth needs at least two different sizes")
    n = torch.tensor(measurement.sizes, dtype=torch.float64) + measurement.reply_bytes
    if statistic not in ("fastest", "median"):
        raise ValueError(f"`statistic` must be 'fastest' or 'median', got {statistic!r}")
    t = torch.tensor(getattr(measurement, statistic), dtype=torch.float64)
    if not (torch.isfinite(t).all() and (t > 0).all()):
        raise ValueError("measured times must be finite and positive")
    A = torch.stack([1 / t, n / t], dim=1)  # (c + s·n) / t ≈ 1
    c, s = torch.linalg.lstsq(A, torch.ones_like(t).unsqueeze(1)).solution.squeeze(1).tolist()
    if c < 0 or s <= 0 or not math.isfinite(c + s):
        raise ValueError(f"t = c + n/β does not fit these times (c = {c:.3g} s, 1/β = {s:.3g} s/byte)")
    return Link(name or f"fitted: {measurement.what}", bandwidth=1 / s, latency=c / measurement.messages)
