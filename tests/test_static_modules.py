"""The dashboard's scripts are native ES modules (tracker/static, no build step): small files whose
imports resolve, checked here without a browser, and served with a JavaScript MIME type (a browser
refuses a module script served as anything else).

The import check is regex-based, not a JavaScript parser: it reads `import ... from '...'`,
`import '...'`, `import('...')` and `export ... from '...'` at the start of a line, and the
`export` declarations and lists of each module. Every import must name an existing file under
tracker/static by a relative (or /static/) path, and every imported name must be exported there.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from harness.instances import Instance

STATIC = Path(__file__).resolve().parents[1] / "tracker" / "static"
MAX_LINES = 500
IDENT = r"[A-Za-z_$][\w$]*"

IMPORT_FROM = re.compile(r"^[ \t]*import\s+(?P<clause>[^'\";]*?)\s*from\s*['\"](?P<spec>[^'\"]+)['\"]", re.M)
IMPORT_BARE = re.compile(r"^[ \t]*import\s*['\"](?P<spec>[^'\"]+)['\"]", re.M)
IMPORT_DYNAMIC = re.compile(r"\bimport\(\s*['\"](?P<spec>[^'\"]+)['\"]\s*\)")
IMPORT_DYNAMIC_ANY = re.compile(r"\bimport\(")
EXPORT_FROM = re.compile(
    r"^[ \t]*export\s+(?P<clause>\*(?:\s+as\s+" + IDENT + r")?|\{[^}]*\})\s*from\s*['\"](?P<spec>[^'\"]+)['\"]", re.M
)
EXPORT_DECL = re.compile(
    r"^[ \t]*export\s+(?:async\s+function\s*\*?|function\s*\*?|class|const|let|var)\s*(?P<name>" + IDENT + ")", re.M
)
EXPORT_LIST = re.compile(r"^[ \t]*export\s*\{(?P<names>[^}]*)\}(?!\s*from)", re.M)
EXPORT_DEFAULT = re.compile(r"^[ \t]*export\s+default\b", re.M)


def modules(root: Path = STATIC) -> dict[str, Path]:
    """Every script module of the page (a vendor/ folder of third-party code would be left out)."""
    found = {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.suffix in (".js", ".mjs") and "vendor" not in p.relative_to(root).parts
    }
    assert found, f"no script modules under {root}"
    return dict(sorted(found.items()))


def code(path: Path) -> str:
    """The source without comments that fill a line or a block (an import commented out is no import)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"^[ \t]*//.*$", "", text, flags=re.M)


def resolve(spec: str, importer: Path, root: Path = STATIC) -> Path | None:
    """The file a module specifier names, or None when it is not a path under `root` (/static/)."""
    if spec.startswith("/static/"):
        target = root / spec.removeprefix("/static/")
    elif spec.startswith(("./", "../")):
        target = importer.parent / spec
    else:
        return None  # a bare name or a URL: no import map, no CDN
    target = target.resolve()
    return target if target.is_relative_to(root.resolve()) else None


def names_in(clause: str) -> list[tuple[str, str]]:
    """`{ a, b as c }` -> [("a", "a"), ("b", "c")]: (the name in the module, the local or exported name)."""
    out = []
    for part in clause.strip().strip("{}").split(","):
        words = part.split()
        if not words:
            continue
        assert len(words) in (1, 3) and (len(words) == 1 or words[1] == "as"), f"cannot read {part!r}"
        out.append((words[0], words[-1]))
    return out


def imports(path: Path) -> list[tuple[str, set[str]]]:
    """(specifier, names it must export) for every import and re-export of a module."""
    src = code(path)
    out: list[tuple[str, set[str]]] = []
    for m in IMPORT_FROM.finditer(src):
        clause = m["clause"].strip()
        needed: set[str] = set()
        braces = re.search(r"\{[^}]*\}", clause)
        if braces:
            needed |= {name for name, _ in names_in(braces[0])}
            clause = clause.replace(braces[0], "")
        head = [c.strip() for c in clause.split(",") if c.strip()]
        for item in head:
            if item.startswith("*"):
                assert re.fullmatch(r"\*\s+as\s+" + IDENT, item), f"{path.name}: cannot read import {item!r}"
            else:
                assert re.fullmatch(IDENT, item), f"{path.name}: cannot read import {item!r}"
                needed.add("default")
        out.append((m["spec"], needed))
    for m in EXPORT_FROM.finditer(src):
        clause = m["clause"]
        needed = {name for name, _ in names_in(clause)} if clause.startswith("{") else set()
        out.append((m["spec"], needed))
    out += [(m["spec"], set()) for m in IMPORT_BARE.finditer(src)]
    out += [(m["spec"], set()) for m in IMPORT_DYNAMIC.finditer(src)]
    dynamic = len(IMPORT_DYNAMIC_ANY.findall(src))
    assert dynamic == len(IMPORT_DYNAMIC.findall(src)), f"{path.name}: import() of a computed specifier"
    return out


def exports(path: Path, root: Path = STATIC, seen: frozenset[Path] = frozenset()) -> set[str]:
    """The names a module exports, following `export * from` (which never passes `default` on)."""
    src = code(path)
    names = {m["name"] for m in EXPORT_DECL.finditer(src)}
    for m in EXPORT_LIST.finditer(src):
        names |= {exported for _, exported in names_in(m["names"])}
    if EXPORT_DEFAULT.search(src):
        names.add("default")
    for m in EXPORT_FROM.finditer(src):
        clause = m["clause"]
        if clause.startswith("{"):
            names |= {exported for _, exported in names_in(clause)}
        elif clause != "*":
            names.add(clause.split()[-1])  # export * as ns
        else:
            target = resolve(m["spec"], path, root)
            if target and target.is_file() and target not in seen:
                names |= exports(target, root, seen | {path}) - {"default"}
    return names


PAGES = ("index.html", "share.html", "report.html")  # the dashboard; the recipient's tracking page (tracker/share);
# the printable custody report (tracker/custody/report.py)


def entry_scripts(page: str = "index.html") -> list[str]:
    """The `src` of every script tag of a page, which must all be module scripts."""
    html = (STATIC / page).read_text()
    tags = re.findall(r"<script\b[^>]*>", html)
    assert tags, f"{page} loads no script"
    srcs = []
    for tag in tags:
        src = re.search(r'\bsrc="([^"]+)"', tag)
        assert src and 'type="module"' in tag, f"not a module script with a src: {tag}"
        srcs.append(src[1])
    return srcs


def test_every_module_is_at_most_500_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these modules (at most {MAX_LINES} lines each): {too_long}"


def import_problems(root: Path = STATIC) -> tuple[int, list[str]]:
    """(how many imports were read, what is wrong with them)."""
    problems = []
    count = 0
    for name, path in modules(root).items():
        for spec, needed in imports(path):
            count += 1
            target = resolve(spec, path, root)
            if target is None:
                problems.append(f"{name}: '{spec}' is not a relative or /static/ path inside {root.name}/")
            elif not target.is_file():
                problems.append(f"{name}: '{spec}' names no file ({target.relative_to(root.resolve())})")
            elif missing := needed - exports(target, root):
                problems.append(f"{name}: '{spec}' does not export {sorted(missing)}")
    return count, problems


def test_every_import_resolves_to_a_file_that_exports_the_name() -> None:
    count, problems = import_problems()
    assert count > 0, "no imports found: the regular expressions no longer match the modules"
    assert not problems, "\n".join(problems)


def test_every_module_is_reachable_from_index_html() -> None:
    """No module is left over (such as an old copy of the code) and every entry script exists (of
    the dashboard and of the tracking page)."""
    todo = []
    for page in PAGES:
        for src in entry_scripts(page):
            target = resolve(src, STATIC / page)
            assert target and target.is_file(), f"{page} loads {src}, which is not a file under tracker/static"
            todo.append(target)
    reached: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in reached:
            continue
        reached.add(path)
        for spec, _ in imports(path):
            target = resolve(spec, path)
            if target and target.is_file():
                todo.append(target)
    unused = {name for name, path in modules().items() if path.resolve() not in reached}
    assert not unused, f"modules that no page ({', '.join(PAGES)}) loads: {sorted(unused)}"


def test_the_import_check_finds_broken_imports(tmp_path: Path) -> None:
    """The regular expressions read every form of import and export, and a broken import is reported."""
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "a.js").write_text(
        "import { one, two as deux } from './b.js';\nimport b, * as all from '/static/js/b.js';\n"
        "export { one } from './b.js';\nexport * from './b.js';\nconst x = import('./c.js');\n"
        "import {\n  three,\n  five,\n} from './b.js';\nimport 'https://cdn.example.org/x.js';\n"
        "// import { six } from './b.js';\n"
    )
    (tmp_path / "js" / "b.js").write_text(
        "export function one() {}\nexport const three = 3;\nexport { three as four };\nexport default 1;\n"
    )
    a = tmp_path / "js" / "a.js"
    assert imports(a) == [
        ("./b.js", {"one", "two"}),
        ("/static/js/b.js", {"default"}),
        ("./b.js", {"three", "five"}),
        ("./b.js", {"one"}),
        ("./b.js", set()),
        ("https://cdn.example.org/x.js", set()),
        ("./c.js", set()),
    ]
    assert exports(tmp_path / "js" / "b.js", tmp_path) == {"one", "three", "four", "default"}
    assert exports(a, tmp_path) == {"one", "three", "four"}
    count, problems = import_problems(tmp_path)
    assert count == 7
    assert problems == [
        "js/a.js: './b.js' does not export ['two']",
        "js/a.js: './b.js' does not export ['five']",
        "js/a.js: 'https://cdn.example.org/x.js' is not a relative or /static/ path inside " + tmp_path.name + "/",
        "js/a.js: './c.js' names no file (js/c.js)",
    ]


async def get(inst: Instance, target: str) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", inst.port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{inst.port}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split(" ", 2)[1]), {k.lower(): v for k, v in fields.items()}


async def test_the_service_serves_every_module_as_javascript(instance: Instance) -> None:
    for name in modules():
        status, headers = await get(instance, f"/static/{name}")
        assert status == 200, (name, status)
        mime = headers.get("content-type", "").split(";")[0].strip()
        assert mime in ("text/javascript", "application/javascript"), (name, mime)
