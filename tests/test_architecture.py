"""The package's shape, checked from its source: imports flow one way (no cycle, function-local imports included),
the library never reaches the trainer, functions stay short, and the command line parses without torch."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "liteclip"
MAX_FUNCTION_LINES = 60


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source: top level, in functions, in methods.

    `from pkg.sub import name` is an edge to pkg.sub.name when that is a module, else to pkg.sub (its __init__).
    Parent packages that Python runs on the way are not edges of their own: a package's __init__ importing its
    submodules lazily is not a cycle with them.
    """
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {edge for edge in edges if edge in modules and edge != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_local_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def load():\n    from ..a import thing\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "sub" / "helper.py").write_text("")
    (package / "sub" / "b.py").write_text("def load():\n    from . import helper\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.sub.helper"} and find_cycle(graph) is None


BASE = {"liteclip.config", "liteclip.errors", "liteclip.files"}
CORE = {"liteclip.model", "liteclip.loss", "liteclip.metrics", "liteclip.pretrained"}
SHARED = {"liteclip.embedding", "liteclip.evaluation", "liteclip.pipeline", "liteclip.export", "liteclip.precision",
          "liteclip.runtime", "liteclip.distributed"}
WINGS = ("liteclip.train", "liteclip.search", "liteclip.integrations")


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def imports_of(graph: dict[str, set[str]], modules) -> dict[str, set[str]]:
    return {module: graph[module] for module in graph if any(in_package(module, m) for m in modules)}


def test_the_layers_import_downwards_only():
    """The picture in docs/architecture.md, as rules: base <- weights <- core; data on the base; the shared rooms
    import no wing; only the command line imports the training wing."""
    graph = import_graph(PACKAGE)
    doors = {m for m in graph if m.endswith("__main__")} | {"liteclip.cli"}  # command lines may import anything
    modules = set(graph) - doors
    weights = {m for m in modules if in_package(m, "liteclip.weights")}
    data = {m for m in modules if in_package(m, "liteclip.data")}
    broken = []
    for layer, allowed in ((BASE, BASE), (weights, BASE | weights), (CORE, BASE | weights | CORE),
                           (data, BASE | data)):
        for module in layer:
            broken += [f"{module} -> {target}" for target in graph[module] - allowed]
    for module in SHARED | CORE | weights | data:
        broken += [f"{module} -> {target}" for target in graph[module] if any(in_package(target, w) for w in WINGS)]
    for module in modules:  # the public API (liteclip/__init__.py) included
        if not in_package(module, "liteclip.train"):
            broken += [f"{module} -> {target}" for target in graph[module] if in_package(target, "liteclip.train")]
    assert not broken, "imports against the layering: " + "; ".join(sorted(broken))
    assert SHARED | CORE | BASE <= modules and "liteclip" in modules  # the rules name modules that exist


@pytest.mark.parametrize("library", ["liteclip.model", "liteclip.pipeline", "liteclip.evaluation",
                                     "liteclip.embedding", "liteclip.loss", "liteclip.data", "liteclip.export",
                                     "liteclip.search.serve", "liteclip.integrations.clip_benchmark"])
def test_the_library_never_reaches_the_trainer(library):
    graph = import_graph(PACKAGE)
    assert not {module for module in reachable(graph, library) if in_package(module, "liteclip.train")}


def test_config_and_errors_import_nothing_heavier_than_each_other():
    graph = import_graph(PACKAGE)
    assert graph["liteclip.errors"] == set()
    assert graph["liteclip.config"] == {"liteclip.errors"}


def test_the_layout_page_names_every_module_and_the_command_line_every_command():
    """docs/architecture.md lists every module (a new one must be placed on the page), and cli.py's docstring, like
    the help test, names every command build_parser() has."""
    from liteclip.cli import build_parser

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    modules = sorted(str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py"))
    missing = [module for module in modules if f"`{module}`" not in page]
    assert not missing, f"docs/architecture.md does not name {missing}"
    commands = next(action for action in build_parser()._actions if action.dest == "command").choices
    docstring = (PACKAGE / "cli.py").read_text().split('"""')[1]
    assert not [command for command in commands if command not in docstring], docstring


def test_no_function_in_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these up: " + "; ".join(long)


@pytest.mark.parametrize("argv", [["--help"], ["data", "check", "--help"], ["train", "--help"],
                                  ["wise-ft", "--help"], ["average", "--help"]])
def test_command_line_help_does_not_import_torch(argv):
    probe = ("import sys\nfrom liteclip.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'timm', 'transformers', 'albumentations') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n" % argv)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stderr
    assert "usage: liteclip" in result.stdout
    assert "HEAVY []" in result.stdout


# a measured figure: a number with a unit of time or throughput, or a speed-up ratio ("6.6x")
MEASURED_FIGURE = re.compile(r"\b\d+(\.\d+)?\s?(ms|s|seconds?|min|minutes?|GFLOP/s|samples/s|steps/s)(?![\w/])"
                             r"|\b\d+(\.\d+)?x(?!\w)")


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    found = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                found.append((node.body[0].lineno, docstring))
    return found


def yaml_comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment of a YAML file (a # that starts a line or follows a space)."""
    return [(number, line.split("#", 1)[1] if line.lstrip().startswith("#") else line.split(" #", 1)[1])
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if line.lstrip().startswith("#") or " #" in line]


# in a config's comments, a recall figure ages as surely as a timing: "gained 1.7 points", "R@10 69.1"
MEASURED_SCORE = re.compile(r"\b\d+(\.\d+)?\s?(points?|%)(?!\w)|R@\d+(/\d+)*\s+\d+\.\d")


def test_code_comments_say_why_and_leave_measured_figures_to_the_benchmarks():
    """Timings from one machine age, and scores move with the code; they belong in benchmarks/README.md, where the
    machine, the date and the command are named. Code and configs alike."""
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}: {match.group(0)!r}"
                 for path in [*sorted(PACKAGE.rglob("*.py")), PACKAGE.parent / "train.py"]
                 for line, text in comments_and_docstrings(path) for match in MEASURED_FIGURE.finditer(text)]
    offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}: {match.group(0)!r}"
                  for path in sorted((PACKAGE.parent / "configs").glob("*.yaml"))
                  for line, text in yaml_comments(path)
                  for pattern in (MEASURED_FIGURE, MEASURED_SCORE) for match in pattern.finditer(text)]
    assert not offenders, "\n".join(offenders)
