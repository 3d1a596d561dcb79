"""Rules the test suite keeps about itself.

An expected failure must say which failure it expects: `pytest.mark.xfail` without `raises=` also counts a crash
(a TypeError in the code under test, a missing file) as the expected failure, so a broken component would pass
as "xfailed" forever. `raises=AssertionError` keeps the expected failure to the assertion it documents.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_xfail(node: ast.AST) -> bool:
    """`pytest.mark.xfail` or `mark.xfail` (called or not)."""
    target = node.func if isinstance(node, ast.Call) else node
    return isinstance(target, ast.Attribute) and target.attr == "xfail" and (
        isinstance(target.value, ast.Attribute) and target.value.attr == "mark"
        or isinstance(target.value, ast.Name) and target.value.id == "mark")


def xfails_without_raises(source: str, filename: str) -> list[str]:
    """'file:line' of every xfail mark (decorator, `pytest.param(marks=...)`, `pytestmark`) that does not name the
    exception it expects, and of every imperative `pytest.xfail(...)` call (it cannot name one)."""
    tree = ast.parse(source, filename)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}  # `mark.xfail(...)`: judged as the call
    found = []
    for node in ast.walk(tree):
        if id(node) in called:
            continue
        if _is_xfail(node):
            if not (isinstance(node, ast.Call) and any(k.arg == "raises" for k in node.keywords)):
                found.append(f"{filename}:{node.lineno}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "xfail"
              and isinstance(node.func.value, ast.Name) and node.func.value.id == "pytest"):
            found.append(f"{filename}:{node.lineno} (imperative pytest.xfail)")
    return sorted(set(found))


def test_every_expected_failure_names_its_exception():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        offenders += xfails_without_raises(path.read_text(), str(path.relative_to(TESTS.parent)))
    assert not offenders, f"xfail without raises=: {offenders}"


def test_the_rule_can_fail():
    bare = ("import pytest\n@pytest.mark.xfail(strict=True, reason='x')\ndef test_a():\n    pass\n"
            "@pytest.mark.xfail\ndef test_b():\n    pass\n"
            "CASES = [pytest.param(1, marks=pytest.mark.xfail(reason='y'))]\n"
            "def test_c():\n    pytest.xfail('z')\n")
    assert xfails_without_raises(bare, "t.py") == ["t.py:10 (imperative pytest.xfail)", "t.py:2", "t.py:5", "t.py:8"]
    named = "import pytest\n@pytest.mark.xfail(strict=True, raises=AssertionError, reason='x')\ndef test_a():\n    pass\n"
    assert xfails_without_raises(named, "t.py") == []
