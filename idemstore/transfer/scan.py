"""JSON text as the Rust store's parser reads it: the C scanners with serde_json's number rules
(a float beyond f64 refused, ``-0`` read as the float it is there), their iterative twins for
values deeper than the stack allows, and the lexical bits the reader and the validator share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final

from .. import jsonvalue
from ..jsonvalue import DuplicateKey, OutOfRange

JSON_WS: Final = " \t\n\r"
WS_RE: Final = re.compile(r"[ \t\n\r]*")
NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


class Unreadable(Exception):
    """The text of a value is not what serde_json reads (NaN, a number out of range, nesting
    too deep): the reader explains it with the positional parser."""


class NonFinite(Unreadable):
    """NaN or Infinity, which JSON has not."""

    pass


class TextOutOfRange(Unreadable):
    """A number beyond f64, which serde_json refuses."""

    pass


class TextTooDeep(Unreadable):
    """Nested deeper than serde_json reads."""

    pass


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise DuplicateKey
    return d


def _reject_constant(name: str) -> Any:
    raise NonFinite(name)


def _float(text: str) -> float:
    try:
        return jsonvalue.rust_float(text)
    except OutOfRange:
        raise TextOutOfRange(text) from None


def _exact_int(text: str) -> int | float:
    """Integers as serde_json holds them (``-0`` is ``-0.0``): for records whose text holds
    a ``-0``, the only integer Python's decoder reads otherwise."""
    try:
        return jsonvalue.rust_int_text(text)
    except OutOfRange:
        raise TextOutOfRange(text) from None


Scanner = Callable[[str, int], tuple[Any, int]]
# scan_once is the C scanner behind raw_decode (not in typeshed): value, end = scan(text, idx)
# Every scanner reads numbers as the Rust parser does: a float beyond f64 is refused
# (``_float``); an integer keeps Python's exact value (records whose text holds an integer
# ``-0`` are scanned again with ``_exact_int``, see may_hold_neg_zero); details convert theirs.
_HOOKS: Final[dict[str, Any]] = {"parse_constant": _reject_constant, "parse_float": _float}
SCAN: Final[Scanner] = json.JSONDecoder(  # type: ignore[attr-defined]
    object_pairs_hook=_pairs_hook, **_HOOKS
).scan_once
PLAIN_SCAN: Final[Scanner] = json.JSONDecoder(**_HOOKS).scan_once  # type: ignore[attr-defined]
# The bulk path's scanner: objects come out as tuples of (key, value) pairs (the hook is the C
# type ``tuple``: no Python call per object), which plain_value() turns into dicts, finding
# duplicate keys on the way.
PAIRS_SCAN: Final[Scanner] = json.JSONDecoder(  # type: ignore[attr-defined]
    object_pairs_hook=tuple, **_HOOKS
).scan_once
EXACT: Final[dict[Any, Scanner]] = {
    scan: json.JSONDecoder(  # type: ignore[attr-defined]
        object_pairs_hook=hook, parse_int=_exact_int, **_HOOKS
    ).scan_once
    for scan, hook in ((SCAN, _pairs_hook), (PAIRS_SCAN, tuple))
}


def _iterative(hook: Callable[[Any], Any], parse_int: Callable[[str], Any]) -> Scanner:
    def scan(text: str, idx: int) -> tuple[Any, int]:
        return jsonvalue.decode_iterative(
            text,
            idx,
            make_object=hook,
            parse_float=_float,
            parse_int=parse_int,
            parse_constant=_reject_constant,
        )

    return scan


# The same decoding without recursion, for a value the C scanner cannot finish on what is left
# of the stack (it recurses per level).
ITERATIVE: Final[dict[Any, Scanner]] = {
    SCAN: _iterative(_pairs_hook, int),
    PLAIN_SCAN: _iterative(dict, int),
    PAIRS_SCAN: _iterative(tuple, int),
    EXACT[SCAN]: _iterative(_pairs_hook, _exact_int),
    EXACT[PAIRS_SCAN]: _iterative(tuple, _exact_int),
}
#: An integer ``-0`` (serde_json's float ``-0.0``), or the same characters inside a string.
_NEG_ZERO_RE: Final = re.compile(r"-0(?![0-9.eE])")
#: A ``\u`` escape: where a lone surrogate or a NUL may hide.
ESCAPE_RE: Final = re.compile(r"\\u")
scanstring: Final[Callable[[str, int], tuple[str, int]]] = json.decoder.scanstring  # type: ignore[attr-defined]


def may_hold_neg_zero(buf: str, start: int, end: int) -> bool:
    """Whether ``buf[start:end]`` (JSON text) may hold the integer ``-0`` (a ``-0`` after
    ``:``, ``[`` or ``,``; possibly inside a string, which only costs an exact decode)."""
    m = _NEG_ZERO_RE.search(buf, start, end)
    while m is not None:
        i = m.start() - 1
        while i >= start and buf[i] in JSON_WS:
            i -= 1
        if i >= start and buf[i] in ":[,":
            return True
        m = _NEG_ZERO_RE.search(buf, m.end(), end)
    return False
