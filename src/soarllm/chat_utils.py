"""Chat messages -> prompt text through the model's own chat template."""

from __future__ import annotations

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
        clean.append({"role": role, "content": content})
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError(
            "this model has no chat template; use the completions API with a plain prompt "
            "(`soar generate`), or give the server one with --chat-template",
            param="messages",
        )
    return tokenizer.apply_chat_template(
        clean, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


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
