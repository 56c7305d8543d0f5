"""The package reads as the pipeline: each stage imports only from the stages before it and
from the shared modules, and no module imports another module's `_private` names."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import featx

ROOT = Path(featx.__file__).parent
SHARED = {"errors", "runtime", "settings", "_lazy", "runlog", "__init__"}
STAGES = ["data", "backbones", "store", "inference", "extraction", "models", "classify"]
STAGES += ["finetuning", "report", "cli"]


def stage_of(module: str) -> str:
    """`featx.classify.fitting` -> "classify"; `featx.runtime` -> "runtime"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `from featx... import ...` and `import featx...`."""
    found = []
    for node in nodes(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featx"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("featx")]
    return found


@functools.cache
def nodes(path: Path) -> tuple[ast.AST, ...]:
    """Every node of a module's syntax tree (parsed once for all the checks here)."""
    return tuple(ast.walk(ast.parse(path.read_text())))


@functools.cache
def modules() -> tuple[tuple[str, Path], ...]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(("featx." + ".".join(parts), path))
    return tuple(out)


def test_no_stage_imports_a_later_stage():
    wrong = []
    for name, path in modules():
        mine = stage_of(name)
        if mine in SHARED:
            continue
        for target, _ in imports(path):
            theirs = stage_of(target)
            if theirs in SHARED or theirs == mine:
                continue
            if theirs not in STAGES or STAGES.index(theirs) > STAGES.index(mine):
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_module_imports_private_names_of_another():
    wrong = [
        f"{name} imports {target}.{imported}"
        for name, path in modules()
        for target, names in imports(path)
        for imported in names
        if imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert not wrong, wrong


def test_shared_modules_import_no_stage():
    wrong = [
        f"{name} imports {target}"
        for name, path in modules()
        if stage_of(name) in SHARED - {"__init__"}
        for target, _ in imports(path)
        if stage_of(target) not in SHARED
    ]
    assert not wrong, wrong


def test_every_public_module_declares_all():
    missing = [
        name
        for name, path in modules()
        if not path.name.startswith("_")
        and path.name not in ("__main__.py",)
        and "__all__" not in path.read_text()
    ]
    assert not missing, missing


# ---- every public name resolves; no circles; sizes --------------------------------------
RESOLVE = r"""
import importlib, pkgutil, sys
import featx

problems = []
packages = ["featx"] + [
    f"featx.{m.name}" for m in pkgutil.iter_modules(featx.__path__) if m.ispkg
]
# First the lazy tables, before anything else is imported: a name must not resolve only
# because another module happened to load first.
for name in packages:
    try:
        package = getattr(featx, name.split(".")[1]) if "." in name else featx
    except Exception as error:
        problems.append(f"featx.{name}: {type(error).__name__}: {error}")
        continue
    table = getattr(package, "_EXPORTS", {})
    for attr in dict.fromkeys([*table, *getattr(package, "__all__", [])]):
        try:
            getattr(package, attr)
        except Exception as error:
            problems.append(f"{name}.{attr}: {type(error).__name__}: {error}")
# Then every module, and every name in its __all__.
for info in pkgutil.walk_packages(featx.__path__, "featx."):
    if info.name.endswith("__main__"):
        continue
    try:
        module = importlib.import_module(info.name)
    except Exception as error:
        problems.append(f"import {info.name}: {type(error).__name__}: {error}")
        continue
    for attr in getattr(module, "__all__", []):
        if not hasattr(module, attr):
            problems.append(f"{info.name}.{attr} is in __all__ but does not exist")
print("\n".join(problems))
"""


@pytest.fixture(scope="module")
def every_module_imported() -> dict[str, list[str]]:
    """One fresh interpreter resolves every lazy export first, then imports every module and
    looks for shadowed exports; each check's findings, by name (importing every module once
    costs seconds, so both checks share it)."""
    import subprocess
    import sys

    script = RESOLVE + 'print("\\n--- shadowed ---")\n' + SHADOWED
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    resolve, _, shadowed = done.stdout.partition("--- shadowed ---")
    return {
        "resolve": [line for line in resolve.splitlines() if line.strip()],
        "shadowed": [line for line in shadowed.splitlines() if line.strip()],
    }


@pytest.mark.slow
def test_every_exported_name_resolves_in_a_fresh_interpreter(every_module_imported):
    assert every_module_imported["resolve"] == []


def test_subpackages_are_attributes_of_featx_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = (
        "import featx, sys; "
        "print(featx.classify.__name__, featx.runlog.__name__, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["featx.classify", "featx.runlog", "False"], done.stderr


SHADOWED = """
import importlib, pkgutil, types
import featx
names = [m.name for m in pkgutil.iter_modules(featx.__path__) if m.ispkg]
packages = [featx] + [importlib.import_module(f"featx.{name}") for name in names]
for package in packages:
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
for package in packages:
    for name in getattr(package, "_EXPORTS", {}):
        if isinstance(getattr(package, name), types.ModuleType):
            print(f"{package.__name__}.{name}")
"""


@pytest.mark.slow
def test_no_exported_name_is_shadowed_by_a_module_of_the_same_name(every_module_imported):
    """A lazily exported function must stay itself once every module is imported: a module
    named like the export would be bound over it by the import system."""
    assert every_module_imported["shadowed"] == []


def module_imports(name: str, path: Path) -> set[str]:
    """Every featx module that `name` imports, at the top, in functions or for type checking:
    `from featx.a import b` names the module featx.a.b when b is a module, else featx.a."""
    known = {module for module, _ in modules()}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in nodes(path):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if not base.startswith("featx"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("featx")}
    found = {m if m in known else f"{m}.__init__" for m in found}
    return {m.removesuffix(".__init__") for m in found if m.removesuffix(".__init__") != name}


def test_no_import_circles():
    graph = {
        name.removesuffix(".__init__"): module_imports(name.removesuffix(".__init__"), path)
        for name, path in modules()
    }
    circles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def test_no_module_over_600_lines():
    long = {
        name: n
        for name, path in modules()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_body_over_80_lines():
    long = {}
    for name, path in modules():
        for node in nodes(path):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = lines
    assert not long, long
