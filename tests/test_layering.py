"""The layers of the tree: `models/` (plain PyTorch) and `data/` sit underneath `orchestrator/`
and never import it, not even lazily inside a function."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

LOWER_LAYERS = ("models", "data")


def modules_of(package: str) -> list[str]:
    return sorted(
        f"{package}.{p.stem}" if p.stem != "__init__" else package
        for p in (REPO_ROOT / package).glob("*.py")
    )


@pytest.mark.parametrize("package", LOWER_LAYERS)
def test_importing_a_lower_layer_loads_no_orchestrator_module(package):
    names = modules_of(package)
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'orchestrator' or m.startswith('orchestrator.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", f"importing {package}/ loaded {out.stdout.strip()}"


@pytest.mark.parametrize("package", LOWER_LAYERS)
def test_no_lower_layer_source_imports_orchestrator(package):
    offenders = []
    for path in sorted((REPO_ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            else:
                continue
            if any(t == "orchestrator" or t.startswith("orchestrator.") for t in targets):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not offenders, f"{package}/ must not import orchestrator/: {offenders}"


# -- orchestrator/: no import cycles; training never runs tools -------------------------------

PACKAGES = ("orchestrator", "models", "data")
NEVER_IMPORT_TOOLS = ("orchestrator.training", "orchestrator.parallel", "orchestrator.checkpoint")


def module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in a file, lazy ones inside functions too;
    relative imports resolved against the file's package."""
    package = module_name(path).rsplit(".", 1)[0] if path.stem != "__init__" else module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def module_graph() -> dict[str, set[str]]:
    """orchestrator module -> the orchestrator modules it imports (a name that is a submodule, as
    in `from orchestrator.tools import evaluate`, counts as that module)."""
    files = {module_name(p): p for p in (REPO_ROOT / "orchestrator").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for module, names, _ in imports_of(path):
            if module in files:
                subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in files]
                targets.update(subs or [module])
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def test_orchestrator_modules_import_no_cycle():
    graph = module_graph()
    assert len(graph) > 40 and "orchestrator.evaluation.scoring" in graph
    assert cycles(graph) == []
    # (the check sees one: a module importing its importer)
    assert cycles(
        {**graph, "orchestrator.config": graph["orchestrator.config"] | {"orchestrator.train"}}
    )


def test_training_parallel_and_checkpoint_never_import_tools():
    offenders = [
        f"{name} -> {target}"
        for name, targets in module_graph().items()
        if name.startswith(NEVER_IMPORT_TOOLS)
        for target in targets
        if target.startswith("orchestrator.tools")
    ]
    assert not offenders, (
        "tools/ are commands; what training needs of them lives elsewhere: " + str(offenders)
    )


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for module, names, line in imports_of(path):
                if module.split(".")[0] in PACKAGES and module != module_name(path):
                    private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                    if private:
                        offenders.append(f"{path.relative_to(REPO_ROOT)}:{line} {module} {private}")
    assert not offenders, offenders
