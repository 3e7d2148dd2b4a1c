"""toy/suite.py: the flags it passes to every run, and its refusals (no run is started here)."""

import json
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


def test_claims_refuse_flags_meant_for_runs(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--claims", str(tmp_path), "--steps", "3000"])
    assert exit_.value.code == 2 and "takes no flags for runs (got --steps 3000)" in capsys.readouterr().err


def test_claims_count_the_pairs_where_each_holds_and_call_them_seen_only_when_all_do(tmp_path):
    def make_suite(name, ratios):
        for run, r in ratios.items():
            (tmp_path / name / "runs" / run).mkdir(parents=True)
            (tmp_path / name / "runs" / run / "metrics.json").write_text(json.dumps({"w2_ratio": r}))
        return str(tmp_path / name)

    s0 = make_suite("s0", {"moons__both": 1.1, "moons__predictor": 1.2, "rings__both": 1.0, "rings__predictor": 1.1,
                      "moons-k0__both": 2.0})
    s1 = make_suite("s1", {"moons__both": 1.1, "moons__predictor": 1.0, "rings__both": 1.0, "rings__predictor": 1.1,
                      "moons-k0__both": 1.2})
    rows = {line.split(" | ")[0].strip("| "): line for line in suite.claims([s0, s1]).splitlines()[2:]}
    assert rows["both losses beat the predictor alone"].endswith("| 3 of 4 | mixed |")
    assert rows["k = 0 breaks the full method"].endswith("| 1 of 2 | not seen |")  # 2.0 > 1.5 x 1.1; 1.2 is not
    assert rows["guiding the corrector's teacher on [0, 1] instead of [0, 0.7] breaks it"].endswith("| not run | 0 of 0 | — |")
    assert suite.claims([s0]).count("| seen |") == 2  # seed 0 alone: both beat predictor on both sets; k = 0 broke
