"""Chat messages -> prompt text through the model's own chat template."""

from __future__ import annotations

import json
from pathlib import Path

from soarllm.errors import ConfigError, InvalidRequestError

_ROLES = {"system", "user", "assistant", "tool", "developer"}


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content}", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequestError(f"messages[{i}] needs a 'role' and a 'content'", param="messages")
        if m["role"] not in _ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {sorted(_ROLES)}, got {m['role']!r}", param="messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequestError(
                        f"messages[{i}].content: only text parts are supported", param="messages"
                    )
                parts.append(part.get("text", ""))
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        message = {"role": role, "content": content}
        for key in ("name", "tool_call_id"):
            if m.get(key):
                message[key] = m[key]
        if m.get("tool_calls"):
            message["tool_calls"] = [_template_tool_call(c) for c in m["tool_calls"]]
        clean.append(message)
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError(
            "this model has no chat template; use the completions API with a plain prompt "
            "(`soar generate`), or give the server one with --chat-template",
            param="messages",
        )
    return tokenizer.apply_chat_template(
        clean, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def _template_tool_call(call: dict) -> dict:
    """An OpenAI tool call as chat templates read it: arguments as an object (templates write
    ``arguments | tojson``), the JSON text kept where it is not an object."""
    call = dict(call)
    function = dict(call.get("function") or {})
    args = function.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    call["function"] = function
    return call


_PROBE_TOOL = {"type": "function", "function": {
    "name": "soar_probe_tool_7d1c", "description": "probe",
    "parameters": {"type": "object", "properties": {}}}}


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template writes the tools it is given into the prompt (rendered once
    with a probe tool, whose name must show up)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                             tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that fails on tools has no usable tool support
        return False
    return isinstance(text, str) and _PROBE_TOOL["function"]["name"] in text


def load_chat_template(value: str) -> str:
    """A --chat-template argument as template text: a file's contents, or the argument itself
    when it is an inline Jinja template (as vLLM reads it). Syntax errors are reported here."""
    path = Path(value).expanduser()
    try:
        text = path.read_text() if path.is_file() else None
    except OSError as e:
        raise ConfigError(f"cannot read the chat template file {path}: {e}") from None
    if text is None:
        if "{{" not in value and "{%" not in value:
            raise ConfigError(
                f"--chat-template {value!r} is neither a file nor a Jinja template; give the path "
                "of a .jinja file or the template text itself"
            )
        text = value
    import jinja2

    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template has a Jinja syntax error (line {e.lineno}): "
                          f"{e.message}") from None
    return text
