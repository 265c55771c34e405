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
