"""Structured output through the offline API (LLM.generate) on the tiny random Llama: outputs
validate (the jsonschema package) whatever the temperature; greedy under a grammar is
transformers' greedy over the tokens llguidance allows (an oracle built here from transformers'
logits and llguidance's own matcher); free-text requests are unchanged beside grammar requests
(transformers' greedy); grammar requests never speculate, survive preemption, and a schema the
grammar engine cannot enforce is refused with nothing left behind."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import pytest
import torch

from soarllm.entrypoints.llm import LLM
from soarllm.errors import InvalidRequestError
from soarllm.sampling_params import SamplingParams
from soarllm.sampling_params import StructuredOutputParams as SO
from tests.serve.test_real_engine_sampling import hf_greedy_ids

# bounded: every valid document is short (strings and integers are bounded, no extra keys)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": -50, "maximum": 50},
        "kind": {"enum": ["file", "dir", "link"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "ok", "size", "kind"],
    "additionalProperties": False,
}
PROMPTS = ["def parse(args):", "import json\n", "class Config:", "# settings\n", "x = {", "{\"a\":",
           "Return a JSON object.", "for i in range(10):"]
REGEX = r"(GET|POST) /[a-z]{1,6}(/[0-9]{1,3})? HTTP/1\.[01]"


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_num_seqs=64)


def _texts(outs) -> list[tuple[str, str]]:
    return [(c.text, c.finish_reason) for o in outs for c in o.outputs]


def test_json_schema_outputs_validate_at_temperature(llm):
    params = SamplingParams(temperature=0.7, n=2, max_tokens=1500, seed=None,
                            structured_outputs=SO(json=SCHEMA))
    outs = llm.generate(PROMPTS, params)
    for text, reason in _texts(outs):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert llm.llm_engine.structured.num_requests == 0  # every sibling's matcher released


def test_regex_and_choice_outputs_match(llm):
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=200,
                                                structured_outputs=SO(regex=REGEX)))
    for text, reason in _texts(outs):
        assert reason == "stop" and re.fullmatch(REGEX, text), text
    choices = ["yes", "no", "maybe later"]
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.5, max_tokens=50,
                                                structured_outputs=SO(choice=choices)))
    assert all(text in choices and reason == "stop" for text, reason in _texts(outs))


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tok, model


def hf_constrained_greedy(model, tok, prompt_ids: list[int], grammar: str, n: int) -> list[int]:
    """Greedy decoding with transformers' logits, masked by an llguidance matcher, until the
    grammar is complete or n tokens."""
    ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=model.config.vocab_size)
    matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            mask = np.zeros((1, (len(logits) + 31) // 32), dtype=np.int32)
            llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
            allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[: len(logits)]
            nxt = int(np.argmax(np.where(allowed > 0, logits, -np.inf)))
            assert matcher.consume_token(nxt)
            ids.append(nxt)
            out.append(nxt)
            if matcher.is_stopped():
                break
    return out


@pytest.mark.parametrize("so", [SO(regex=REGEX), SO(json=SCHEMA)], ids=["regex", "json"])
def test_greedy_under_a_grammar_is_transformers_greedy_over_allowed_tokens(llm, hf, so):
    from soarllm.structured_output import grammar_of

    tok, model = hf
    prompt = "def handler(request):"
    want = hf_constrained_greedy(model, tok, tok(prompt)["input_ids"], grammar_of(so), 300)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=300,
                                              structured_outputs=so))[0].outputs[0]
    assert out.token_ids == want
    assert out.finish_reason == "stop"


def test_free_text_is_unchanged_beside_grammar_requests(llm, hf):
    tok, model = hf
    prompts = ["def parse(args):", "class Config:"]
    wants = [hf_greedy_ids(model, tok(p)["input_ids"], 24) for p in prompts]
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    grammar = SamplingParams(temperature=0.9, max_tokens=1500, structured_outputs=SO(json=SCHEMA))
    outs = llm.generate(prompts + PROMPTS[:4], [free, free] + [grammar] * 4)
    assert [o.outputs[0].token_ids for o in outs[:2]] == wants


def test_grammar_requests_never_speculate(tiny_model_dir):
    # adaptive off: the control below drafts whatever this machine's step times say (with the
    # cost model on, a loaded machine can rightly decide drafting does not pay, and the control
    # would prove nothing)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_num_seqs=64,
              speculative_config={"method": "ngram", "adaptive": False})
    engine = llm.llm_engine
    prompt = "def parse(args):"
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    text = free[0].outputs[0].text
    before = engine.get_stats().spec.num_drafts
    # control: a prediction of the exact output is drafted and verified
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True,
                                        prediction=text))
    drafted = engine.get_stats().spec.num_drafts
    assert drafted > before
    outs = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, prediction=text,
                                               structured_outputs=SO(regex=REGEX)))
    assert engine.get_stats().spec.num_drafts == drafted
    assert re.fullmatch(REGEX, outs[0].outputs[0].text)


def test_grammar_state_survives_preemption(tiny_model_dir):
    # 12 blocks of 16 tokens for 16 requests: the scheduler preempts and recomputes
    small = LLM(str(tiny_model_dir), dtype="float32", device="cpu", num_gpu_blocks_override=12,
                max_model_len=192, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.8, max_tokens=120, structured_outputs=SO(json=SCHEMA))
    outs = small.generate(PROMPTS * 2, params)
    assert small.llm_engine.get_stats().num_preemptions > 0
    texts = _texts(outs)
    assert sum(reason == "stop" for _, reason in texts) >= len(texts) // 2
    for text, reason in texts:
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
        else:  # cut by max_tokens: still a prefix that the grammar allowed
            assert reason == "length"


@pytest.mark.parametrize("schema, word", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "string", "format": "frobnicate"}, "frobnicate"),
])
def test_an_unenforceable_schema_is_refused_and_nothing_is_left(llm, schema, word):
    with pytest.raises(InvalidRequestError, match=word):
        llm.generate(["a", "b"], SamplingParams(structured_outputs=SO(json=schema)))
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.structured.num_requests == 0
