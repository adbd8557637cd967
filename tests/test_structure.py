"""The shape of the project: no import circles inside typsamp, transformers only in
typsamp.hf, no pointers to documents outside the repository, one vocabulary of method
names, provenance in every result file, and a GPU check (make gpu-check) that fails
loudly where there is no GPU."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "lib" / "typsamp"
PACKAGE = "typsamp"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """typsamp modules that ``path`` imports anywhere in its body (top level, inside
    functions, under ``if TYPE_CHECKING``): ``import typsamp.x``, ``from typsamp import x``,
    ``from typsamp.x import y`` and relative forms. ``from typsamp import name`` counts
    only when ``name`` is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                    # relative: inside the package
                base = node.module.split(".")[0] if node.module else None
            elif node.module and node.module.split(".")[0] == PACKAGE:
                parts = node.module.split(".")
                base = parts[1] if len(parts) > 1 else None
            else:
                continue
            if base is not None:
                found.add(base)
            else:                                             # from typsamp import a, b
                found.update(alias.name for alias in node.names if alias.name in modules)
    return found & modules


def import_graph(lib: Path = LIB) -> dict[str, set[str]]:
    files = {p.stem: p for p in lib.glob("*.py") if p.stem != "__init__"}
    modules = set(files)
    return {name: imports_of(path, modules) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_reader_sees_every_form(tmp_path):
    pkg = tmp_path / "typsamp"
    pkg.mkdir()
    (pkg / "a.py").write_text("import typsamp.b\n")
    (pkg / "b.py").write_text("def f():\n    from typsamp import c, __version__\n")
    (pkg / "c.py").write_text("from .d import thing\n")
    (pkg / "d.py").write_text("if True:\n    from typsamp.a import x\nimport torch\n")
    (pkg / "e.py").write_text("from . import a\n")
    graph = import_graph(pkg)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"a"}, "e": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "d", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "e": {"a", "b"}}) is None


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert {"sampling", "generate", "stats", "provenance", "bench", "train", "model"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_light_modules_stay_light():
    """stats and provenance are imported by the engine, train and bench: they import no
    other typsamp module but checks."""
    graph = import_graph()
    assert graph["stats"] <= {"checks"}
    assert graph["provenance"] == set()


def test_only_hf_imports_transformers():
    offenders = []
    for path in sorted(LIB.glob("*.py")):
        if path.stem == "hf":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "transformers" for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"transformers is imported outside typsamp.hf: {offenders}"


# ---------------------------------------------------------------------------------------
# No design document outside the repository


def _text_files():
    for base in ("lib", "notebooks", "book", "tests"):
        for path in (ROOT / base).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".ipynb", ".md", ".yml", ".yaml", ".bib", ".txt", ".rst"} \
                    and "__pycache__" not in path.parts and path != Path(__file__).resolve():
                yield path
    for name in ("_toc.yml", "_config.yml", "README.md", "Makefile", "pyproject.toml"):
        if (ROOT / name).is_file():
            yield ROOT / name


def test_nothing_refers_to_a_design_document():
    needles = ("design.md", "design doc")
    hits = []
    for path in _text_files():
        text = path.read_text(errors="replace").lower()
        hits += [f"{path.relative_to(ROOT)}: {needle!r}" for needle in needles if needle in text]
    assert not hits, "references to a design document outside the repository: " + "; ".join(hits)


# ---------------------------------------------------------------------------------------
# make gpu-check fails loudly without CUDA


def test_gpu_check_fails_loudly_without_cuda(tmp_path):
    """The check's entry point, run where CUDA is hidden, exits non-zero with a message
    saying why, before doing any work: nothing is written, nothing is skipped silently."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "typsamp.bench", "gpucheck", "--out", str(tmp_path / "g.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "CUDA" in result.stderr and "gpu-check" in result.stderr, result.stderr
    assert not any(tmp_path.iterdir())


def test_make_gpu_check_runs_the_check_first():
    """``make gpu-check`` starts with the entry point above (so it too fails before doing
    anything on a machine without CUDA), then the CUDA benchmarks."""
    out = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MAKEFLAGS": ""})
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "typsamp" in line]
    assert "typsamp.bench gpucheck" in lines[0], lines
    assert any("--device cuda" in line for line in lines[1:]), lines


def test_skips_become_failures_under_gpu_check(tmp_path):
    """With TYPSAMP_REQUIRE_CUDA=1 (what gpu-check sets), a test that skips fails instead."""
    test = tmp_path / "test_skipping.py"
    test.write_text("import pytest\n\n@pytest.mark.skipif(True, reason='needs a CUDA GPU')\n"
                    "def test_cuda_thing():\n    pass\n")
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    base = [sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    relaxed = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "TYPSAMP_REQUIRE_CUDA"})
    assert relaxed.returncode == 0 and "1 skipped" in relaxed.stdout, relaxed.stdout
    strict = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TYPSAMP_REQUIRE_CUDA": "1"})
    # a skip decided at setup (skipif) reports as an error, one inside the test as a failure
    assert strict.returncode != 0 and ("1 failed" in strict.stdout or "1 error" in strict.stdout), strict.stdout
    assert "needs a CUDA GPU" in strict.stdout


def test_notebook_results_are_json_with_provenance():
    """Every committed result file names the machine, versions, commit and load."""
    for path in sorted((ROOT / "notebooks" / "results").glob("*.json")):
        result = json.loads(path.read_text())
        m = result["machine"]
        for key in ("processor", "cpu_count", "torch_threads", "device", "date", "load_average_1min", "commit",
                    "python", "torch"):
            assert key in m, (path.name, key)
        assert "dirty" in m, path.name


def test_compare_devices_runs_every_engine_path():
    """The comparison behind gpu-check, run CPU against CPU (it has never met a GPU here):
    every method in every case runs and agrees with itself."""
    import torch

    from typsamp import bench

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = bench.compare_devices("cpu", "cpu", tokens=8, prompts=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    methods = ("autoregressive", *bench.METHODS)
    assert [(r["case"], r["method"]) for r in rows] == [(c, m) for c in ("T=0", "T=0 ragged+eos", "T=1")
                                                        for m in methods]
    assert all(r["ok"] and r["identical_rows"] == 1.0 for r in rows), [r for r in rows if not r["ok"]]


def test_greedy_comparison_flags_a_real_difference(monkeypatch):
    """Two T = 0 runs that part where the target is not near a tie fail the check; the
    same parting at a (declared) tie passes, and the detail says which."""
    from types import SimpleNamespace

    import torch

    from typsamp import bench, model as gpt

    target = gpt.load("draft_small")
    prompt = torch.arange(10)
    a = SimpleNamespace(tokens=torch.tensor([[1, 2, 3, 4]]))
    b = SimpleNamespace(tokens=torch.tensor([[1, 2, 5, 4]]))
    assert bench._same_greedy_tokens(a, a, [prompt], target) == (True, "identical tokens")
    ok, detail = bench._same_greedy_tokens(a, b, [prompt], target)
    assert not ok and "row 0 parts at token 2" in detail and "NOT a tie" in detail
    monkeypatch.setattr(bench, "TIE_MARGIN", 1e9)
    ok, detail = bench._same_greedy_tokens(a, b, [prompt], target)
    assert ok and "near-tie" in detail


def test_method_vocabulary():
    from typsamp import bench, speculative, typical

    assert list(bench.METHODS) == ["rejection_sampled", "rejection_greedy", "match_sampled", "typical_greedy"]
    assert bench.method_label(typical.TypicalAcceptance(), True) == "typical_greedy"
    assert bench.method_label(speculative.ExactMatch(), False) == "match_sampled"
    for label, (rule, greedy) in bench.METHODS.items():
        assert bench.method_label(rule, greedy) == label
    with pytest.raises(TypeError, match="`greedy` must be a bool"):
        bench.method_label(speculative.ExactMatch(), "yes")
    with pytest.raises(TypeError, match="`rule` must be a verification rule"):
        bench.method_label("rejection", True)
    with pytest.raises(ValueError, match="unknown method 'rejection'"):
        bench.run_method("rejection", None, None, None, 4, temperature=0.0)
    with pytest.raises(ValueError, match=r"`grid\['method'\]`: unknown method 'typical'"):
        bench.bench_decode(grid={"method": ("typical",)}, peer=False)


# ---------------------------------------------------------------------------------------
# provenance


def test_machine_describes_this_checkout():
    import re

    import torch

    from typsamp import provenance

    m = provenance.machine("cpu")
    assert set(m) >= {"platform", "processor", "cpu_count", "torch_threads", "python", "torch", "device", "date",
                      "load_average_1min", "commit", "dirty"}
    assert m["device"] == "cpu" and m["torch"] == torch.__version__ and m["torch_threads"] == torch.get_num_threads()
    if (provenance.ROOT / ".git").exists():                       # run from a checkout
        assert re.fullmatch(r"[0-9a-f]{40}", m["commit"]) and isinstance(m["dirty"], bool)
    assert m["load_average_1min"] is None or m["load_average_1min"] >= 0
    json.dumps(m)                                                   # it goes into JSON files
    if torch.cuda.is_available():
        assert provenance.machine("cuda")["gpu"]
    else:
        with pytest.raises(ValueError, match="`device` is 'cuda' but CUDA is not available"):
            provenance.machine("cuda")
    with pytest.raises(TypeError, match="`device`"):
        provenance.machine(0)


def test_git_facts_outside_a_checkout(tmp_path):
    from typsamp import provenance

    assert provenance.git_commit(tmp_path) == "unknown"
    assert provenance.git_dirty(tmp_path) is None


def test_git_dirty_sees_a_changed_tracked_file(tmp_path):
    from typsamp import provenance

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "untracked.txt").write_text("not counted\n")
    assert provenance.git_dirty(tmp_path) is False
    results = tmp_path / provenance.RESULTS
    results.mkdir(parents=True)
    (results / "bench.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "results")
    (results / "bench.json").write_text('{"new": 1}\n')     # a run's own output: not dirt
    assert provenance.git_dirty(tmp_path) is False
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance.git_dirty(tmp_path) is True
    assert len(provenance.git_commit(tmp_path)) == 40


def test_versions():
    import platform

    import torch

    from typsamp import provenance

    v = provenance.versions()
    assert v["python"] == platform.python_version() and v["torch"] == torch.__version__
    assert "typsamp" in v and "numpy" in v
    assert "no-such-package-xyz" not in provenance.versions(("torch", "no-such-package-xyz"))
    with pytest.raises(TypeError, match="not one string"):
        provenance.versions("torch")
    with pytest.raises(TypeError, match="package names"):
        provenance.versions([3])


def test_describe_prints_where_a_result_came_from():
    from typsamp import provenance

    result = {"command": "python -m typsamp.bench decode", "versions": {"python": "3.11.7", "torch": "2.13.0"},
              "machine": {"processor": "CPU X", "cpu_count": 2, "torch_threads": 1, "device": "cpu",
                          "load_average_1min": 0.5, "date": "2026-01-01T00:00:00+00:00", "python": "3.11.7",
                          "commit": "0123456789abcdef0123", "dirty": True}}
    assert provenance.describe(result, "decode_bench.json").splitlines() == [
        "decode_bench.json: python -m typsamp.bench decode",
        "  machine: CPU X, 2 cores, 1 torch thread(s), device cpu; load average 0.5 at the start; "
        "2026-01-01T00:00:00+00:00",
        "  versions: torch 2.13.0, python 3.11.7",
        "  commit 0123456789ab with uncommitted changes (dirty)",
    ]
    result["machine"].update(dirty=False, gpu="H200", device="cuda")
    text = provenance.describe(result)
    assert text.startswith("python -m typsamp.bench decode\n") and "device cuda, H200;" in text
    assert "dirty" not in text
    with pytest.raises(ValueError, match="'machine'"):
        provenance.describe({"command": "x"})
