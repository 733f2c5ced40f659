"""docs/PROTOCOL.md stays in step with schemas/, with the server's code, and inside the repository.

No server is needed: these tests read files. The conventions of docs/PROTOCOL.md they rely on:

- a frame section is a level-3 heading "### `type` (direction)" inside a level-2 section whose title
  starts with "WS /v1/"; it links its schema as `../schemas/<name>.json`;
- "## Frames and schemas" holds the index table: endpoint | direction | `type` | schema link;
- a frame section's ```json blocks are examples of its frame (validated against its schema);
- "#### Error codes" holds the websocket error codes (first column), "### HTTP errors" the HTTP
  ones (status | code), "## Close codes" the close codes (first column).

The server's code is read from tracker/ (Python and Lua, not the simulators under tracker/sim nor
the page under tracker/static, which are clients): frame types it builds (`"type": "..."`), close
codes it closes with (`close(4001`, `fail(1009`, `close_code=1009`) and error codes it sends
(`error("...")`, `Refusal("...")`, the writer's `(item, "code", "message")` outcomes, `ApiError` and
`error_response` with their HTTP status, `HTTP_CODES`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from urllib.parse import unquote

from .schema_check import assert_frame_valid

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "PROTOCOL.md"
SCHEMAS = ROOT / "schemas"
CODE = ROOT / "tracker"
CLIENT_CODE = ("sim", "static")  # under tracker/: clients of the protocol, not the server
SKIP_DIRS = frozenset(
    {
        ".git",
        ".venv",
        "venv",
        "node_modules",
        ".tracker",
        ".hypothesis",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "test-artifacts",
        "build",
        "dist",
    }
)
SKIP_PATHS = frozenset({"bench/results", "bench/.peers-venv"})

FRAME_HEADING = re.compile(r"^`([a-z_]+)` \(([^)]+)\)$")
SCHEMA_LINK = re.compile(r"\]\(\.\./schemas/([^)#\s]+\.json)\)")


# -- reading markdown ---------------------------------------------------------------------------


@cache
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def without_code(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept) and inline code spans removed."""
    lines, fence = [], ""
    for line in text.split("\n"):
        marker = re.match(r"^\s{0,3}(`{3,}|~{3,})", line)
        if fence:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence):
                fence = ""
            lines.append("")
        elif marker:
            fence = marker.group(1)
            lines.append("")
        else:
            lines.append(line)
    return re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", "\n".join(lines), flags=re.S)


def sections(text: str) -> list[tuple[int, str, str]]:
    """(level, title, body up to the next heading of any level) of every heading outside code fences."""
    out: list[tuple[int, str, list[str]]] = []
    fence = ""
    for line in text.split("\n"):
        marker = re.match(r"^\s{0,3}(`{3,}|~{3,})", line)
        if marker and (not fence or (marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence))):
            fence = "" if fence else marker.group(1)
        heading = None if fence or marker else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if heading:
            out.append((len(heading.group(1)), heading.group(2), []))
        elif out:
            out[-1][2].append(line)
    return [(level, title, "\n".join(body)) for level, title, body in out]


def section_tree(text: str) -> Iterator[tuple[str, int, str, str]]:
    """(enclosing level-2 title, level, title, body including deeper subsections) per heading."""
    flat = sections(text)
    parent = ""
    for i, (level, title, body) in enumerate(flat):
        if level == 2:
            parent = title
        parts = [body]
        for deeper_level, deeper_title, deeper_body in flat[i + 1 :]:
            if deeper_level <= level:
                break
            parts.append(f"{'#' * deeper_level} {deeper_title}\n{deeper_body}")
        yield parent, level, title, "\n".join(parts)


def table_after(title: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table in the section titled `title`, header excluded."""
    found = [body for _, t, body in sections(doc()) if t == title]
    assert found, f"docs/PROTOCOL.md has no heading {title!r}"
    rows: list[list[str]] = []
    for line in found[0].split("\n"):
        if line.lstrip().startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2 and set(rows[1][0]) <= set("-: "), f"no table under {title!r}"
    return rows[2:]


def unquote_code(cell: str) -> str:
    return cell.strip().strip("`").strip()


def frame_sections() -> list[tuple[str, str, str, str]]:
    """(endpoint section, type, direction, body) of every frame section."""
    out = []
    for parent, level, title, body in section_tree(doc()):
        match = FRAME_HEADING.match(title)
        if level == 3 and parent.startswith("WS /v1/") and match:
            out.append((parent, match.group(1), match.group(2), body))
    return out


# -- schemas and code ---------------------------------------------------------------------------


def schema_files() -> set[str]:
    return {p.name for p in SCHEMAS.glob("*.json")}


def http_body_schemas() -> set[str]:
    """Schemas of HTTP bodies (no `type` property, or a webhook's: `webhook-*.json`, whose event body
    has a `type` but is no frame): linked from "## HTTP API", not frame sections."""
    return {
        name
        for name in schema_files()
        if name.startswith("webhook")
        or "type" not in json.loads((SCHEMAS / name).read_text(encoding="utf-8")).get("properties", {})
    }


def frame_schema_files() -> set[str]:
    return schema_files() - http_body_schemas()


def schema_type(name: str) -> str:
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return str(schema["properties"]["type"]["const"])


@cache
def server_sources() -> dict[str, str]:
    out = {}
    for path in sorted(CODE.rglob("*")):
        rel = path.relative_to(CODE)
        if path.suffix in (".py", ".lua") and not set(rel.parts[:-1]) & set(CLIENT_CODE):
            out[str(rel)] = path.read_text(encoding="utf-8")
    assert len(out) > 10, "tracker/ sources not found"
    return out


def found_in_code(*patterns: str) -> dict[str, set[str]]:
    """The first group of each match of `patterns` (joined with "|" when there are several groups)
    -> the files of tracker/ it is in."""
    out: dict[str, set[str]] = {}
    for name, text in server_sources().items():
        for pattern in patterns:
            for m in re.finditer(pattern, text, re.M):
                out.setdefault("|".join(m.groups()), set()).add(name)
    return out


def close_codes_in_code() -> dict[str, set[str]]:
    return found_in_code(
        r"\b(?:close|fail)\(\s*(\d{4})\b",  # channel.close(4001, ...), self.fail(1002, ...), ws.close(1008, ...)
        r"\bclose_code\s*=\s*(\d{4})\b",  # ProtocolError(..., close_code=1009)
        r"^\s*[A-Z_]*CLOSE[A-Z_]*\s*(?::[^=\n]*)?=\s*(\d{4})\b",  # a constant, should one be introduced
    )


def ws_error_codes_in_code() -> dict[str, set[str]]:
    return found_in_code(
        r"\berror\(\s*\"([a-z_]+)\"",  # frames.error("protocol", ...)
        r"\bRefusal\(\s*\"([a-z_]+)\"",  # an event refused at validation
        r"(?<![\w.])\(\s*[A-Za-z_][\w.\[\]]*\s*,\s*\"([a-z_]+)\"\s*,\s*f?\"[A-Za-z]",  # (it, "conflict", "...")
    )


def http_errors_in_code() -> set[tuple[int, str]]:
    pairs = found_in_code(r"\b(?:ApiError|error_response)\(\s*(\d{3})\s*,\s*\"([a-z_]+)\"")
    out = {(int(status), code) for status, code in (pair.split("|") for pair in pairs)}
    for body in found_in_code(r"\bHTTP_CODES\s*(?::[^=\n]*)?=\s*\{([^}]*)\}"):
        out |= {(int(s), c) for s, c in re.findall(r"(\d{3})\s*:\s*\"([a-z_]+)\"", body)}
    return out


# -- schemas <-> doc ----------------------------------------------------------------------------


def test_every_schema_is_linked_from_the_doc() -> None:
    linked = set(SCHEMA_LINK.findall(without_code(doc())))
    assert schema_files(), "schemas/ is empty"
    assert schema_files() - linked == set(), "schemas not linked from docs/PROTOCOL.md"
    assert linked - schema_files() == set(), "docs/PROTOCOL.md links schemas that do not exist"


def test_every_frame_section_links_the_schema_of_its_type() -> None:
    found = frame_sections()
    assert {parent.split(":")[0] for parent, *_ in found} == {"WS /v1/driver", "WS /v1/live"}, (
        "frame sections must be '### `type` (direction)' under '## WS /v1/driver…' and '## WS /v1/live…'"
    )
    linked_from_frames: set[str] = set()
    for parent, kind, direction, body in found:
        where = f"{parent} > `{kind}` ({direction})"
        names = SCHEMA_LINK.findall(without_code(body))
        assert names, f"{where}: links no schema (../schemas/<name>.json)"
        for name in names:
            assert name in schema_files(), f"{where}: links {name}, which is not in schemas/"
            assert schema_type(name) == kind, f"{where}: links {name}, a schema of type {schema_type(name)!r}"
        linked_from_frames.update(names)
    assert frame_schema_files() - linked_from_frames == set(), "schemas that no frame section links"


def test_http_body_schemas_are_linked_from_the_http_api_section() -> None:
    http = [body for parent, level, _, body in section_tree(doc()) if level == 2 and parent == "HTTP API"]
    assert http, "docs/PROTOCOL.md has no '## HTTP API' section"
    linked = set(SCHEMA_LINK.findall(without_code(http[0])))
    assert {"upload.json", "upload-answer.json"} <= http_body_schemas(), "the HTTP body scan found too little"
    assert http_body_schemas() - linked == set(), "HTTP body schemas not linked from '## HTTP API'"


def json_examples(body: str) -> list[object]:
    """The JSON values of the ```json blocks of a section: the whole block, or one value per line."""
    out: list[object] = []
    for block in re.findall(r"^```json\n(.*?)^```", body, re.S | re.M):
        try:
            out.append(json.loads(block))
        except ValueError:
            out += [json.loads(line) for line in block.split("\n") if line.strip()]
    return out


def test_frame_examples_match_their_schema() -> None:
    checked = 0
    for parent, kind, direction, body in frame_sections():
        name = SCHEMA_LINK.findall(without_code(body))[0]
        for example in json_examples(body):
            assert isinstance(example, dict) and example.get("type") == kind, f"`{kind}` ({direction}): {example}"
            try:
                assert_frame_valid(example, name)
            except AssertionError as exc:
                raise AssertionError(
                    f"{parent} > `{kind}` ({direction}): example does not match {name}: {exc}"
                ) from None
            checked += 1
    assert checked >= 15, "frame sections show their frames in ```json blocks"


def test_index_table_matches_frame_sections_and_schemas() -> None:
    rows = table_after("Frames and schemas")
    index: set[tuple[str, str, str]] = set()
    for row in rows:
        endpoint, direction, kind = unquote_code(row[0]), row[1], unquote_code(row[2])
        names = SCHEMA_LINK.findall(row[3])
        assert len(names) == 1, f"index row {row}: one ../schemas/<name>.json link"
        assert names[0] in schema_files(), f"index row {row}: no such schema"
        assert schema_type(names[0]) == kind, f"index row {row}: {names[0]} is of type {schema_type(names[0])!r}"
        index.add((endpoint, kind, direction))
    assert {SCHEMA_LINK.findall(row[3])[0] for row in rows} == frame_schema_files(), "the index must list every frame"
    sections_ = {(parent.split(":")[0], kind, direction) for parent, kind, direction, _ in frame_sections()}
    assert index == sections_, (
        f"index rows without a section: {sorted(index - sections_)}; sections not in the index: "
        f"{sorted(sections_ - index)}"
    )


def test_frame_types_the_server_builds_have_a_section() -> None:
    built = found_in_code(r"\"type\\?\"\s*:\s*\\?\"([a-z][a-z_]*)\\?\"")
    assert {"welcome", "ack", "error", "snapshot", "pos"} <= built.keys(), "the frame-type scan found too little"
    documented = {kind for _, kind, _, _ in frame_sections()}
    missing = {kind: sorted(files) for kind, files in built.items() if kind not in documented}
    assert missing == {}, "frame types the server builds without a frame section in docs/PROTOCOL.md"


# -- codes ----------------------------------------------------------------------------------------


def test_close_codes_used_by_the_server_are_in_the_close_code_table() -> None:
    table = {unquote_code(row[0]) for row in table_after("Close codes")}
    assert all(re.fullmatch(r"\d{4}", code) for code in table), table
    used = close_codes_in_code()
    assert {"4000", "4001", "4003", "1013"} <= used.keys(), "the close-code scan found too little"
    missing = {code: sorted(files) for code, files in used.items() if code not in table}
    assert missing == {}, "close codes the server uses, missing from docs/PROTOCOL.md's close-code table"


def test_websocket_error_codes_are_in_the_error_table_and_the_schema() -> None:
    table = [unquote_code(row[0]) for row in table_after("Error codes")]
    assert len(table) == len(set(table)), "a code listed twice"
    enum = set(json.loads((SCHEMAS / "error.json").read_text(encoding="utf-8"))["properties"]["code"]["enum"])
    assert set(table) == enum, (
        f"error table and schemas/error.json differ: only in the doc {set(table) - enum}, only in the schema "
        f"{enum - set(table)}"
    )
    used = ws_error_codes_in_code()
    assert {"protocol", "unauthorized", "conflict", "unavailable"} <= used.keys(), "the error scan found too little"
    missing = {code: sorted(files) for code, files in used.items() if code not in table}
    assert missing == {}, "websocket error codes the server sends, missing from the error table"


def test_http_error_codes_are_in_the_http_error_table() -> None:
    table = {(int(row[0]), unquote_code(row[1])) for row in table_after("HTTP errors")}
    used = http_errors_in_code()
    assert {(401, "unauthorized"), (404, "not_found"), (405, "method_not_allowed")} <= used, used
    assert used - table == set(), "HTTP (status, code) pairs the server sends, missing from the HTTP error table"


# -- links ----------------------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    out = []
    for top, dirs, files in os.walk(ROOT):
        rel = Path(top).relative_to(ROOT)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in SKIP_DIRS and not d.endswith(".egg-info") and (rel / d).as_posix() not in SKIP_PATHS
        )
        out += [Path(top) / f for f in sorted(files) if f.endswith(".md")]
    return out


def links(text: str) -> list[str]:
    text = without_code(text)
    inline = re.findall(r"\]\(\s*<?([^()\s<>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)", text)
    refs = re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", text, re.M)
    html = re.findall(r"\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", text)
    return inline + refs + html


def is_external(target: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target)) or target.startswith("//")


def resolve(md: Path, target: str) -> tuple[Path, str]:
    """(the file a relative link names, its #fragment)."""
    path, _, fragment = target.partition("#")
    path = unquote(path.split("?", 1)[0])
    if not path:
        return md, fragment
    base = ROOT if path.startswith("/") else md.parent
    return (base / path.lstrip("/")).resolve(), fragment


def test_relative_links_resolve_to_files_inside_the_repository() -> None:
    files = markdown_files()
    assert DOC in files and ROOT / "README.md" in files
    root = ROOT.resolve()
    bad = []
    for md in files:
        for target in links(md.read_text(encoding="utf-8")):
            if not target or is_external(target):
                continue
            path, _ = resolve(md, target)
            where = f"{md.relative_to(ROOT)}: ({target})"
            if not path.is_relative_to(root):
                bad.append(f"{where} points outside the repository")
            elif not path.exists():
                bad.append(f"{where} does not exist")
    assert bad == [], "\n".join(bad)


def slugs(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    out: set[str] = set()
    for _, title, _ in sections(text):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
        slug = re.sub(r"[^\w\- ]", "", plain.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in out:
            n += 1
            candidate = f"{slug}-{n}"
        out.add(candidate)
    return out


def test_anchors_of_the_protocol_doc_exist() -> None:
    checked = 0
    for target in links(doc()):
        if is_external(target) or "#" not in target:
            continue
        path, fragment = resolve(DOC, target)
        if path.suffix == ".md" and path.exists():
            assert fragment in slugs(path.read_text(encoding="utf-8")), f"docs/PROTOCOL.md: ({target}) no such heading"
            checked += 1
    assert checked > 5, "the contents list links the sections"


def test_readme_links_the_protocol_doc() -> None:
    targets = {resolve(ROOT / "README.md", t)[0] for t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert DOC in targets, "README.md must link docs/PROTOCOL.md"
