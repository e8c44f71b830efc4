"""The state machine that turns a reply, fed in pieces of any size, into content text and
tool-call deltas, for any ``ToolCallFormat``.

States: ``text`` (content; a suffix that could begin the start marker is held back, so markup
never leaks into the content), ``open`` (the block's opening text, mistral's "["), ``object``
(one call object, scanned by json_scanner.py), ``after`` (a separator, the block's end marker,
or for formats without one any other text); for the name-first form (``args_marker``: Mistral's
``[TOOL_CALLS]name[ARGS]{...}``) ``name`` (the function's name, an optional call id, up to the
arguments marker) and ``args`` (the arguments object; the block ends with it).

The content is the text outside the calls, without the whitespace that touches a block (held back
until non-space text follows). A call is announced (index, id, name) as soon as its name is
complete, then its arguments follow as they arrive. Text that only looked like a call (a block
whose object has no name, or is not JSON) goes to the content as written; a call cut before its
name was complete (the reply ended) is dropped. With ``max_calls``,
calls past that many are dropped (``parallel_tool_calls=false``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from soarllm.serve.tool_parsers.base import (
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
)
from soarllm.serve.tool_parsers.json_scanner import CallObjectScanner, JsonObjectScanner

_WS = " \t\r\n"
# name-first form: a function name (OpenAI: letters, digits, "_" and "-", at most 64; "." too),
# a call id of letters and digits; the text between the start and arguments markers is bounded
_NAME = r"[A-Za-z0-9_.\-]{1,64}"
_CALL_ID = r"[A-Za-z0-9]{1,64}"
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-\[\]]")
_MAX_NAME_TEXT = 160
Event = str | ToolCallDelta  # content text, or a piece of a call


class ToolCallStream:
    def __init__(self, fmt: ToolCallFormat, new_id: Callable[[], str],
                 max_calls: int | None = None, strip_texts: tuple[str, ...] = ()):
        self.fmt = fmt
        self.new_id = new_id
        self.max_calls = max_calls
        self.strip_texts = strip_texts
        self.state = "text"
        self.pending = ""  # content not handed out yet
        self.at_start = True  # only whitespace so far
        self.skip_ws = False  # whitespace right after a block is dropped
        self.replay = ""  # block text not handed out yet (content again if the block breaks)
        self.expect = ""  # marker text matched so far in the open / after states
        self.scanner: CallObjectScanner | None = None
        self.num_calls = 0
        self.current: int | None = None  # index of the call being streamed
        self.suppressed = False  # the current object is a call past max_calls
        self.marked = False  # the current block began with the start marker
        self.args_sent = 0
        self.head = ""  # name-first form: the text after the start marker, up to the arguments
        self.call_id: str | None = None  # name-first form: the id the model wrote, if any
        self.args: JsonObjectScanner | None = None  # name-first form: the arguments object
        self._out: list[Event] = []
        if fmt.args_marker:
            ids = rf"(?:{re.escape(fmt.id_marker)}({_CALL_ID}))?" if fmt.id_marker else ""
            self._head_re = re.compile(rf"({_NAME}){ids}{re.escape(fmt.args_marker)}")

    # -- the public side ---------------------------------------------------------------------

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of the reply, in order (content pieces merged, argument
        pieces of one call merged)."""
        for ch in text:
            self._char(ch)
        if self.state == "text":
            self._flush_text(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        """Events for what the end of the reply settles (held-back text, a half-written
        block)."""
        if self.state == "text":
            self._flush_text(final=True)
        elif self.state == "object" and self.current is None and not self.suppressed \
                and not self.marked:
            self._content(self.replay)  # unmarked JSON (llama3_json) that never became a call
        # else: a call cut before its name, after its start marker: markup, dropped
        self.state, self.replay = "text", ""
        return self._take()

    @property
    def called(self) -> bool:
        return self.num_calls > 0

    @staticmethod
    def collect(events: list[Event]) -> ExtractedToolCalls:
        """A whole reply's events as content and calls."""
        content = "".join(e for e in events if isinstance(e, str))
        calls: list[ToolCall] = []
        for e in events:
            if isinstance(e, str):
                continue
            if e.id is not None:
                calls.append(ToolCall(e.id, e.name or "", e.arguments))
            else:
                calls[e.index].arguments += e.arguments
        return ExtractedToolCalls(content or None, calls)

    # -- the machine -------------------------------------------------------------------------

    def _take(self) -> list[Event]:
        merged: list[Event] = []
        for e in self._out:
            last = merged[-1] if merged else None
            if isinstance(e, str) and isinstance(last, str):
                merged[-1] = last + e
            elif (isinstance(e, ToolCallDelta) and isinstance(last, ToolCallDelta)
                  and e.id is None and last.index == e.index and last.id is None):
                last.arguments += e.arguments
            else:
                merged.append(e)
        self._out = []
        return merged

    def _content(self, text: str) -> None:
        for s in self.strip_texts:
            text = text.replace(s, "")
        if text:
            self._out.append(text)

    def _char(self, ch: str) -> None:
        state = self.state
        if state == "text":
            self._text_char(ch)
            return
        self.replay += ch
        if state == "open":
            if self.fmt.args_marker and not self.expect and ch not in _WS \
                    and not self.fmt.open.startswith(ch):
                self.state, self.head = "name", ""
                self._name_char(ch)
                return
            self._marker_char(ch, {self.fmt.open: "object"})
        elif state == "object":
            self._object_char(ch)
        elif state == "name":
            self._name_char(ch)
        elif state == "args":
            self._args_char(ch)
        else:
            self._after_char(ch)

    def _text_char(self, ch: str) -> None:
        fmt = self.fmt
        if self.skip_ws:
            if ch in _WS:
                return
            self.skip_ws = False
        if self.at_start and ch not in _WS:
            self.at_start = False
            if fmt.bare_json_at_start and ch == "{":
                self.pending = ""  # leading whitespace
                self._begin_object()
                self.marked = False
                self.replay = ch
                self._object_char(ch)
                return
        self.pending += ch
        if fmt.start and self.pending.endswith(fmt.start):
            before = self.pending[:-len(fmt.start)]
            kept = before.rstrip(_WS)
            self._content(kept)
            # the whitespace before the marker is content again if the block breaks
            self.pending, self.replay, self.marked = "", before[len(kept):] + fmt.start, True
            if fmt.open:
                self.state, self.expect = "open", ""
            else:
                self._begin_object()

    def _begin_object(self) -> None:
        self.state = "object"
        self.scanner = CallObjectScanner(self.fmt.args_keys)
        self.current, self.suppressed, self.args_sent = None, False, 0

    def _object_char(self, ch: str) -> None:
        sc = self.scanner
        assert sc is not None
        sc.feed(ch)
        if sc.error:
            self._broken()
            return
        if self.current is None and not self.suppressed and sc.name is not None:
            if self.max_calls is not None and self.num_calls >= self.max_calls:
                self.suppressed = True
            else:
                self.current = self.num_calls
                self.num_calls += 1
                self._out.append(ToolCallDelta(self.current, self.new_id(), sc.name, ""))
                self.replay = ""
        if self.current is not None:
            args = sc.arguments()
            if len(args) > self.args_sent:
                self._out.append(ToolCallDelta(self.current, arguments=args[self.args_sent:]))
                self.args_sent = len(args)
                self.replay = ""
        if sc.done:
            if self.current is None and not self.suppressed:
                self._broken()  # a JSON object, but not a call
                return
            if self.current is not None and not sc.has_arguments:
                self._out.append(ToolCallDelta(self.current, arguments="{}"))
            self.state, self.expect, self.replay = "after", "", ""

    def _name_char(self, ch: str) -> None:
        """Name-first form: the text between the start marker and the arguments marker."""
        fmt = self.fmt
        assert fmt.args_marker is not None
        self.head += ch
        if not _NAME_CHARS.fullmatch(ch) or len(self.head) > _MAX_NAME_TEXT:
            self._broken()
            return
        if not self.head.endswith(fmt.args_marker):
            return
        m = self._head_re.fullmatch(self.head)
        if m is None:
            self._broken()
            return
        self.state, self.args = "args", JsonObjectScanner()
        self.call_id = m.group(2) if fmt.id_marker else None
        self.current, self.suppressed, self.args_sent = None, False, 0

    def _args_char(self, ch: str) -> None:
        """Name-first form: the arguments object. The call is announced with its first brace
        (so that a marker followed by anything else is content, not a call)."""
        sc = self.args
        assert sc is not None
        sc.feed(ch)
        if sc.error:
            self._broken()
            return
        if not sc.text:
            return  # whitespace before the object
        if self.current is None and not self.suppressed:
            if self.max_calls is not None and self.num_calls >= self.max_calls:
                self.suppressed = True
            else:
                self.current = self.num_calls
                self.num_calls += 1
                m = self._head_re.fullmatch(self.head)
                assert m is not None
                self._out.append(ToolCallDelta(self.current, self.call_id or self.new_id(),
                                               m.group(1), ""))
        if self.current is not None and len(sc.text) > self.args_sent:
            self._out.append(ToolCallDelta(self.current, arguments=sc.text[self.args_sent:]))
            self.args_sent = len(sc.text)
        self.replay = ""
        if sc.done:  # one call per start marker: the block ends here
            self.state, self.skip_ws, self.args = "text", True, None

    def _after_char(self, ch: str) -> None:
        fmt = self.fmt
        targets = {}
        if fmt.separator:
            targets[fmt.separator] = "object"
        if fmt.end:
            targets[fmt.end] = "text"
        if not self.expect and ch in _WS:
            return
        if fmt.end is None and not any(t.startswith(self.expect + ch) for t in targets):
            # a block without an end marker ends where other text starts
            self.state, self.replay = "text", ""
            rest, self.expect = self.expect + ch, ""
            for c in rest:
                self._text_char(c)
            return
        self._marker_char(ch, targets)

    def _marker_char(self, ch: str, targets: dict[str, str]) -> None:
        if not self.expect and ch in _WS:
            return
        self.expect += ch
        for marker, state in targets.items():
            if marker == self.expect:
                self.expect = ""
                if state == "object":
                    self._begin_object()
                else:
                    self.state, self.replay, self.skip_ws = "text", "", True
                return
        if not any(m.startswith(self.expect) for m in targets):
            self._broken()

    def _broken(self) -> None:
        """The block is not the format's markup: what was held of it is content."""
        self._content(self.replay)
        self.state, self.replay, self.expect = "text", "", ""
        self.scanner, self.current, self.suppressed = None, None, False
        self.head, self.args = "", None

    def _flush_text(self, final: bool) -> None:
        text = self.pending
        if final:
            self.pending = ""
            if self.num_calls:  # after calls, a start marker cut short is markup: dropped
                start = self.fmt.start
                for k in range(min(len(start) - 1, len(text)), 0, -1):
                    if text.endswith(start[:k]):
                        text = text[:-k]
                        break
                text = text.rstrip(_WS)
            self._content(text)
            return
        hold = 0  # a suffix that may begin the start marker or a text to strip
        for marker in (self.fmt.start, *self.strip_texts):
            for k in range(min(len(marker) - 1, len(text)), hold, -1):
                if text.endswith(marker[:k]):
                    hold = k
                    break
        emit = text[:len(text) - hold]
        stripped = emit.rstrip(_WS)
        self._content(stripped)
        self.pending = text[len(stripped):]
