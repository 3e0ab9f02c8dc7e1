"""Data flows one way: lower layers never import higher ones, and no modules import each other in a circle.
Read from the source (every import statement, also the ones inside functions), not from what happens to be
imported at run time."""

import ast
from pathlib import Path

import mea

ROOT = Path(mea.__file__).parent

# rank of each part of the package: a module may import its own part and parts of a lower rank only.
# A module not listed here is a low-level utility (rank 0: it imports nothing of mea); list it to go higher.
RANKS = {
    "atomic": 0, "console": 0, "markdown": 0, "plotting": 0, "precision": 0,
    "ops": 0.5,  # tensor ops: may ask `precision` what this hardware computes natively (which kernel to use)
    "cache": 1, "machine": 1,  # machine: the description of the hardware, may use low-level helpers
    "layers": 2,
    "models": 3,
    "": 3.5,  # the package itself: `import mea` registers the model
    "checkpoint": 4, "data": 4, "info": 4, "kv_setting": 4,
    "convert": 5,
    "serving": 5,  # runs in the serving environment: imported by nothing else (checked below)
    "eval": 6, "train": 6, "demo": 6,
    "compress": 7,
    "bench": 8, "experiments": 8,
    "commands": 9,
    "cli": 10,
    "__main__": 11,
}
# the model configuration is the start of the flow (config -> model): it may use tensor ops and the cache layout
# rule (which the layers read too), nothing else
ONLY = {"mea.models.configuration_mea": ("ops", "cache")}


def module_name(path: Path) -> str:
    parts = ["mea", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def part(name: str) -> str:
    return name.split(".")[1] if "." in name else ""


def test_import_graph_is_read():
    assert "mea.ops.rope" in GRAPH["mea.models.configuration_mea"]  # the parser resolves relative imports
    assert "mea.commands" in GRAPH["mea.cli"] and "mea.machine" in GRAPH["mea.train.loop"]


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for name, targets in GRAPH.items():
        rank = RANKS.get(part(name), 0)
        for t in targets:
            if part(t) != part(name) and RANKS.get(part(t), 0) >= rank:
                wrong.append(f"{name} ({part(name) or 'mea'}: {rank}) imports {t} ({part(t) or 'mea'}: "
                             f"{RANKS.get(part(t), 0)})")
        if name in ONLY:
            wrong += [f"{name} may import only {ONLY[name]}, imports {t}" for t in targets if part(t) not in ONLY[name]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name, path):
        state[name] = 1
        for t in sorted(GRAPH[name]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_nothing_imports_the_serving_integrations():
    """mea.serving runs in vLLM's environment (an older transformers): the package must work without it."""
    wrong = [f"{name} imports {t}" for name, targets in GRAPH.items() if part(name) != "serving"
             for t in targets if part(t) == "serving"]
    assert not wrong, "\n".join(wrong)
