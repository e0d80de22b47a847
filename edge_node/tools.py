"""OpenAI tool calling for the chat API: validation, rendering, the answer's grammar (pure functions).

One format, Hermes' (Qwen2.5, Qwen3 and Hermes templates use it natively), is rendered, constrained and
parsed::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- ``tool_request`` validates ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (a ``ToolError`` names
  the param) and compiles the parameter schemas with ``runtime.grammar``.
- ``ToolRequest.render`` turns the conversation (assistant ``tool_calls``, ``tool`` results) into prompt ids:
  with the model's chat template where it takes ``tools`` and writes ``<tool_call>``; else with the fallback:
  the tools listed in the system message, calls written as above, results as a ``user`` turn of
  ``<tool_response>`` blocks.
- ``ToolRequest.grammar`` constrains the answer: ``required`` and a named function force calls whose
  arguments follow the function's schema; ``auto`` lets text run until ``<tool_call>`` appears and constrains
  the call from there; ``none`` adds nothing (and the tools are not shown to the model).
- ``edge_node.tool_calls`` parses the generated text back into OpenAI ``tool_calls``, whole or streamed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from protos import splitglm_pb2 as pb
from runtime.grammar import GrammarError, Grammars, schema_depth, without_annotations

from .tool_calls import CALL_CLOSE, CALL_OPEN, ToolCallParser

__all__ = ["FIRST_NOT_A_TOOL_RESULT", "MAX_TOOLS", "MESSAGE_RULES", "TOOLS_SCHEMA", "TOOL_CALL_SCHEMA",
           "TOOL_CHOICE_SCHEMA", "Tool", "ToolChoice", "ToolError", "ToolRequest", "call_text",
           "template_supports_tools", "tool_request"]

MAX_TOOLS = 128
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
NO_PARAMETERS = {"type": "object", "properties": {}}
CHOICES = ("none", "auto", "required")
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # json.dumps' own
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
FALLBACK_PROMPT = """# Tools

You may call functions to answer. Their signatures, one JSON object a line, inside <tools></tools>:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object of its name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function name>, "arguments": <the arguments as a JSON object>}}
</tool_call>
Results come back inside <tool_response></tool_response> tags."""


class ToolError(ValueError):
    """A request's tools or tool messages that cannot be served; ``param`` names the field (a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict  # a JSON schema of the arguments
    strict: bool | None  # accepted; the arguments are constrained by the schema either way

    def spec(self) -> dict:
        """The tool as OpenAI's request shows it (what chat templates and the fallback prompt render)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none", "auto", "required" or "function" (the one named)
    name: str | None = None


def _keys(value, allowed: tuple[str, ...], param: str) -> dict:
    if not isinstance(value, dict):
        raise ToolError(param, "must be an object")
    extra = next((k for k in value if k not in allowed), None)
    if extra is not None:
        raise ToolError(f"{param}.{extra}", f"unrecognized field (a {param.split('[')[0]} entry has "
                                           f"{', '.join(allowed)})")
    return value


def parse_tool(raw, i: int) -> Tool:
    """One entry of ``tools``, checked."""
    where = f"tools[{i}]"
    _keys(raw, ("type", "function"), where)
    if raw.get("type") != "function":
        raise ToolError(f"{where}.type", 'must be "function" (the only kind of tool served)')
    fn = _keys(raw.get("function"), ("name", "description", "parameters", "strict"), f"{where}.function")
    name, description = fn.get("name"), fn.get("description")
    parameters, strict = fn.get("parameters"), fn.get("strict")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolError(f"{where}.function.name", "must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.function.description", "must be a string")
    if parameters is not None and not isinstance(parameters, dict):
        raise ToolError(f"{where}.function.parameters", "must be a JSON schema object")
    if strict is not None and not isinstance(strict, bool):
        raise ToolError(f"{where}.function.strict", "must be a boolean")
    return Tool(name, description, NO_PARAMETERS if parameters is None else parameters, strict)


def parse_choice(raw, names: list[str]) -> ToolChoice:
    """``tool_choice``, checked against the tools' names; absent: "auto" with tools, else "none" (what "auto"
    without tools amounts to)."""
    if raw is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(raw, str):
        if raw not in CHOICES:
            raise ToolError("tool_choice", f'must be "none", "auto", "required" or a named function, got {raw!r}')
        choice = ToolChoice(raw)
    else:
        _keys(raw, ("type", "function"), "tool_choice")
        if raw.get("type") != "function":
            raise ToolError("tool_choice.type", 'must be "function"')
        name = _keys(raw.get("function"), ("name",), "tool_choice.function").get("name")
        if not isinstance(name, str):
            raise ToolError("tool_choice.function.name", "must be a string")
        if name not in names:
            raise ToolError("tool_choice.function.name", f"names {name!r}, which is not among the tools")
        choice = ToolChoice("function", name)
    if choice.mode not in ("none", "auto") and not names:  # "auto" without tools: nothing to call (as vLLM)
        raise ToolError("tool_choice", "is only allowed when tools are given")
    return choice


def tool_request(tools, tool_choice=None, parallel_tool_calls=None, grammars: Grammars | None = None) -> ToolRequest:
    """The request's tool fields, checked; each parameters schema compiled by ``grammars`` (GrammarError ->
    ToolError naming the tool). ``grammars`` None: not compiled (the caller has no vocabulary)."""
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ToolError("tools", "must be a list of tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"at most {MAX_TOOLS} tools are served, got {len(tools)}")
    parsed = [parse_tool(t, i) for i, t in enumerate(tools)]
    names = [t.name for t in parsed]
    dup = next((i for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ToolError(f"tools[{dup}].function.name", f"{names[dup]!r} names two tools")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls", "must be a boolean")
    req = ToolRequest(tuple(parsed), parse_choice(tool_choice, names), parallel_tool_calls is not False)
    if grammars is not None and parsed:
        req.compile(grammars)
    return req


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: ToolChoice
    parallel: bool = True  # OpenAI's parallel_tool_calls: several calls in one answer

    @property
    def active(self) -> bool:
        """Whether the model is shown the tools and may (or must) call one."""
        return bool(self.tools) and self.choice.mode != "none"

    def compile(self, grammars: Grammars) -> None:
        """Compile every tool's schema (as the ``required`` grammar) and the answer's grammar under
        ``grammars``' limits; ToolError names the tool whose parameters are refused."""
        for i, tool in enumerate(self.tools):
            depth = schema_depth(tool.parameters)
            if depth > grammars.limits.max_depth:
                raise ToolError(f"tools[{i}].function.parameters",
                                f"the JSON schema nests {depth} levels; the limit is {grammars.limits.max_depth}")
        every = ToolRequest(self.tools, ToolChoice("required"), self.parallel)
        for grammar in dict.fromkeys([every.grammar().text, *([self.grammar().text] if self.active else [])]):
            try:
                grammars.matcher("lark", grammar)
            except GrammarError as e:
                for i, tool in enumerate(self.tools):  # which tool: its schema compiled alone
                    try:
                        grammars.matcher("json_schema", json.dumps(tool.parameters))
                    except GrammarError as alone:
                        raise ToolError(f"tools[{i}].function.parameters", str(alone)) from None
                raise ToolError("tools", f"the tools' grammar cannot be used: {e}") from None

    def grammar(self) -> pb.Grammar | None:
        """The answer's grammar, or None (no tools, or tool_choice "none")."""
        if not self.active:
            return None
        if self.choice.mode == "function":
            tools, mode, several = [t for t in self.tools if t.name == self.choice.name], "required", False
        else:
            tools, mode, several = list(self.tools), self.choice.mode, self.parallel
        return pb.Grammar(kind="lark", text=lark_grammar(tools, mode, several))

    def parser(self) -> ToolCallParser | None:
        """A parser of the answer's tool calls, or None when the model is not asked to call."""
        return ToolCallParser() if self.active else None

    def render(self, tokenizer, messages: list[dict]) -> list[int]:
        """The conversation's prompt ids (``add_generation_prompt``). ``messages`` are OpenAI's, as dicts with
        text ``content`` (str or None); assistant ``tool_calls`` and ``tool`` messages are checked here."""
        native = template_supports_tools(tokenizer)
        turns = template_turns(messages) if native else fallback_turns(messages)
        specs = [t.spec() for t in self.tools] if self.active else None
        if specs and not native:
            turns = with_tools_prompt(turns, specs)
        try:
            ids = tokenizer.apply_chat_template(turns, tools=specs if native else None, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 -- a template that rejects the conversation (e.g. role order)
            raise ToolError("messages", f"the chat template rejected the messages: {e}") from None
        return list(ids)


# ---- the tool fields' published JSON schema (edge_node.schemas; what the code here checks, for clients) --------

STRING = {"type": "string"}
TOOL_SCHEMA = {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
    "type": {"const": "function"}, "function": {
        "type": "object", "required": ["name"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "pattern": f"^{NAME.pattern}$"}, "description": STRING,
            "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}}}  # fmt: skip
TOOLS_SCHEMA = {"type": "array", "maxItems": MAX_TOOLS, "items": TOOL_SCHEMA}
TOOL_CHOICE_SCHEMA = {"anyOf": [
    {"enum": list(CHOICES)},
    {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "additionalProperties": False,
                     "properties": {"name": STRING}}}}]}  # fmt: skip
TOOL_CALL_SCHEMA = {"type": "object", "required": ["id", "type", "function"], "additionalProperties": False,
                    "properties": {"id": STRING, "type": {"const": "function"}, "function": {
                        "type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                        "properties": {"name": STRING, "arguments": STRING}}}}  # fmt: skip
MESSAGE_RULES = {"allOf": [  # a tool message answers a call; only an assistant's carries calls
    {"if": {"properties": {"role": {"const": "tool"}}},
     "then": {"required": ["tool_call_id", "content"], "properties": {"tool_call_id": STRING, "content": STRING}},
     "else": {"not": {"required": ["tool_call_id"]}}},
    {"if": {"properties": {"role": {"const": "assistant"}}}, "else": {"properties": {"tool_calls": {"maxItems": 0}}}},
]}  # fmt: skip
FIRST_NOT_A_TOOL_RESULT = {"not": {"prefixItems": [{"properties": {"role": {"const": "tool"}}, "required": ["role"]}]}}


# ---- the answer's grammar ----------------------------------------------------------------------------------

def call_schema(tool: Tool) -> dict:
    """The JSON of one call to ``tool``: its name, then arguments that follow its schema (the schema's own
    ``#...`` references moved under ``arguments``, where it now sits)."""
    arguments = rebase(without_annotations(tool.parameters))  # (its descriptions are prompt text: kept at the edge)
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_FORMAT}


def rebase(schema, root: str = "#/properties/arguments"):
    """``schema`` with its local ``$ref`` pointers ("#", "#/$defs/X") made relative to ``root``."""
    if isinstance(schema, dict):
        return {k: (root + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else rebase(v, root))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [rebase(v, root) for v in schema]
    return schema


def lark_grammar(tools: list[Tool], mode: str, several: bool) -> str:
    """llguidance Lark: "required", one call (or several, one a line) of one of ``tools``; "auto", text that
    holds no ``<tool_call>``, or text up to a ``<tool_call>`` and the call(s) from there."""
    more = r' ("\n" call)*' if several else ""
    first = "call" if mode == "required" else "TEXT | head body"
    lines = ["%llguidance {}",
             f"start: {first}{more}",
             f'call: "{CALL_OPEN}" body',
             rf'body: "\n" fn "\n{CALL_CLOSE}"',
             "fn: " + " | ".join(f"fn_{i}" for i in range(len(tools)))]
    if mode != "required":
        lines += [rf"TEXT: /(?s:.*)/ & ~/(?s:.*){CALL_OPEN}(?s:.*)/", f"head[lazy]: /(?s:.*){CALL_OPEN}/"]
    lines += [f"fn_{i}: %json {json.dumps(call_schema(t), ensure_ascii=False)}" for i, t in enumerate(tools)]
    return "\n".join(lines) + "\n"


# ---- rendering ---------------------------------------------------------------------------------------------

def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` and writes calls as ``<tool_call>``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    if not isinstance(template, str) or CALL_OPEN not in template:
        return False
    import jinja2
    import jinja2.meta

    try:
        return "tools" in jinja2.meta.find_undeclared_variables(
            jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    except jinja2.TemplateError:  # a tag of transformers' own environment: read the text
        return re.search(r"\btools\b", template) is not None


def call_text(name: str, arguments) -> str:
    """One call as the model writes it (``arguments``: the parsed JSON)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def checked_calls(message: dict, i: int) -> list[tuple[str, str, object]]:
    """An assistant message's ``tool_calls`` as (id, name, parsed arguments)."""
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ToolError(f"messages[{i}].tool_calls", "must be a list")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        _keys(call, ("id", "type", "function"), where)
        if call.get("type") != "function":
            raise ToolError(f"{where}.type", 'must be "function"')
        if not isinstance(call.get("id"), str):
            raise ToolError(f"{where}.id", "must be a string")
        fn = _keys(call.get("function"), ("name", "arguments"), f"{where}.function")
        if not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ToolError(f"{where}.function", "needs a name and arguments, both strings")
        try:
            arguments = json.loads(fn["arguments"])
        except ValueError:
            raise ToolError(f"{where}.function.arguments", "is not valid JSON") from None
        out.append((call["id"], fn["name"], arguments))
    return out


def conversation(messages: list[dict]):
    """Each message with its checked calls (assistant) or the name of the call it answers (tool): tuples
    (index, message, calls, name). A tool message answers a call of the assistant message before it."""
    open_calls: dict[str, str] = {}
    for i, m in enumerate(messages):
        role = m.get("role")
        if role == "assistant":
            calls = checked_calls(m, i)
            open_calls = {cid: name for cid, name, _ in calls}
            yield i, m, calls, None
        elif role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                raise ToolError(f"messages[{i}].tool_call_id", "a tool message needs the id of the call it answers")
            if cid not in open_calls:
                raise ToolError(f"messages[{i}].tool_call_id",
                                f"{cid!r} answers no call of the assistant message before it")
            if not isinstance(m.get("content"), str):
                raise ToolError(f"messages[{i}].content", "a tool message needs content (the call's result)")
            yield i, m, [], open_calls[cid]
        else:
            if m.get("tool_calls"):
                raise ToolError(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
            open_calls = {}
            yield i, m, [], None


def template_turns(messages: list[dict]) -> list[dict]:
    """Messages for a template with tool support: call arguments as objects (as transformers' templates expect)."""
    turns = []
    for _, m, calls, name in conversation(messages):
        turn = {"role": m["role"], "content": m.get("content") or ""}
        if calls:
            turn["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": n, "arguments": args}}
                                  for cid, n, args in calls]
        if name is not None:
            turn |= {"tool_call_id": m["tool_call_id"], "name": name}
        turns.append(turn)
    return turns


def fallback_turns(messages: list[dict]) -> list[dict]:
    """Messages for a template without tool support: calls written into the assistant's text; consecutive tool
    results merged into one user turn of ``<tool_response>`` blocks."""
    turns: list[dict] = []
    results = False  # whether turns[-1] is a turn of tool results
    for _, m, calls, name in conversation(messages):
        if name is not None:
            block = f"{RESPONSE_OPEN}\n{m['content']}\n{RESPONSE_CLOSE}"
            if results:
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block})
            results = True
            continue
        text = "\n".join([*([m["content"]] if m.get("content") else []), *(call_text(n, a) for _, n, a in calls)])
        turns.append({"role": m["role"], "content": text})
        results = False
    return turns


def with_tools_prompt(turns: list[dict], specs: list[dict]) -> list[dict]:
    """The fallback's tool list: appended to the system message, or a system message put first."""
    prompt = FALLBACK_PROMPT.format(tools="\n".join(json.dumps(s, ensure_ascii=False) for s in specs))
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}, *turns[1:]]
    return [{"role": "system", "content": prompt}, *turns]
