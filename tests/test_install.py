"""The install is locked and CI installs as the README says: .ci/run runs the README's test command verbatim, both
README commands install from requirements.lock, and the lock pins every dependency exactly (torch at the README's pin)."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv .venv")]


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"requirements.lock: not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_ci_runs_the_readmes_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands  # the pipeline and the tests
    test_command = next(c for c in commands if c.endswith("python -m pytest"))
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command


def test_readme_commands_install_from_the_lock():
    for command in readme_commands():
        installs = [part.strip() for part in command.split("&&") if part.strip().startswith("pip install")]
        assert len(installs) == 2 and "torch==" in installs[0], command
        assert all("-c requirements.lock" in part for part in installs), command


def test_lock_pins_every_dependency_and_not_erc():
    pins = lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()
        assert name in pins, f"{name} is not in requirements.lock: run tools/refresh-lock"
    assert "erc" not in pins
    torch_pin = re.search(r"torch==([^ ]+)", readme_commands()[0]).group(1)
    assert pins["torch"] == torch_pin, "requirements.lock and the README pin different torch versions"
