"""An incremental scanner of one tool-call JSON object, ``{"name": ..., "arguments": ...}``, fed
one character at a time.

It knows, as soon as the text allows, the function's name (once its string is complete) and how
much of the arguments value has arrived, so that a stream can send the name first and then the
arguments as they are generated. Only the top-level keys matter; nested values are skipped with a
bracket / string / escape count, and the arguments value is kept as the model wrote it (the same
text whole or streamed). An arguments value written as a JSON string (some models quote the
object) is decoded once complete.
"""

from __future__ import annotations

import json

_WS = " \t\r\n"


class _StringTracker:
    """Where a character falls relative to JSON strings: inside one, escaped, or closing it."""

    _in_string = False
    _escape = False

    def _string_char(self, ch: str) -> bool:
        """Follow one character inside a string; True when it closes the string."""
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            self._in_string = False
            return True
        return False


class CallObjectScanner(_StringTracker):
    def __init__(self, args_keys: tuple[str, ...]):
        self.args_keys = args_keys
        self.text = ""
        self.state = "start"  # start, key_or_end, key, colon, value_start, value, after_value
        self.done = False  # the object closed
        self.error = False  # the text is not a JSON object
        self.name: str | None = None
        self._key: str | None = None
        self._start = 0  # where the current key or value starts
        self._kind = ""  # the current value: "container", "string" or "scalar"
        self._nest = 0
        self._in_string = False
        self._escape = False
        self._args: tuple[int, int | None, str] | None = None  # start, end, kind
        self._seen_args = False

    def feed(self, ch: str) -> None:
        """Consume one character (nothing once done or in error)."""
        if self.done or self.error:
            return
        i = len(self.text)
        self.text += ch
        state = self.state
        if state == "start":
            if ch == "{":
                self.state = "key_or_end"
            elif ch not in _WS:
                self.error = True
        elif state in ("key_or_end", "key_next"):
            if ch == '"':
                self.state, self._start, self._escape = "key", i, False
            elif ch == "}" and state == "key_or_end":
                self.done = True
            elif ch not in _WS:
                self.error = True
        elif state == "key":
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                try:
                    self._key = json.loads(self.text[self._start:i + 1])
                except ValueError:
                    self.error = True
                self.state = "colon"
        elif state == "colon":
            if ch == ":":
                self.state = "value_start"
            elif ch not in _WS:
                self.error = True
        elif state == "value_start":
            if ch in _WS:
                return
            self._start, self.state = i, "value"
            self._in_string = self._escape = False
            if ch in "{[":
                self._kind, self._nest = "container", 1
            elif ch == '"':
                self._kind, self._in_string = "string", True
            elif ch in ",}]:":
                self.error = True
                return
            else:
                self._kind = "scalar"
            if self._key in self.args_keys and not self._seen_args:
                self._args = (i, None, self._kind)
        elif state == "value":
            self._value_char(ch, i)
        elif state == "after_value":
            if ch == ",":
                self.state = "key_next"
            elif ch == "}":
                self.done = True
            elif ch not in _WS:
                self.error = True

    def _value_char(self, ch: str, i: int) -> None:
        kind = self._kind
        if kind == "scalar":
            if ch in _WS or ch in ",}":
                self._end_value(i)
                self.state = "after_value"
                self.text = self.text[:i]
                self.feed(ch)  # the delimiter belongs to the object
            return
        if self._in_string:
            if self._string_char(ch) and kind == "string":
                self._end_value(i + 1)
            return
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._nest += 1
        elif ch in "}]":
            self._nest -= 1
            if self._nest == 0:
                self._end_value(i + 1)

    def _end_value(self, end: int) -> None:
        self.state = "after_value"
        raw = self.text[self._start:end]
        if self._key == "name" and self.name is None:
            try:
                value = json.loads(raw)
            except ValueError:
                value = None
            if isinstance(value, str) and value:
                self.name = value
        if self._args is not None and self._args[1] is None:
            self._args = (self._args[0], end, self._args[2])
            self._seen_args = True

    @property
    def has_arguments(self) -> bool:
        return self._args is not None

    def arguments(self) -> str:
        """The arguments text known so far: an object or array as it arrives; a string or
        scalar value only once complete ("" before); a JSON string decoded to its text."""
        if self._args is None:
            return ""
        start, end, kind = self._args
        if kind == "container":
            return self.text[start:end]
        if end is None:
            return ""
        raw = self.text[start:end]
        if kind == "string":
            try:
                return json.loads(raw)
            except ValueError:
                return raw
        return raw


class JsonObjectScanner(_StringTracker):
    """The extent of one JSON object fed one character at a time (leading whitespace skipped):
    ``done`` once its closing brace arrives, ``error`` when the text does not start with "{".
    Strings, escapes and nesting are followed; the text is kept as written."""

    def __init__(self) -> None:
        self.text = ""
        self.done = False
        self.error = False
        self._nest = 0
        self._in_string = False
        self._escape = False

    def feed(self, ch: str) -> None:
        if self.done or self.error:
            return
        if not self.text:
            if ch in _WS:
                return
            if ch != "{":
                self.error = True
                return
        self.text += ch
        if self._in_string:
            self._string_char(ch)
        elif ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._nest += 1
        elif ch in "}]":
            self._nest -= 1
            if self._nest == 0:
                self.done = True
