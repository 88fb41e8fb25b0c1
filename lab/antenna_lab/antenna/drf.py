"""Django REST Framework's error shapes and messages, so a client sees what Antenna would answer.

Pure functions: pydantic validation errors become DRF's nested field-error
dicts (``{"batch_size": ["Ensure this value is greater than or equal to 1."]}``,
``{"results": [{}, {"reply_subject": ["This field is required."]}]}``), and a
body that is not JSON becomes DRF's ``JSON parse error - ...``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

AUTH_MISSING = "Authentication credentials were not provided."
AUTH_INVALID = "Invalid token."
AUTH_NO_CREDENTIALS = "Invalid token header. No credentials provided."
AUTH_SPACES = "Invalid token header. Token string should not contain spaces."
NOT_FOUND = "Not found."

_TYPE_NAMES = {list: "list", dict: "dict", str: "str", int: "int", float: "float", bool: "bool", type(None): "NoneType"}


class BadRequest(Exception):
    """A 400 answer; ``body`` is the DRF-shaped payload (a dict of field errors, or a
    list for a bare ``ValidationError("...")``)."""

    def __init__(self, body: dict[str, Any] | list[Any]):
        super().__init__(body)
        self.body = body


def authenticate(header: str | None, token: str) -> str | None:
    """DRF TokenAuthentication's verdict on an Authorization header: None if valid, else the 401 detail."""
    parts = (header or "").split()
    if not parts or parts[0].lower() != "token":
        return AUTH_MISSING  # no header, or another scheme: not authenticated at all
    if len(parts) == 1:
        return AUTH_NO_CREDENTIALS
    if len(parts) > 2:
        return AUTH_SPACES
    return None if parts[1] == token else AUTH_INVALID


def parse_json(body: bytes) -> Any:
    """The request body as JSON (empty means ``{}``, as DRF's parsed empty form); raises BadRequest."""
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest({"detail": f"JSON parse error - {exc}"}) from exc


def validate(model: type[BaseModel], data: Any) -> Any:
    """``model.model_validate(data)``, raising BadRequest with DRF's errors."""
    if not isinstance(data, dict):
        raise BadRequest(
            {"non_field_errors": [f"Invalid data. Expected a dictionary, but got {_type_name(data)}."]}
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(field_errors(exc.errors(include_url=False))) from exc


def field_errors(errors: Iterable[Any], prefix: tuple[Any, ...] = (), into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nest pydantic's flat error list the way DRF nests serializer errors (model-level ones: ``non_field_errors``)."""
    out: dict[str, Any] = {} if into is None else into
    for err in errors:
        loc = prefix + tuple(err["loc"]) or ("non_field_errors",)
        add_error(out, loc, message(err))
    return out


def add_error(tree: dict[str, Any], loc: tuple[Any, ...], msg: str) -> None:
    """Put ``msg`` at ``loc`` in a DRF error tree: dicts for fields, lists padded with ``{}`` for items."""
    *path, leaf = loc
    node: Any = tree
    for key, following in zip(path, [*path[1:], leaf]):
        node = _child(node, key, [] if isinstance(following, int) else {})
    _child(node, leaf, []).append(msg)


def _child(node: Any, key: Any, empty: Any) -> Any:
    if isinstance(node, list):
        while len(node) <= key:
            node.append({})
        if not node[key]:  # an item's ``{}`` placeholder becomes its error container
            node[key] = empty
        return node[key]
    return node.setdefault(str(key), empty)


def message(err: Any) -> str:
    """DRF's wording for the common pydantic error types (pydantic's own for the rest)."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "missing":
        return "This field is required."
    if value is None and kind.endswith("_type"):
        return "This field may not be null."
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "A valid integer is required."
    if kind in ("float_parsing", "float_type"):
        return "A valid number is required."
    if kind in ("bool_parsing", "bool_type"):
        return "Must be a valid boolean."
    if kind == "string_type":
        return "Not a valid string."
    if kind == "greater_than_equal":
        return f"Ensure this value is greater than or equal to {ctx.get('ge')}."
    if kind == "less_than_equal":
        return f"Ensure this value is less than or equal to {ctx.get('le')}."
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "This field may not be blank."
    if kind == "list_type":
        return f'Expected a list of items but got type "{_type_name(value)}".'
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"Invalid data. Expected a dictionary, but got {_type_name(value)}."
    if kind == "value_error":
        return str(ctx.get("error") or err["msg"])
    return err["msg"]


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)
