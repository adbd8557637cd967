"""The committed sweeps of chapters 5 and 6 are this code's output: a few cells of each,
recomputed alone with one torch thread, reproduce the committed JSON (integers, counts
and texts exactly; floats to 1e-9 relative, the same computation on another CPU may
round the last bits differently), and the files hold every cell the chapters read."""

from __future__ import annotations

import math

import pytest
import torch

from typsamp import sweeps, typical


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same(recomputed, committed, where=""):
    """Equal, recursively: numbers of float type to 1e-6 relative, everything else exactly.

    The numbers come from float32 logits of the CPU's own kernels, which round
    differently on another processor: the committed run (an Intel host) and an AMD host
    differ by one float32 ulp (6e-8 at 0.58) in the predictions and by 3e-8 relative in
    the means over a run; every count and token must still agree exactly."""
    if isinstance(recomputed, dict):
        assert set(recomputed) == set(committed), where
        for key in recomputed:
            same(recomputed[key], committed[key], f"{where}.{key}")
    elif isinstance(recomputed, (list, tuple)):
        assert len(recomputed) == len(committed), where
        for i, (a, b) in enumerate(zip(recomputed, committed)):
            same(a, b, f"{where}[{i}]")
    elif isinstance(recomputed, float) and not isinstance(committed, bool):
        assert math.isclose(recomputed, committed, rel_tol=1e-6, abs_tol=1e-12), (where, recomputed, committed)
    else:
        assert recomputed == committed, (where, recomputed, committed)


@pytest.fixture(scope="module")
def acceptance():
    return sweeps.load("acceptance")


@pytest.fixture(scope="module")
def typical_sweep():
    return sweeps.load("typical")


def test_chapter_5_file_holds_every_run_and_grid(acceptance):
    keys = [(r["draft"], r["rule"], r["T"]) for r in acceptance["runs"]]
    assert keys == [(d, r, T) for d in ("target", "draft") for r in sweeps.RULES for T in sweeps.TEMPERATURES]
    grid = set(acceptance["predicted"]["T"])
    assert set(sweeps.FINE) | set(sweeps.WIDE) | set(sweeps.TEMPERATURES) <= grid
    assert set(sweeps.SPLIT_T) | set(sweeps.FAR) <= set(acceptance["split_tv"]["T"])
    for d in ("target", "draft"):
        assert all(len(acceptance["predicted"][d][r]) == len(grid) for r in sweeps.RULES)


def test_a_chapter_5_run_reproduces(acceptance):
    committed = {(r["draft"], r["rule"], r["T"]): r for r in acceptance["runs"]}
    for cell in (("draft", "typical_greedy", 1.0), ("target", "match_sampled", 0.5)):
        same(sweeps.run_cell(*cell), committed[cell], str(cell))


def test_chapter_5_predictions_reproduce(acceptance):
    grid = acceptance["predicted"]["T"]
    for T in (0.0, 0.75, 10 ** (-12 / 8)):
        i = grid.index(T)
        for d in ("target", "draft"):
            for rule in sweeps.RULES:
                same(sweeps.predicted(rule, T, d), acceptance["predicted"][d][rule][i], f"{d}/{rule}/{T}")
    split = acceptance["split_tv"]
    i = split["T"].index(2.0)
    same(sweeps.split_tv(2.0), {k: split[k][i] for k in sweeps.split_tv(2.0)}, "split 2.0")


def test_chapter_6_file_holds_every_cell(typical_sweep):
    counts = {}
    for cell in sweeps.typical_cells():
        counts[cell[0]] = counts.get(cell[0], 0) + 1
    assert {k: len(typical_sweep[k]) for k in counts} == counts
    methods = {(q["method"], q.get("T")) for q in typical_sweep["quality"]}
    assert {(m, T) for m in sweeps.METHODS for T in sweeps.QUALITY_T} <= methods
    assert all(len(q["nll"]) == sweeps.N_PROMPTS for q in typical_sweep["quality"])


def test_chapter_6_cells_reproduce(typical_sweep):
    cells = sweeps.typical_cells()
    for cell in (("trade", 1.0, 0.09), ("trade", 0.7, "rejection"), ("det", "greedy", 1.0, 2),
                 ("quality", "play")):
        kind = cell[0]
        index = [c for c in cells if c[0] == kind].index(cell)
        same(sweeps.typical_cell(*cell), typical_sweep[kind][index], str(cell))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`rule`"):
        sweeps.acceptance("typical", torch.zeros(2, 3), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="`draft_name`"):
        sweeps.run_cell("medusa", "rejection_sampled", 1.0)
    with pytest.raises(ValueError, match="`kind`"):
        sweeps.typical_cell("speed", 1.0)
    with pytest.raises(ValueError, match="`method`"):
        sweeps.typical_cell("quality", "beam", 1.0)
    with pytest.raises(ValueError, match="`name`"):
        sweeps.load("chapter5")
    assert set(typical.EXTRA) == {"greedy", "target", "truncated"}


def test_chapter_6_simulations_reproduce():
    simulated = sweeps.load("simulation")
    cells = sweeps.simulation_cells()
    assert [(t["kind"], t["context"], t["mode"], t["param"]) for t in simulated["tables"]] == cells
    assert simulated["settings"]["contexts"] == sweeps.contexts_06()["contexts"].tolist()
    for cell in (cells[1], cells[-1]):               # a typical-acceptance and a lenience table
        same(sweeps.simulation_cell(*cell), simulated["tables"][cells.index(cell)], str(cell))
    with pytest.raises(ValueError, match="no simulated table"):
        sweeps.simulation_cell("typical", 0, "sampled", "greedy")


def test_chapter_6_distances_reproduce():
    committed = sweeps.load("distance")
    assert [(c["T"], c["eps"]) for c in committed["grid"]] == [(T, e) for T in sweeps.DIST_T
                                                              for e in sweeps.EPS_GRID]
    same(sweeps.distance_cell(1.3, 0.2), committed["grid"][committed["grid"].index(
        next(c for c in committed["grid"] if (c["T"], c["eps"]) == (1.3, 0.2)))], "distance 1.3/0.2")
