"""The request fields that constrain the output (OpenAI's response_format, vLLM's structured_outputs and
its older guided_* spellings) as one engine StructuredOutputsParams. Two of them at once is a 400."""

from __future__ import annotations

from engine.structured_output import StructuredOutputsParams
from server.errors import bad_request
from server.protocol import SamplingFields


def requested_structured_outputs(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The constraint and the name of the field it came from ((None, None) without one)."""
    specs: dict[str, dict] = {}
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        specs["response_format"] = {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise bad_request("response_format of type 'json_schema' needs json_schema.schema",
                              "response_format.json_schema")
        specs["response_format"] = {"json": fmt.json_schema.json_schema}
    so = req.structured_outputs
    if so is not None:
        specs["structured_outputs"] = {"json": so.json_schema, "regex": so.regex, "choice": so.choice,
                                       "grammar": so.grammar, "json_object": bool(so.json_object),
                                       "whitespace_pattern": so.whitespace_pattern}
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        if getattr(req, name) is not None:
            specs[name] = {key: getattr(req, name), "whitespace_pattern": req.guided_whitespace_pattern}
    if len(specs) > 1:
        raise bad_request(f"give one way of constraining the output, got {', '.join(specs)}", list(specs)[1])
    if not specs:
        return None, None
    (param, fields), = specs.items()
    try:
        return StructuredOutputsParams(**fields), param
    except ValueError as e:
        raise bad_request(str(e), param) from None
