"""JSON parsing that refuses an object with the same key twice.

Python's json (like most parsers) keeps the last of two equal keys, so a second `"train"` object in a run file
silently replaces the whole first one. Configuration files are read with `loads_unique` instead, which names
the key and the lines of both occurrences.

The line of a key is found from where its value starts: the standard library's pure-Python object parser is
given a `scan_once` that records each value's start (the C scanner offers no such hook). Configuration files
are small, so the slower parser costs nothing noticeable.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from typing import Any


class DuplicateKeyError(ValueError):
    """An object holds `key` twice, first at line `first_line`, again at line `second_line`."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(f"duplicate key {json.dumps(key)} at lines {first_line} and {second_line}")


class _UniqueKeyDecoder(json.JSONDecoder):
    def __init__(self) -> None:
        super().__init__()

        def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):  # noqa: ANN001, ANN202
            string = s_and_end[0]
            value_starts: list[int] = []

            def scan_value(s: str, idx: int):  # noqa: ANN202 - json's scanner protocol
                value_starts.append(idx)
                return scan_once(s, idx)

            def line_of(value_start: int) -> int:  # the line of the colon right after the key
                return string.count("\n", 0, string.rindex(":", 0, value_start)) + 1

            def unique(pairs: list[tuple[str, Any]]) -> dict:
                seen: dict[str, int] = {}
                for (key, _), start in zip(pairs, value_starts):
                    if key in seen:
                        raise DuplicateKeyError(key, line_of(seen[key]), line_of(start))
                    seen[key] = start
                return dict(pairs)

            return json.decoder.JSONObject(s_and_end, strict, scan_value, object_hook, unique, memo)

        self.parse_object = parse_object
        self.scan_once = json.scanner.py_make_scanner(self)


def loads_unique(text: str) -> Any:
    """`json.loads(text)`, but DuplicateKeyError for an object holding a key twice (json.JSONDecodeError and
    ValueError as json.loads raises them)."""
    return _UniqueKeyDecoder().decode(text)
