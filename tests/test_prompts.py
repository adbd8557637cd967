"""typsamp.prompts: the prompt sets, their split and their sources."""

from __future__ import annotations

import hashlib

import pytest

from typsamp import prompts


def test_counts_and_an_even_split():
    counts = prompts.counts()
    assert counts["code"]["all"] == 164 and counts["gsm8k"]["all"] == 8
    assert counts["mmlu_cot"]["all"] == 282      # 57 subjects, 5 exemplars each but 3 with 4
    assert counts["shakespeare"]["all"] == counts["shakespeare_summary"]["all"] == 64
    for category, c in counts.items():
        assert c["test"] == (c["all"] + 1) // 2 and c["train"] + c["test"] == c["all"], category


def test_split_is_disjoint_stable_and_shared_by_the_passage_sets():
    for category in prompts.CATEGORIES:
        train = {p.id for p in prompts.load(category, "train")}
        test = {p.id for p in prompts.load(category, "test")}
        assert not train & test
        assert [p.id for p in prompts.load(category, "all")] == [p.id for p in prompts._all(category)]
    plain = {p.id: p for p in prompts.load("shakespeare", "all")}
    for p in prompts.load("shakespeare_summary", "all"):
        assert p.split == plain[p.id].split and p.text == plain[p.id].text + "\n\nSummary:"
    # The split is a function of the seed and the ids only: recompute it from scratch.
    ids = [p.id for p in prompts.load("code", "all")]
    order = sorted(ids, key=lambda i: hashlib.sha256(f"{prompts.SEED}:code:{i}".encode()).hexdigest())
    assert {p.id for p in prompts.load("code", "test")} == set(order[:82])


def test_prompt_texts_have_their_expected_shape():
    code = prompts.load("code", "all")
    assert code[0].id == "HumanEval/0" and all("def " in p.text and '"""' in p.text or "'''" in p.text for p in code)
    assert all(p.text.endswith(prompts.COT_CUE) and p.text.startswith("The following are multiple choice")
               for p in prompts.load("mmlu_cot", "all"))
    gsm = prompts.load("gsm8k", "all")
    assert gsm[0].text.startswith("Q: There are 15 trees") and all(p.text.endswith("\nA:") for p in gsm)
    for p in prompts.load("shakespeare", "all"):
        assert 400 <= len(p.text) <= prompts.PASSAGE_CHARS and p.id.split("/")[0] in (
            "hamlet", "julius_caesar", "macbeth", "twelfth_night")


def test_sources_are_checked():
    for category in prompts.SOURCES:
        path = prompts.source_path(category)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == prompts.SOURCES[category][3]


def test_a_changed_source_or_missing_package_fails_loudly(monkeypatch):
    monkeypatch.setitem(prompts.SOURCES, "gsm8k", ("lm-eval", "0.4.13", "lm_eval/tasks/gsm8k/gsm8k-cot.yaml", "0" * 64))
    with pytest.raises(ValueError, match="SHA-256.*make install"):
        prompts.source_path("gsm8k")
    monkeypatch.setitem(prompts.SOURCES, "gsm8k", ("lm-eval", "9.9", "x", "0" * 64))
    with pytest.raises(ValueError, match=r"defined on lm-eval==9\.9"):
        prompts.source_path("gsm8k")
    monkeypatch.setitem(prompts.SOURCES, "gsm8k", ("no-such-dist-typsamp", "1", "x", "0" * 64))
    with pytest.raises(FileNotFoundError, match="no-such-dist-typsamp"):
        prompts.source_path("gsm8k")


def test_bad_arguments():
    with pytest.raises(ValueError, match="category"):
        prompts.load("humaneval")
    with pytest.raises(ValueError, match="split"):
        prompts.load("code", "validation")
