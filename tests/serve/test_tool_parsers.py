"""Tool-call parsers on hand-written model outputs of each format (hermes, llama3_json,
mistral): the calls and the content, parsed whole and streamed in pieces of every size (one
character, random chunks, the tokens of a BPE tokenizer), the streamed deltas in OpenAI's order and
reassembling to the whole parse, markup never in the content; and each parser's forcing grammar
walked at random through llguidance's token masks: every reply it lets through parses to calls
whose arguments validate (jsonschema) against the function's parameters."""

from __future__ import annotations

import copy
import inspect
import json
import random

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import pytest

from soarllm.serve.tool_parsers import TOOL_PARSERS, detect_tool_parser, get_tool_parser
from soarllm.serve.tool_parsers.base import FunctionSpec, ToolCallDelta

WEATHER = {"city": "Paris", "unit": "celsius"}
TRICKY = {"code": 'print("}") # </tool_call> ]; [TOOL_CALLS] {', "n": [1, {"a": None}],
          "s": "caf\u00e9 \u2603 \\ \"q\""}

# (parser, model output, expected content, expected [(name, arguments object)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}\n</tool_call>', None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "run", '
     '"arguments": ' + json.dumps(TRICKY) + '}\n</tool_call>',
     "Let me check both.", [("get_weather", WEATHER), ("run", TRICKY)]),
    ("hermes", '<tool_call>{"arguments": {"x": [1, 2]}, "name": "f"}</tool_call>\nDone.',
     "Done.", [("f", {"x": [1, 2]})]),
    ("hermes", '<tool_call>\n{"name": "now"}\n</tool_call>', None, [("now", {})]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', None,
     [("f", {"a": 1})]),
    ("hermes", "if a < b and c <tool then <tool_call", "if a < b and c <tool then <tool_call",
     []),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ("hermes", 'No tools needed: {"name": "x"}', 'No tools needed: {"name": "x"}', []),
    ("hermes", 'Calling.\n<tool_call>\n{"name": "get_wea', "Calling.", []),  # cut: dropped
    ("hermes", '<tool_call>', None, []),
    ("hermes", '<tool_call>\n{"name": "now"}\n</tool_call>\n<tool', None,
     [("now", {})]),  # cut while writing the next call's marker: dropped
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
     '"celsius"}}', None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
     '"unit": "celsius"}}', None, [("get_weather", WEATHER)]),
    ("llama3_json", ' {"name": "a", "parameters": {}}; {"name": "run", "arguments": '
     + json.dumps(TRICKY) + "}", None, [("a", {}), ("run", TRICKY)]),
    ("llama3_json", "The weather in Paris is mild {not a call}.",
     "The weather in Paris is mild {not a call}.", []),
    ("llama3_json", '{"answer": 42, "name": 7}', '{"answer": 42, "name": 7}', []),
    ("llama3_json", '{"answer": [4, 2', '{"answer": [4, 2', []),  # cut JSON: content
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
     '"celsius"}}]</s>', None, [("get_weather", WEATHER)]),
    ("mistral", 'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", '
     '"unit": "celsius"}}, {"name": "run", "arguments": ' + json.dumps(TRICKY) + "}]",
     "Checking.", [("get_weather", WEATHER), ("run", TRICKY)]),
    ("mistral", "Plain answer, nothing to call.</s>", "Plain answer, nothing to call.", []),
    # Mistral's name-first form (tokenizers v11+), as mistral-common writes an assistant message
    # with tool calls (tokens/tokenizers/instruct.py, InstructTokenizerV13 / V11
    # ``_encode_tool_calls_in_assistant_message``: [TOOL_CALLS] name ([CALL_ID] id) [ARGS]
    # json.dumps(arguments)), then the end of sequence
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]' + json.dumps(WEATHER) + "</s>", None,
     [("get_weather", WEATHER)]),
    ("mistral", "Checking both.[TOOL_CALLS]get_weather[ARGS]" + json.dumps(WEATHER)
     + "[TOOL_CALLS]run[ARGS]" + json.dumps(TRICKY, ensure_ascii=False) + "[TOOL_CALLS]now[ARGS]{}"
     "</s>", "Checking both.", [("get_weather", WEATHER), ("run", TRICKY), ("now", {})]),
    ("mistral", "[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]" + json.dumps(WEATHER)
     + "[TOOL_CALLS]add_2[CALL_ID]Zz9Zz9Zz9[ARGS]" + '{"a": 1, "b": [true, {"c": "}]"}]}</s>',
     None, [("get_weather", WEATHER), ("add_2", {"a": 1, "b": [True, {"c": "}]"}]})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}\nIt is mild there.</s>',
     "It is mild there.", [("get_weather", {"city": "Paris"})]),
    ("mistral", "The [TOOL_CALLS] marker opens a call.</s>",
     "The [TOOL_CALLS] marker opens a call.", []),  # not a call: content (markers as written)
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]not json</s>", "[TOOL_CALLS]get_weathernot json",
     []),  # the end-of-sequence and [ARGS] special tokens are never content
    ("mistral", "Calling.[TOOL_CALLS]get_wea", "Calling.", []),  # cut before its name: dropped
]


class _SpecialTokens:
    """What the mistral parser reads of a tokenizer: its special tokens' texts."""

    all_special_tokens = ["<s>", "</s>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"]

    def convert_tokens_to_ids(self, tokens):
        return [self.all_special_tokens.index(t) for t in tokens]


def _parser(name: str):
    return get_tool_parser(name, _SpecialTokens() if name == "mistral" else None)


def _check(name, parsed_content, calls, content, expected):
    assert parsed_content == content
    assert [c.name for c in calls] == [n for n, _ in expected]
    for call, (_, args) in zip(calls, expected):
        assert json.loads(call.arguments) == args
        if name == "mistral":
            assert len(call.id) == 9 and call.id.isalnum()
        else:
            assert call.id.startswith("call_") and len(call.id) > 10


@pytest.mark.parametrize("name, text, content, expected", CASES)
def test_whole_reply(name, text, content, expected):
    parsed = _parser(name).parse(text)
    _check(name, parsed.content, parsed.tool_calls, content, expected)


def _pieces(text: str, how: str, tokenizer) -> list[str]:
    if how == "chars":
        return list(text)
    if how == "tokens":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out, prev = [], ""
        for i in range(len(ids)):  # as a detokenizer hands them out
            now = tokenizer.decode(ids[:i + 1])
            if now.endswith("\ufffd") and i + 1 < len(ids):
                continue  # half a character: held back, as the detokenizer does
            out.append(now[len(prev):])
            prev = now
        assert "".join(out) == text
        return out
    rng = random.Random(len(text))
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 9)
        out.append(text[i:i + k])
        i += k
    return out


@pytest.mark.parametrize("how", ["chars", "random", "tokens"])
@pytest.mark.parametrize("name, text, content, expected", CASES)
def test_streamed_reply(name, text, content, expected, how, bpe_tokenizer):
    stream = _parser(name).stream()
    events = []
    for piece in _pieces(text, how, bpe_tokenizer):
        events += stream.feed(piece)
    events += stream.finish()
    streamed_content = "".join(e for e in events if isinstance(e, str)) or None
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    # OpenAI's order: a call's first delta has index, id, name and arguments ""; then pieces
    seen: list[int] = []
    for d in deltas:
        if d.id is not None:
            assert d.index == len(seen) and d.arguments == "" and d.name
            assert d.to_openai()["type"] == "function"
            seen.append(d.index)
        else:
            assert d.index in seen and d.arguments
            assert set(d.to_openai()) == {"index", "function"}
    whole = stream.collect(events)
    _check(name, streamed_content, whole.tool_calls, content, expected)
    for e in events:
        if isinstance(e, str) and expected:
            for marker in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>",
                           "[ARGS]", "[CALL_ID]"):
                assert marker not in e


def test_truncated_call_keeps_its_arguments_so_far():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": "tw'
    parsed = _parser("hermes").parse(text)
    assert parsed.content is None
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1, "b": "tw')]


def test_mistral_keeps_the_call_ids_the_model_wrote():
    text = ("[TOOL_CALLS]a[CALL_ID]a1B2c3D4e[ARGS]{}[TOOL_CALLS]b[ARGS]{}"
            "[TOOL_CALLS]c[CALL_ID]Zz9Zz9Zz9[ARGS]{}</s>")
    whole = _parser("mistral").parse(text).tool_calls
    stream = _parser("mistral").stream()
    events = [e for ch in text for e in stream.feed(ch)] + stream.finish()
    for calls in (whole, stream.collect(events).tool_calls):
        assert [c.id for c in calls][::2] == ["a1B2c3D4e", "Zz9Zz9Zz9"]
        assert len(calls[1].id) == 9 and calls[1].id.isalnum()


def test_mistral_truncated_name_first_call_keeps_its_arguments_so_far():
    parsed = _parser("mistral").parse('[TOOL_CALLS]f[ARGS]{"a": 1, "b": "tw')
    assert parsed.content is None
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("f", '{"a": 1, "b": "tw')]


def test_max_calls_drops_the_calls_past_it():
    text = ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
            '{"name": "b", "arguments": {"x": 1}}\n</tool_call>')
    parsed = _parser("hermes").parse(text, max_calls=1)
    assert [c.name for c in parsed.tool_calls] == ["a"] and parsed.content is None
    text = '[TOOL_CALLS]a[ARGS]{}[TOOL_CALLS]b[ARGS]{"x": 1}</s>'
    parsed = _parser("mistral").parse(text, max_calls=1)
    assert [c.name for c in parsed.tool_calls] == ["a"] and parsed.content is None


@pytest.mark.parametrize("template, name", [
    ('{{- "<tool_call>\\n{\\"name\\": <function-name>}" }}', "hermes"),
    ("{% if message.role == 'ipython' %}{{ '<|python_tag|>' }}{% endif %}", "llama3_json"),
    ('{{ "[AVAILABLE_TOOLS]" }}{{ "[TOOL_CALLS]" }}', "mistral"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", None),
    (None, None),
])
def test_parser_is_found_from_the_chat_template(template, name):
    assert detect_tool_parser(template) == name


def test_cli_offers_every_parser():
    from soarllm.cli.main import build_parser

    args = build_parser().parse_args(["serve", "x", "--tool-call-parser", "mistral"])
    assert args.tool_call_parser == "mistral"
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    action = next(a for a in serve._actions if a.dest == "tool_call_parser")
    assert sorted(action.choices) == sorted(TOOL_PARSERS)


# -- the forcing grammars, walked through llguidance's masks -----------------------------------

FUNCTIONS = [
    FunctionSpec("get_weather", {
        "type": "object", "additionalProperties": False, "required": ["city", "unit"],
        "properties": {"city": {"type": "string", "maxLength": 6},
                       "unit": {"enum": ["celsius", "fahrenheit"]}}}),
    FunctionSpec("add", {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 99},
                       "b": {"type": "boolean"}}}),
    FunctionSpec("now", None),
]


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the json module's source, with Mistral's
    [TOOL_CALLS], [ARGS] and [CALL_ID] among its special tokens and Qwen's <tool_call> tags as
    added tokens."""
    import json as json_module

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [inspect.getsource(json_module)],
        trainers.BpeTrainer(vocab_size=400,
                            special_tokens=["</s>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                   additional_special_tokens=["[TOOL_CALLS]", "[ARGS]",
                                                              "[CALL_ID]"])
    fast.add_tokens(["<tool_call>", "</tool_call>"])  # added, not special: as in Qwen 2.5
    return fast


def _walk(matcher: llguidance.LLMatcher, n_vocab: int, eos: int, rng: random.Random,
          max_steps: int = 3000) -> list[int]:
    """Tokens sampled uniformly among those the grammar allows, until it is complete."""
    ids = []
    bitmask = np.zeros((1, (n_vocab + 31) // 32), dtype=np.int32)
    for _ in range(max_steps):
        if matcher.is_stopped():
            return ids
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
        bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n_vocab]
        allowed = np.flatnonzero(bits).tolist()
        assert allowed, matcher.get_error()
        if eos in allowed and rng.random() < 0.5:
            return ids
        token = rng.choice([t for t in allowed if t != eos] or [eos])
        if token == eos:
            return ids
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    raise AssertionError("the grammar never completed")


# a chat template that writes Mistral's name-first calls (as Mistral Small 3.2's does)
NAME_FIRST_TEMPLATE = ("{% for t in message.tool_calls %}{{ '[TOOL_CALLS]' + t.function.name + "
                       "'[ARGS]' + t.function.arguments|tojson }}{% endfor %}")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("name", sorted(TOOL_PARSERS) + ["mistral-name-first"])
@pytest.mark.parametrize("which", ["required", "named"])
def test_forcing_grammar_only_lets_valid_calls_through(name, which, parallel, bpe_tokenizer):
    tok = copy.copy(bpe_tokenizer)
    if name == "mistral-name-first":
        name, tok.chat_template = "mistral", NAME_FIRST_TEMPLATE
    parser = get_tool_parser(name, tok)
    if tok.chat_template == NAME_FIRST_TEMPLATE:
        assert parser.name_first
    functions = FUNCTIONS if which == "required" else FUNCTIONS[:1]
    grammar = llguidance.grammar_from("lark", parser.call_grammar(functions, parallel))
    eos = tok.eos_token_id
    ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=eos)
    schemas = {f.name: f.parameters or {"type": "object"} for f in functions}
    rng = random.Random(hash((name, which, parallel)) & 0xFFFF)
    numbers = set()
    for _ in range(25):
        matcher = llguidance.LLMatcher(ll_tok, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        text = tok.decode(_walk(matcher, len(tok), eos, rng), skip_special_tokens=False)
        parsed = parser.parse(text)
        assert parsed.content is None, text
        assert parsed.tool_calls, text
        if not parallel:
            assert len(parsed.tool_calls) == 1
        numbers.add(len(parsed.tool_calls))
        for call in parsed.tool_calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    if parallel:
        assert max(numbers) > 1  # the grammar does allow several calls
