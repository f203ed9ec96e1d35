"""The shape of the code base as a specification: which module may import which.

Read with ast (nothing is imported or run), over every .py file in the repository root and in data/, with
every import counted, also those inside a function: a late import hides a cycle from Python, not from a reader.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def root_modules() -> dict[str, pathlib.Path]:
    """module name as imported ("model", "data.tasks") -> its file."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"data.{p.stem}": p for p in (ROOT / "data").glob("*.py") if p.stem != "__init__"})
    return found


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules that a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]   # `from data import tasks`
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def import_graph() -> dict[str, set[str]]:
    modules = root_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_root_modules_import_each_other_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None      # a diamond is no cycle


def test_the_graph_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\ndef g():\n    from model import Encoder\n    import trainer\n")
    assert imports_of(f, {"model", "trainer", "losses"}) == {"model", "trainer"}


def test_every_atomic_write_goes_through_the_one_helper():
    """os.replace (the rename that makes a write atomic) stands in atomic.py alone among the root modules."""
    callers = sorted(name for name, path in root_modules().items() if not name.startswith("data.")
                     and "os.replace(" in path.read_text(encoding="utf-8"))
    assert callers == ["atomic"]


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    from atomic import atomic_write, write_text
    target = tmp_path / "x.json"
    target.write_text("old")
    try:
        with atomic_write(str(target)) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    except RuntimeError:
        pass
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with atomic_write(str(target)) as tmp, open(tmp, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    write_text(target, "naïve\n")  # the text helper: UTF-8 whatever the locale, and no temporary file left
    assert target.read_bytes() == "naïve\n".encode() and [p.name for p in tmp_path.iterdir()] == ["x.json"]
