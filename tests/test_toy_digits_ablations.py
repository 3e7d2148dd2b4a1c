"""toy/digits_ablations.py: the runs it starts, its table and claims on the Fréchet distances, and its
refusals (no digits run is started here)."""

import json
import os
import subprocess
import types

import pytest

from toy import digits_ablations as da


def curve(fds):
    """A scan curve {γ: metrics} with learned FDs `fds` at γ = 1, 1.5, 2 (pixel FDs a tenth of them)."""
    return {g: {"fd": fd, "pixel_fd": fd / 10, "precision": 0.8, "recall": 0.7} for g, fd in zip(("1", "1.5", "2"), fds)}


def fake_run(out, variant, fr1, fr2, scan=(10.0, 12.0, 14.0)):
    scale = lambda fr: {"endpoint_rmse": 0.1, "frechet_to_real": {"student": fr, "teacher": 0.3},  # noqa: E731
                        "frechet_to_teacher": 0.28, "frechet_floor": 0.24, "accuracy": {"student": 0.99}}
    student, teacher = curve(scan), curve((9.0, 8.0, 11.0))
    best = lambda c: {k: float(min(c, key=lambda g: c[g][k])) for k in ("fd", "pixel_fd")}  # noqa: E731
    run = os.path.join(out, "runs", f"digits__{variant}")
    os.makedirs(run)
    with open(os.path.join(run, "metrics.json"), "w") as f:
        json.dump({"scales": {"1": scale(fr1), "2": scale(fr2)}, "train_seconds": 100.0,
                   "scan": {"teacher": teacher, "student": student, "teacher_solver": "rk4, 8 steps",
                            "best": {"teacher": best(teacher), "student": best(student)}}}, f)


def test_claims_at_the_best_scale_compare_each_run_where_it_is_best(tmp_path):
    out = str(tmp_path)
    fake_run(out, "predictor", 0.40, 0.60, scan=(10.0, 12.0, 14.0))  # best at γ = 1: 10
    fake_run(out, "alpha3-psi4", 0.45, 0.70, scan=(11.0, 9.0, 13.0))  # worse at γ = 1, best at 1.5: 9
    assert da.at_best_scale(json.load(open(os.path.join(out, "runs", "digits__alpha3-psi4", "metrics.json")))) == \
        {"learned": 9.0, "pixels": 0.9}
    rows = lambda measure: {line.split(" | ")[0].strip("| "): line  # noqa: E731
                            for line in da.claims([out], da.CLAIMS, measure, "F").splitlines()[2:]}
    claim = "(ours) both losses with α = 3 and 4 extra g_ψ updates beat the predictor alone"
    assert rows(da.at_best_scale)[claim].endswith("| 2 of 2 | seen |")
    assert rows(da.frechet_to_real)[claim].endswith("| 0 of 2 | not seen |")  # at fixed scales it loses
    table = da.table(out)
    assert "| alpha3-psi4 | 1.5: 9.00 (0.800 / 0.700) | 1.5: 0.900 |" in table
    assert "| teacher (rk4, 8 steps) | 1.5: 8.00 (0.800 / 0.700) | 1.5: 0.800 |" in table


def test_the_predictor_given_equal_flops_trains_more_steps(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or types.SimpleNamespace(returncode=0))
    da.main(["--out", str(tmp_path), "--only", "predictor-equal", "--steps", "1000"])
    cmd = seen[0]
    assert cmd[len(cmd) - 1 - cmd[::-1].index("--steps") + 1] == str(round(1000 * da.EQUAL_FLOPS)) == "1500"
    assert cmd[cmd.index("--loss") + 1] == "predictor"


def test_claims_compare_both_scales_of_every_seed(tmp_path):
    s0, s1 = str(tmp_path / "s0"), str(tmp_path / "s1")
    for out, runs in ((s0, {"both": (0.39, 0.64), "predictor": (0.40, 0.63), "k0": (0.70, 1.00)}),
                      (s1, {"both": (0.38, 0.60), "predictor": (0.41, 0.62), "k0": (0.50, 0.95)})):
        for variant, (fr1, fr2) in runs.items():
            fake_run(out, variant, fr1, fr2)
    rows = {line.split(" | ")[0].strip("| "): line
            for line in da.claims([s0, s1], da.CLAIMS, da.frechet_to_real, "F").splitlines()[2:]}
    both = rows["both losses beat the predictor alone"]
    assert "γ = 1 0.390 / 0.400, γ = 2 0.640 / 0.630, γ = 1 0.380 / 0.410, γ = 2 0.600 / 0.620" in both
    assert both.endswith("| 3 of 4 | mixed |")
    assert rows["k = 0 breaks the full method"].endswith("| 3 of 4 | mixed |")  # all but 0.50 < 1.5 x 0.38
    assert rows["the corrector alone is worse than both"].endswith("| not run | 0 of 0 | — |")


def test_table_has_a_row_per_finished_variant_in_order(tmp_path):
    fake_run(str(tmp_path), "predictor", 0.4, 0.6)
    fake_run(str(tmp_path), "both", 0.39, 0.64)
    rows = da.table(str(tmp_path)).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| both", "| predictor", "| teacher (rk4, 8 steps)"]
    assert "0.390 / 0.640 (0.300 / 0.300)" in rows[0] and "99.0 % / 99.0 %" in rows[0]


def test_every_variant_runs_with_its_flags_after_the_common_ones(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or types.SimpleNamespace(returncode=0))
    da.main(["--out", str(tmp_path), "--only", "both,k0,corr01", "--seed", "1"])
    assert len(seen) == 3 and all(cmd[cmd.index("--seed") + 1] == "1" for cmd in seen)
    k0 = next(cmd for cmd in seen if "--k" in cmd)
    assert k0[k0.index("--k") + 1] == "0" and k0.index("--seed") < k0.index("--k")
    assert all(cmd[cmd.index("--toy-teacher") + 1] == str(tmp_path / "teachers" / "digits.pt") for cmd in seen)
    assert "[digits] 3 runs" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--only", "both,nosuch"], "there is no variant 'nosuch'"),
    (["--steps", "-1"], "--steps must be a positive integer (got -1)"),
    (["--table-only"], "there are no runs under"),
])
def test_bad_input_is_one_sentence_and_starts_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_:
        da.main(["--out", str(tmp_path / "d"), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_claims_refuse_flags_meant_for_runs(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with pytest.raises(SystemExit) as exit_:
        da.main(["--claims", str(tmp_path), "--steps", "3000"])
    assert exit_.value.code == 2 and "takes no flags for runs (got --steps 3000)" in capsys.readouterr().err
