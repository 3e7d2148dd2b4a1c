"""toy/guidance_scan.py: which guidance scale a guided student samples, and its bad input."""

import json

import numpy as np
import pytest
import torch

import freeflow as ff
import toy.guidance_scan as gs

TINY = ["--steps", "40", "--teacher-steps", "300", "--width", "32", "--depth", "2", "--batch-size", "64",
        "--eval-samples", "300", "--device", "cpu"]


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """A finished guided run (CFG 2) on three labelled blobs."""
    from toy.run import run_toy

    tmp = tmp_path_factory.mktemp("scan")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    points = 2 * np.c_[np.cos(2 * labels), np.sin(2 * labels)] + 0.5 * rng.normal(size=(3000, 2))
    np.savez(tmp / "blobs.npz", points=points, labels=labels)
    cfg = ff.parse_config(["--toy", str(tmp / "blobs.npz"), "--cfg", "2", "--out", str(tmp / "run"), *TINY]).check()
    run_toy(cfg, progress=False)
    return str(tmp / "run")


def test_within_class_spread_is_the_rms_distance_to_each_class_mean():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 14.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert gs.spread(x, y) == pytest.approx(np.sqrt((1 + 1 + 4 + 4) / 4))


def test_data_sets_draw_points_of_the_asked_labels():
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    labels = np.array([0, 1] * 5)
    (d,) = gs.data_sets((x, labels), torch.tensor([1, 0, 1]), 1, np.random.default_rng(0))
    assert [labels[int(row[0]) // 2] for row in d] == [1, 0, 1]


def test_a_student_that_samples_the_teacher_at_scale_3_is_found_at_3(guided_run, monkeypatch):
    cfg, teacher, *_ = gs.load_run(guided_run)

    def teacher_at_3(student, z, y, gamma):  # a "student" that is the teacher's own ODE at γ = 3
        return ff.teacher_ode(teacher, z, y, torch.full_like(gamma, 3.0), cfg.guidance_interval, 32, "rk4")[0]

    monkeypatch.setattr(gs, "sample_one_step", teacher_at_3)
    _, to, _, floor, _, spreads = gs.scan(guided_run, [1, 3, 6])
    assert min(to, key=to.get) == 3
    assert to[3] < 0.5 * min(to[1], to[6])
    assert spreads["student"] != spreads["teacher"]  # the teacher's spread is read at the run's γ = 2


def test_the_table_has_one_row_per_run_and_marks_the_closest_scale(guided_run, capsys):
    assert gs.main([guided_run, guided_run, "--gammas", "1,2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(f"| {guided_run} |")]
    assert len(rows) == 2 and rows[0].count("**") == 2
    assert "at γ' to the training data: 1: " in out


def test_bad_input_is_one_line(guided_run, tmp_path, capsys):
    digits = tmp_path / "digits"
    digits.mkdir()
    (digits / "metrics.json").write_text(json.dumps({"config": {"toy": "digits"}}))
    assert gs.main([str(tmp_path / "none")]) == 2
    assert gs.main([guided_run, "--gammas", "1,x"]) == 2
    assert gs.main([str(digits)]) == 2
    assert gs.main([guided_run, "--steps", "3"]) == 2
    (tmp_path / "m.json").mkdir()
    (tmp_path / "m.json" / "metrics.json").write_text("{}")
    assert gs.main([str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5
    assert "has no metrics.json" in err[0] and "--gammas must be numbers" in err[1]
    assert "digits run" in err[2] and "unknown arguments --steps 3" in err[3] and "holds no run settings" in err[4]
