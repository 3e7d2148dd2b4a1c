"""`python freeflow.py --toy ...` (freeflow.main and toy/run.py): a whole run writes what it promises, and
every bad input gets one line, a non-zero exit and no files."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import freeflow as ff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--steps", "40", "--teacher-steps", "100", "--width", "16", "--depth", "1", "--batch-size", "64",
        "--eval-samples", "200", "--device", "cpu"]


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "freeflow.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_toy_run_writes_metrics_figure_and_checkpoints_then_reuses_its_teacher(tmp_path):
    out = tmp_path / "run"
    first = cli("--toy", "moons", "--out", str(out), *TINY)
    assert first.returncode == 0, first.stderr
    assert "W2 one-step vs teacher" in first.stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "figure.png", "log.jsonl", "metrics.json", "teacher.pt"]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("w2", "w2_floor", "w2_ratio", "endpoint_error", "teacher_nfe", "student_nfe", "sampling_speedup",
                "train_seconds", "steps", "config"):
        assert key in m, key
    assert set(m["trajectory_error"]) == {"0.75", "0.5", "0.25"}
    assert m["student_nfe"] == 1 and m["steps"] == 40 and m["teacher"]["cached"] is False
    assert m["config"]["cfg"] == 1.0 and m["config"]["toy"] == "moons"
    assert np.isclose(m["w2_ratio"], m["w2"] / m["w2_floor"])
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = cli("--toy", "moons", "--out", str(out), *TINY)
    assert again.returncode == 0 and json.loads((out / "metrics.json").read_text())["teacher"]["cached"] is True


def test_user_npz_with_labels_runs_with_guidance(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    points = np.c_[np.cos(2 * labels), np.sin(2 * labels)] + 0.2 * rng.normal(size=(600, 2))
    np.savez(tmp_path / "blobs.npz", points=points, labels=labels)
    cfg = ff.parse_config(["--toy", str(tmp_path / "blobs.npz"), "--cfg", "2.5", "--out", str(tmp_path / "o"),
                           *TINY]).check()
    from toy.run import run_toy

    m = run_toy(cfg, progress=False)
    assert m["toy"] == "blobs" and m["cfg"] == 2.5 and tuple(m["config"]["cfg_range"]) == (2.5, 2.5)
    # CFG is on over the whole default interval [0, 1]: two teacher calls per evaluation
    assert m["teacher_nfe"] == 2 * 4 * m["reference_solver"]["steps"]


def test_help_lists_every_config_field():
    result = cli("--help")
    assert result.returncode == 0
    for f in dataclasses.fields(ff.Config):
        assert f"--{f.name.replace('_', '-')}" in result.stdout


BAD_ARGS = {
    "unknown toy": (["--toy", "swirl"],
                    "unknown toy 'swirl'; choose one of moons, 8gaussians, checkerboard, spirals, rings"),
    "missing file": (["--toy", "missing.npy"], "no such file: missing.npy"),
    "zero steps": (["--toy", "moons", "--steps", "0"], "--steps must be a positive integer (got 0)"),
    "negative batch": (["--toy", "moons", "--batch-size", "-4"], "--batch-size must be a positive integer (got -4)"),
    "negative width": (["--toy", "moons", "--width", "-1"], "--width must be a positive integer"),
    "zero eval samples": (["--toy", "moons", "--eval-samples", "0"], "--eval-samples must be a positive integer"),
    "cfg without labels": (["--toy", "checkerboard", "--cfg", "2"],
                           "--cfg needs class labels, and toy 'checkerboard' has none"),
    "inverted interval": (["--toy", "moons", "--guidance-interval", "0.8", "0.2"], "needs LO <= HI"),
    "interval outside": (["--toy", "moons", "--corrector-interval", "0", "1.5"], "must lie within [0, 1]"),
    "empty r range": (["--toy", "moons", "--r-range", "0.6", "0.6"], "--r-range needs 0 <= LO < HI <= 1 (got 0.6 0.6)"),
    "lr too high": (["--toy", "moons", "--lr", "1e38"], "--lr must be a number in (0, 1], e.g. 1e-3 (got 1e+38)"),
    "nan lr": (["--toy", "moons", "--lr", "nan"], "--lr must be a number in (0, 1], e.g. 1e-3 (got nan)"),
    "nan fraction": (["--toy", "moons", "--predictor-frac", "nan"], "--predictor-frac must be in [0, 1] (got nan)"),
    "negative alpha": (["--toy", "moons", "--alpha", "-1"], "--alpha must be a finite number >= 0 (got -1.0)"),
    "ema of 1": (["--toy", "moons", "--ema", "1"], "--ema must be in [0, 1) (got 1.0)"),
    "nothing to do": ([], "nothing to do: give --toy NAME"),
    "previews of a 2D toy": (["--toy", "moons", "--preview-every", "100"],
                             "--preview-every watches image runs (--toy digits, --teacher); a 2D toy draws"),
    "scores of a 2D toy": (["--toy", "moons", "--fid-every", "100"], "--fid-every watches image runs"),
    "negative keep": (["--toy", "moons", "--keep-every", "-5"], "--keep-every must be an integer >= 0 (0: off)"),
    "zero fd step": (["--toy", "moons", "--dsdt", "fd-forward", "--fd-eps", "0"], "--fd-eps must be a positive number"),
}


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_input_is_one_line_exit_2_and_no_files(tmp_path, capsys, case):
    args, message = BAD_ARGS[case]
    out = tmp_path / "out"
    code = ff.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("freeflow.py: error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("case", ["unknown toy", "missing file", "cfg without labels"])
def test_errors_raised_inside_the_toy_package_are_one_line_from_the_real_command_line(tmp_path, case):
    # `python freeflow.py` runs this file as __main__ while toy/ imports `freeflow`: the error class
    # must be the one main() catches, so a real process prints one line and no traceback
    args, message = BAD_ARGS[case]
    result = cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_and_non_finite_files_are_refused_before_anything_is_written(tmp_path, capsys):
    junk = tmp_path / "junk.npy"
    junk.write_text("definitely not numpy")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.where(np.arange(200).reshape(100, 2) == 11, np.nan, 1.0) + np.arange(200).reshape(100, 2))
    for path, message in ((junk, "cannot read"), (nan, "NaN or infinite values (rows 5)")):
        assert ff.main(["--toy", str(path), "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["junk.npy", "nan.npy"]


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    assert ff.main(["--toy", "moons", "--out", str(tmp_path / "taken")]) == 2
    assert "--out " + str(tmp_path / "taken") + " is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "a file"


def test_argparse_mistakes_are_one_line_too():
    result = cli("--toy", "moons", "--steps", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "invalid int value: 'many'" in result.stderr
    result = cli("--toy", "moons", "--loss", "neither")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "invalid choice" in result.stderr


def test_divergence_is_reported_in_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    import toy.run

    def diverge(*args, **kwargs):
        raise ff.Diverged("training became non-finite at step 7 (loss nan); stopped, and no checkpoint was written; "
                          "try a lower --lr or --grad-clip.")

    monkeypatch.setattr(toy.run, "distill", diverge)
    code = ff.main(["--toy", "moons", "--out", str(tmp_path / "o"), *TINY])
    last = capsys.readouterr().err.split("\n")[-2]  # after the teacher's progress bar
    assert code == 1 and last.startswith("freeflow.py: error: ") and "non-finite at step 7" in last
    assert not (tmp_path / "o" / "metrics.json").exists()
