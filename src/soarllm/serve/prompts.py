"""Turning the prompt fields of API requests into token ids: completion prompts (text, batches,
token ids), fill-in-the-middle with ``suffix``, chat messages through the model's template.

The ``*_input(s)`` coroutines are what the routes call: they refuse prompts that cannot fit
before any tokenizing, then run the tokenizer on the worker threads (serve/tokenization.py).
"""

from __future__ import annotations

import json
from typing import Any

from soarllm.chat_utils import render_chat
from soarllm.errors import InvalidRequestError
from soarllm.model.tokenizer import fim_tokens
from soarllm.serve.generation import PromptInput
from soarllm.serve.protocol_openai import MAX_PROMPTS, ChatMessage, TextContentPart
from soarllm.serve.state import ServerState


async def completion_inputs(
    state: ServerState, prompt: str | list[str] | list[int] | list[list[int]],
    suffix: str | None, model_name: str,
) -> list[PromptInput]:
    """completion_prompts on a worker thread, after refusing prompts too long to fit."""
    workers = state.tokenizers
    items = _items(prompt)
    for i, p in enumerate(items):
        what = "the prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            workers.check_chars(len(p) + len(suffix or ""), "prompt", what)
        elif isinstance(p, list):
            workers.check_num_tokens(len(p), "prompt")
    return await workers.run(completion_prompts, state.tokenizer, prompt, suffix, model_name)


async def chat_input(state: ServerState, messages: list[ChatMessage],
                     tools: list[dict[str, Any]] | None = None) -> PromptInput:
    """chat_prompt on a worker thread, after refusing conversations too long to fit."""
    chars = sum(_message_chars(m) for m in messages)
    if tools:
        chars += len(json.dumps(tools))
    state.tokenizers.check_chars(chars, "messages", "the conversation")
    return await state.tokenizers.run(chat_prompt, state.tokenizer, messages, tools)


async def text_input(state: ServerState, text: str, param: str,
                     add_special_tokens: bool = True) -> list[int]:
    """encode on a worker thread, after refusing text too long to fit."""
    state.tokenizers.check_chars(len(text), param)
    return await state.tokenizers.run(encode, state.tokenizer, text, add_special_tokens)


async def prediction_input(state: ServerState, text: str) -> list[int]:
    """A Predicted Outputs text as token ids, on a worker thread (it may be a whole file)."""
    state.tokenizers.check_chars(len(text), "prediction", "the prediction")
    return await state.tokenizers.run(encode, state.tokenizer, text, False)


def _message_chars(m: ChatMessage) -> int:
    calls = sum(len(c.function.arguments) for c in m.tool_calls or [])
    if isinstance(m.content, str):
        return len(m.content) + calls
    if isinstance(m.content, list):
        return sum(len(p.text) for p in m.content if isinstance(p, TextContentPart)) + calls
    return calls


def _items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt is an empty list; send a string, a list of strings "
                                  "or a list of token ids", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        items: list[str | list[int]] = [list(prompt)]  # type: ignore[arg-type]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if len(items) > MAX_PROMPTS:
        raise InvalidRequestError(
            f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt"
        )
    return items


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def completion_prompts(
    tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]], suffix: str | None,
    model_name: str,
) -> list[PromptInput]:
    """One PromptInput per prompt of a /v1/completions request (blocking: call it through
    completion_inputs on the event loop)."""
    items = _items(prompt)
    if suffix is not None:
        return [fim_prompt(tokenizer, p, suffix, model_name) for p in items]
    out = []
    for i, p in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            if not p:
                raise InvalidRequestError(f"{where} is empty; send some text", param="prompt")
            out.append(PromptInput(encode(tokenizer, p), p))
        else:
            if not p:
                raise InvalidRequestError(f"{where} has no token ids", param="prompt")
            out.append(PromptInput(p, _decode(tokenizer, p)))
    return out


def fim_prompt(tokenizer: Any, prefix: str | list[int], suffix: str,
               model_name: str) -> PromptInput:
    """Prefix-suffix-middle prompt with the tokenizer's own FIM tokens."""
    tokens = fim_tokens(tokenizer)
    if tokens is None:
        raise InvalidRequestError(
            f"the model {model_name!r} has no fill-in-the-middle tokens, so 'suffix' cannot be "
            "used; remove 'suffix' or serve a code model with FIM tokens (e.g. <fim_prefix>)",
            param="suffix",
        )
    if not isinstance(prefix, str):
        raise InvalidRequestError("'suffix' needs a text prompt, not token ids", param="prompt")
    pre_id, suf_id, mid_id = tokenizer.convert_tokens_to_ids(list(tokens))
    ids = (
        [pre_id] + encode(tokenizer, prefix, add_special_tokens=False)
        + [suf_id] + encode(tokenizer, suffix, add_special_tokens=False) + [mid_id]
    )
    return PromptInput(ids, prefix)


def chat_prompt(tokenizer: Any, messages: list[ChatMessage],
                tools: list[dict[str, Any]] | None = None) -> PromptInput:
    """``tools``: OpenAI's tool objects, given to the template (the caller has checked that
    the template writes them)."""
    if not messages:
        raise InvalidRequestError(
            "messages is empty; send at least one message, e.g. "
            '[{"role": "user", "content": "Hello"}]', param="messages",
        )
    plain: list[dict[str, Any]] = []
    for m in messages:  # the request model admits text parts only
        content = m.content
        if isinstance(content, list):
            content = "".join(p.text for p in content if isinstance(p, TextContentPart))
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name:
            message["name"] = m.name
        if m.tool_calls:  # earlier calls of the assistant, rendered by the template
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        plain.append(message)
    kwargs = {"tools": tools} if tools else {}
    text = render_chat(tokenizer, plain, add_generation_prompt=True, **kwargs)
    return PromptInput(encode(tokenizer, text, add_special_tokens=False), text)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids)
    except (OverflowError, TypeError, ValueError, IndexError):
        return ""  # the engine refuses these ids with a clear message
