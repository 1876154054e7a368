"""fxtp's stages import one way only (docs/architecture.md): a module imports from its own
stage or from stages below it, the module-level imports form no cycle, and a function-level
import of fxtp's own code is rare and says why beside it. Read from the source with `ast`, so
a new module is checked without being listed here."""
from __future__ import annotations

import ast
import pathlib

import fxtp

ROOT = pathlib.Path(fxtp.__file__).parent
# lowest first: a module may import from its own stage and the ones before it
STAGES = [
    ("errors",),
    ("graph",),
    ("runtime",),
    ("capture",),
    ("solve",),
    ("planning",),
    ("rewrite",),
    ("guards", "modes", "_transform", "_load", "generation", "inspection", "saving",
     "shared_tensors", "size_graphs"),    # the API
    ("testing", "cli"),
    ("__init__", "__main__"),
]
MAX_LATE_IMPORTS = 5


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(("fxtp",) + rel.parts)
        out[name.removesuffix(".__init__") if rel.name == "__init__" else name] = (
            ast.parse(path.read_text()), rel.name == "__init__")
    return out


def _stage(module: str) -> int:
    head = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(STAGES):
        if head in names:
            return rank
    raise AssertionError(f"{module} is in no stage of tests/test_layers.py: add its folder")


def _target(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """The fxtp modules an import statement reads (a package's submodule when it names one)."""
    if node.level:
        base = module.split(".")
        base = base if is_pkg else base[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != "fxtp" and not target.startswith("fxtp."):
        return []
    return [target]


def _imports(modules):
    """(importer, imported, line, at module level) for every import of fxtp's own code."""
    found = []
    for name, (tree, is_pkg) in modules.items():
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for target in _target(name, is_pkg, node):
                    subs = [f"{target}.{a.name}" for a in node.names
                            if f"{target}.{a.name}" in modules]
                    for t in subs or [target]:
                        found.append((name, t, node.lineno, id(node) in top))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("fxtp"):
                        found.append((name, a.name, node.lineno, id(node) in top))
    return found


def test_every_import_points_to_the_same_stage_or_below():
    modules = _modules()
    upward = [f"{a}:{line} imports {b}" for a, b, line, _ in _imports(modules)
              if _stage(b) > _stage(a)]
    assert not upward, "imports that point up the stages:\n" + "\n".join(upward)


def test_module_level_imports_form_no_cycle():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for a, b, _, top in _imports(modules):
        if top and b in edges and a != b and not a.startswith(b + "."):
            edges[a].add(b)      # a package's __init__ imported by its own modules is not a cycle
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_function_level_imports_are_few_and_say_why():
    modules = _modules()
    late = [(a, line) for a, _, line, top in _imports(modules) if not top]
    assert len(late) <= MAX_LATE_IMPORTS, late
    for module, line in late:
        rel = module.removeprefix("fxtp.").replace(".", "/")
        path = ROOT / (rel + ".py") if (ROOT / (rel + ".py")).exists() else ROOT / rel / "__init__.py"
        lines = path.read_text().splitlines()
        near = " ".join(lines[max(0, line - 3):line])
        assert "function-level import" in near, (
            f"{module}:{line}: a function-level import of fxtp's own code needs its reason in a "
            "'# function-level import: ...' comment just above it")


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_no_public_function_shadows_a_module():
    """`fxtp.load(...)` and `import fxtp.load` must not be confused: no public name of fxtp
    is also a submodule."""
    submodules = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    assert not set(fxtp.__all__) & submodules
