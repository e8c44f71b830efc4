"""Mistral: ``[TOOL_CALLS]`` (a special token), then the calls in one of two forms.

- JSON array (tokenizers up to v7: Mistral 7B v0.3, Mixtral, Nemo, Small 2409)::

      [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]

- name first (tokenizers v11 and later: Mistral Small 3.2, Magistral, Devstral, Ministral 3),
  one ``[TOOL_CALLS]`` per call, ``[CALL_ID]`` + a 9-character id only in v11::

      [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}
      [TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}

  As Mistral's own tokenizer writes them: mistral-common,
  src/mistral_common/tokens/tokenizers/instruct.py, ``InstructTokenizerV11`` and
  ``InstructTokenizerV13._encode_tool_calls_in_assistant_message`` (TOOL_CALLS, the name,
  [CALL_ID] id in v11, ARGS, ``json.dumps(arguments, ensure_ascii=False)``); the models' Hugging
  Face chat templates write ``'[TOOL_CALLS]' + name + '[ARGS]' + arguments`` alike.

Both forms are read from any reply (the character after the marker tells them apart); a forced
call is written in the form the chat template uses (name first when it mentions ``[ARGS]``). The
markers are special tokens, so requests parsed with this format keep special tokens in the text
(skip_special_tokens=false unless the request sets it) and the other special tokens (the end
of sequence) are taken out of the content. Call ids are 9 letters and digits, as Mistral's
templates require of the ids sent back with tool results; a call id the model wrote is kept.
"""

from __future__ import annotations

import json
import secrets
import string

from soarllm.serve.tool_parsers.base import FunctionSpec, ToolCallFormat, ToolParser, lark_literal

_MARKER = "[TOOL_CALLS]"
_ARGS = "[ARGS]"
_CALL_ID = "[CALL_ID]"


class MistralToolParser(ToolParser):
    name = "mistral"
    format = ToolCallFormat(start=_MARKER, end="]", open="[", separator=",",
                            args_keys=("arguments",), args_marker=_ARGS, id_marker=_CALL_ID)
    needs_special_tokens = True

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return _MARKER in template

    @property
    def name_first(self) -> bool:
        """Whether the model's chat template writes calls name first (``[ARGS]``)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return isinstance(template, str) and _ARGS in template

    def new_call_id(self) -> str:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def call_rule(self, function: FunctionSpec, args_rule: str) -> str:
        if self.name_first:
            return (f"{self.marker(_MARKER)} {lark_literal(function.name)} {self.marker(_ARGS)} "
                    f"{args_rule}")
        head = '{"name": ' + json.dumps(function.name) + ', "arguments": '
        return f"{lark_literal(head)} {args_rule} {lark_literal('}')}"

    def block_grammar(self, call: str, parallel: bool) -> str:
        if self.name_first:  # each call carries its own marker
            return f"start: {call}" + (f" {call}*" if parallel else "")
        more = f' (", " {call})*' if parallel else ""
        return f'start: {self.marker(_MARKER)} "[" {call}{more} "]"'
