"""README.md: every command in its code blocks parses with the current flags (freeflow.py's, fid.py's and the
toy modules'), so a user who copies one gets a run, not a usage error."""

import os
import re
import shlex

import pytest

import fid
import freeflow as ff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """Every shell command in the README's ```bash blocks, continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_a_user_needs():
    joined = "\n".join(COMMANDS)
    for needed in ("python freeflow.py --toy moons", "python freeflow.py --toy digits", "torchrun", "python fid.py",
                   "python -m pytest tests", "pip install torch==2.13.0"):
        assert needed in joined, needed


@pytest.mark.parametrize("command", [c for c in COMMANDS if "freeflow.py" in c])
def test_every_freeflow_command_parses_and_passes_its_checks(command):
    argv = shlex.split(command)
    argv = argv[argv.index("freeflow.py") + 1:]
    cfg = ff.parse_config(argv)  # a flag that no longer exists exits here with a usage error
    cfg.check()
    ff.check_mode(cfg)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python fid.py")])
def test_every_fid_command_parses(command):
    fid.parse_args(shlex.split(command)[2:])


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python -m toy.")])
def test_every_toy_module_exists_and_its_flags_parse(command, monkeypatch):
    import importlib
    argv = shlex.split(command)
    module = importlib.import_module(argv[2])
    assert hasattr(module, "main")
    if argv[2] == "toy.plot_log":  # its parser is the one main() builds: parse without plotting
        monkeypatch.setattr(module, "read_log", lambda path: (_ for _ in ()).throw(module.LogError("parsed")))
        assert module.main(argv[3:]) == 2
