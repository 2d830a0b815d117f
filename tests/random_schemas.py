"""Random JSON schemas for constrained-decoding tests, each with a bounded language.

Every schema covers a mix of: nested objects, arrays with minItems/maxItems, enums, consts,
strings with lengths or anchored patterns, integers and numbers with ranges, booleans, nulls,
required and optional properties, and anyOf. Strings are always bounded (length, pattern or
enum) and objects closed (additionalProperties: false), so a random model that follows the
grammar must finish: outputs are then parsed with `json` and checked with `jsonschema`.
"""

from __future__ import annotations

import random

# Anchored so that llguidance's reading (whole string) and jsonschema's (re.search) agree.
PATTERNS = [r"^[a-z]{1,6}$", r"^[A-Z][0-9]{2,3}$", r"^(cat|dog|cow)s?$", r"^\d{3}-\d{2}$"]
ENUM_VALUES = ["red", "green", "blue", "a b", "é", "42", 7, True, None, 3.5]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A closed object schema with 1-4 properties of random kinds (nesting up to depth 2)."""
    props = {f"p{i}": _random_value(rng, depth) for i in range(rng.randint(1, 4))}
    names = list(props)
    required = rng.sample(names, rng.randint(1 if depth == 0 else 0, len(names)))
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def _random_value(rng: random.Random, depth: int) -> dict:
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum", "const", "null"]
    if depth < 2:
        kinds += ["array", "object", "anyOf"]
    return _VALUE_MAKERS[rng.choice(kinds)](rng, depth)


def _string(rng: random.Random, depth: int) -> dict:
    hi = rng.randint(0, 8)
    return {"type": "string", "minLength": rng.randint(0, hi), "maxLength": hi}


def _pattern(rng: random.Random, depth: int) -> dict:
    return {"type": "string", "pattern": rng.choice(PATTERNS)}


def _integer(rng: random.Random, depth: int) -> dict:
    lo = rng.randint(-1000, 1000)
    schema = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if rng.random() < 0.3:
        del schema["maximum" if rng.random() < 0.5 else "minimum"]
    return schema


def _number(rng: random.Random, depth: int) -> dict:
    lo = round(rng.uniform(-100, 100), 2)
    schema = {"type": "number", "minimum": lo, "maximum": lo + round(rng.uniform(0.5, 50), 2)}
    if rng.random() < 0.3:
        schema["exclusiveMaximum"] = schema.pop("maximum")
    return schema


def _enum(rng: random.Random, depth: int) -> dict:
    return {"enum": rng.sample(ENUM_VALUES, rng.randint(1, 4))}


def _const(rng: random.Random, depth: int) -> dict:
    return {"const": rng.choice(ENUM_VALUES)}


def _array(rng: random.Random, depth: int) -> dict:
    lo = rng.randint(0, 2)
    return {
        "type": "array",
        "items": _random_value(rng, depth + 1),
        "minItems": lo,
        "maxItems": lo + rng.randint(0, 2),
    }


def _any_of(rng: random.Random, depth: int) -> dict:
    return {"anyOf": [_random_value(rng, depth + 1) for _ in range(rng.randint(2, 3))]}


_VALUE_MAKERS = {
    "string": _string,
    "pattern": _pattern,
    "integer": _integer,
    "number": _number,
    "boolean": lambda rng, depth: {"type": "boolean"},
    "null": lambda rng, depth: {"type": "null"},
    "enum": _enum,
    "const": _const,
    "array": _array,
    "object": lambda rng, depth: random_schema(rng, depth + 1),
    "anyOf": _any_of,
}


def random_tool(rng: random.Random, name: str) -> dict:
    """An OpenAI function tool whose parameters are a random closed schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"Tool {name}: does \"things\" with\nnewlines and 'quotes'.",
            "parameters": random_schema(rng),
        },
    }
