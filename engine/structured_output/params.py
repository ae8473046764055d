"""What a request constrains its output to (vLLM's `StructuredOutputsParams`), as an llguidance grammar.

Exactly one of json (a JSON schema), json_object (any JSON object), regex, choice (one of the strings)
or grammar (Lark, as llguidance reads it, or GBNF). JSON is written in one line with `", "` and `": "`
between items (the way json.dumps writes it) and no other whitespace, unless whitespace_pattern says
which whitespace to allow: free whitespace lets a model pad its output until max_tokens. An object
schema that lists its properties gets only those unless it sets additionalProperties itself (what
vLLM's default backend, xgrammar, and outlines do); the output still validates against the schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")  # not allOf: closed parts of one object would clash
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "additionalItems")


def closed_objects(schema: Any) -> Any:
    """A copy of a JSON schema where every object schema with `properties` but no `additionalProperties`
    allows no other keys."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            closed[key] = {name: closed_objects(sub) for name, sub in schema[key].items()}
    for key in _SCHEMA_LISTS + _SCHEMAS:
        value = schema.get(key)
        closed[key] = [closed_objects(sub) for sub in value] if isinstance(value, list) else closed_objects(value)
    closed = {key: value for key, value in closed.items() if key in schema}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None  # regex of the whitespace JSON may have between tokens

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice or grammar, "
                             f"got {given or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError(f"structured_outputs choice must be a non-empty list of strings, got {self.choice!r}")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs {name} must be a string, got {type(value).__name__}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError(f"structured_outputs json must be a JSON schema object, got {type(self.json).__name__}")

    @property
    def key(self) -> str:
        """Identifies the grammar: equal keys compile to the same matcher."""
        fields = {"json": self.json, "json_object": self.json_object, "regex": self.regex,
                  "choice": list(self.choice) if self.choice is not None else None, "grammar": self.grammar,
                  "whitespace_pattern": self.whitespace_pattern}
        return json.dumps(fields, sort_keys=True)

    def to_grammar(self) -> str:
        """The llguidance grammar (not yet checked: the compiler reports what is wrong with it)."""
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", list(self.choice))
        if self.grammar is not None:
            try:
                return llguidance.grammar_from("grammar", self.grammar)  # Lark, or GBNF converted to Lark
            except ValueError as e:
                raise ValueError(f"invalid grammar: {e}") from None
        schema = {"type": "object"} if self.json_object else self.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        schema = closed_objects(schema)
        options = dict(COMPACT_JSON)
        if self.whitespace_pattern is not None:
            options = {"whitespace_flexible": True, "whitespace_pattern": self.whitespace_pattern}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
