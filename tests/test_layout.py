"""The layout tells the truth: MLflow is reached through echo/tracking/ alone."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS_MLFLOW = re.compile(r"^\s*(import mlflow|from mlflow[\s.])", re.MULTILINE)


def test_only_the_tracking_package_imports_mlflow():
    code = [
        ROOT / "run.py",
        *ROOT.glob("echo/**/*.py"),
        *ROOT.glob("experiments/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]
    importers = {str(p.relative_to(ROOT)) for p in code if IMPORTS_MLFLOW.search(p.read_text())}
    assert importers and all(name.startswith("echo/tracking/") for name in importers), sorted(importers)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of echo/ and hydra_plugins/ -> the modules of this project it imports, anywhere in
    its file (function-level imports too): `from echo.x import y` is echo.x.y if that is a module, else echo.x."""
    files = {_module_name(p): p for top in ("echo", "hydra_plugins") for p in (ROOT / top).glob("**/*.py")}
    packages = {name for name, p in files.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if name in packages else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level` dots up
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        for target in found:  # `import echo.a.b` imports echo.a.b (and its packages, which do not matter here)
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph.setdefault(name, set()).add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """Layers import downwards only: no module reaches itself through its imports, lazy ones included."""
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


LIBRARIES = {"torch", "pytorch_lightning", "lightning_fabric", "lightning", "hydra", "omegaconf", "mlflow", "joblib",
             "loky", "torchmetrics", "atexit", "sys", "matplotlib", "submitit", "optuna", "ray", "ctypes"}  # fmt: skip
LIGHTNING_OBJECTS = {"trainer", "fit_loop", "strategy", "precision_plugin", "epoch_loop"}


def private_names(source: str) -> list[str]:
    """Another library's private names that `source` reaches: `from lib._x import ...`, `from lib import _x`,
    `lib._x`, `lib.sub._x`, `trainer._x`, `getattr(x, "_y")`, and `sys.modules` or `sys.meta_path` (a stand-in or an
    import hook)."""
    tree = ast.parse(source)
    bound = {}  # local name -> the library it comes from
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound[alias.asname or alias.name.split(".")[0]] = alias.name.split(".")[0]
                library = alias.name.split(".")[0] in LIBRARIES
                if library and any(part.startswith("_") for part in alias.name.split(".")):
                    found.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                bound[alias.asname or alias.name] = node.module.split(".")[0]
                library = node.module.split(".")[0] in LIBRARIES
                if library and any(part.startswith("_") for part in [*node.module.split("."), alias.name]):
                    found.append(f"from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "setattr", "hasattr", "delattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and str(name.value).startswith("_") and not name.value.startswith("__"):
                found.append(ast.unparse(node))
        if not isinstance(node, ast.Attribute):
            continue
        chain, root = [node.attr], node.value
        while isinstance(root, ast.Attribute):
            chain.insert(0, root.attr)
            root = root.value
        name = getattr(root, "id", "")
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        if bound.get(name) in LIBRARIES and (private or (name == "sys" and node.attr in ("modules", "meta_path"))):
            found.append(ast.unparse(node))
        elif private and LIGHTNING_OBJECTS & set(chain[:-1]):
            found.append(ast.unparse(node))
    return found


def test_no_private_name_of_another_library_outside_compat():
    """Other libraries' internals are fenced in echo/compat.py, each with its measured reason and test."""
    code = [ROOT / "run.py", *ROOT.glob("echo/**/*.py"), *ROOT.glob("hydra_plugins/**/*.py")]
    found = {
        str(p.relative_to(ROOT)): names
        for p in code
        if p.name != "compat.py" and (names := private_names(p.read_text()))
    }
    assert not found, found
    planted = "import sys\nimport torch\nfrom hydra._internal.core_plugins import x\ntorch._C._foo()\n"
    planted += "sys.modules['scipy'] = None\nself.trainer.fit_loop._restarting = True\ngetattr(loky, '_executor')\n"
    seen = {
        "from hydra._internal.core_plugins import x",
        "torch._C",
        "sys.modules",
        "self.trainer.fit_loop._restarting",
        "getattr(loky, '_executor')",
    }
    assert seen <= set(private_names(planted)), private_names(planted)
    assert private_names((ROOT / "echo/compat.py").read_text())  # what compat fences is seen
