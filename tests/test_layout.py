"""The package reads as the pipeline: each stage imports only from the stages before it and
from the shared modules, and no module imports another module's `_private` names."""

from __future__ import annotations

import ast
from pathlib import Path

import featx

ROOT = Path(featx.__file__).parent
SHARED = {"errors", "runtime", "_lazy", "runlog", "__init__"}
STAGES = ["data", "backbones", "store", "inference", "extraction", "models", "classify"]
STAGES += ["finetuning", "report", "cli"]


def stage_of(module: str) -> str:
    """`featx.classify.fit` -> "classify"; `featx.runtime` -> "runtime"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `from featx... import ...` and `import featx...`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featx"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("featx")]
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append(("featx." + ".".join(parts), path))
    return out


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
