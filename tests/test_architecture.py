"""The house plan, checked on every run: families on floors over a ground floor, no stage importing another, no private imports, no cycles, no 450-line rooms, no 2,000-line folders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.cli import COMMANDS

PACKAGE = ROOT / "pipeline"
MAX_LINES = 450
MAX_FOLDER_LINES = 2000
#: The floors, lowest first (core, then report, on the ground): images < backbones < featurefile < extract / rows < classical < nets < inference / compare / bench.
#: A module of each folder may import its own folder and the folders listed for it.
ALLOWED = {"core": {"core"}}
ALLOWED["report"] = {"core", "report"}  # the ground floor's second room: scores, statistics, charts
ALLOWED["images"] = ALLOWED["report"] | {"images"}
ALLOWED["backbones"] = ALLOWED["images"] | {"backbones"}
ALLOWED["featurefile"] = ALLOWED["backbones"] | {"featurefile"}
ALLOWED["extract"] = ALLOWED["featurefile"] | {"extract"}
ALLOWED["rows"] = ALLOWED["featurefile"] | {"rows"}
ALLOWED["classical"] = ALLOWED["rows"] | {"classical"}
# LP-FT starts fine-tuning from a classical model bundle: nets may use classical's parts (not its stages).
ALLOWED["nets"] = ALLOWED["classical"] | {"nets"}
ALLOWED["inference"] = ALLOWED["nets"] | {"inference"}
ALLOWED["compare"] = ALLOWED["extract"] | ALLOWED["nets"] | {"compare"}
ALLOWED["bench"] = ALLOWED["extract"] | ALLOWED["classical"] | {"bench"}
#: The top floor runs stages: the command line, and the compare and bench families (they call stages).
TOP = {"pipeline.cli", "pipeline.__main__", "pipeline", "pipeline.api"} | {
    ".".join(p.relative_to(ROOT).with_suffix("").parts) for fam in ("compare", "bench") for p in (PACKAGE / fam).glob("*.py") if p.name != "__init__.py"
}
STAGES = set(COMMANDS.values()) - TOP


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the module, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("pipeline")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline") and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                # `from pipeline.report import plots` imports a module, not a name
                out.append((sub, None, node.lineno) if sub in MODULES else (node.module, a.name, node.lineno))
    return out


def family(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def test_the_walker_sees_the_package():
    assert {"pipeline.cli", "pipeline.core.config", "pipeline.extract.stage", "pipeline.classical.train", "pipeline.nets.finetune"} <= set(MODULES)
    assert any(target == "pipeline.core.errors" for target, _, _ in imports_of("pipeline.extract.stage"))
    assert STAGES and all(stage in MODULES for stage in STAGES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small_and_says_what_it_owns(name):
    text = MODULES[name].read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{name}: {len(text.splitlines())} lines"
    doc = ast.get_docstring(ast.parse(text))
    assert doc and doc.strip(), f"{name}: no module docstring"


def test_folder_is_small():
    sizes: dict[str, int] = {}
    for name, path in MODULES.items():
        fam = family(name) or "top"
        sizes[fam] = sizes.get(fam, 0) + len(path.read_text().splitlines())
    big = {fam: n for fam, n in sizes.items() if n > MAX_FOLDER_LINES}
    assert not big, f"folders over {MAX_FOLDER_LINES} lines: {big}"


def test_every_folder_has_a_floor():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ALLOWED), folders ^ set(ALLOWED)


def test_families_import_only_their_own_and_the_floors_below():
    wrong = []
    for name in MODULES:
        fam = family(name)
        if fam not in ALLOWED:
            continue
        for target, _, line in imports_of(name):
            tf = family(target)
            if tf is not None and tf not in ALLOWED[fam]:
                wrong.append(f"{name}:{line} imports {target}")
            if tf is None and target != "pipeline":
                wrong.append(f"{name}:{line} imports the top floor's {target}")
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage():
    wrong = [f"{name}:{line} imports {target}" for name in STAGES for target, _, line in imports_of(name) if target in STAGES and target != name]
    wrong += [
        f"{name}:{line} imports {target}"
        for name in MODULES
        if name not in STAGES and name not in TOP
        for target, _, line in imports_of(name)
        if target in STAGES
    ]
    assert not wrong, "a part or a stage imports a stage:\n" + "\n".join(wrong)


def test_no_module_imports_a_private_name():
    wrong = [
        f"{name}:{line} imports {target}.{imported}"
        for name in MODULES
        for target, imported, line in imports_of(name)
        if imported and imported.startswith("_") and not imported.startswith("__")
    ]
    # module._private attribute access through an imported pipeline module
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                if node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name:
                    wrong.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {name: {t if t in MODULES else t.rsplit(".", 1)[0] for t, _, _ in imports_of(name)} & set(MODULES) - {name} for name in MODULES}
    # a package's __init__ is not a dependency of interest
    graph = {n: {t for t in ts if not MODULES[t].name == "__init__.py"} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif state.get(nxt) is None:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "\n".join(cycles)
