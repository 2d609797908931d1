"""Metadata filters: parsed from a query string or a JSON object, applied in PostgreSQL, summarised for the page.

A filter is a list of conditions on top-level keys of an image's JSONB metadata, all of which must hold:
  equality   {"colour": "red"}                   colour:red
  in         {"colour": {"in": ["red", "blue"]}}  colour:in:red,blue
  range      {"year": {"gte": 2000, "lt": 2010}}  year:gte:2000   year:lt:2010   (gt, gte, lt, lte; numbers only)
  exists     {"season": {"exists": true}}         season:exists   (season:missing for false)
In the query-string form every value is text: a value that reads as a number (or true/false) also matches that
number (or boolean), so `year:2001` finds both 2001 and "2001".
"""
import json
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from backend.errors import InvalidQuery
from backend.storage.tables import Image

MAX_CONDITIONS = 20
MAX_IN_VALUES = 100
MAX_KEY_LENGTH = 100
MAX_VALUE_LENGTH = 500
MAX_INTEGER = 2**63 - 1  # what PostgreSQL's bigint holds; JSON numbers beyond it are refused
MAX_JSON_DEPTH = 20
NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")
RANGE_OPERATORS = {"gt": "__gt__", "gte": "__ge__", "lt": "__lt__", "lte": "__le__"}
OPERATORS = ("eq", "in", *RANGE_OPERATORS, "exists")
# A filter matching at most this many images is applied inside FAISS (their ids as a selector); one matching more
# is applied to what FAISS returns (backend.service.image_search._search). 100,000 ids take under a megabyte and milliseconds.
PREFILTER_MAX_IDS = 100_000
KEYS_SHOWN = 50  # keys the summary lists, most common first
VALUES_SHOWN = 20  # distinct values listed per key (a key with more is offered as free text)

QUERY_SYNTAX = ("metadata conditions, all of which must hold: `key:value` (equal), `key:in:v1,v2` (one of), "
                "`key:gte:2000` (gt, gte, lt, lte: a number range), `key:exists`, `key:missing`; repeat the parameter "
                "for more conditions. A value that reads as a number or true/false matches it as text too.")


class InvalidFilter(InvalidQuery):
    """A metadata filter that cannot be understood."""

    def __init__(self, message: str):
        super().__init__(f"filter: {message}")


@dataclass(frozen=True)
class Condition:
    """One test on a metadata key: op is one of OPERATORS; value a scalar, a tuple of scalars (in) or a bool
    (exists)."""

    key: str
    op: str
    value: object


def key_problem(key) -> str | None:
    """Why `key` cannot be a metadata key (the one rule for uploads, CSV columns and filters), or None."""
    if isinstance(key, str) and key and len(key) <= MAX_KEY_LENGTH and not any(
            unicodedata.category(ch) == "Cc" for ch in key):
        return None
    return f"a metadata key must be 1 to {MAX_KEY_LENGTH} characters without control characters, not {key!r:.120}"


def _check_key(key) -> str:
    if (problem := key_problem(key)) is not None:
        raise InvalidFilter(problem)
    return key


def storable(value) -> bool:
    """Whether a JSON scalar can be stored and compared as imsrc does: text without NUL or lone surrogates (PostgreSQL
    refuses both), integers within 64 bits, finite floats."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return -MAX_INTEGER <= value <= MAX_INTEGER
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return "\x00" not in value
    return False


def _check_scalar(key: str, value):
    if isinstance(value, str) and len(value) > MAX_VALUE_LENGTH:
        raise InvalidFilter(f"{key}: a value must be at most {MAX_VALUE_LENGTH} characters")
    if isinstance(value, (dict, list)) or not storable(value):
        raise InvalidFilter(f"{key}: {json.dumps(value)[:120]} is not a string, number, boolean or null that can be "
                            "stored (text without NUL, integers within 64 bits, finite numbers)")
    return value


def _check_number(key: str, op: str, value) -> float:
    if isinstance(value, str):
        value = parse_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not storable(value):
        raise InvalidFilter(f"{key}: `{op}` takes a number")
    return value


def parse_number(text: str) -> int | float | None:
    """The number a text writes in plain decimal (`2001`, `-3`, `9.5`), else None: codes with leading zeros
    (`007`), exponents, underscores and non-ASCII digits stay text. Integers beyond 64 bits stay text too."""
    if not NUMBER.fullmatch(text):
        return None
    number = float(text) if "." in text else int(text)
    return number if storable(number) else None


def load_json(text: str, what: str):
    """JSON text from a request, strictly: no NaN or Infinity, nesting at most MAX_DEPTH deep, every scalar storable
    (see storable); InvalidFilter (a 422) saying what is wrong otherwise."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    try:
        value = json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError) as exc:
        raise InvalidQuery(f"{what}: not valid JSON ({str(exc)[:100]})") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidQuery(f"{what}: nested more than {MAX_JSON_DEPTH} deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth) for k in item)
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif not storable(item):
            raise InvalidQuery(f"{what}: {json.dumps(item)[:80]} cannot be stored (text without NUL, integers within "
                               "64 bits, finite numbers)")
    return value


def from_json(spec) -> list[Condition]:
    """Conditions from the JSON form: {key: value} or {key: {op: value, ...}} (see the module docstring)."""
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise InvalidFilter("a filter is a JSON object of metadata keys")
    conditions = []
    for key, test in spec.items():
        _check_key(key)
        if not isinstance(test, dict):
            conditions.append(Condition(key, "eq", _check_scalar(key, test)))
            continue
        if not test:
            raise InvalidFilter(f"{key}: give at least one of {', '.join(OPERATORS)}")
        for op, value in test.items():
            if op == "eq":
                conditions.append(Condition(key, op, _check_scalar(key, value)))
            elif op == "in":
                if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
                    raise InvalidFilter(f"{key}: `in` takes a list of 1 to {MAX_IN_VALUES} values")
                conditions.append(Condition(key, op, tuple(_check_scalar(key, v) for v in value)))
            elif op in RANGE_OPERATORS:
                conditions.append(Condition(key, op, _check_number(key, op, value)))
            elif op == "exists":
                if not isinstance(value, bool):
                    raise InvalidFilter(f"{key}: `exists` takes true or false")
                conditions.append(Condition(key, op, value))
            else:
                raise InvalidFilter(f"{key}: unknown operator {op!r:.40}; use {', '.join(OPERATORS)}")
    return _bounded(conditions)


def _text_value(key: str, text: str) -> tuple:
    """A query-string value and what else it may have been stored as (a number, a boolean)."""
    text = _check_scalar(key, text)
    alternatives = [text]
    if (number := parse_number(text)) is not None:
        alternatives.append(number)
    if text in ("true", "false"):
        alternatives.append(text == "true")
    return tuple(alternatives)


def from_query(terms: list[str] | None) -> list[Condition]:
    """Conditions from the query-string form, one per term (see QUERY_SYNTAX)."""
    conditions = []
    for term in terms or []:
        key, sep, rest = term.partition(":")
        _check_key(key)
        if not sep:
            raise InvalidFilter(f"{term[:120]!r}: write key:value, key:in:a,b, key:gte:n, key:exists or key:missing")
        op, sep, value = rest.partition(":")
        if rest in ("exists", "missing"):
            conditions.append(Condition(key, "exists", rest == "exists"))
        elif sep and op == "in":
            values = [v for v in value.split(",")]
            if not 1 <= len(values) <= MAX_IN_VALUES:
                raise InvalidFilter(f"{key}: `in` takes 1 to {MAX_IN_VALUES} values")
            conditions.append(Condition(key, "in", tuple(a for v in values for a in _text_value(key, v))))
        elif sep and op in RANGE_OPERATORS:
            conditions.append(Condition(key, op, _check_number(key, op, value)))
        else:  # key:value, or key:eq:value for a value that itself starts with an operator's name
            conditions.append(Condition(key, "in", _text_value(key, value if sep and op == "eq" else rest)))
    return _bounded(conditions)


def _bounded(conditions: list[Condition]) -> list[Condition]:
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidFilter(f"at most {MAX_CONDITIONS} conditions in one filter, not {len(conditions)}")
    return conditions


def to_sql(conditions: list[Condition]):
    """The conditions as one SQLAlchemy expression on images (true when there are none); equality and `in` use
    containment and `exists` the key operator, which the GIN index on metadata serves."""
    column = Image.metadata_
    clauses = []
    for c in conditions:
        if c.op == "exists":
            clauses.append(column.has_key(c.key) if c.value else sa.not_(column.has_key(c.key)))
        elif c.op in ("eq", "in"):
            values = c.value if c.op == "in" else (c.value,)
            clauses.append(sa.or_(*[column.contains({c.key: v}) for v in values]))
        else:  # a number range: values of other types never match (and never fail the cast)
            field = column[c.key]
            number = sa.case((sa.func.jsonb_typeof(field) == "number", sa.cast(field.astext, sa.Numeric)))
            clauses.append(getattr(number, RANGE_OPERATORS[c.op])(c.value))
    return sa.and_(sa.true(), *clauses)


def matching_ids(session, conditions: list[Condition], limit: int) -> list[int] | None:
    """The ids of the images that match, or None when more than `limit` do."""
    ids = session.scalars(sa.select(Image.id).where(to_sql(conditions)).limit(limit + 1)).all()
    return None if len(ids) > limit else list(ids)


def all_matching_ids(session, conditions: list[Condition]) -> np.ndarray:
    """The ids of every matching image (int64), streamed from PostgreSQL: 8 bytes an image in memory."""
    rows = session.execute(sa.select(Image.id).where(to_sql(conditions)).execution_options(yield_per=50_000))
    return np.fromiter((r[0] for r in rows), np.int64)


def matching_categories(session, conditions: list[Condition]) -> list[int]:
    """The categories holding at least one matching image."""
    return list(session.scalars(sa.select(Image.category_id).where(to_sql(conditions), Image.category_id.is_not(None))
                                .distinct()))


def which_match(session, conditions: list[Condition], ids: list[int]) -> set[int]:
    """Those of `ids` whose images match."""
    if not ids:
        return set()
    return set(session.scalars(sa.select(Image.id).where(Image.id.in_(ids), to_sql(conditions))).all())


# One pass over the (key, value) pairs, kept for the two aggregates: per key, and per key and value.
_SUMMARY = sa.text("""
WITH kv AS MATERIALIZED (SELECT e.key, e.value FROM images, jsonb_each(images.metadata) AS e),
keys AS (SELECT key, count(*) AS images, array_agg(DISTINCT jsonb_typeof(value)) AS types,
                min(CASE WHEN jsonb_typeof(value) = 'number' THEN (value #>> '{}')::numeric END) AS low,
                max(CASE WHEN jsonb_typeof(value) = 'number' THEN (value #>> '{}')::numeric END) AS high
         FROM kv GROUP BY key ORDER BY images DESC, key LIMIT :keys),
vals AS (SELECT key, value #>> '{}' AS value, count(*) AS images,
                row_number() OVER (PARTITION BY key ORDER BY count(*) DESC, value #>> '{}') AS place
         FROM kv WHERE jsonb_typeof(value) IN ('string', 'boolean') AND key IN (SELECT key FROM keys)
         GROUP BY key, value #>> '{}')
SELECT k.key, k.images, k.types, k.low, k.high, v.value, v.images AS value_images
FROM keys AS k LEFT JOIN vals AS v ON v.key = k.key AND v.place <= :values + 1
ORDER BY k.images DESC, k.key, v.place""")


def summarise_keys(session) -> list[dict]:
    """The metadata keys stored, most common first (at most KEYS_SHOWN): how many images have each, the JSON types
    seen, its most common text and boolean values (up to VALUES_SHOWN) and the range of its numbers."""
    summary: dict[str, dict] = {}
    for row in session.execute(_SUMMARY, {"keys": KEYS_SHOWN, "values": VALUES_SHOWN}):
        entry = summary.setdefault(row.key, {"key": row.key, "images": row.images, "types": sorted(row.types),
                                             "values": [], "more_values": False, "min": _float(row.low),
                                             "max": _float(row.high)})
        if row.value is not None:
            if len(entry["values"]) < VALUES_SHOWN:
                entry["values"].append({"value": row.value, "images": row.value_images})
            else:
                entry["more_values"] = True
    return list(summary.values())


def _float(number) -> float | None:
    """A numeric from PostgreSQL as a float (a JSON number beyond the float range reads as infinite, then None)."""
    value = float(number) if number is not None else None
    return value if value is not None and math.isfinite(value) else None
