"""Chat templates for GGUF files that carry none (tokenizer.chat_template absent).

llama.cpp falls back to built-in formats for these; so does the converter, per architecture.
"""

from __future__ import annotations

from collections.abc import Mapping

# Gemma's turn format: <start_of_turn>user|model\n ... <end_of_turn>\n, no system role (a system
# message is put in front of the first user turn), text parts only.
GEMMA = """\
{%- macro text(content) -%}
  {%- if content is string -%}{{ content }}
  {%- else -%}{% for part in content if part.type == "text" %}{{ part.text }}{% endfor %}
  {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns = namespace(prefix="") -%}
{%- set turns = messages -%}
{%- if messages and messages[0].role == "system" -%}
  {%- set ns.prefix = text(messages[0].content) ~ "\\n\\n" -%}
  {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message.role == "user") != (loop.index0 is even) -%}
    {{- raise_exception("Gemma needs the roles to alternate user/assistant/user/...") -}}
  {%- endif -%}
  {{- "<start_of_turn>" ~ ("model" if message.role == "assistant" else message.role) ~ "\\n" -}}
  {{- (ns.prefix if loop.first else "") ~ (text(message.content) | trim) ~ "<end_of_turn>\\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<start_of_turn>model\\n" -}}{%- endif -%}
"""

BY_ARCHITECTURE: Mapping[str, str] = {"gemma2": GEMMA, "gemma3": GEMMA}


def fallback_chat_template(gguf_architecture: str) -> str | None:
    return BY_ARCHITECTURE.get(gguf_architecture)
