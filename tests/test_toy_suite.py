"""toy/suite.py: the flags it passes to every run, and its refusals (no run is started here)."""

import os
import subprocess
import types

import pytest

from toy import suite


def test_any_other_flag_reaches_every_run_before_the_runs_own_flags(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(suite.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or types.SimpleNamespace(returncode=0))
    assert suite.run_one(str(tmp_path), "moons", "predictor", "moons", ["--loss", "predictor"],
                         ["--steps", "3000", "--lr", "2e-3"]) == 0
    cmd = seen[0]
    assert cmd[cmd.index("--steps") + 1] == "3000" and cmd[cmd.index("--lr") + 1] == "2e-3"
    assert cmd.index("--lr") < cmd.index("--loss")  # a variant's own flag comes last, so it wins
    assert cmd[cmd.index("--toy-teacher") + 1] == os.path.join(str(tmp_path), "teachers", "moons.pt")


def test_a_bad_flag_for_every_run_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--out", str(tmp_path / "s"), "--steps", "-3"])
    assert exit_.value.code == 2 and "--steps must be a positive integer (got -3)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_table_only_without_runs_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--out", str(tmp_path), "--table-only"])
    assert exit_.value.code == 2 and "there are no runs under" in capsys.readouterr().err
