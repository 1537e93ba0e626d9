"""JSON values as the Rust store's parser holds them, and a codec that does not recurse.

The Rust store reads its file with ``serde_json::from_str::<Value>`` (the whole file, then the
records; serde_json 1 with its default features, as ``tandem-server`` declares it). From that
parser's documented behaviour and source:

* **Nesting.** The deserializer starts with ``remaining_depth = 128`` and takes one per array
  or object it enters: a document nested 127 deep reads, 128 deep fails with ``recursion
  limit exceeded``. The count runs over the whole file, not one value.
* **Integers.** A ``Value`` number is a u64, an i64 or an f64 (no ``arbitrary_precision``).
  A non-negative integer above u64's range becomes an f64, computed the way its default
  (not ``float_roundtrip``) parser does: the leading digits that fit a u64, then times a power
  of ten in f64 (:func:`_f64_from_parts`); a negative one below i64's range becomes
  ``-(digits as f64)``; ``-0`` becomes the float ``-0.0``.
* **Range.** A number whose f64 is infinite is an error, ``number out of range``.

The importer stores what that parser would hold, or refuses what it would refuse; nothing
idemstore accepts (also through ``complete``) makes an export the Rust store cannot read.
Ordinary decimals keep Python's correctly rounded value: serde_json's default parser may land
one unit in the last place away for long mantissas (its ``float_roundtrip`` feature does not);
that difference is not emulated. Python decodes and
encodes JSON recursively (the C scanner and encoder count against the interpreter's recursion
limit), so deep but legal values are read and written here without recursion when the
recursive path runs out of stack (:func:`loads`, :func:`dumps_compact`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any, Final

from .model import U64_MAX

__all__ = [
    "DETAILS_CONTAINERS",
    "MAX_DEPTH",
    "MAX_DETAILS_DEPTH",
    "RUST_RECURSION_LIMIT",
    "DuplicateKey",
    "JSONValueProblem",
    "OutOfRange",
    "TooDeep",
    "check_details",
    "check_number",
    "check_value",
    "decode_iterative",
    "dumps_compact",
    "first_too_deep",
    "loads",
    "plain_value",
    "rust_float",
    "rust_int_text",
    "rust_number_of_int",
]

#: serde_json's recursion limit: a document nested this deep is refused.
RUST_RECURSION_LIMIT: Final = 128
#: The deepest nesting (arrays and objects alike) a file the Rust store reads may have.
MAX_DEPTH: Final = RUST_RECURSION_LIMIT - 1
#: Containers around an outcome's ``details`` in the versioned file the Rust store writes (and
#: ``idemstore export`` writes): the file object, the ``records`` map, the record, ``outcome``
#: (a legacy file has one fewer, but a record's details must survive an export).
DETAILS_CONTAINERS: Final = 4
#: The deepest nesting ``details`` may have: 127 - 4 = 123. Deeper details make a file the
#: Rust store cannot read, so ``complete`` and the importer refuse them.
MAX_DETAILS_DEPTH: Final = MAX_DEPTH - DETAILS_CONTAINERS

I64_MIN: Final = -(2**63)


class JSONValueProblem(Exception):
    """A value the Rust store's parser would refuse (internal: callers name the field)."""


class TooDeep(JSONValueProblem):
    """Nested deeper than allowed."""


class OutOfRange(JSONValueProblem):
    """A number beyond f64's range: serde_json's ``number out of range``."""


class DuplicateKey(JSONValueProblem):
    """An object repeats a key (idemstore refuses what serde would silently merge)."""


# --------------------------------------------------------------------------------------------
# Numbers


#: serde_json's table of powers of ten (each the f64 nearest to ``10**i``).
_POW10: Final = tuple(float(f"1e{i}") for i in range(309))
#: Digits of an exponent beyond i32: serde_json's parse_exponent_overflow.
_I32_MAX: Final = 2**31 - 1
_NUMBER_PARTS: Final = re.compile(r"(-?)([0-9]+)(?:\.([0-9]+))?(?:[eE]([-+]?)([0-9]+))?\Z")


def _f64_from_parts(positive: bool, significand: int, exponent: int) -> float:
    """serde_json's ``f64_from_parts`` without ``float_roundtrip``: ``significand`` (a u64)
    as f64, times (or divided by) a power of ten in f64; infinite -> :class:`OutOfRange`."""
    f = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            if exponent >= 0:
                f *= _POW10[exponent]
                if math.isinf(f):
                    raise OutOfRange
            else:
                f /= _POW10[-exponent]
            break
        if f == 0.0:
            break
        if exponent >= 0:
            raise OutOfRange
        f /= 1e308
        exponent += 308
    return f if positive else -f


def _rust_parse(text: str) -> float | int:
    """The number ``text`` (valid JSON) as serde_json's default parser holds it."""
    m = _NUMBER_PARTS.match(text)
    if m is None:  # pragma: no cover - the callers pass JSON numbers
        raise ValueError(text)
    sign, integer, fraction, exp_sign, exp_digits = m.groups()
    positive = not sign
    significand = 0
    exponent = 0
    overflowed = False
    for c in integer:
        if overflowed:
            exponent += 1
            continue
        digit = ord(c) - 48
        if significand * 10 + digit > U64_MAX:
            overflowed = True
            exponent += 1
            continue
        significand = significand * 10 + digit
    if fraction is None and exp_digits is None:
        if not overflowed:
            if positive:
                return significand
            if significand <= 2**63 and significand != 0:
                return -significand
            return -float(significand)  # below i64, or -0
        return _f64_from_parts(positive, significand, exponent)
    if fraction is not None:
        for c in fraction:
            digit = ord(c) - 48
            if significand * 10 + digit > U64_MAX:
                break  # serde_json ignores the digits that no longer fit
            significand = significand * 10 + digit
            exponent -= 1
    if exp_digits is not None:
        digits = exp_digits.lstrip("0") or "0"
        value = int(digits) if len(digits) <= 10 else _I32_MAX + 1
        if value > _I32_MAX:  # serde_json's parse_exponent_overflow
            if significand != 0 and exp_sign != "-":
                raise OutOfRange
            return 0.0 if positive else -0.0
        exponent = exponent - value if exp_sign == "-" else exponent + value
    return _f64_from_parts(positive, significand, exponent)


def check_number(text: str) -> None:
    """:class:`OutOfRange` if serde_json refuses the JSON number ``text``."""
    _rust_parse(text)


def rust_float(text: str) -> float:
    """A JSON number with a fraction or exponent, as a float (the decoders' ``parse_float``):
    Python's correctly rounded value, or :class:`OutOfRange` where serde_json reports
    ``number out of range``."""
    value = float(text)
    if -1e308 < value < 1e308:
        return value
    # Near or beyond the end of f64's range: decide as serde_json does.
    rust = _rust_parse(text)
    return value if math.isfinite(value) else float(rust)


def rust_int_text(text: str) -> int | float:
    """A JSON integer as serde_json holds it (the decoders' ``parse_int`` where one is
    needed): ``-0`` is ``-0.0``; beyond u64 / below i64 an f64; :class:`OutOfRange`."""
    if text == "-0":
        return -0.0
    if len(text) < 19:
        return int(text)
    return _rust_parse(text)


def rust_number_of_int(value: int) -> int | float:
    """A decoded Python integer as serde_json would hold it (see :func:`rust_int_text`)."""
    if I64_MIN <= value <= U64_MAX:
        return value
    if value.bit_length() > 1100:  # beyond f64 whatever the rounding (and str() limits)
        raise OutOfRange
    return _rust_parse(str(value))


# --------------------------------------------------------------------------------------------
# Decoded values: nesting, duplicate keys and numbers


def plain_value(
    value: Any, limit: int = MAX_DEPTH, *, rust_numbers: bool = False, copy: bool = False
) -> Any:
    """A decoded value with objects as plain dicts (the bulk decoder returns them as tuples of
    ``(key, value)`` pairs, which become dicts here), checked without recursion:

    * nested at most ``limit`` containers deep (:class:`TooDeep`);
    * no object repeats a key (:class:`DuplicateKey`);
    * with ``rust_numbers``, integers serde_json holds as f64 are replaced by that f64 and
      numbers beyond f64 raise :class:`OutOfRange` (as do non-finite floats).

    Lists and dicts of ``value`` are changed in place unless ``copy``.
    """
    t = type(value)
    if t is tuple:
        value = _dict_of(value)
    elif t is list or t is dict:
        if copy:
            value = t(value)
    else:
        if rust_numbers:
            if t is int:
                return rust_number_of_int(value)
            if t is float and not math.isfinite(value):
                raise OutOfRange
        return value
    if limit < 1:
        raise TooDeep
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        container, depth = pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, item in items:
            t = type(item)
            if t is str or item is None:
                continue
            if t is tuple:
                if depth >= limit:
                    raise TooDeep
                child = container[key] = _dict_of(item)
                if child:
                    push((child, depth + 1))
            elif t is list or t is dict:
                if depth >= limit:
                    raise TooDeep
                if copy:
                    item = container[key] = t(item)
                if item:
                    push((item, depth + 1))
            elif rust_numbers:
                if t is int:
                    if not I64_MIN <= item <= U64_MAX:
                        container[key] = rust_number_of_int(item)
                elif t is float and not math.isfinite(item):
                    raise OutOfRange
    return value


def _dict_of(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise DuplicateKey
    return d


def check_value(value: Any, limit: int, *, tuples_are_objects: bool = True) -> None:
    """Check a decoded value (dicts, lists, or tuples of pairs) as the Rust parser would read
    it, without recursion and without changing it: :class:`TooDeep` if it nests deeper than
    ``limit`` (also a value that contains itself), :class:`OutOfRange` for an integer beyond
    f64 (floats are checked as they are decoded). ``tuples_are_objects=False``: tuples are
    arrays (a caller's value, not a decoded one)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        t = type(item)
        if t is int:
            if not I64_MIN <= item <= U64_MAX:
                rust_number_of_int(item)
            continue
        if t is tuple and tuples_are_objects:
            children: Any = [pair[1] for pair in item]
        elif t is dict:
            children = item.values()
        elif t is list or t is tuple:
            children = item
        else:
            continue
        if depth >= limit:
            raise TooDeep
        stack.extend((child, depth + 1) for child in children)


def _beyond_f64(value: int) -> bool:
    try:
        rust_number_of_int(value)
    except OutOfRange:
        return True
    return False


def check_details(value: Any) -> str | None:
    """For details given by a caller (not decoded from a file): the dotted path of the first
    integer beyond f64's range (serde_json's ``number out of range``: the Rust store could not
    read the file back), or None. The value is already known to be JSON."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
        elif isinstance(item, int) and not isinstance(item, bool) and _beyond_f64(int(item)):
            return path or "details"
    return None


# --------------------------------------------------------------------------------------------
# Text: how deep, and a decoder / encoder without recursion

#: Structural characters outside strings (a string is skipped whole).
_STRUCTURE: Final = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def first_too_deep(text: str, start: int = 0, end: int | None = None, limit: int = 0) -> int | None:
    """The offset of the bracket that opens container number ``limit + 1`` of a nesting in
    the JSON value at ``text[start:]`` (looking no further than ``end``, nor past the end of
    the value); None if none is that deep."""
    depth = 0
    for m in _STRUCTURE.finditer(text, start, len(text) if end is None else end):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > limit:
                return m.start()
        elif c == "]" or c == "}":
            depth -= 1
            if depth <= 0:
                return None  # the value has ended
    return None


_WS: Final = re.compile(r"[ \t\n\r]*")
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_scanstring: Final[Callable[[str, int], tuple[str, int]]] = json.decoder.scanstring  # type: ignore[attr-defined]
_CONSTANTS: Final = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# Over 80 lines on purpose: one explicit-stack state machine (a recursive decoder split
# into helpers would need the stack this exists to avoid).
def decode_iterative(
    text: str,
    idx: int = 0,
    *,
    make_object: Callable[[list[tuple[str, Any]]], Any] = dict,
    parse_float: Callable[[str], Any] = float,
    parse_int: Callable[[str], Any] = int,
    parse_constant: Callable[[str], Any] = _CONSTANTS.__getitem__,
) -> tuple[Any, int]:
    """One JSON value at ``text[idx:]`` as the C scanner would decode it (same hooks), with
    a stack instead of recursion: ``(value, end)``. Raises :class:`json.JSONDecodeError`
    (or what a hook raises)."""
    # A frame: [items, key] (an object: items are pairs, key the pending key) or [items]
    stack: list[list[Any]] = []
    ws = _WS.match
    i = idx

    def fail(message: str, at: int) -> json.JSONDecodeError:
        return json.JSONDecodeError(message, text, at)

    while True:
        # A value starts at i.
        c = text[i : i + 1]
        if c == "{":
            i = ws(text, i + 1).end()  # type: ignore[union-attr]
            if text[i : i + 1] == "}":
                value: Any = make_object([])
                i += 1
            else:
                if text[i : i + 1] != '"':
                    raise fail("Expecting property name enclosed in double quotes", i)
                key, i = _scanstring(text, i + 1)
                i = ws(text, i).end()  # type: ignore[union-attr]
                if text[i : i + 1] != ":":
                    raise fail("Expecting ':' delimiter", i)
                i = ws(text, i + 1).end()  # type: ignore[union-attr]
                stack.append([[], key])
                continue
        elif c == "[":
            i = ws(text, i + 1).end()  # type: ignore[union-attr]
            if text[i : i + 1] == "]":
                value = []
                i += 1
            else:
                stack.append([[]])
                continue
        elif c == '"':
            value, i = _scanstring(text, i + 1)
        else:
            m = _NUMBER.match(text, i)
            if m is not None:
                number = m.group()
                value = parse_float(number) if m.group(1) or m.group(2) else parse_int(number)
                i = m.end()
            elif text.startswith("null", i):
                value, i = None, i + 4
            elif text.startswith("true", i):
                value, i = True, i + 4
            elif text.startswith("false", i):
                value, i = False, i + 5
            else:
                for name in ("NaN", "Infinity", "-Infinity"):
                    if text.startswith(name, i):
                        value, i = parse_constant(name), i + len(name)
                        break
                else:
                    raise fail("Expecting value", i)
        # A value is complete: add it to its container(s), closing those that end.
        while True:
            if not stack:
                return value, i
            frame = stack[-1]
            items = frame[0]
            if len(frame) == 2:
                items.append((frame[1], value))
            else:
                items.append(value)
            i = ws(text, i).end()  # type: ignore[union-attr]
            c = text[i : i + 1]
            if c == ",":
                i = ws(text, i + 1).end()  # type: ignore[union-attr]
                if len(frame) == 2:
                    if text[i : i + 1] != '"':
                        raise fail("Expecting property name enclosed in double quotes", i)
                    frame[1], i = _scanstring(text, i + 1)
                    i = ws(text, i).end()  # type: ignore[union-attr]
                    if text[i : i + 1] != ":":
                        raise fail("Expecting ':' delimiter", i)
                    i = ws(text, i + 1).end()  # type: ignore[union-attr]
                break
            if c != ("}" if len(frame) == 2 else "]"):
                raise fail("Expecting ',' delimiter", i)
            i += 1
            stack.pop()
            value = make_object(items) if len(frame) == 2 else items


def loads(text: str) -> Any:
    """``json.loads(text)`` for stored details, whatever the caller's stack depth: the C
    decoder, or (when it runs out of stack) the same decoding without recursion."""
    try:
        return json.loads(text)
    except RecursionError:
        value, end = decode_iterative(text, _WS.match(text).end())  # type: ignore[union-attr]
        if _WS.match(text, end).end() != len(text):  # type: ignore[union-attr]
            raise json.JSONDecodeError("Extra data", text, end) from None
        return value


_END: Final[Any] = object()


def _compact_parts(value: Any) -> Iterator[str]:
    """What the C encoder writes for the stored form (compact, keys sorted, non-ASCII kept,
    NaN refused), in parts, without recursion. ``value`` must not contain itself."""
    encode = json.encoder.encode_basestring
    stack: list[tuple[Iterator[Any], bool]] = []  # open containers: (members, is an object)
    current: Any = value
    while True:
        if isinstance(current, str):
            yield encode(current)
        elif current is None:
            yield "null"
        elif current is True:
            yield "true"
        elif current is False:
            yield "false"
        elif isinstance(current, int):
            yield int.__repr__(current)
        elif isinstance(current, float):
            if not math.isfinite(current):
                raise ValueError("Out of range float values are not JSON compliant")
            yield float.__repr__(current)
        elif isinstance(current, list | tuple):
            if current:
                members = iter(current)
                stack.append((members, False))
                current = next(members)
                yield "["
                continue
            yield "[]"
        elif isinstance(current, dict):
            if current:
                members = iter(sorted(current.items()))  # as the C encoder sorts
                stack.append((members, True))
                key, current = next(members)
                yield "{" + encode(_key(key)) + ":"
                continue
            yield "{}"
        else:
            raise TypeError(f"Object of type {type(current).__name__} is not JSON serializable")
        # ``current`` is written: on to the next member of the innermost open container.
        while stack:
            members, is_object = stack[-1]
            item: Any = next(members, _END)
            if item is _END:
                stack.pop()
                yield "}" if is_object else "]"
                continue
            if is_object:
                key, current = item
                yield "," + encode(_key(key)) + ":"
            else:
                current = item
                yield ","
            break
        else:
            return


def _key(key: object) -> str:
    """An object key as the C encoder writes it (strings, and the scalars it converts)."""
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        if not math.isfinite(key):
            raise ValueError("Out of range float values are not JSON compliant")
        return float.__repr__(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def dumps_compact(value: Any) -> str:
    """``value`` as the stored details text (what the C encoder writes), without recursion."""
    return "".join(_compact_parts(value))
