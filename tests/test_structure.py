"""The package's structure, read from the imports (tests/import_graph.py): packages in the order data flows, each
importing only those before it, and no two modules importing each other, however indirectly."""

from __future__ import annotations

import pytest

from tests.import_graph import ROOT, closure, erc_imports, module_name, with_packages

# The order data flows; a module may import its own layer and those before it. `base` is the small shared modules
# at the top of erc/ (params, schema, errors, io, sources, safe pickle loading, tracking, metrics); `entry` is the
# `erc` command, which dispatches to every layer.
LAYERS = ["base", "data", "features", "models", "training", "evaluation", "serving", "entry"]
ENTRY = {"erc.cli", "erc.__main__"}


def layer(module: str) -> str:
    if module in ENTRY:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "base"


def modules() -> dict[str, set[str]]:
    """Module -> the erc modules it imports, less its own packages (which Python runs before it, not because of it)."""
    graph = {}
    for path in sorted((ROOT / "erc").rglob("*.py")):
        name = module_name(path)
        graph[name] = erc_imports(path) - with_packages(name)
    return graph


def test_every_module_belongs_to_a_layer():
    packages = {p.name for p in (ROOT / "erc").iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYERS), f"erc/ packages outside the layers {LAYERS}: {sorted(packages - set(LAYERS))}"


def import_direction_problems(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} ({layer(module)}) imports {target} ({layer(target)}), which comes later in {LAYERS}"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module))]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_run_down_the_flow():
    problems = import_direction_problems(modules())
    assert not problems, "\n".join(problems)


def test_no_two_modules_import_each_other():
    found = cycles(modules())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("program,forbidden", [
    ("pipelines/prepare.py", ("erc/training", "erc/models", "erc/features")),  # preparing data trains nothing
    ("pipelines/probe.py", ("erc/training", "erc/models")),
    ("pipelines/leaderboard.py", ("erc/training", "erc/models", "erc/features")),
])
def test_a_stage_program_reaches_only_what_it_needs(program, forbidden):
    reached = sorted(str(p.relative_to(ROOT)) for p in closure([ROOT / program]))
    wrong = [p for p in reached if p.startswith(forbidden)]
    assert not wrong, f"{program} imports {wrong}"


def test_the_checks_see_a_violation():
    """The two checks above on a graph with a model importing the trainer, and a circle."""
    graph = {"erc.models.toy": {"erc.training.loop"}, "erc.training.loop": {"erc.models.toy"}}
    assert import_direction_problems(graph) == [
        "erc.models.toy (models) imports erc.training.loop (training), which comes later in " + str(LAYERS)]
    assert cycles(graph) == [["erc.models.toy", "erc.training.loop"]]
