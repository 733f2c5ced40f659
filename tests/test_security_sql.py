"""SQL only through parameters: no string-built SQL anywhere in tracker/ (f-strings, `.format`, `%`, or `+`
on a string holding SELECT/INSERT/UPDATE/DELETE), and nothing but a fixed string reaches a query method.

A static check over the syntax tree (ruff's S608 is the same idea, run in lint; this one also fails the
test suite, and proves its detector on examples of what it must and must not catch)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "tracker"
SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)
SQL_SHAPE = re.compile(r"\b(SELECT\b[\s\S]*\bFROM|INSERT\s+INTO|UPDATE\s+\S+\s+SET|DELETE\s+FROM)\b", re.IGNORECASE)
QUERY_METHODS = {
    "execute",
    "executemany",
    "fetch",
    "fetchval",
    "fetchrow",
    "prepare",
    "cursor",
    "copy_from_query",
    "copy_records_to_table",
    "copy_to_table",
    "copy_from_table",
}


def _literal_text(node: ast.AST) -> str | None:
    """The literal text of a string-building expression (None if `node` builds no string)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)) + " "
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        left, right = _literal_text(node.left), _literal_text(node.right) if isinstance(node.op, ast.Add) else ""
        if left is None and right is None:
            return None
        return (left or "") + " " + (right or "")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("format", "join"):
        return _literal_text(node.func.value)
    return None


def _is_built(node: ast.AST) -> bool:
    """A string made at run time from pieces (as opposed to a literal)."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return _literal_text(node) is not None
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def findings(source: str, filename: str = "<string>") -> Iterator[str]:
    """Where `source` builds SQL from strings, or hands a query method anything but a fixed string."""
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if _is_built(node):
            text = _literal_text(node) or ""
            if SQL_WORDS.search(text) and (
                SQL_SHAPE.search(text)
                or text.strip().upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE", "WITH"))
            ):
                yield f"{filename}:{getattr(node, 'lineno', '?')}: SQL built from strings: {text.strip()[:60]!r}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in QUERY_METHODS:
            if node.args and _is_built(node.args[0]):
                yield f"{filename}:{node.lineno}: {node.func.attr}() given a string built at run time"


def test_no_string_built_sql_in_tracker() -> None:
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 20
    found = [f for path in files for f in findings(path.read_text(), str(path.relative_to(ROOT.parent)))]
    assert found == [], "\n".join(found)


BAD = {
    "f-string": "async def f(c, org):\n    await c.fetch(f\"SELECT * FROM positions WHERE org = '{org}'\")\n",
    "format": 'def f(c, t):\n    return c.execute("DELETE FROM {} WHERE x = 1".format(t))\n',
    "percent": "def f(c, o):\n    return c.fetchrow(\"SELECT id FROM scans WHERE org = '%s'\" % o)\n",
    "plus": (
        "def f(c, o):\n    q = \"UPDATE packages SET state = 'x' WHERE org = '\" + o + \"'\"\n    return c.execute(q)\n"
    ),
    "via a variable": 'def f(c, col):\n    sql = f"INSERT INTO t ({col}) VALUES ($1)"\n    return c.execute(sql, 1)\n',
    "any query method": 'def f(c, x):\n    return c.fetchval(f"{x}")\n',
    "lowercase": 'def f(c, o):\n    return c.fetch("select * from t where o = " + o)\n',
}
GOOD = {
    "parameters": 'async def f(c, org):\n    await c.fetch("SELECT * FROM positions WHERE org = $1", org)\n',
    "a constant": 'Q = """\nSELECT 1\nFROM t\n"""\nasync def f(c):\n    await c.fetchval(Q)\n',
    "constant concatenation": 'Q = ("SELECT a "\n     "FROM t WHERE o = $1")\n',
    "prose": 'def f(x):\n    raise ValueError(f"cannot update {x}: select another one")\n',
    "a log line": 'def f(log, n):\n    log.info("deleted %d rows from the select list", n)\n',
}


def test_the_detector_catches_string_built_sql() -> None:
    for name, source in BAD.items():
        assert list(findings(source)), name
    for name, source in GOOD.items():
        assert not list(findings(source)), name
