"""docs/ and the code kept together.

Each equation in docs/*.md carries a label, written `[eq:` + a name + `]` on the line of the equation; the
one place in the code that computes it carries the same label in a comment or docstring. This file checks:

- every label is well formed: a name of lower-case letters, digits and '-';
- every label in docs/ stands exactly once in docs/ and exactly once in the code;
- every label in the code is explained in docs/;
- every relative markdown link in docs/ points at a file or folder that exists;
- every code name in backticks in docs/ and README.md exists: `module.name`, `Class.member` and
  `module.Class.member` of the project's modules, private `_helpers` and `test_...` functions, and
  CamelCase names (which must at least occur in the code: a library's class the code uses counts).

"The code" is every .py file in the repository root and in data/ (tests/ only cites labels). In docs/,
fenced code blocks and inline code spans are skipped, so a page can show the convention itself. In the code,
a module docstring is skipped: it describes its file and may cite a label as an example, it computes nothing.
Generic on purpose: a new docs page or module brings its own labels and needs no change here.
"""
import ast
import pathlib
import re
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CODE_GLOBS = ("*.py", "data/*.py")                    # data/*/ holds downloaded data, not code (.gitignore)

ANY_LABEL = re.compile(r"\[eq:([^\]\s]*)\]")           # anything label-shaped, so malformed names are caught
NAME = re.compile(r"[a-z0-9-]+")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?!`)(?:(?!\n[ \t]*\n).)*?(?<!`)\1(?!`)", re.S)   # not across a blank line
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a reference definition `[x]: target` only where a paragraph starts (it cannot interrupt one)
LINK_DEFINITION = re.compile(r"(?:\A|\n[ \t]*\n) {0,3}\[[^\]]+\]:[ \t]*\n?[ \t]*<?([^\s>]+)>?")


# ---------------------------------------------------------------------------------------------------------
# collecting


def markdown_prose(text: str) -> list[tuple[int, str]]:
    """(line number, line) for the lines of a markdown text outside fenced code, with inline code spans
    blanked out (a span may run over a line break, so spans are removed from the whole text first)."""
    kept, fence = [], None
    for line in text.split("\n"):
        m = FENCE.match(line)
        if fence is None and m:
            fence, line = m.group(1), ""
        elif fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip(" `~"):
                fence = None
            line = ""
        kept.append(line)
    prose = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(kept))
    return list(enumerate(prose.split("\n"), start=1))


def module_docstring_lines(source: str) -> set[int]:
    try:
        body = ast.parse(source).body
    except SyntaxError:                                 # a file mid-edit: read it whole
        return set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return set(range(body[0].lineno, body[0].end_lineno + 1))
    return set()


def docs_files() -> list[pathlib.Path]:
    return sorted(DOCS.glob("*.md"))


def code_files() -> list[pathlib.Path]:
    return sorted({p for g in CODE_GLOBS for p in ROOT.glob(g) if p.is_file()})


def rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def labels_in_docs() -> dict[str, list[str]]:
    """label -> ["docs/x.md:LINE", ...], one entry per occurrence."""
    found = defaultdict(list)
    for path in docs_files():
        for n, line in markdown_prose(path.read_text(encoding="utf-8")):
            for name in ANY_LABEL.findall(line):
                found[name].append(f"{rel(path)}:{n}")
    return found


def labels_in_code() -> dict[str, list[str]]:
    found = defaultdict(list)
    for path in code_files():
        source = path.read_text(encoding="utf-8")
        skip = module_docstring_lines(source)
        for n, line in enumerate(source.split("\n"), start=1):
            if n not in skip:
                for name in ANY_LABEL.findall(line):
                    found[name].append(f"{rel(path)}:{n}")
    return found


def report(title: str, bad: dict[str, list[str]]) -> str:
    rows = [f"  [eq:{name}]  " + (", ".join(where) if where else "(nowhere)") for name, where in sorted(bad.items())]
    return f"{title}:\n" + "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------
# the checks


def test_there_is_something_to_check():
    assert docs_files(), f"no markdown files in {DOCS}"
    assert labels_in_docs(), "docs/ holds no equation labels at all"


def test_labels_are_well_formed():
    bad = {name: where for found in (labels_in_docs(), labels_in_code()) for name, where in found.items()
           if not NAME.fullmatch(name)}
    assert not bad, report("labels whose name is not [a-z0-9-]+", bad)


def test_each_docs_label_stands_once_in_docs():
    bad = {name: where for name, where in labels_in_docs().items() if len(where) != 1}
    assert not bad, report("labels written more than once in docs/ (keep one, on its equation's line)", bad)


def test_each_docs_label_is_computed_once_in_code():
    code = labels_in_code()
    bad = {name: code.get(name, []) for name in labels_in_docs() if len(code.get(name, [])) != 1}
    assert not bad, report("docs labels not found exactly once in the code (root and data/ .py files)", bad)


def test_each_code_label_is_explained_in_docs():
    docs = labels_in_docs()
    bad = {name: where for name, where in labels_in_code().items() if name not in docs}
    assert not bad, report("code labels with no equation in docs/", bad)


def test_relative_links_in_docs_exist():
    broken = []
    for path in docs_files():
        prose = "\n".join(line for _, line in markdown_prose(path.read_text(encoding="utf-8")))
        found = [(m.start(1), m.group(1)) for m in LINK.finditer(prose)]
        found += [(m.start(1), m.group(1)) for m in LINK_DEFINITION.finditer(prose)]
        for start, target in sorted(found):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue                                # http:, mailto:, ... and anchors in the same page
            file = target.split("#", 1)[0].split("?", 1)[0]
            if not (path.parent / file).exists():
                broken.append(f"  {rel(path)}:{prose.count(chr(10), 0, start) + 1}  ({target})")
    assert not broken, "relative links in docs/ to files that do not exist:\n" + "\n".join(broken)


# ---------------------------------------------------------------------------------------------------------
# code names in docs


CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(\(\))?")
CAMEL = re.compile(r"[A-Z][a-z0-9]+[A-Z]\w*")                   # two humps at least: FooBar, Int8Linear
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "pt", "bin", "txt", "model", "safetensors", "onnx", "tmp", "PID"}


def code_index() -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(module -> its top-level names, class -> its members, every name defined anywhere), from the root
    modules and data/ (as "data.tasks") with ast; members are methods, class-level fields and self.x."""
    modules, classes, defined = {}, defaultdict(set), set()
    for path in code_files():
        name = rel(path)[:-3].replace("/", ".")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                top.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                top |= {t.id for t in targets if isinstance(t, ast.Name)}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                top |= {(a.asname or a.name).split(".")[0] for a in node.names}
        modules[name] = top
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                defined.add(node.name)
            if isinstance(node, ast.ClassDef):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        classes[node.name].add(sub.name)
                    elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                        classes[node.name].add(sub.target.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        classes[node.name].add(sub.attr)
    return modules, classes, defined


def missing_code_name(span: str, modules, classes, defined, tests: set[str], code_text: str) -> bool:
    """True when `span` names project code that does not exist; other spans (flags, math, files, a
    library's functions) are not code names of ours and pass."""
    name = span[:-2] if span.endswith("()") else span
    if DOTTED.fullmatch(span):
        parts = name.split(".")
        if parts[-1] in FILE_SUFFIXES:
            return False
        for cut in range(len(parts) - 1, 0, -1):                        # the longest module prefix
            module = ".".join(parts[:cut])
            if module in modules:
                rest = parts[cut:]
                if rest[0] not in modules[module]:
                    return True
                return len(rest) > 1 and (rest[0] not in classes or rest[1] not in classes[rest[0]])
        return parts[0] in classes and parts[1] not in classes[parts[0]]
    if re.fullmatch(r"test_\w+", name):
        return name not in tests
    if re.fullmatch(r"_[a-z]\w*", name):
        return name not in defined
    if CAMEL.fullmatch(name):
        return name not in defined and not re.search(rf"\b{name}\b", code_text)
    return False


def test_code_names_in_docs_exist():
    modules, classes, defined = code_index()
    tests = {n.name for p in (ROOT / "tests").glob("test_*.py") for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.FunctionDef)}
    # deploy/ defines names too (the Prometheus alerts docs/deployment.md lists)
    code_text = "\n".join(p.read_text(encoding="utf-8")
                          for p in code_files() + sorted(ROOT.glob("deploy/**/*.y*ml")))
    bad = []
    for path in docs_files() + [ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        for m in CODE_SPAN.finditer(text):
            if missing_code_name(m.group(1).strip(), modules, classes, defined, tests, code_text):
                bad.append(f"  {rel(path)}:{text.count(chr(10), 0, m.start()) + 1}  `{m.group(1)}`")
    assert not bad, "code names in docs that the code does not define:\n" + "\n".join(bad)


def test_missing_code_name_rules():
    modules, classes, defined = {"model": {"Block", "unwrap"}, "data.tasks": {"read_examples"}}, \
        {"Block": {"forward"}}, {"Block", "unwrap", "_helper"}
    check = lambda span: missing_code_name(span, modules, classes, defined, {"test_a"}, "SummaryWriter")
    assert [check(s) for s in ("model.unwrap", "model.Block.forward", "Block.forward", "data.tasks.read_examples",
                               "test_a", "_helper", "SummaryWriter", "model.py", "torch.compile", "--lr", "x = 1")] \
        == [False] * 11
    assert [check(s) for s in ("model.gone", "model.Block.attend", "Block.attend()", "data.tasks.nope", "test_b",
                               "_gone", "SentenceEncoder")] == [True] * 7


# ---------------------------------------------------------------------------------------------------------
# the collectors themselves


def test_markdown_prose_skips_fences_and_inline_code():
    text = "a [eq:one]\n```\n[eq:two]\n```\nb `[eq:three]` c ``x ` [eq:four]`` d\n~~~py\n[eq:five]\n~~~\n[eq:six]"
    names = [name for _, line in markdown_prose(text) for name in ANY_LABEL.findall(line)]
    assert names == ["one", "six"]
    assert [n for n, line in markdown_prose(text) if "six" in line] == [9]


def test_module_docstring_is_skipped_but_not_others():
    source = '"""Labels like [eq:x] look so."""\nimport os\n\ndef f():\n    """[eq:y]"""\n'
    assert module_docstring_lines(source) == {1}
    assert module_docstring_lines("import os\n") == set()


def test_link_patterns():
    assert LINK.findall("see [m](../model.py) and ![i](img.png \"t\") and [w](https://x.org)") == \
        ["../model.py", "img.png", "https://x.org"]
    assert LINK_DEFINITION.findall("[ref]: ../losses.py\n\nx\n\n  [b]:\n  c.md") == ["../losses.py", "c.md"]
    assert LINK_DEFINITION.findall("a sum in\n[1, K]: no overflow") == []
    assert LINK.findall("[eq:attention] (text)") == []
