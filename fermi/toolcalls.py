"""Reading tool calls out of a streamed answer, in the format the model's chat
template teaches:

- hermes (Qwen2.5, Qwen3, and the fallback fermi describes to templates that know
  no tools): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`;
- llama3 (Llama 3.x): `{"name": …, "parameters": {…}}`, bare or after `<|python_tag|>`;
- qwen3_coder (Qwen3-Coder): `<tool_call><function=NAME><parameter=P>value</parameter>…
  </function></tool_call>`, values turned into JSON by the tool's parameter types.

A bare JSON object that opens the answer and names a known tool is a call in the
JSON formats too (small models drop the tags). Text around calls is content.

The parser works on text deltas of any size: a tag cut across two deltas is held
back until it can be decided, and a call's arguments go out as they come, not
at its end."""

from __future__ import annotations

import json
import uuid
from .serving.records import ToolCall
from .thinking import held_suffix

OPENERS = {"hermes": ("<tool_call>",), "llama3": ("<|python_tag|>",), "qwen3_coder": ("<tool_call>", "<function=")}
CLOSER = {"hermes": "</tool_call>", "llama3": None, "qwen3_coder": "</tool_call>"}
ARG_KEYS = ('"arguments"', '"parameters"')
WS = " \t\r\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def scan_head(buf: str):
    """`{"name": "X", "arguments": ` at the start of buf -> (name, end); "more" when
    buf may still become one; None when it cannot."""
    i, name = 0, None
    for step in ("{", '"name"', ":", "string", ",", ARG_KEYS, ":"):
        while i < len(buf) and buf[i] in WS:
            i += 1
        if i == len(buf):
            return "more"
        if step == "string":
            if buf[i] != '"':
                return None
            try:
                name, i = json.decoder.scanstring(buf, i + 1)
            except json.JSONDecodeError:
                return "more"
            continue
        rest = buf[i:]
        for lit in step if isinstance(step, tuple) else (step,):
            if rest.startswith(lit):
                i += len(lit)
                break
            if lit.startswith(rest):
                return "more"
        else:
            return None
    return name, i


class ValueScanner:
    """Finds where one JSON value ends in text fed piece by piece."""

    def __init__(self, depth: int = 0):
        self.depth, self.in_str, self.esc, self.started = depth, False, False, depth > 0

    def feed(self, text: str) -> int | None:
        """The index in `text` just past the value's end, or None if it goes on."""
        for i, c in enumerate(text):
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 0:
                        return i + 1
            elif c == '"':
                self.in_str, self.started = True, True
            elif c in "{[":
                self.depth, self.started = self.depth + 1, True
            elif c in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif self.depth == 0 and self.started and c in WS + ",":
                return i  # a bare scalar ends
            elif c not in WS:
                self.started = True
        return None


class CallParser:
    """feed(text) -> records: ("content", text) pairs and ToolCall pieces."""

    def __init__(self, fmt: str, tools: dict[str, dict], parallel: bool = True):
        """tools: name -> the parameters' JSON schema; parallel False: one call at most."""
        self.fmt, self.tools, self.parallel = fmt, tools, parallel
        self.openers, self.closer = OPENERS[fmt], CLOSER[fmt]
        self.state = "text"
        self.buf = ""
        self.at_start = True  # a bare JSON call may come (nothing but whitespace before)
        self.bare = False
        self.calls: list[dict] = []  # {"id", "name", "arguments"}, as they come
        self.scanner: ValueScanner | None = None
        self.param: str | None = None  # qwen3_coder: the open parameter's name
        self.value: list[str] = []  # qwen3_coder: a typed parameter's text

    # --- output

    def _content(self, out: list, text: str) -> None:
        if self.calls and self.at_start and not text.strip():
            return  # whitespace between or after calls
        if text:
            if text.strip():
                self.at_start = False
            if out and isinstance(out[-1], tuple):
                out[-1] = ("content", out[-1][1] + text)
            else:
                out.append(("content", text))

    def _start(self, out: list, name: str) -> None:
        call = {"id": new_call_id(), "name": name, "arguments": ""}
        self.calls.append(call)
        out.append(ToolCall(len(self.calls) - 1, "", call["id"], name))
        self.at_start = False

    @property
    def finished(self) -> bool:
        """One call was wanted and it is whole: the answer may end."""
        return not self.parallel and bool(self.calls) and self.state == "text"

    # --- input

    def feed(self, text: str) -> list:
        out: list = []
        self.buf += text
        while self.buf and self._step(out):
            pass
        return out

    def flush(self) -> list:
        """The end of the answer: what is held back is content, unless a call is open
        (its arguments so far stay its arguments)."""
        out: list = []
        if self.state == "text" or (self.state == "head" and self.bare):
            self._content(out, self.buf)
        elif self.state == "raw":
            self._raw_call(out, self.buf, closed=False)
        elif self.state == "arguments":
            self._args_piece(out, self.buf)
        elif self.state in ("param", "value"):
            if self.state == "value":
                self._close_param(out, self.buf)
            self._args_piece(out, "}")
        self.buf, self.state = "", "text"
        return out

    def _step(self, out: list) -> bool:
        """Consume what can be decided of self.buf; False when it must wait for more."""
        return getattr(self, "_" + self.state)(out)

    def _text(self, out: list) -> bool:
        if self.at_start and self.fmt != "qwen3_coder":
            stripped = self.buf.lstrip(WS)
            if stripped.startswith("{"):
                self.state, self.bare = "head", True
                return True
            if not stripped:
                return False  # whitespace only: wait
        hits = [(self.buf.find(o), o) for o in self.openers if o in self.buf]
        if hits:
            i, opener = min(hits)
            self._content(out, self.buf[:i])
            self.buf = self.buf[i + len(opener):]
            self.bare = False
            self.state = "function" if opener == "<function=" else ("xml" if self.fmt == "qwen3_coder" else "head")
            return True
        keep = max(held_suffix(self.buf, o) for o in self.openers)
        self._content(out, self.buf[:len(self.buf) - keep])
        self.buf = self.buf[len(self.buf) - keep:]
        return False

    def _head(self, out: list) -> bool:
        head = scan_head(self.buf)
        if head == "more":
            return False
        if head is None or (self.bare and head[0] not in self.tools):
            if self.bare:  # an answer that happens to be JSON
                self.at_start = False
                self._content(out, self.buf)
                self.buf, self.state = "", "text"
            else:
                self.state = "raw"
            return True
        name, end = head
        self._start(out, name)
        self.buf = self.buf[end:].lstrip(WS)
        self.scanner, self.state = ValueScanner(), "arguments"
        return True

    def _arguments(self, out: list) -> bool:
        if not self.scanner.started:
            self.buf = self.buf.lstrip(WS)
            if not self.buf:
                return False
        end = self.scanner.feed(self.buf)
        if end is None:
            self._args_piece(out, self.buf)
            self.buf = ""
            return False
        self._args_piece(out, self.buf[:end])
        self.buf = self.buf[end:]
        self.scanner, self.state = ValueScanner(depth=1), "rest"
        return True

    def _args_piece(self, out: list, text: str) -> None:
        if text:
            self.calls[-1]["arguments"] += text
            out.append(ToolCall(len(self.calls) - 1, text))

    def _rest(self, out: list) -> bool:
        """The rest of the call object after its arguments (a closing brace, keys we ignore)."""
        end = self.scanner.feed(self.buf)
        if end is None:
            self.buf = ""
            return False
        self.buf = self.buf[end:]
        if self.bare or self.closer is None:
            self.state, self.at_start = "text", True
            self.buf = self.buf.lstrip(WS + ";,")
        else:
            self.state = "close"
        return True

    def _close(self, out: list) -> bool:
        i = self.buf.find(self.closer)
        if i < 0:
            keep = held_suffix(self.buf, self.closer)
            self.buf = self.buf[len(self.buf) - keep:]
            return False
        self.buf = self.buf[i + len(self.closer):]
        self.state, self.at_start = "text", True
        return True

    def _raw(self, out: list) -> bool:
        """A tagged call whose head is not `{"name": …, "arguments": …}`: read whole."""
        i = self.buf.find(self.closer) if self.closer else -1
        if i < 0:
            return False
        text, self.buf = self.buf[:i], self.buf[i + len(self.closer):]
        self.state, self.at_start = "text", True
        return self._raw_call(out, text)

    def _raw_call(self, out: list, text: str, closed: bool = True) -> bool:
        try:
            obj = json.loads(text)
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError(name)
        except (ValueError, KeyError, TypeError, AttributeError):
            self._content(out, self.openers[0] + text + (self.closer if closed else ""))
            return True
        self._start(out, name)
        self._args_piece(out, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
        return True

    # --- qwen3_coder's XML

    def _xml(self, out: list) -> bool:
        stripped = self.buf.lstrip(WS)
        if "<function=".startswith(stripped):
            return False
        if not stripped.startswith("<function="):
            self.state = "raw"
            return True
        self.buf = stripped[len("<function="):]
        self.state = "function"
        return True

    def _function(self, out: list) -> bool:
        i = self.buf.find(">")
        if i < 0:
            return False
        self._start(out, self.buf[:i].strip())
        self._args_piece(out, "{")
        self.buf, self.state = self.buf[i + 1:], "param"
        return True

    def _param(self, out: list) -> bool:
        stripped = self.buf.lstrip(WS)
        for tag in ("<parameter=", "</function>"):
            if stripped.startswith(tag):
                break
            if tag.startswith(stripped):
                return False
        else:  # neither: skip a character of noise
            self.buf = stripped[1:]
            return True
        if tag == "</function>":
            self._args_piece(out, "}")
            self.buf, self.state = stripped[len(tag):], "close"
            return True
        i = stripped.find(">")
        if i < 0:
            return False
        self.param = stripped[len(tag):i].strip()
        first = self.calls[-1]["arguments"] == "{"
        self._args_piece(out, ("" if first else ", ") + json.dumps(self.param) + ": ")
        self.buf, self.state, self.value = stripped[i + 1:], "value", []
        if self._is_string(self.param):
            self._args_piece(out, '"')
        return True

    def _is_string(self, param: str) -> bool:
        schema = self.tools.get(self.calls[-1]["name"], {}).get("properties", {}).get(param, {})
        kind = schema.get("type", "string")
        return kind == "string" or (isinstance(kind, list) and "string" in kind)

    def _value(self, out: list) -> bool:
        if not self.value and self.buf.startswith("\n"):
            self.buf = self.buf[1:]  # the newline after <parameter=P>
        if not self.value and not self.buf:
            return False
        end = self.buf.find("</parameter>")
        if end < 0:
            keep = held_suffix(self.buf, "\n</parameter>")
            piece, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            self._value_piece(out, piece)
            return False
        piece = self.buf[:end]
        self.buf = self.buf[end + len("</parameter>"):]
        self._close_param(out, piece[:-1] if piece.endswith("\n") else piece)
        self.state = "param"
        return True

    def _value_piece(self, out: list, piece: str) -> None:
        if not piece:
            return
        self.value.append(piece)
        if self._is_string(self.param):
            self._args_piece(out, json.dumps(piece, ensure_ascii=False)[1:-1])

    def _close_param(self, out: list, piece: str) -> None:
        self._value_piece(out, piece)
        if self._is_string(self.param):
            self._args_piece(out, '"')
            return
        text = "".join(self.value).strip()
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        self._args_piece(out, json.dumps(value, ensure_ascii=False))

