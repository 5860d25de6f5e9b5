"""The shape a request asks its answer to take, as the engine's ``StructuredOutputsParams``.

Four request fields can ask for one: OpenAI's ``response_format`` (``json_schema`` or ``json_object``), vLLM's
``structured_outputs``, vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` /
``structural_tag`` (with their options ``guided_whitespace_pattern`` and ``guided_decoding_backend``, which apply to
whichever of these the request uses), and, on chat, ``tool_choice`` ``required`` or a named function (the grammar
of a call). A request may use one of them: two are refused with 400. Every constraint is checked up front (xgrammar parses it, in milliseconds, with
no tokenizer), so a schema, regex or grammar the engine cannot use is a 400 naming the field the client sent
(``response_format.json_schema.schema``, ``tools[2].function.parameters``, ``structured_outputs.regex``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferneo.entrypoints.openai.errors import APIError, bad_request
from inferneo.entrypoints.openai.protocol import ChatCompletionRequest, _SamplingBody
from inferneo.entrypoints.openai.tool_parsers import function_parameters, required_calls_schema
from inferneo.sampling_params import StructuredOutputsParams
from inferneo.structured_output import StructuredOutputError, check_schema_reads, check_structured_outputs

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
           "structural_tag": "structural_tag"}
# vLLM's guided_decoding_backend: its backends, and the options it took after a colon ("xgrammar:no-fallback").
_BACKENDS = {"auto": "auto", "xgrammar": "xgrammar", "guidance": "guidance", "llguidance": "guidance"}
_BACKEND_OPTIONS = {"disable-any-whitespace": "disable_any_whitespace",
                    "disable-additional-properties": "disable_additional_properties",
                    "no-additional-properties": "disable_additional_properties", "no-fallback": "disable_fallback"}


@dataclass(slots=True, frozen=True)
class _Asked:
    """One request field's constraint: the field, the constraint's fields, and the name errors give its value."""

    field: str
    values: dict[str, Any]
    param: str


def structured_outputs_of(req: _SamplingBody) -> StructuredOutputsParams | None:
    """The constraint ``req`` asks for (None: none), checked; an ``APIError`` (400 naming the field) when two
    fields ask for one, or when the engine could not use it."""
    asked = _constraint_fields(req)
    if isinstance(req, ChatCompletionRequest):
        _check_tools(req)
        tool = _tool_constraint(req)
        if tool is not None:
            asked.append(tool)
    _apply_options(req, asked)
    if not asked:
        return None
    if len(asked) > 1:
        first, second = asked[0].field, asked[1].field
        raise bad_request(f"{second} and {first} both constrain the answer; a request may use only one of "
                          "response_format, structured_outputs, guided_*, and tool_choice 'required' or a named "
                          "function", second)
    return _checked(asked[0])


def _apply_options(req: _SamplingBody, asked: list[_Asked]) -> None:
    """Add vLLM's constraint options (``guided_decoding_backend``, ``guided_whitespace_pattern``) to the constraints
    ``asked`` (a tool call's grammar included); a 400 naming the option when there is none to apply it to."""
    options = _backend_options(req.guided_decoding_backend)
    if req.guided_whitespace_pattern is not None:
        options["whitespace_pattern"] = req.guided_whitespace_pattern
    if options and not asked:
        field = "guided_whitespace_pattern" if req.guided_whitespace_pattern is not None else "guided_decoding_backend"
        raise bad_request(f"{field} is an option of a constraint, and the request asks for none (response_format, "
                          "structured_outputs, guided_*, or tool_choice 'required' or a named function)", field)
    if req.guided_whitespace_pattern is not None and any(
            not ({"json", "json_object"} & set(item.values)) for item in asked):
        raise bad_request("guided_whitespace_pattern is the whitespace of a JSON answer: it goes with a JSON schema "
                          "or json_object, not a regex, choice, grammar or structural tag", "guided_whitespace_pattern")
    for item in asked:
        item.values.update(options)


def _backend_options(value: str | None) -> dict[str, Any]:
    """The ``StructuredOutputsParams`` options vLLM's ``guided_decoding_backend`` names: ``auto``, ``xgrammar`` or
    ``guidance`` (``llguidance``), with vLLM's options after a colon; a 400 naming the field for anything else."""
    if value is None:
        return {}
    name, _, rest = value.strip().partition(":")
    backend = _BACKENDS.get(name.strip().lower())
    if backend is None:
        raise bad_request(f"guided_decoding_backend {value!r} is not one of Inferneo's: it has xgrammar and "
                          "llguidance ('xgrammar', 'guidance' or 'llguidance' to use one alone; 'auto', the default, "
                          "picks per constraint: xgrammar for what it enforces, llguidance for the rest). "
                          "outlines and lm-format-enforcer are not available", "guided_decoding_backend")
    options: dict[str, Any] = {"backend": backend}
    for option in filter(None, (o.strip() for o in rest.split(","))):
        if option not in _BACKEND_OPTIONS:
            raise bad_request(f"guided_decoding_backend option {option!r} is not one of "
                              f"{', '.join(sorted(_BACKEND_OPTIONS))}", "guided_decoding_backend")
        options[_BACKEND_OPTIONS[option]] = True
    return options


def _constraint_fields(req: _SamplingBody) -> list[_Asked]:
    asked = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema":
        asked.append(_Asked("response_format", {"json": fmt.json_schema.schema_}, "response_format.json_schema.schema"))
    elif fmt is not None and fmt.type == "json_object":
        asked.append(_Asked("response_format", {"json_object": True}, "response_format"))
    if req.structured_outputs is not None:
        asked.append(_Asked("structured_outputs", req.structured_outputs.fields(), ""))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            asked.append(_Asked(name, {kind: value}, name))
    return asked


def _check_tools(req: ChatCompletionRequest) -> None:
    """400 for a ``tool_choice`` that does not fit ``tools``, and for a function whose ``parameters`` the engine
    could not use: a grammar must enforce those of the functions ``tool_choice`` forces (``required``: all, or the
    named one); the others (every function under ``auto`` and ``none``) need only be a schema xgrammar reads."""
    names = [tool.function.name for tool in req.tools or ()]
    mode = req.tool_mode()
    if mode != "none" and not names:
        raise bad_request(f"tool_choice {req.tool_choice!r} needs 'tools', a non-empty list of functions",
                          "tool_choice")
    named = req.named_tool()
    if named is not None and named not in names:
        raise bad_request(f"tool_choice names the function {named!r}, which is not among the tools "
                          f"({', '.join(repr(n) for n in names)})", "tool_choice")
    for i, tool in enumerate(req.tools or ()):
        if tool.function.parameters is not None:
            if tool.function.parameters.get("type", "object") != "object":
                raise bad_request("a function's parameters must be a JSON schema of an object "
                                  "({'type': 'object', ...})", f"tools[{i}].function.parameters")
            forced = mode == "required" or tool.function.name == named
            _checked(_Asked("tools", {"json": tool.function.parameters}, f"tools[{i}].function.parameters"),
                     enforced=forced)


def _tool_constraint(req: ChatCompletionRequest) -> _Asked | None:
    """The grammar of a call for ``tool_choice`` ``required`` (an array of calls) or a named function (its
    arguments); None for ``auto`` and ``none``, which leave the answer free.

    A forced call is compact JSON (``disable_any_whitespace``): its text is re-encoded into ``tool_calls`` anyway,
    and whitespace runs between its tokens would only spend ``max_tokens`` (a small model that drifts into them
    can run out before the call is complete)."""
    mode = req.tool_mode()
    tools = req.tools or []
    if mode == "named":
        index = next(i for i, t in enumerate(tools) if t.function.name == req.named_tool())
        return _Asked("tool_choice", {"json": function_parameters(tools[index].function.parameters),
                                      "disable_any_whitespace": True}, f"tools[{index}].function.parameters")
    if mode == "required":
        functions = [{"name": t.function.name, "parameters": t.function.parameters} for t in tools]
        parallel = req.parallel_tool_calls is not False
        return _Asked("tool_choice", {"json": required_calls_schema(functions, parallel),
                                      "disable_any_whitespace": True}, "tools")
    return None


def _checked(asked: _Asked, enforced: bool = True) -> StructuredOutputsParams:
    """The constraint ``asked`` names, checked: a grammar must enforce it, or (not ``enforced``) xgrammar must
    read it."""
    try:
        params = StructuredOutputsParams(**asked.values)
        (check_structured_outputs if enforced else check_schema_reads)(params)
    except StructuredOutputError as exc:
        raise _renamed(exc, exc.param, asked) from None
    except ValueError as exc:  # the shape checks of StructuredOutputsParams: "structured_outputs.json is not ..."
        first = str(exc).split(" ", 1)[0]
        raise _renamed(exc, first if first.startswith("structured_outputs.") else "structured_outputs",
                       asked) from None
    return params


def _renamed(exc: ValueError, engine_param: str, asked: _Asked) -> APIError:
    """The error with the field named as the client sent it (``structured_outputs.*`` kept as it is)."""
    param = asked.param or engine_param
    message = str(exc)
    if engine_param == "structured_outputs.whitespace_pattern" and asked.field != "structured_outputs":
        param = "guided_whitespace_pattern"  # the only other field that gives one
        message = message.replace(engine_param, param, 1)
    elif asked.param:
        message = message.replace(engine_param, param, 1)
    if param not in message:
        message = f"{param}: {message}"
    return bad_request(message, param)
