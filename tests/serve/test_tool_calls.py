"""Tool calling on /v1/chat/completions through the official `openai` client.

- A real ``soar serve`` of the tiny random Llama, given a Hermes-style tool template (written here,
  after Qwen 2.5's) with --chat-template: forced calls (tool_choice "required" and a named
  function) at temperature 0.7 parse into ``message.tool_calls`` whose arguments validate
  (jsonschema) against the function's parameters, over many requests; streamed tool-call deltas,
  accumulated by the openai library's own stream state, equal the non-streamed call with the same
  seed; an agent round trip (call -> tool message -> answer) reaches the model through the
  template exactly as transformers renders that conversation.
- Requests the server must refuse, on the fake engine: a 400 that says what to change.
- One test marked ``model``: Qwen2.5-Coder-0.5B-Instruct (its own tool template) makes a forced
  named call and answers from the tool's result; with the tools still offered it repeats its call
  as bare JSON instead, exactly as transformers' greedy decoding of the same prompt does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai.lib.streaming.chat import ChatCompletionStreamState

from soarllm.engine.async_engine import AsyncLLMEngine
from soarllm.serve.app import build_app
from soarllm.serve.config import ServerConfig
from tests.serve.conftest import start_soar_serve
from tests.serve.fake_engine import FakeEngine

# A Hermes-style tool template (the layout of Qwen 2.5's): tools as JSON in the system turn,
# calls as <tool_call> JSON in assistant turns, results in <tool_response> blocks.
TOOL_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call functions. Signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Reply with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{%- if m.content %}
{{ m.content }}
{%- endif %}
{%- for call in m.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
}
SEARCH = {
    "type": "object", "required": ["query", "limit"], "additionalProperties": False,
    "properties": {"query": {"type": "string", "maxLength": 20},
                   "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                   "exact": {"type": "boolean"}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "search_code", "description": "Search the repo",
                                      "parameters": SEARCH}},
    {"type": "function", "function": {"name": "list_files"}},
]
SCHEMAS = {"get_weather": WEATHER, "search_code": SEARCH,
           "list_files": {"type": "object", "maxProperties": 0}}  # no parameters: {}
PROMPTS = ["What's the weather in Paris?", "Find where parse_args is defined.",
           "List the files, please.", "Is it raining in Oslo right now?",
           "def fib(n): where is this used?", "weather in Tokyo, in fahrenheit",
           "Search for TODO comments.", "hello"]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def tool_server(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tool-serve")
    (d / "tools.jinja").write_text(TOOL_TEMPLATE)
    srv = start_soar_serve(str(tiny_model_dir), "--chat-template", str(d / "tools.jinja"),
                           "--no-access-log", "--served-model-name", "tiny",
                           log_path=d / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.base_url + "/v1", api_key="none", max_retries=0,
                         timeout=300)


def _ask(client, prompt: str, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], tools=TOOLS, **kw)


def _valid_calls(choice, one: bool) -> list:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and (len(calls) == 1 or not one)
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)
    return calls


def test_forced_named_calls_validate_at_temperature_0_7(client):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _ask(client, p, temperature=0.7, n=2,
                                               max_completion_tokens=400, tool_choice=NAMED),
                                PROMPTS))
    for r in replies:
        for choice in r.choices:
            calls = _valid_calls(choice, one=True)
            assert calls[0].function.name == "get_weather"


def test_required_single_calls_validate_at_temperature_0_7(client):
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _ask(client, p, temperature=0.7, n=2,
                                               max_completion_tokens=400,
                                               tool_choice="required",
                                               parallel_tool_calls=False), PROMPTS))
    names = set()
    for r in replies:
        for choice in r.choices:
            names |= {c.function.name for c in _valid_calls(choice, one=True)}
    assert len(names) > 1  # "required" lets the model pick among the tools


def test_required_parallel_calls_validate_at_temperature_0_7(client):
    """The random model rarely ends its reply after a call, so replies are often cut by
    max_tokens: then every call but the last (cut) one validates."""
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda p: _ask(client, p, temperature=0.7,
                                               max_completion_tokens=200,
                                               tool_choice="required"), PROMPTS))
    counts = []
    for r in replies:
        choice = r.choices[0]
        calls = choice.message.tool_calls
        assert choice.message.content is None and calls
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        assert choice.finish_reason in ("tool_calls", "length")
        for call in complete:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        counts.append(len(calls))
    assert max(counts) > 1


def test_streamed_deltas_reassemble_to_the_non_streamed_call(client):
    for i, prompt in enumerate(PROMPTS[:4]):
        kw = dict(temperature=0.7, seed=100 + i, max_completion_tokens=400,
                  parallel_tool_calls=False, tool_choice="required" if i % 2 else NAMED)
        whole = _ask(client, prompt, **kw).choices[0]
        state = ChatCompletionStreamState()
        firsts: dict[int, dict] = {}
        for chunk in _ask(client, prompt, stream=True, **kw):
            state.handle_chunk(chunk)
            for c in chunk.choices:
                assert not c.delta.content  # no markup leaks into the content
                for d in c.delta.tool_calls or []:
                    if d.index not in firsts:  # OpenAI's first delta of a call
                        firsts[d.index] = d.model_dump()
                        assert d.id and d.type == "function" and d.function.name
                        assert d.function.arguments == ""
                    else:
                        assert d.id is None and d.function.name is None
        streamed = state.get_final_completion().choices[0]
        assert streamed.finish_reason == whole.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] \
            == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
        assert [firsts[k]["id"] for k in sorted(firsts)] \
            == [c.id for c in streamed.message.tool_calls]


def test_tool_choice_none_gives_the_model_no_tools(client):
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4,
        temperature=0)
    none = _ask(client, "hi", max_completion_tokens=4, temperature=0, tool_choice="none")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None


def _as_template_reads_it(message: dict) -> dict:
    """transformers' documented shape of a tool call: arguments as an object."""
    out = dict(message)
    if out.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(
            c["function"]["arguments"])}} for c in out["tool_calls"]]
    if out.get("content") is None:
        out["content"] = ""
    return out


def test_agent_round_trip_goes_through_the_template(client, tiny_model_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    first = _ask(client, messages[0]["content"], temperature=0.7, seed=7,
                 max_completion_tokens=400, tool_choice=NAMED).choices[0]
    call = _valid_calls(first, one=True)[0]
    messages.append(first.message.model_dump(include={"role", "content", "tool_calls"}))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 21, "sky": "clear"})})
    answer = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                            temperature=0, max_completion_tokens=8)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and not choice.message.tool_calls
    # the oracle: transformers renders the same conversation with the same template
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tok.apply_chat_template([_as_template_reads_it(m) for m in messages], tools=TOOLS,
                                   chat_template=TOOL_TEMPLATE, tokenize=False,
                                   add_generation_prompt=True)
    assert '<tool_response>\n{"temperature": 21' in text
    assert '"name": "get_weather", "arguments": {' in text
    assert answer.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])


# -- refusals (fake engine) --------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _fake_client(template: str | None) -> TestClient:
    fake = FakeEngine(max_model_len=512)
    if template is not None:
        fake.tokenizer.chat_template = template
    app = build_app(AsyncLLMEngine(fake), ServerConfig(served_model_names=["fake"],
                                                       access_log=False))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def plain_model():
    with _fake_client(None) as c:
        yield c


@pytest.fixture(scope="module")
def tool_model():
    with _fake_client(TOOL_TEMPLATE) as c:
        yield c


def _refused(r, *words: str, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"], err["message"]
    assert err["param"] == param


def test_a_model_without_tool_template_refuses_tools_naming_the_fix(plain_model):
    for choice in (None, "auto", "required", {"type": "function", "function": {"name": "f"}}):
        body = {**CHAT, "tools": [FN]} | ({"tool_choice": choice} if choice else {})
        _refused(plain_model.post("/v1/chat/completions", json=body), "no tool support",
                 "qwen2.5-coder-0.5b-instruct", "tool_choice \"none\"", param="tools")
    r = plain_model.post("/v1/chat/completions",
                         json={**CHAT, "tools": [FN], "tool_choice": "none"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["tool_calls"] is None


@pytest.mark.parametrize("body, words, param", [
    ({**CHAT, "tool_choice": "required"}, ["needs tools"], "tool_choice"),
    ({**CHAT, "tools": [FN], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     ["'g'", "not in tools", "f"], "tool_choice"),
    ({**CHAT, "tools": [FN, FN]}, ["f", "twice"], "tools"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     ["tools[0].function.name"], "tools[0].function.name"),
    ({**CHAT, "tools": [FN], "tool_choice": "required", "response_format": {
        "type": "json_object"}}, ["either", "not both"], "tool_choice"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"not": {}}}}}}], "tool_choice": "required"},
     ["tools[0].function.parameters", "cannot be enforced", "not"], "tools"),
    ({**CHAT, "messages": [{"role": "function", "name": "f", "content": "1"}]},
     ["'tool' message"], None),
    ({**CHAT, "messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                                "function": {"name": "f"}}]}]},
     ["arguments"], None),
])
def test_bad_tool_requests_are_400s_naming_the_field(tool_model, body, words, param):
    r = tool_model.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param


def test_tool_messages_and_auto_on_a_tool_template(tool_model):
    """The fake model writes no calls: with tool_choice auto its reply is plain content."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
    ]
    r = tool_model.post("/v1/chat/completions",
                        json={**CHAT, "messages": messages, "tools": [FN], "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] and choice["message"]["tool_calls"] is None


# -- the real code model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory):
    from soarllm import hub

    path = Path(hub.pull("qwen2.5-coder-0.5b-instruct", progress=False))
    log = tmp_path_factory.mktemp("qwen-tools") / "server.log"
    # float32 and unquantized: transformers' greedy decoding of the dequantized GGUF is an oracle
    srv = start_soar_serve("qwen2.5-coder-0.5b-instruct", "--max-model-len", "1024",
                           "--dtype", "float32", "--quantization", "none",
                           "--no-access-log", log_path=log, startup_timeout=600)
    yield srv, path
    srv.stop()


@pytest.mark.model
def test_qwen_coder_forced_call_and_round_trip(qwen_server):
    """The model's own tool template (from its GGUF, read by transformers) is the oracle of
    the prompt. At 0.5B the model does not answer from a tool result while tools are still
    offered: it repeats its call as bare JSON. That is the model, not our rendering: with the
    tools offered our prompt is transformers' token for token and our reply is transformers'
    greedy continuation of it. So the answer is asked for with tool_choice "none", as an agent
    does once it has what it needs."""
    import torch

    from tests.hf_reference import hf_gguf

    server, gguf = qwen_server
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none",
                           max_retries=0, timeout=600)
    model = "qwen2.5-coder-0.5b-instruct"
    tools = TOOLS[:1]
    messages = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                           tool_choice=NAMED, temperature=0,
                                           max_completion_tokens=40)
    call = _valid_calls(first.choices[0], one=True)[0]
    assert json.loads(call.function.arguments)["city"].lower() == "paris"
    messages.append(first.choices[0].message.model_dump(include={"role", "content",
                                                                 "tool_calls"}))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": "21 degrees Celsius, clear sky"})
    answer = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                            tool_choice="none", temperature=0,
                                            max_completion_tokens=40)
    choice = answer.choices[0]
    assert not choice.message.tool_calls
    assert "21" in choice.message.content  # the answer reads the tool's result
    tok, hf = hf_gguf(gguf)  # transformers' reading of the GGUF (tokenizer and model)
    text = tok.apply_chat_template([_as_template_reads_it(m) for m in messages], tokenize=False,
                                   add_generation_prompt=True)
    assert "<tool_response>\n21 degrees" in text and '"name": "get_weather"' in text
    assert answer.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])

    # tools still offered: the model repeats its call (bare JSON, so no tool_calls), and so does
    # transformers' greedy decoding of the conversation as transformers renders it
    again = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                           temperature=0, max_completion_tokens=24)
    text = tok.apply_chat_template([_as_template_reads_it(m) for m in messages], tools=tools,
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert again.usage.prompt_tokens == len(ids)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                          dtype=torch.long), do_sample=False, max_new_tokens=24)
    want = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert again.choices[0].message.content == want
    assert want.startswith('{"name": "get_weather"') and not again.choices[0].message.tool_calls
