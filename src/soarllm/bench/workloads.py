"""Workloads: the requests a benchmark sends, built before the clock starts.

* ``random``: prompts of random tokens with input/output lengths set in tokens (vLLM's random
  dataset idea); sent with ``ignore_eos`` so every request generates exactly its output length.
* ``code``: completion prompts (a prefix of a standard-library file, to be continued) alternating
  with editing prompts (a standard-library function and an instruction to rewrite it).
* ``chat``: multi-turn conversations; turn k carries the whole history of turns 1..k-1, so later
  turns share a prefix with earlier ones (what prefix caching serves).
* ``jsonl``: a user file, one JSON object a line: ``{"prompt": ...}`` or ``{"messages": [...]}``,
  optionally ``"output_len"`` (or ``"max_tokens"``).
"""

from __future__ import annotations

import ast
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soarllm.errors import InvalidRequestError

Messages = list[dict[str, str]]
WORKLOADS = ("random", "code", "chat", "jsonl")


@dataclass
class SampleRequest:
    prompt: str | Messages  # text for /v1/completions, messages for /v1/chat/completions
    prompt_len: int  # tokens, by our tokenizer (the server's usage overrides it when reported)
    output_len: int  # max_tokens asked for
    kind: str = "random"  # workload, or its sub-kind ("code-complete", "code-edit", "chat-turn2")


@dataclass
class WorkloadConfig:
    name: str = "random"
    num_prompts: int = 100
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly from [L * (1 - r), L * (1 + r)]
    api: str = "completions"  # "completions" | "chat": the form of each prompt
    path: str | None = None  # the jsonl file
    turns: int = 3  # chat: user turns per conversation
    seed: int = 0


def build_workload(config: WorkloadConfig, tokenizer: Any) -> list[SampleRequest]:
    if config.num_prompts < 1:
        raise InvalidRequestError("--num-prompts must be at least 1")
    if config.api not in ("completions", "chat"):
        raise InvalidRequestError(f"--api must be 'completions' or 'chat', got {config.api!r}")
    builders = {"random": _random, "code": _code, "chat": _chat, "jsonl": _jsonl}
    if config.name not in builders:
        raise InvalidRequestError(
            f"unknown workload {config.name!r}; choose one of {', '.join(WORKLOADS)}"
        )
    return builders[config.name](config, tokenizer)


def _lengths(rng: random.Random, length: int, ratio: float) -> int:
    if ratio <= 0:
        return length
    low, high = max(1, math.floor(length * (1 - ratio))), math.ceil(length * (1 + ratio))
    return rng.randint(low, high)


def _as_api(text: str, api: str) -> str | Messages:
    return [{"role": "user", "content": text}] if api == "chat" else text


def _prompt_len(tokenizer: Any, prompt: str | Messages) -> int:
    if isinstance(prompt, str):
        return len(tokenizer.encode(prompt, add_special_tokens=False))
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))
    return sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) for m in prompt)


def _render_chat(tokenizer: Any, messages: Messages) -> str:
    """A conversation as plain text, for servers addressed through /v1/completions."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


# --- random ---------------------------------------------------------------------------------


def random_token_text(tokenizer: Any, rng: random.Random, length: int) -> str:
    """Text of random (non-special) tokens that re-encodes to ``length`` tokens or very nearly.

    Tokens that decode to a fragment of a UTF-8 character are skipped. Decoding random ids and
    encoding the text again still merges or splits a few tokens, so the text is re-encoded and
    cut (or extended) until the round trip gives ``length`` tokens, for a few rounds at most.
    """
    vocab = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def draw(n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            tok = rng.randrange(vocab)
            if tok not in special and "\ufffd" not in tokenizer.decode([tok]):
                ids.append(tok)
        return ids

    ids = draw(length)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(8):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == length:
            break
        ids = ids[:length] if len(ids) > length else ids + draw(length - len(ids))
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return text


def _random(config: WorkloadConfig, tokenizer: Any) -> list[SampleRequest]:
    rng = random.Random(config.seed)
    requests = []
    for _ in range(config.num_prompts):
        n_in = _lengths(rng, config.input_len, config.range_ratio)
        n_out = _lengths(rng, config.output_len, config.range_ratio)
        prompt = _as_api(random_token_text(tokenizer, rng, n_in), config.api)
        requests.append(SampleRequest(prompt, _prompt_len(tokenizer, prompt), n_out, "random"))
    return requests


# --- code -----------------------------------------------------------------------------------


def _functions(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
            body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            found.append(_dedent(body))
    return found


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text)


def _cut_to_tokens(tokenizer: Any, text: str, length: int) -> str:
    """The longest run of whole lines from the start of ``text`` within ``length`` tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= length:
        return text
    cut = tokenizer.decode(ids[:length], skip_special_tokens=True)
    return cut[: cut.rfind("\n") + 1] if "\n" in cut else cut


def _fitting_function(tokenizer: Any, funcs: list[str], budget: int, rng: random.Random) -> str:
    """A whole function within ``budget`` tokens if one exists, else a cut of a random one."""
    order = list(funcs)
    rng.shuffle(order)
    for func in order[:50]:
        if len(tokenizer.encode(func, add_special_tokens=False)) <= budget:
            return func if func.endswith("\n") else func + "\n"
    return _cut_to_tokens(tokenizer, order[0], budget)


def _code(config: WorkloadConfig, tokenizer: Any) -> list[SampleRequest]:
    from soarllm.eval.corpus import stdlib_sources

    rng = random.Random(config.seed)
    files = stdlib_sources(num_files=max(4, config.num_prompts), seed=config.seed)
    requests = []
    for i in range(config.num_prompts):
        src = files[i % len(files)]
        n_in = _lengths(rng, config.input_len, config.range_ratio)
        n_out = _lengths(rng, config.output_len, config.range_ratio)
        funcs = [f for f in _functions(src.text) if f.count("\n") >= 3]
        if i % 2 == 0 or not funcs:
            text = _cut_to_tokens(tokenizer, src.text, n_in)
            prompt: str | Messages = (
                text if config.api == "completions" else _as_api(
                    f"Continue this file from the Python standard library ({src.name}):\n\n"
                    f"```python\n{text}", "chat")
            )
            kind = "code-complete"
        else:
            head = (
                f"Rewrite this function from the Python standard library ({src.name}) with type "
                "hints and a docstring, keeping its behaviour:\n\n```python\n"
            )
            tail = "```\n" + ("\n```python\n" if config.api == "completions" else "")
            budget = max(16, n_in - _prompt_len(tokenizer, head + tail))
            func = _fitting_function(tokenizer, funcs, budget, rng)
            prompt = head + func + tail
            if config.api == "chat":
                prompt = _as_api(prompt, "chat")
            kind = "code-edit"
        requests.append(SampleRequest(prompt, _prompt_len(tokenizer, prompt), n_out, kind))
    return requests


# --- chat -----------------------------------------------------------------------------------

_FOLLOW_UPS = (
    "Can you give a short example?",
    "What mistakes do people often make with it?",
    "How does it compare with the alternatives?",
    "Summarize that in two sentences.",
    "Why was it designed that way?",
)


def _chat(config: WorkloadConfig, tokenizer: Any) -> list[SampleRequest]:
    from pydoc_data.topics import topics

    rng = random.Random(config.seed)
    keys = sorted(topics)
    rng.shuffle(keys)
    turns = max(1, config.turns)
    num_sessions = math.ceil(config.num_prompts / turns)
    sessions: list[list[SampleRequest]] = []
    for s in range(num_sessions):
        key = keys[s % len(keys)]
        reference = topics[key].split("\n\n")
        history: Messages = []
        session = []
        for t in range(turns):
            question = (
                f"Explain the Python topic '{key}'." if t == 0
                else _FOLLOW_UPS[(s + t) % len(_FOLLOW_UPS)]
            )
            history = history + [{"role": "user", "content": question}]
            n_out = _lengths(rng, config.output_len, config.range_ratio)
            prompt: str | Messages = (
                list(history) if config.api == "chat" else _render_chat(tokenizer, history)
            )
            session.append(
                SampleRequest(prompt, _prompt_len(tokenizer, prompt), n_out, f"chat-turn{t + 1}")
            )
            # The assistant's reply that the next turn sees: reference prose, about n_out tokens.
            answer = _cut_to_tokens(tokenizer, reference[t % len(reference)].strip(), n_out)
            history = history + [{"role": "assistant", "content": answer}]
        sessions.append(session)
    # Turn-major order: every conversation's first turn, then every second turn, ...
    ordered = [sess[t] for t in range(turns) for sess in sessions]
    return ordered[: config.num_prompts]


# --- jsonl ----------------------------------------------------------------------------------


def _jsonl(config: WorkloadConfig, tokenizer: Any) -> list[SampleRequest]:
    if not config.path:
        raise InvalidRequestError("the jsonl workload needs --dataset-path FILE.jsonl")
    path = Path(config.path)
    if not path.is_file():
        raise InvalidRequestError(f"--dataset-path {config.path!r} is not a file")
    requests = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{lineno}: not JSON ({e.msg})") from None
        if "messages" in row:
            messages = row["messages"]
            prompt: str | Messages = (
                messages if config.api == "chat" else _render_chat(tokenizer, messages)
            )
        elif "prompt" in row:
            prompt = _as_api(str(row["prompt"]), config.api)
        else:
            raise InvalidRequestError(f"{path}:{lineno}: needs a 'prompt' or 'messages' field")
        n_out = int(row.get("output_len", row.get("max_tokens", config.output_len)))
        requests.append(SampleRequest(prompt, _prompt_len(tokenizer, prompt), n_out, "jsonl"))
        if len(requests) >= config.num_prompts:
            break
    if not requests:
        raise InvalidRequestError(f"{path} holds no requests")
    return requests
