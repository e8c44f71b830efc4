"""Structured output through the official `openai` client against a real `soar serve` of the tiny
random Llama: response_format json_schema replies validate (the jsonschema package) on many
prompts at temperature 0.7, streamed or not; json_object replies parse; vLLM's guided_choice,
guided_regex (python's re) and guided_grammar hold on chat and completions; logprobs and n compose
with them; what the grammar engine cannot enforce is a 400 that names the problem."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.structured.test_engine import PROMPTS, REGEX, SCHEMA


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="none", max_retries=0,
                         timeout=300)


def _fmt(schema: dict) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "entry", "schema": schema, "strict": True}}


def _chat(client, prompt: str, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], **kw)


def test_json_schema_replies_validate_on_many_prompts(client):
    prompts = PROMPTS + [p.upper() for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _chat(client, p, temperature=0.7, n=2,
                                                max_completion_tokens=1500,
                                                response_format=_fmt(SCHEMA)), prompts))
    docs = 0
    for r in replies:
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
            docs += 1
    assert docs == 2 * len(prompts)


def test_json_object_replies_parse_to_objects(client):
    r = _chat(client, "Give me JSON.", temperature=0, max_completion_tokens=1500,
              response_format={"type": "json_object"})
    c = r.choices[0]
    # any JSON object may nest without bound: a reply cut by max_tokens is allowed here
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:
        assert c.message.content.startswith("{")


def test_streamed_json_schema_reply_joins_to_a_valid_document(client):
    for prompt in PROMPTS[:4]:
        text, reasons = "", []
        for chunk in _chat(client, prompt, temperature=0.7, max_completion_tokens=1500,
                           response_format=_fmt(SCHEMA), stream=True):
            for c in chunk.choices:
                text += c.delta.content or ""
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        assert reasons == ["stop"]
        jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_choice_on_chat_and_completions(client):
    choices = ["red", "green", "blue sky"]
    for prompt in PROMPTS[:4]:
        r = _chat(client, prompt, temperature=1.0, max_completion_tokens=20,
                  extra_body={"guided_choice": choices})
        assert r.choices[0].message.content in choices
        r = client.completions.create(model="tiny", prompt=prompt, temperature=1.0, max_tokens=20,
                                      n=3, extra_body={"guided_choice": choices})
        assert all(c.text in choices and c.finish_reason == "stop" for c in r.choices)


def test_guided_regex_fullmatches(client):
    for prompt in PROMPTS:
        r = client.completions.create(model="tiny", prompt=prompt, temperature=0.9,
                                      max_tokens=200, extra_body={"guided_regex": REGEX})
        assert re.fullmatch(REGEX, r.choices[0].text), r.choices[0].text


def test_guided_grammar_lark_and_gbnf(client):
    lark = 'start: call ("," call)?\ncall: NAME "(" NUMBER? ")"\nNAME: /[a-z]{1,5}/\nNUMBER: /[0-9]{1,2}/'
    pattern = r"[a-z]{1,5}\([0-9]{0,2}\)(,[a-z]{1,5}\([0-9]{0,2}\))?"
    gbnf = 'root ::= "x" [0-9] [0-9]?'
    for prompt in PROMPTS[:4]:
        r = client.completions.create(model="tiny", prompt=prompt, temperature=0.9,
                                      max_tokens=200, extra_body={"guided_grammar": lark})
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
        r = _chat(client, prompt, temperature=0.9, max_completion_tokens=20,
                  extra_body={"guided_grammar": gbnf})
        assert re.fullmatch(r"x[0-9]{1,2}", r.choices[0].message.content)


def test_logprobs_compose_with_a_grammar(client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0.8,
                                  max_tokens=200, logprobs=2, extra_body={"guided_regex": REGEX})
    c = r.choices[0]
    assert re.fullmatch(REGEX, c.text)
    assert "".join(c.logprobs.tokens) == c.text
    assert all(lp is not None and lp <= 0 for lp in c.logprobs.token_logprobs)


@pytest.mark.parametrize("kw, words, param", [
    ({"response_format": _fmt({"type": "object", "properties": {"a": {"not": {}}}})},
     ["not", "cannot be enforced"], "response_format"),
    ({"response_format": _fmt({"type": "object", "if": {}, "then": {}})}, ["if"],
     "response_format"),
    ({"extra_body": {"guided_regex": "(?<=a)b"}}, ["look-around"], "guided_regex"),
    ({"extra_body": {"guided_grammar": "start: nowhere"}}, ["nowhere"], "guided_grammar"),
    ({"extra_body": {"guided_json": "{oops"}}, ["JSON"], "guided_json"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}},
     ["only one of", "response_format", "guided_choice"], "guided_choice"),
])
def test_what_cannot_be_enforced_is_a_400_that_names_it(client, kw, words, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", max_completion_tokens=5, **kw)
    err = e.value.body
    assert e.value.status_code == 400
    for w in words:
        assert w in err["message"], err
    assert err["param"] == param
