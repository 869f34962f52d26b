"""erc's imports read from the source (no code runs): which erc modules a file imports, at module level or inside a
function, and the files a program reaches through them. The structure tests and the stage-deps test use it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module `name` (erc.x.y -> erc/x/y.py or erc/x/y/__init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(Path(path).resolve().relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def with_packages(name: str) -> set[str]:
    """`name` and the packages Python runs first to import it (erc.a.b -> erc, erc.a, erc.a.b)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def erc_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The erc modules that the file at `path` imports anywhere in it, with the packages they run."""
    tree = ast.parse(Path(path).read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from erc.a import b`: erc.a's module, and erc.a.b where b is a module of its own
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if module_file(f"{node.module}.{a.name}", root)]
        else:
            continue
        for name in names:
            if name == "erc" or name.startswith("erc."):
                found |= {n for n in with_packages(name) if module_file(n, root)}
    return found


def closure(paths, root: Path = ROOT, extra_modules=()) -> set[Path]:
    """Every erc file that the files `paths` (and the modules `extra_modules`) reach through their imports."""
    todo = [Path(p).resolve() for p in paths]
    todo += [module_file(m, root) for n in extra_modules for m in with_packages(n) if module_file(m, root)]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [module_file(m, root) for m in erc_imports(path, root)]
    return {p for p in seen if p.is_relative_to(root / "erc")}
