"""toy/digits.py (`python freeflow.py --toy digits`): the data are the bundled digits scaled to [-1, 1], a tiny
run writes everything it promises, its teacher and student load with sit.load_teacher without being told
their size and reproduce the samples it wrote, the endpoint-error table means what it says, and bad input
(no scikit-learn, a width the SiT cannot split into heads) is one line with no files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DIGITS_TINY as TINY, DIGITS_WATCH as WATCH, assert_close_at_scale

import freeflow as ff
import sit
from toy import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_data_are_the_bundled_digits_scaled_to_minus_one_one():
    from sklearn.datasets import load_digits
    x, y, k = digits.load_digits()
    raw = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and k == 10
    assert np.array_equal(x[:, 0], raw.images.astype(np.float32) / 8 - 1) and np.array_equal(y, raw.target)
    assert x.min() == -1 and x.max() == 1 and sorted(set(y.tolist())) == list(range(10))


def test_the_classifier_reads_real_digits_and_not_noise():
    x, y, _ = digits.load_digits()
    clf, held_out = digits.fit_classifier(x, y)
    assert held_out > 0.9
    noise = np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32)
    assert digits.accuracy(clf, noise, y) < 0.3
    # the Fréchet distance of the real digits to their own statistics is zero, and noise is far away
    real = digits.fid.statistics(x.reshape(len(x), -1))
    assert abs(digits.frechet_to(x, real)) < 1e-6 and digits.frechet_to(noise, real) > 10




def test_a_tiny_run_writes_metrics_figure_samples_and_checkpoints(tiny_run):
    out, stdout = tiny_run
    assert "endpoint RMSE one-step student" in stdout and "γ = 2" in stdout
    assert sorted(os.listdir(out)) == ["ckpt.pt", "digits_cnn_s0.pt", "figure.png", "log.jsonl", "metrics.json", "preview",
                                       "samples.npz", "scan.png", "snapshots", "teacher.pt"]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["scales"]) == {"1", "2"} and m["eval_samples"] == 40 and m["steps"] == 4
    for r in m["scales"].values():
        assert set(r["teacher_solvers"]) == {"euler 1", "euler 2", "euler 4", "euler 8", "euler 16",
                                             "heun 3", "heun 7", "heun 15"}
        assert np.isclose(r["w2_ratio"], r["w2"] / r["w2_floor"])
        assert r["reference_solver"]["halving_change"] <= r["reference_solver"]["tol"]
        assert {"student", "teacher"} == set(r["accuracy"]) == set(r["frechet_to_real"])
    # an evaluation at γ = 1 is one network call; a guided one (a step starting in [0, 0.7]) costs two
    assert m["scales"]["1"]["teacher_solvers"]["euler 4"]["nfe"] == 4
    assert m["scales"]["2"]["teacher_solvers"]["euler 4"]["nfe"] == 1 + 1 + 2 + 2  # steps from 1, .75 | .5, .25
    assert m["scales"]["1"]["teacher_solvers"]["heun 7"]["steps"] == 4
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(out / "samples.npz") as f:
        assert set(f.files) == {"noise", "labels", "gamma", "student", "teacher"}
        assert f["noise"].shape == f["student"].shape == f["teacher"].shape == (80, 1, 8, 8)
        assert f["labels"].shape == f["gamma"].shape == (80,)
        assert sorted(set(f["gamma"].tolist())) == [1.0, 2.0]
        assert np.bincount(f["labels"][f["gamma"] == 2]).tolist() == [4] * 10  # spread over the classes


def test_teacher_and_student_files_load_without_their_size_and_reproduce_the_samples(tiny_run):
    out, _ = tiny_run
    m = json.loads((out / "metrics.json").read_text())
    teacher = sit.load_teacher(str(out / "teacher.pt"), resolution=None)
    student = sit.load_teacher(str(out / "ckpt.pt"), resolution=None)
    assert (teacher.input_size, teacher.in_channels, teacher.hidden, teacher.num_classes) == (8, 1, 16, 10)
    assert student.inputs == ("s", "gamma") and student.input_size == 8
    with np.load(out / "samples.npz") as f:
        z, y, gamma = (torch.from_numpy(f[k]) for k in ("noise", "labels", "gamma"))
        stored_student, stored_teacher = torch.from_numpy(f["student"]), torch.from_numpy(f["teacher"])
    # the student in ckpt.pt (its EMA weights) is the one that made the samples: x̂ = z - F(z, 0)
    # float32 through the SiT, rounding of the samples' scale (about 4; 1e-6 of it through two attention blocks,
    # see test_sit.py): the evaluation ran these rows in batches of another size, which other kernels may sum
    # in another order
    assert_close_at_scale(ff.sample_one_step(student, z, y, gamma), stored_student, 1e-5, "one-step samples")
    # the teacher's samples are its RK4 solve from the same noise, with the steps the reference took
    for g in (1.0, 2.0):
        rows = gamma == g
        steps = m["scales"][f"{g:g}"]["reference_solver"]["steps"]
        x = ff.teacher_ode(teacher, z[rows], y[rows], gamma[rows], (0.0, 0.7), steps, "rk4")[0]
        # an RK4 solve of tens of float32 network calls, rounding of the scale (about 4) adding up at each
        assert_close_at_scale(x, stored_teacher[rows], 1e-5, "the teacher's RK4 samples")


def test_a_watched_run_writes_8_by_8_digit_grids_snapshots_and_its_distance_to_the_real_digits(tiny_run):
    import matplotlib.image
    out, stdout = tiny_run
    assert sorted(os.listdir(out / "preview")) == ["step_0000002.png", "step_0000004.png"]
    grid = matplotlib.image.imread(out / "preview" / "step_0000004.png")
    assert grid.shape[:2] == (8 * 32 + 7 * 2, 8 * 32 + 7 * 2)  # 8 x 8 digits, each 8 x 8 pixels shown 4 times larger
    assert sorted(os.listdir(out / "snapshots")) == ["ema_0000004.pt", "ema_best.pt"]
    last = sit.load_teacher(str(out / "snapshots" / "ema_0000004.pt"), resolution=None)
    student = sit.load_teacher(str(out / "ckpt.pt"), resolution=None)
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), student.state_dict().values()))
    scores = [e for e in map(json.loads, open(out / "log.jsonl")) if "frechet_to_real" in e]
    assert [e["step"] for e in scores] == [2, 4] and all(e["frechet_to_real"] > 0 and e["learned_fd"] > 0 for e in scores)
    assert "step 4: learned_fd" in stdout and all(e["best_learned_fd"] == min(e["learned_fd"] for e in scores[:i + 1])
                                                  for i, e in enumerate(scores))  # the best by the learned FD
    # the logged scores are digits_score of the EMA student at that step (the snapshot), in the CNN's features and
    # over the pixels, and they tell apart an EMA student from the untrained one
    from toy.digits_features import DigitsFeatures
    x, y, k = digits.load_digits()
    cfg = ff.parse_config(["--toy", "digits", *TINY, *WATCH]).resolve(True)
    score = digits.digits_score(cfg, x, k, "cpu", DigitsFeatures(str(out), x, y))
    untrained = score(ff.make_student(sit.load_teacher(str(out / "teacher.pt"), resolution=None)))
    for key in ("learned_fd", "frechet_to_real"):
        assert score(last)[key] == pytest.approx(scores[-1][key], rel=1e-9)
        assert untrained[key] != pytest.approx(scores[-1][key], rel=1e-3)


def test_a_second_run_reuses_the_cached_teacher(tiny_run, tmp_path):
    out, _ = tiny_run
    again = tmp_path / "again"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "freeflow.py"), "--toy", "digits", "--out", str(again),
                             "--toy-teacher", str(out / "teacher.pt"), *TINY, "--eval-samples", "20", "--cfg", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    m = json.loads((again / "metrics.json").read_text())
    assert m["teacher"]["cached"] is True and set(m["scales"]) == {"1"}


def test_an_untrained_student_scores_exactly_the_teachers_one_euler_step():
    # the student starts as the teacher's Euler step f(z, 0) = z - v(z, 1): at γ = 1 its endpoint error must
    # equal the table's "euler 1" row, which checks the table's budget, its solver and the error itself
    x, y, k = digits.load_digits()
    cfg = ff.parse_config(["--toy", "digits", "--width", "16", "--depth", "1", "--eval-samples", "30"]).resolve(True)
    torch.manual_seed(0)
    teacher = digits.digits_sit(x, k, cfg).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    metrics, arrays = digits.evaluate_digits(ff.make_student(teacher), teacher, x, y, cfg, "cpu", progress=False)
    for r in metrics["scales"].values():  # γ = 2 too: REPA's Euler step from t = 1 lies outside [0, 0.7]
        assert r["endpoint_rmse"] > 0.01
        assert r["endpoint_rmse"] == pytest.approx(r["teacher_solvers"]["euler 1"]["endpoint_rmse"], abs=1e-6)
        assert r["teacher_solvers"]["euler 16"]["endpoint_rmse"] < r["teacher_solvers"]["euler 1"]["endpoint_rmse"]


def test_without_scikit_learn_the_error_names_the_package(tmp_path, capsys, monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.linear_model"):
        monkeypatch.setitem(sys.modules, name, None)  # `import sklearn` now raises ImportError
    assert ff.main(["--toy", "digits", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs scikit-learn" in err and "pip install scikit-learn" in err
    assert not (tmp_path / "out").exists()


def test_a_width_the_heads_cannot_split_is_one_line_and_no_files(tmp_path, capsys):
    assert ff.main(["--toy", "digits", "--width", "90", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--width 90" in err and "divisible by 4" in err
    assert not (tmp_path / "out").exists()


def test_the_digits_verifier_is_the_classifiers_log_probability_of_the_wanted_class():
    x, y, _ = digits.load_digits()
    clf, _ = digits.fit_classifier(x, y)
    verify = digits.classifier_verifier(clf)
    images, labels = torch.from_numpy(x[:20]), torch.from_numpy(y[:20])
    wrong = (labels + 1) % 10
    log_p = clf.predict_log_proba(x[:20].reshape(20, -1))
    assert torch.allclose(verify(images, labels), torch.from_numpy(log_p[np.arange(20), y[:20]]))
    assert (verify(images, labels) > verify(images, wrong)).float().mean() > 0.9  # real digits: their own class wins
