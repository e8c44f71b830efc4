"""POST /infill (llama.cpp's code-infill endpoint) without a real model: the prompt layouts of
llama.cpp's server README, written out here as text and compared token for token with what the
engine received (the fake engine's tokenizer spells every byte as one token, so the expected ids
are those of the expected text); truncation to the context by hand-derived counts; the response
and stream shapes; refusals. The real refusal for a model without FIM tokens runs on the tiny
random model's server; tests/model/test_qwen_coder_serve.py runs a real infill."""

from __future__ import annotations

import json

import httpx
import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from soarllm.sampling_params import (
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
)
from soarllm.serve.config import ServerConfig
from soarllm.serve.infill import (
    StopRules,
    indent_cut,
    sampler_overrides,
    select_fields,
    time_limit_reached,
)
from soarllm.serve.protocol_infill import InfillRequest
from tests.serve.conftest import API_KEY, start_thread_server
from tests.serve.fake_engine import FakeEngine

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PREFIX = "def area(r):\n    "
SUFFIX = "\n    return a\n"


def _server(fake: FakeEngine):
    return start_thread_server(fake, ServerConfig(api_key=API_KEY, access_log=False,
                                                  served_model_names=["fake-model"]))


@pytest.fixture(scope="module")
def fake_srv():
    srv = _server(FakeEngine(step_time=0.0, max_model_len=512))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def repo_srv():
    """A tokenizer that also has StarCoder2's repo-level tokens."""
    fake = FakeEngine(step_time=0.0, max_model_len=512)
    fake.tokenizer.add_special_tokens({"additional_special_tokens": ["<reponame>", "<file_sep>"]},
                                      replace_extra_special_tokens=False)
    fake.vocab_size = len(fake.tokenizer)
    srv = _server(fake)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def short_srv():
    srv = _server(FakeEngine(step_time=0.0, max_model_len=64))
    yield srv
    srv.stop()


def _post(srv, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.base_url + "/infill", json=body, headers=AUTH, timeout=60, **kw)


def _sent(srv) -> str:
    """The prompt the engine got, as text with the special tokens spelled out."""
    return srv.fake.tokenizer.decode(srv.fake.last_prompt_ids)


def _ids(srv, text: str) -> list[int]:
    return srv.fake.tokenizer.encode(text, add_special_tokens=False)


def test_prompt_layout_without_repo_tokens(fake_srv):
    r = _post(fake_srv, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "prompt": "a = 3.14 *",
                         "input_extra": [{"filename": "util.py", "text": "PI = 3.14\n"}],
                         "n_predict": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    # README: "[input_extra]<FIM_PRE>[input_prefix]<FIM_SUF>[input_suffix]<FIM_MID>", each
    # extra chunk after a snippet line; `prompt` ends the prefix (llama.cpp's code)
    want = ("\n\n--- snippet ---\n\nPI = 3.14\n<fim_prefix>" + PREFIX + "a = 3.14 *"
            + "<fim_suffix>" + SUFFIX + "<fim_middle>")
    assert fake_srv.fake.last_prompt_ids == _ids(fake_srv, want)
    out = r.json()
    assert out["tokens_evaluated"] == len(_ids(fake_srv, want))
    assert out["prompt"] == want and out["truncated"] is False


def test_prompt_layout_with_repo_tokens(repo_srv):
    extra = [{"filename": "util.py", "text": "PI = 3.14\n"}, {"filename": "b.py", "text": "B = 2\n"}]
    r = _post(repo_srv, {"input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": extra,
                         "n_predict": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    # README's repo-level pattern (arXiv:2409.12186)
    want = ("<reponame>myproject\n<file_sep>util.py\nPI = 3.14\n<file_sep>b.py\nB = 2\n"
            "<file_sep>filename\n<fim_prefix>" + PREFIX + "<fim_suffix>" + SUFFIX + "<fim_middle>")
    assert repo_srv.fake.last_prompt_ids == _ids(repo_srv, want)


def test_prefix_and_suffix_truncated_around_the_cursor(short_srv):
    prefix = "".join(chr(ord("a") + i % 26) for i in range(200))
    suffix = "".join(chr(ord("A") + i % 26) for i in range(200))
    r = _post(short_srv, {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 8,
                          "input_extra": [{"text": "never fits"}], "temperature": 0})
    assert r.status_code == 200, r.text
    # 64 - 8 reserved = 56 prompt tokens; 3 FIM tokens leave 53: a quarter (13) for the start of
    # the suffix, the other 40 for the end of the prefix, nothing for the extra file
    want = "<fim_prefix>" + prefix[-40:] + "<fim_suffix>" + suffix[:13] + "<fim_middle>"
    assert short_srv.fake.last_prompt_ids == _ids(short_srv, want)
    assert len(short_srv.fake.last_prompt_ids) == 56
    assert r.json()["truncated"] is True


def test_extra_context_keeps_its_end(short_srv):
    text = "".join(str(i % 10) for i in range(100))
    r = _post(short_srv, {"input_prefix": "p", "input_suffix": "s", "n_predict": 8,
                          "input_extra": [{"filename": "x.py", "text": text}], "temperature": 0})
    assert r.status_code == 200, r.text
    # 56 - 3 FIM tokens - 2 (prefix, suffix) = 51 tokens of "--- snippet ---" + text, its end
    full = "\n\n--- snippet ---\n\n" + text
    want = full[-51:] + "<fim_prefix>p<fim_suffix>s<fim_middle>"
    assert short_srv.fake.last_prompt_ids == _ids(short_srv, want)
    assert r.json()["truncated"] is True


def test_nothing_fits_is_refused(short_srv):
    r = _post(short_srv, {"input_prefix": "x", "prompt": "y" * 60, "n_predict": 4})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "maximum context length" in error["message"] and error["param"] == "prompt"
    r = _post(short_srv, {"input_prefix": "x", "n_predict": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"


def test_response_shape_and_stop_types(fake_srv):
    # the fake engine's greedy text is " w0 w1 w2 ..." one byte per token
    r = _post(fake_srv, {"input_prefix": PREFIX, "n_predict": 6, "temperature": 0,
                         "return_tokens": True})
    out = r.json()
    assert out["content"] == " w0 w1" and out["stop"] is True and out["model"] == "fake-model"
    assert out["stop_type"] == "limit" and out["tokens_predicted"] == 6
    assert fake_srv.fake.tokenizer.decode(out["tokens"]) == out["content"]
    assert out["has_new_line"] is False and out["timings"]["predicted_n"] == 6
    r = _post(fake_srv, {"input_prefix": PREFIX, "n_predict": 20, "temperature": 0,
                         "stop": ["w2"]})
    out = r.json()
    assert (out["content"], out["stop_type"], out["stopping_word"]) == (" w0 w1 ", "word", "w2")
    assert out["tokens"] == []  # only with return_tokens


def test_stream_joins_to_the_whole_answer(fake_srv):
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 7, "temperature": 0,
            "return_tokens": True}
    whole = _post(fake_srv, body).json()
    with httpx.stream("POST", fake_srv.base_url + "/infill", json={**body, "stream": True},
                      headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    lines = [ln for ln in raw.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert "[DONE]" not in raw  # llama.cpp's own (non-OpenAI) streams end with stop: true
    events = [json.loads(ln[len("data: "):]) for ln in lines]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert "".join(e["content"] for e in events) == whole["content"]
    assert [t for e in events for t in e["tokens"]] == whole["tokens"]
    assert [e["tokens_predicted"] for e in events[:-1]] == list(range(1, 8))
    last = events[-1]
    assert last["content"] == "" and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == 7 and last["tokens_evaluated"] == whole["tokens_evaluated"]


def test_seeded_sampling_is_reproducible(fake_srv):
    body = {"input_prefix": PREFIX, "n_predict": 8, "temperature": 0.8, "seed": 42}
    a, b = _post(fake_srv, body).json(), _post(fake_srv, body).json()
    assert a["content"] == b["content"]
    assert a["content"] != _post(fake_srv, {**body, "seed": 43}).json()["content"]


@pytest.mark.parametrize("body, param", [
    ({"input_prefix": "x", "samplers": ["top_k", "mirostat"]}, "samplers"),  # not a sampler
    ({"input_prefix": "x", "n_probs": 21}, "n_probs"),  # more than MAX_LOGPROBS
    ({"input_prefix": "x", "post_sampling_probs": True}, "post_sampling_probs"),  # not served
    ({"input_prefix": "x", "n_cmpl": 2, "stream": True}, "n_cmpl"),
    ({"input_prefix": "x", "n_cmpl": 0}, "n_cmpl"),
    ({"input_prefix": "x", "n_predict": -2}, "n_predict"),
    ({"input_prefix": "x", "temperature": -1}, "temperature"),
    ({"input_prefix": "x", "seed": -2}, "seed"),
    ({"input_prefix": 3}, "input_prefix"),
    ({"input_extra": [{"filename": "a.py", "content": "x"}]}, "input_extra"),
    ({"input_prefix": "x", "model": "other"}, "model"),
])
def test_bad_requests_name_the_field(fake_srv, body, param):
    r = _post(fake_srv, body)
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert param in (error["param"] or "") or param in error["message"], error


B = {"input_prefix": "x", "n_predict": 2}


@pytest.mark.parametrize("body", [
    {**B, "n_predict": -1}, {**B, "n_predict": 0}, {**B, "n_predict": -2},
    {**B, "seed": -1}, {**B, "seed": -2}, {**B, "seed": 2**32 - 1}, {**B, "seed": 2**32},
    {**B, "top_p": 0}, {**B, "top_p": 1}, {**B, "top_k": MAX_TOP_K}, {**B, "top_k": MAX_TOP_K + 1},
    {**B, "temperature": MAX_TEMPERATURE}, {**B, "temperature": MAX_TEMPERATURE + 0.5},
    {**B, "repeat_penalty": 0}, {**B, "min_p": 1}, {**B, "min_p": 1.5},
    {**B, "stop": [""]}, {**B, "stop": ["a"] * MAX_STOP_STRINGS},
    {**B, "stop": ["a"] * (MAX_STOP_STRINGS + 1)}, {**B, "input_extra": [{}]},
    {**B, "input_extra": [{"text": "a", "lines": 3}]}, {**B, "cache_prompt": False},
    {**B, "stream": "yes"}, {"n_predict": 2},
    {**B, "n_indent": 4}, {**B, "n_indent": -1}, {**B, "t_max_predict_ms": -1},
    {**B, "t_max_predict_ms": -2}, {**B, "t_max_prompt_ms": 500}, {**B, "id_slot": 0},
    {**B, "id_slot": -2}, {**B, "samplers": []}, {**B, "samplers": ["top-k", "temp", "infill"]},
    {**B, "samplers": ["mirostat"]}, {**B, "samplers": "kt"}, {**B, "response_fields": [""]},
    {**B, "response_fields": ["timings/prompt_n", 3]}, {**B, "n_probs": 0}, {**B, "n_probs": 2},
    {**B, "n_probs": MAX_LOGPROBS}, {**B, "n_probs": MAX_LOGPROBS + 1}, {**B, "n_probs": -1},
    {**B, "input_extra": [{"text": "a", "time": [1732000000, 123456]}]},
    {**B, "n_cmpl": 3}, {**B, "n_cmpl": 0}, {**B, "n_cmpl": 17},
])
def test_the_schema_says_what_the_server_enforces(fake_srv, body):
    """jsonschema_rs reading the published schema and the server agree on every bound."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    published = httpx.get(fake_srv.base_url + "/openapi.json", headers=AUTH, timeout=30).json()
    ref = published["paths"]["/infill"]["post"]["requestBody"]["content"]["application/json"]
    validator = jsonschema_rs.Draft202012Validator(
        {**ref["schema"], "components": published["components"]})
    r = _post(fake_srv, body)
    assert r.status_code < 500, r.text
    assert (r.status_code < 400) == validator.is_valid(body), (r.status_code, r.text)


def test_needs_an_api_key(fake_srv):
    r = httpx.post(fake_srv.base_url + "/infill", json={"input_prefix": "x"}, timeout=60)
    assert r.status_code == 401


def test_model_without_fim_tokens_is_refused(tiny_server, tiny_model_dir):
    """The tiny random model's tokenizer has no FIM tokens (transformers' reading of it says
    so): the real server refuses /infill with a 400 that names the fix."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(tiny_model_dir)).get_vocab()
    assert not [t for t in vocab if "fim" in t.lower()]
    r = httpx.post(tiny_server.base_url + "/infill", timeout=60,
                   json={"input_prefix": "def f():\n    ", "input_suffix": "\n", "n_predict": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "fill-in-the-middle" in error["message"]
    assert "qwen2.5-coder-0.5b-instruct" in error["message"] and error["param"] == "model"
    # the server is unharmed: an ordinary completion still runs
    ok = httpx.post(tiny_server.base_url + "/v1/completions", timeout=60,
                    json={"prompt": "def", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


# -- what llama.cpp's editor plugins send ----------------------------------------------------

# llama.vim's FIM request (autoload/llama.vim, s:fim), field for field
LLAMA_VIM_FIELDS = [
    "content", "timings/prompt_n", "timings/prompt_ms", "timings/prompt_per_token_ms",
    "timings/prompt_per_second", "timings/predicted_n", "timings/predicted_ms",
    "timings/predicted_per_token_ms", "timings/predicted_per_second", "truncated",
    "tokens_cached",
]


def llama_vim_body(prefix: str, suffix: str, middle: str, n_predict: int, indent: int) -> dict:
    return {
        "id_slot": 0, "input_prefix": prefix, "input_suffix": suffix,
        "input_extra": [{"filename": "util.py", "text": "PI = 3.14\n"}], "prompt": middle,
        "n_predict": n_predict, "stop": [], "n_indent": indent, "top_k": 40, "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True,
        "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "response_fields": LLAMA_VIM_FIELDS,
    }


def test_the_llama_vim_request_is_answered(fake_srv):
    r = _post(fake_srv, llama_vim_body(PREFIX, SUFFIX, "a = ", 8, 4))
    assert r.status_code == 200, r.text
    out = r.json()
    # only the fields asked for, the nested ones flattened under their path
    assert sorted(out) == sorted(LLAMA_VIM_FIELDS)
    assert isinstance(out["content"], str) and out["timings/predicted_n"] <= 8
    assert out["truncated"] is False and out["tokens_cached"] >= 0
    assert out["timings/prompt_n"] + out["tokens_cached"] == len(fake_srv.fake.last_prompt_ids)


def test_samplers_left_out_are_off(fake_srv):
    """llama.cpp builds its chain from `samplers` alone: without "temperature", temperature 0
    is not applied and the answer is sampled (the fake engine's greedy text is " w0 w1...")."""
    body = {"input_prefix": PREFIX, "n_predict": 6, "temperature": 0, "seed": 1}
    greedy = " w0 w1"
    assert _post(fake_srv, body).json()["content"] == greedy
    assert _post(fake_srv, {**body, "samplers": ["top_k", "temperature"]}).json()["content"] \
        == greedy
    assert _post(fake_srv, {**body, "samplers": ["top_k", "top_p"]}).json()["content"] != greedy


def test_sampler_overrides():
    assert sampler_overrides(None) == {}
    everything = ["penalties", "top_k", "top_p", "min_p", "temperature", "infill", "dry"]
    assert sampler_overrides(everything) == {}
    assert sampler_overrides(["top-k", "nucleus", "infill"]) == {
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "min_p": 0.0, "temperature": 1.0}
    assert sampler_overrides([]) == {
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "top_k": 0, "top_p": 1.0, "min_p": 0.0, "temperature": 1.0}


def test_an_unknown_sampler_is_refused_naming_the_known_ones(fake_srv):
    r = _post(fake_srv, {"input_prefix": "x", "samplers": ["top_k", "mirostat"]})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "samplers" in message
    for name in ("top_k", "top_p", "min_p", "temperature", "penalties", "infill"):
        assert f"'{name}'" in message, message


@pytest.mark.parametrize("text, n, want", [
    ("x = 1", 4, None),  # the first line continues the cursor's line: never checked
    ("x = 1\n    y = 2\n", 4, None),
    ("x = 1\n    y = 2\n  z", 4, 18),  # "  z": 2 < 4 -> keep "...\n  ", drop "z"
    ("x = 1\n    y = 2\n  z = 3\nw", 2, 24),  # "w" at column 0 < 2
    ("x = 1\n    y = 2\n  ", 4, None),  # the line has no text yet
    ("a\n\t\t\t\tb", 4, None),  # tabs count one each
    ("a\n   \tb", 4, None),
    ("a\n   b", 4, 5),
    ("a\n\n    b", 4, 2),  # an empty line: its newline is text after no indentation
    ("a\n      b\n   c\nd", 4, 13),  # the first short line wins
    ("a\nb", 0, None),  # 0: off
])
def test_indent_cut(text, n, want):
    assert indent_cut(text, n) == want
    if want is not None:  # what is dropped starts with the short line's text
        assert text[want] not in " \t"


def test_indent_cut_from_an_offset():
    text = "a\n b\n    c\n d"
    assert indent_cut(text, 2) == 3  # " b" is short
    assert indent_cut(text, 2, start=text.index("\n    c")) == 12  # " d", checked from "    c"


@pytest.mark.parametrize("new_text, elapsed_ms, limit, want", [
    ("x\n", 1001.0, 1000, True),
    ("x\n", 1000.0, 1000, False),  # more than the limit, as llama.cpp's `>`
    ("xy", 5000.0, 1000, False),  # only at a token with a newline
    ("\n", 5000.0, 0, False),  # 0 and -1: no limit
    ("\n", 5000.0, -1, False),
])
def test_time_limit_reached(new_text, elapsed_ms, limit, want):
    assert time_limit_reached(new_text, elapsed_ms, limit) is want


def test_stop_rules_with_a_clock():
    now = [100.0]
    rules = StopRules(InfillRequest(t_max_predict_ms=250), clock=lambda: now[0])
    assert rules.active
    first = 100.0
    now[0] = 100.1
    assert rules.check("ab\n", "ab\n", first) is None  # 100 ms
    now[0] = 100.3
    assert rules.check("ab\ncd", "cd", first) is None  # 300 ms but no newline
    assert rules.check("ab\ncd\n", "\n", first) == len("ab\ncd\n")  # stop, keep the newline
    assert rules.check("ab\n", "ab\n", None) is None  # no token yet: no clock
    assert not StopRules(InfillRequest()).active


def test_select_fields():
    body = {"content": "x", "stop": True, "timings": {"prompt_n": 3, "predicted_n": 2}}
    assert select_fields(["content", "timings/prompt_n"], body) == {
        "content": "x", "timings/prompt_n": 3}
    assert select_fields(["timings"], body) == {"timings": body["timings"]}
    assert select_fields(["", "nope", "timings/nope", "content/x", "timings/prompt_n/x"],
                         body) == {}


SCRIPT = "x = 1\n    y = 2\n  z = 3\nw = 4\n" * 4


class ScriptedEngine(FakeEngine):
    """Greedy requests write SCRIPT, one byte per step."""

    def next_token(self, req, seq):
        if not req.params.greedy:
            return super().next_token(req, seq)
        return self.tokenizer.convert_tokens_to_ids(
            bytes_to_unicode()[SCRIPT.encode()[len(seq.token_ids) % len(SCRIPT)]])


@pytest.fixture(scope="module")
def script_srv():
    srv = _server(ScriptedEngine(step_time=0.0, max_model_len=512))
    yield srv
    srv.stop()


def _stream(srv, body: dict) -> list[dict]:
    with httpx.stream("POST", srv.base_url + "/infill", json={**body, "stream": True},
                      headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        return [json.loads(ln[len("data: "):]) for ln in r.read().decode().split("\n") if ln]


@pytest.mark.parametrize("n_indent, want", [
    (4, "x = 1\n    y = 2\n  "),  # "z" starts 2 columns in: cut before it
    (2, "x = 1\n    y = 2\n  z = 3\n"),  # "w" starts at column 0
    (0, SCRIPT[:40]),  # off: n_predict ends it
])
def test_n_indent_whole_and_streamed(script_srv, n_indent, want):
    body = {"input_prefix": PREFIX, "n_predict": 40, "temperature": 0, "n_indent": n_indent,
            "return_tokens": True}
    out = _post(script_srv, body).json()
    assert out["content"] == want
    assert out["stop_type"] == "limit"
    # llama.cpp counts (and returns) every token generated, the cut line's first text included
    assert len(out["tokens"]) == out["tokens_predicted"] >= len(want)
    events = _stream(script_srv, body)
    assert "".join(e["content"] for e in events) == want
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit"
    assert events[-1]["tokens_predicted"] == out["tokens_predicted"]


def test_response_fields_on_the_stream_s_last_event(script_srv):
    body = {"input_prefix": PREFIX, "n_predict": 5, "temperature": 0,
            "response_fields": ["stop_type", "timings/predicted_n", "nope"]}
    events = _stream(script_srv, body)
    assert "".join(e.get("content", "") for e in events) == SCRIPT[:5]
    assert events[-1] == {"stop_type": "limit", "timings/predicted_n": 5}
    assert all(not e["stop"] for e in events[:-1])  # the partial events are whole
    assert _post(script_srv, {**body, "response_fields": [""]}).json() == {}


def test_n_cmpl_answers_a_list(script_srv, fake_srv):
    """llama.vscode asks for 3 completions (n_cmpl): llama.cpp then answers a list, one answer
    per completion with its index, each cut by the stop rules on its own."""
    body = {"input_prefix": PREFIX, "n_predict": 40, "temperature": 0, "n_indent": 4,
            "n_cmpl": 3}
    out = _post(script_srv, body).json()
    assert [a["index"] for a in out] == [0, 1, 2]
    assert [a["content"] for a in out] == ["x = 1\n    y = 2\n  "] * 3
    out = _post(script_srv, {**body, "response_fields": ["content"]}).json()
    assert out == [{"content": "x = 1\n    y = 2\n  "}] * 3
    sampled = _post(fake_srv, {"input_prefix": PREFIX, "n_predict": 8, "n_cmpl": 2,
                               "seed": 5}).json()
    assert len(sampled) == 2 and sampled[0]["content"] != sampled[1]["content"]
