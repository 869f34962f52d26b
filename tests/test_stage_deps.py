"""Every DVC stage's deps against the files its program imports (tests/import_graph.py), so that a code change reruns
what it touches: a file a stage's program reaches through its `erc` imports and its deps leave out would let
`dvc status` call a stale stage up to date. The model registry imports a model's module by name (erc.models.REGISTRY),
so a stage that builds a model by name reaches that model's file too."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from erc.models import REGISTRY
from tests.import_graph import ROOT, closure


def stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return [(stage.addressing, stage.cmd, Path(stage.wdir),
                 [Path(stage.wdir) / d.def_path for d in stage.deps if not hasattr(d, "params")])
                for stage in repo.index.stages if stage.cmd]


def models_built(argv: list[str], params: dict) -> set[str]:
    """The models a stage's program builds by name: `--model`, a distilled model's teacher, the report's all."""
    program = Path(argv[1]).name
    models = set()
    if "--model" in argv:
        models.add(argv[argv.index("--model") + 1])
    if "--teacher" in argv or program == "teacher.py":
        models.add((params.get("teacher") or {}).get("model", "baseline"))
    if program == "report.py":
        pipeline = params["pipeline"]
        models |= {*pipeline["models"], *pipeline.get("distilled", []), params["teacher"]["model"]}
    return models


def uncovered(needed: set[Path], deps: list[Path]) -> list[str]:
    deps = [d.resolve() for d in deps]
    return sorted(str(p.relative_to(ROOT)) for p in needed
                  if not any(p == d or (d.is_dir() and p.is_relative_to(d)) for d in deps))


def check_stage(name: str, cmd, wdir: Path, deps: list[Path], params: dict) -> list[str]:
    """What is wrong with one stage's code deps: an imported file left out, or a listed erc file not imported."""
    argv = shlex.split(cmd if isinstance(cmd, str) else " ".join(cmd))
    program = (wdir / argv[1]).resolve()
    modules = {REGISTRY[m] for m in models_built(argv, params)}
    needed = closure([program], extra_modules=modules) | {program}
    problems = [f"stage {name}: imports {f}, not in its deps" for f in uncovered(needed, deps)]
    for dep in (d.resolve() for d in deps):
        if dep.is_file() and dep.is_relative_to(ROOT / "erc") and dep not in needed:
            problems.append(f"stage {name}: lists {dep.relative_to(ROOT)}, which its program does not import")
        if dep.is_dir() and dep.is_relative_to(ROOT / "erc") and not any(p.is_relative_to(dep) for p in needed):
            problems.append(f"stage {name}: lists {dep.relative_to(ROOT)}/, none of which its program imports")
    return problems


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_stage_lists_the_files_its_program_imports(params):
    found = stages()
    assert {"prepare", "featurize", "train", "leaderboard", "report"} <= {n.split("@")[0] for n, *_ in found}
    problems = [p for stage in found for p in check_stage(*stage, params)]
    assert not problems, "\n".join(problems)


def test_the_check_names_a_stage_with_an_import_left_out(params):
    """The same check on train@mosi-sdt with erc/data/canonical.py's folder taken out of its deps (as before the
    check: the train stages listed erc/data/dialogues.py alone), and with a stray file added."""
    name, cmd, wdir, deps = next(s for s in stages() if s[0] == "train@mosi-sdt")
    left_out = [d for d in deps if d != wdir / "erc/data"] + [wdir / "erc/data/dialogues.py"]
    problems = check_stage(name, cmd, wdir, left_out, params)
    assert "stage train@mosi-sdt: imports erc/data/canonical.py, not in its deps" in problems
    assert "stage train@mosi-sdt: imports erc/data/dialogues.py, not in its deps" not in problems
    stray = deps + [ROOT / "erc/evaluation/report.py", ROOT / "erc/serving"]
    assert check_stage(name, cmd, wdir, stray, params) == [
        "stage train@mosi-sdt: lists erc/evaluation/report.py, which its program does not import",
        "stage train@mosi-sdt: lists erc/serving/, none of which its program imports"]
