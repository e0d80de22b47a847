"""The model's tool calls read back from its text: OpenAI ``tool_calls``, whole or as streamed deltas.

The text is what ``edge_node.tools`` constrains: optional content, then calls
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` one a line. ``ToolCallParser`` is fed
text as it is generated and returns OpenAI chat-chunk deltas, as vLLM's Hermes parser streams them:
``{"content": ...}`` until a call starts; ``{"tool_calls": [{"index", "id", "type", "function": {"name",
"arguments": ""}}]}`` once the name is known; then ``{"tool_calls": [{"index", "function": {"arguments":
delta}}]}``. ``parse_tool_calls`` runs the same parser over a whole text, so a streamed answer and a whole
one carry the same content and calls. Whitespace next to a call is not content; the arguments are the
model's own JSON text, unchanged.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

__all__ = ["CALL_CLOSE", "CALL_OPEN", "ParsedAnswer", "ToolCallParser", "finish_reason", "parse_tool_calls"]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')  # a call up to its arguments


def call_id() -> str:
    """A new call's id, shaped as OpenAI's."""
    return "call_" + uuid.uuid4().hex[:24]


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ValueEnd:
    """Where one JSON value ends, in text that arrives in pieces (strings, escapes and nesting followed)."""

    def __init__(self):
        self.depth = 0  # open objects and arrays
        self.started = self.scalar = self.in_string = self.escape = self.done = False

    def feed(self, text: str) -> int:
        """How many characters of ``text`` belong to the value (``done`` once it ended)."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        self.done = True
                        return i + 1
            elif self.scalar:
                if c in ",}] \t\r\n":  # a number, true, false or null ends at its delimiter
                    self.done = True
                    return i
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.done = True
                    return i + 1
            elif self.depth == 0:
                self.scalar = True
            self.started = True
        return len(text)


@dataclass
class ParsedAnswer:
    content: str | None  # the text outside the calls; None when the answer is only calls
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI's: {id, type, function: {name, arguments}}
    complete: bool = True  # every call started was closed (else the text was cut, e.g. by max_tokens)


def finish_reason(reason: str, answer: ParsedAnswer) -> str:
    """OpenAI's finish_reason: "tool_calls" where the model stopped after calling, else the generation's."""
    return "tool_calls" if answer.tool_calls and answer.complete and reason == "stop" else reason


class ToolCallParser:
    """Text deltas in, OpenAI chat-chunk deltas out (see the module's docstring)."""

    def __init__(self):
        self.buf = ""  # text received and not yet read
        self.state = "text"  # "text" | "head" (before the name) | "args" | "tail" (after the arguments)
        self.content = ""
        self.calls: list[dict] = []
        self.value = ValueEnd()
        self.closed = 0  # calls whose </tool_call> came

    def feed(self, delta: str) -> list[dict]:
        """The deltas that ``delta`` (more generated text) completes, in order."""
        self.buf += delta
        out: list[dict] = []
        while getattr(self, "_" + self.state)(out):
            pass
        return out

    def finish(self) -> list[dict]:
        """The deltas left at the end of the text (content that was held back)."""
        out: list[dict] = []
        if self.state == "text":
            rest = self.buf.strip() if self.calls else self.buf
            if not (self.calls and CALL_OPEN.startswith(rest)):  # after calls: another call cut in its marker
                self._content(out, rest)
        elif self.state == "head":
            self._whole_call(out, self.buf)
        self.buf = ""
        return out

    def answer(self) -> ParsedAnswer:
        """The content and calls read so far (after ``finish``: the whole answer's)."""
        content = None if self.calls and not self.content else self.content
        return ParsedAnswer(content, [dict(c, function=dict(c["function"])) for c in self.calls],
                            self.closed == len(self.calls) and self.state == "text")

    def _content(self, out: list[dict], text: str) -> None:
        if self.calls and not self.content:
            text = text.lstrip()
        if text:
            self.content += text
            if out and "content" in out[-1]:
                out[-1]["content"] += text
            else:
                out.append({"content": text})

    def _arguments(self, out: list[dict], text: str) -> None:
        index = len(self.calls) - 1
        self.calls[-1]["function"]["arguments"] += text
        last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
        if last is not None and last["index"] == index and "id" not in last:  # one delta of arguments
            last["function"]["arguments"] += text
        elif text:
            out.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})

    def _start_call(self, out: list[dict], name: str) -> None:
        call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        out.append({"tool_calls": [{"index": len(self.calls) - 1, **call,
                                    "function": dict(call["function"])}]})

    def _text(self, out: list[dict]) -> bool:
        at = self.buf.find(CALL_OPEN)
        if at >= 0:
            self._content(out, self.buf[:at].rstrip())
            self.buf, self.state = self.buf[at + len(CALL_OPEN):], "head"
            return True
        keep = held_back(self.buf, CALL_OPEN)
        ready = self.buf[:len(self.buf) - keep]
        ready = ready.rstrip()  # whitespace waits: it is not content if a call follows
        self._content(out, ready)
        self.buf = self.buf[len(ready):]
        return False

    def _head(self, out: list[dict]) -> bool:
        m = HEAD.match(self.buf)
        if m is None:
            end = self.buf.find(CALL_CLOSE)
            if end < 0:
                return False
            self._whole_call(out, self.buf[:end])  # not the shape streamed: read whole, or dropped
            self.buf, self.state = self.buf[end + len(CALL_CLOSE):], "text"
            self.closed += 1
            return True
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            name = m.group(1)
        self._start_call(out, name)
        self.buf, self.state, self.value = self.buf[m.end():].lstrip(), "args", ValueEnd()
        return True

    def _args(self, out: list[dict]) -> bool:
        self.buf = self.buf if self.value.started else self.buf.lstrip()
        n = self.value.feed(self.buf)
        self._arguments(out, self.buf[:n])
        self.buf = self.buf[n:]
        if self.value.done:
            self.state = "tail"
            return True
        return False

    def _tail(self, out: list[dict]) -> bool:
        end = self.buf.find(CALL_CLOSE)
        if end < 0:
            self.buf = self.buf[len(self.buf) - held_back(self.buf, CALL_CLOSE):]
            return False
        self.buf, self.state = self.buf[end + len(CALL_CLOSE):], "text"
        self.closed += 1
        return True

    def _whole_call(self, out: list[dict], body: str) -> None:
        """A call body that did not stream (e.g. its arguments came before its name): a call if it parses."""
        try:
            call = json.loads(body)
        except ValueError:
            return
        if isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call:
            self._start_call(out, call["name"])
            args = call["arguments"]
            self._arguments(out, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> ParsedAnswer:
    """A whole answer's content and calls (the streaming parser run over it)."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser.answer()
