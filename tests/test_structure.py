"""The package's import graph: no cycle, and data flowing one way.

Every import statement of every module counts, at module level or inside a function (an import
inside a function still ties the two modules together for a reader). An edge goes from a module
to the module it names: ``from ..ops.attention import x`` to ``deformnp.ops.attention``, ``from
. import ops`` to ``deformnp.ops``. ``deformnp/__init__.py`` loads ``ops``, ``nn``, ``optim`` and
``cuda`` lazily by name and is imported by no module of the package.

Run it alone to see the layout: ``python -m pytest tests/test_structure.py -q``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "deformnp"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative import ``from <level dots><name>``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (every import statement)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                while t and t not in modules:  # `import a.b.c` of a non-module: its package
                    t = t.rpartition(".")[0]
                if t.startswith("deformnp") and t != module:
                    graph[module].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30  # the whole package was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    # the test above can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# Lower layers never import upper ones. Each entry: a group of modules (prefixes) and the
# prefixes none of them may import.
UPPER = ("deformnp.ops", "deformnp.nn", "deformnp.cases", "deformnp.__main__", "deformnp.optim")
RULES = [
    # the kernels are plain compute: no ops, layers, cases or command line
    ("deformnp.kernels", (*UPPER, "deformnp.functional", "deformnp.gradcheck")),
    # the engine's core knows nothing above it
    ("deformnp.tensor", (*UPPER, "deformnp.function", "deformnp.functional")),
    ("deformnp.function", (*UPPER, "deformnp.functional")),
    # argument checks are NumPy-only helpers
    (
        "deformnp.validation",
        (*UPPER, "deformnp.tensor", "deformnp.function", "deformnp.functional"),
    ),
    ("deformnp.cuda", (*UPPER, "deformnp.tensor", "deformnp.function", "deformnp.validation")),
    # the library never reaches for its own test and bench cases
    ("deformnp.ops", ("deformnp.nn", "deformnp.cases", "deformnp.__main__")),
    ("deformnp.nn", ("deformnp.cases", "deformnp.__main__")),
    ("deformnp.functional", (*UPPER,)),
]


@pytest.mark.parametrize("lower, forbidden", RULES, ids=[r[0] for r in RULES])
def test_lower_layers_never_import_upper_ones(lower, forbidden):
    graph = import_graph()
    bad = sorted(
        (m, t)
        for m, targets in graph.items()
        if m == lower or m.startswith(lower + ".")
        for t in targets
        if any(t == f or t.startswith(f + ".") for f in forbidden)
    )
    assert bad == []


def test_ops_import_their_kernels_explicitly():
    # no kernel module is looked up by name at run time (importlib)
    for path in (PACKAGE / "ops").glob("*.py"):
        text = path.read_text()
        assert "importlib" not in text and "__import__" not in text, path.name


def _kernel_signatures(path: pathlib.Path) -> dict[str, list[str]]:
    """The public ``<op>_forward`` / ``<op>_backward`` functions of a kernel module and their
    argument names."""
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name.endswith(("_forward", "_backward")):
            if not node.name.startswith("_"):
                a = node.args
                out[node.name] = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return out


# the op families: one file each in ops/, kernels/cpu/ and kernels/cuda/
# ops/mmcv.py is no family: it gives the families' ops mmcv's names and argument order
NAMESPACES = ("__init__", "mmcv")
FAMILIES = sorted(p.stem for p in (PACKAGE / "ops").glob("*.py") if p.stem not in NAMESPACES)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_kernel_contract_on_both_devices(family):
    # every kernels/{cpu,cuda}/<family>.py exports the same <op>_forward / <op>_backward with
    # the same arguments, so ops/<family>.py calls either device's module the same way
    cpu = _kernel_signatures(PACKAGE / "kernels" / "cpu" / f"{family}.py")
    cuda = _kernel_signatures(PACKAGE / "kernels" / "cuda" / f"{family}.py")
    assert cpu and cpu == cuda
    for name, args in cpu.items():
        if name.endswith("_backward"):
            assert args[0].startswith("grad") and "needs" in args, name


def test_every_op_family_has_kernels_on_both_devices():
    assert FAMILIES == [
        "attention", "bilinear", "dcnv3", "dcnv4", "deform_conv", "grid_sample", "roi"
    ]  # fmt: skip
    for family in FAMILIES:
        for device in ("cpu", "cuda"):
            assert (PACKAGE / "kernels" / device / f"{family}.py").exists(), (device, family)


def test_no_machine_paths_in_the_repository():
    root = PACKAGE.parent
    pattern = "/" + "|/".join(("work/", "root/", "home/", "tmp/"))
    files = [root / "README.md", root / "pyproject.toml"]
    for folder in ("deformnp", "tests", "benches", "examples", ".ci"):
        files += [p for p in (root / folder).rglob("*") if p.is_file() and p.suffix != ".png"]
    offenders = [
        str(p.relative_to(root))
        for p in files
        if "__pycache__" not in p.parts
        and any(s in p.read_text(errors="ignore") for s in pattern.split("|"))
    ]
    assert offenders == []
