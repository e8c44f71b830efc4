"""Speculation on the real default model: greedy output token for token the same with prompt lookup
and with Predicted Outputs (a code edit whose prediction is the original code), batched."""

from __future__ import annotations

import inspect
import textwrap

import pytest

from soarllm import LLM, SamplingParams

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engines(default_model_path):
    common = dict(dtype="float32", quantization="none", max_model_len=1024,
                  enable_prefix_caching=False)
    return (LLM(str(default_model_path), **common),
            LLM(str(default_model_path), **common,
                speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                    "adaptive": False}))


def test_code_edit_is_the_same_with_ngram_and_with_a_prediction(engines):
    plain, spec = engines
    tok = plain.get_tokenizer()
    sources = [textwrap.dedent(inspect.getsource(f))
               for f in (textwrap.indent, textwrap.dedent, inspect.getsource)][:2]
    prompts = [tok.apply_chat_template(
        [{"role": "user", "content": f"Rename the variable `lines` to `rows`:\n```python\n{s}```"}],
        add_generation_prompt=True, tokenize=False) for s in sources]
    params = SamplingParams(temperature=0.0, max_tokens=96)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
    assert got == want
    # (the non-adaptive engine: whether the adaptive one verifies depends on measured step times)
    with_prediction = spec.generate(prompts, [
        SamplingParams(temperature=0.0, max_tokens=96, prediction=f"```python\n{s}```")
        for s in sources])
    assert [o.outputs[0].token_ids for o in with_prediction] == want
    assert sum(o.outputs[0].accepted_prediction_tokens for o in with_prediction) > 0
    assert spec.llm_engine.speculator.stats.num_accepted_tokens > 0
