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
    """Every shell command in the README's ```bash blocks (continuation lines joined, comments dropped) and in its
    inline code that starts with `python `."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = re.findall(r"`(python [^`]+)`", text)
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
def test_every_toy_module_command_parses_and_passes_its_checks(command):
    # parse_args is what main() runs first: its flags, and the flags it hands to every freeflow.py run, checked
    # as the command checks them; a renamed or removed flag exits here with a usage error
    import importlib
    argv = shlex.split(command)
    importlib.import_module(argv[2]).parse_args(argv[3:])


def test_a_toy_module_command_with_a_flag_that_does_not_exist_fails_to_parse():
    from toy import mismatch, suite
    for module, argv in ((suite, ["--no-such-flag"]), (mismatch, ["--quick", "--stepz", "9"])):
        with pytest.raises(SystemExit) as stop:
            module.parse_args(argv)
        assert stop.value.code == 2


def test_no_file_cites_what_a_clone_does_not_have():
    # the method, the checkpoints' layout and ADM's evaluator are written down in docs/; nothing may send a reader
    # outside the repository, and every relative link of the README and docs/ must resolve
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".git", "out", "__pycache__")):
            continue
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".txt")):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert ".." + "/shared" not in text, os.path.join(folder, name)  # (spelt so this file passes)
    for page in ["README.md", *(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))]:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)), (page, target)
