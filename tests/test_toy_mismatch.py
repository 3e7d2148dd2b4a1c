"""toy/mismatch.py: the data-based baseline (MeanFlow distillation) against closed forms (the exact two-time flow
map of a Gaussian teacher is its fixed point, with zero loss gradient; dF/dt against a central difference along
the teacher's flow), its time sampler and augmentation, a tiny run through `--states data`, the command's plan,
table and claims, and one sentence for each bad input."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import tiny_mlp

import freeflow as ff
from toy import mismatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExactTwoTimeStudent(nn.Module):
    """The Gaussian teacher's exact two-time flow map (conftest.GaussianTeacher): its flow is affine,
        Φ(x; t → s) = (1 - s) μ + σ_s (x - (1 - t) μ) / σ_t,     σ_t² = (1 - t)² σ² + t²,
    and F*(x, t, s) = (Φ - x) / (s - t), the teacher's velocity v(x, t) at s = t. `a` adds a · (s - t) · x, so a
    student can be moved off the exact map along a direction a gradient can see."""

    num_classes = 0

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t, y, s, gamma):
        t_, s_ = t.to(x.dtype)[:, None], s.to(x.dtype)[:, None]
        mu, sig = self.teacher.mu, self.teacher.sig
        sig_t = torch.sqrt((1 - t_) ** 2 * sig ** 2 + t_ ** 2)
        sig_s = torch.sqrt((1 - s_) ** 2 * sig ** 2 + s_ ** 2)
        gap = s_ - t_
        phi = (1 - s_) * mu + sig_s * (x - (1 - t_) * mu) / sig_t
        exact = torch.where(gap.abs() > 0, (phi - x) / torch.where(gap.abs() > 0, gap, 1.0), self.teacher(x, t, y))
        return exact + self.a * gap * x


def batch(n=300):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.95 * torch.rand(n, generator=g, dtype=torch.float64)
    s = t * torch.rand(n, generator=g, dtype=torch.float64)
    s[:50] = t[:50]  # s = t too: the identity is flow matching there
    return x, t, s, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.float64)


def test_the_exact_two_time_map_is_the_fixed_point_with_zero_loss_gradient(gaussian_teacher):
    teacher = gaussian_teacher.double()
    student = ExactTwoTimeStudent(teacher)
    x, t, s, y, g = batch()
    x1 = student(x, torch.ones_like(t), y, s, g)
    assert torch.allclose(x + (s - 1)[:, None] * x1, teacher.flow(x, s))  # at t = 1 it is FreeFlow's map
    F = mismatch.F_two_time(student, x, t, s, y, g)
    F_tgt = mismatch.meanflow_target(student, teacher, x, t, s, y, g, (0.0, 1.0))
    assert (F_tgt - F).abs().max() < 1e-12
    for a, moves in ((0.0, False), (0.1, True)):
        with torch.no_grad():
            student.a.fill_(a)
        F_tgt = mismatch.meanflow_target(student, teacher, x, t, s, y, g, (0.0, 1.0))
        loss, _ = ff.predictor_loss(mismatch.F_two_time(student, x, t, s, y, g), F_tgt)
        (grad,) = torch.autograd.grad(loss.mean(), student.a)
        assert (abs(grad.item()) > 1e-3) == moves, (a, grad.item())


def test_dF_dt_is_the_derivative_along_the_teachers_flow(gaussian_teacher):
    teacher = gaussian_teacher.double()
    student = ExactTwoTimeStudent(teacher)
    with torch.no_grad():
        student.a.fill_(0.3)  # off the exact map, so that dF/dt is not zero by the identity alone
    x, t, s, y, g = batch()
    t, s = t.clamp(0.1, 0.9), s.clamp(max=0.05)  # away from s = t, where F switches formula
    v = teacher(x, t, y)
    _, dF = mismatch.F_and_dF_dt(student, x, t, s, y, g, v)
    h = 1e-5
    central = (mismatch.F_two_time(student, x + h * v, t + h, s, y, g)
               - mismatch.F_two_time(student, x - h * v, t - h, s, y, g)) / (2 * h)
    assert dF.abs().max() > 0.1 and torch.allclose(dF, central, rtol=1e-6, atol=1e-8)
    only_t = (mismatch.F_two_time(student, x, t + h, s, y, g) - mismatch.F_two_time(student, x, t - h, s, y, g)) / (2 * h)
    assert (only_t - dF).abs().max() > 1e-3  # the x-part v · ∇_x F counts


def test_times_are_sorted_and_equal_on_three_quarters_as_meanflow_draws_them():
    torch.manual_seed(0)
    t, s = mismatch.sample_t_s(40_000, how="meanflow")
    assert torch.all(s <= t) and torch.all((0 < s) & (t < 1))
    assert abs((s == t).float().mean().item() - 0.75) < 0.01
    a = torch.logit(t[s < t])  # the later of two logit-normal(-0.4, 1): mean -0.4 + 1/√π
    assert abs(a.mean().item() - (-0.4 + 1 / np.sqrt(np.pi))) < 0.05


def test_uniform_times_are_sorted_never_equal_and_draw_the_long_jump_two_hundred_times_as_often():
    torch.manual_seed(0)
    t, s = mismatch.sample_t_s(200_000)  # the default
    assert torch.all(s < t) and torch.all((0 <= s) & (t < 1))
    # t is the larger of two uniforms (density 2t, mean 2/3), s the smaller (mean 1/3)
    assert abs(t.mean().item() - 2 / 3) < 0.005 and abs(s.mean().item() - 1 / 3) < 0.005
    long_uniform = ((t > 0.9) & (s < 0.1)).float().mean().item()  # exactly 2 · 0.1 · 0.1 = 2 %
    t, s = mismatch.sample_t_s(200_000, how="meanflow")
    long_meanflow = ((t > 0.9) & (s < 0.1)).float().mean().item()
    assert abs(long_uniform - 0.02) < 0.002 and long_uniform > 100 * long_meanflow


@pytest.mark.parametrize("k", [1, 2])
def test_a_shift_moves_each_digit_whole_by_every_offset_up_to_k_and_fills_in_background(k):
    torch.manual_seed(0)
    x = torch.rand(512, 1, 8, 8) * 2 - 1
    assert torch.equal(mismatch.shift(x, 0), x)
    moved, padded = mismatch.shift(x, k), torch.nn.functional.pad(x, (k, k, k, k), value=-1.0)
    offsets = []
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-k, k + 1) for dx in range(-k, k + 1)
                   if torch.equal(moved[i, 0], padded[i, 0, k + dy:k + dy + 8, k + dx:k + dx + 8])]
        assert len(matches) == 1
        offsets += matches
    # every one of the (2k + 1)² offsets is drawn, each about equally often (512 draws)
    counts = np.bincount([(dy + k) * (2 * k + 1) + dx + k for dy, dx in offsets], minlength=(2 * k + 1) ** 2)
    assert counts.min() > 0.4 * len(x) / (2 * k + 1) ** 2
    assert (moved == -1).float().mean() > 0.05  # background came in


def test_a_data_fraction_keeps_that_share_seeded_and_at_least_one_example():
    x, y = np.arange(100.0)[:, None], np.arange(100)
    assert all(np.array_equal(a, b) for a, b in zip(mismatch.data_subset(x, y, 1.0, seed=0), (x, y)))
    sub_x, sub_y = mismatch.data_subset(x, y, 0.1, seed=0)
    assert len(sub_x) == 10 and np.array_equal(sub_x[:, 0], sub_y) and np.all(np.diff(sub_y) > 0)
    assert np.array_equal(mismatch.data_subset(x, y, 0.1, seed=0)[1], sub_y)  # the same seed, the same examples
    assert not np.array_equal(mismatch.data_subset(x, y, 0.1, seed=1)[1], sub_y)
    assert len(mismatch.data_subset(x, y, 0.001, seed=0)[0]) == 1  # 0.1 of an example rounds up to one


def test_a_data_based_run_steps_its_optimisers_and_schedules_without_a_warning(tmp_path, recwarn):
    """g_ψ has no loss here, but its learning-rate schedule steps with θ's: its optimiser must step too, or
    PyTorch warns that a schedule stepped before its optimiser."""
    cfg = ff.Config(steps=3, batch_size=8).resolve(True)
    step = mismatch.data_step(torch.randn(20, 2), torch.arange(20) % 2, "cpu")
    ff.distill(tiny_mlp(), cfg, (2,), str(tmp_path), progress=False, step_fn=step)
    assert not [str(w.message) for w in recwarn if "lr_scheduler" in str(w.message)]


def test_a_tiny_data_based_run_trains_and_is_evaluated_as_freeflow_is(tmp_path, capsys):
    out = tmp_path / "data"
    tiny = ["--steps", "6", "--teacher-steps", "20", "--width", "16", "--depth", "1", "--batch-size", "16",
            "--eval-samples", "20", "--scan-samples", "100", "--eval-cfg", "2", "--cfg", "2", "--cfg-range", "2", "2"]
    assert ff.main(["--toy", "digits", "--states", "data", "--augment-shift", "1", "--data-fraction", "0.5",
                    "--out", str(out), *tiny]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["states"] == "data" and set(m["scales"]) == {"1", "2"} and "2" in m["scan"]["student"]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log and all(np.isfinite(e["loss"]) for e in log) and "delta_N" not in log[-1]  # no corrector


def test_the_plan_runs_freeflow_once_per_scale_and_the_baseline_at_every_knob():
    runs = dict(mismatch.plan([0, 2], [1.0, 2.0], [0.1]))
    assert list(runs) == ["freeflow-g1", "freeflow-g2", "data-shift0-g1", "data-shift2-g1", "data-shift0-g2",
                          "data-shift2-g2", "data-frac0.1-g1"]
    assert "--states" not in runs["freeflow-g2"] and runs["freeflow-g2"][:5] == ["--cfg", "2", "--cfg-range", "2", "2"]
    assert runs["data-shift2-g2"][:4] == ["--states", "data", "--augment-shift", "2"]
    assert runs["data-frac0.1-g1"][:4] == ["--states", "data", "--data-fraction", "0.1"]
    meanflow = dict(mismatch.plan([0, 2], [1.0], [0.1], "meanflow"))
    assert meanflow["freeflow-g1"] == runs["freeflow-g1"]  # FreeFlow draws no data times
    assert all(f[:4] == ["--states", "data", "--data-times", "meanflow"] for v, f in meanflow.items() if v != "freeflow-g1")


def fake_run(out, seed, variant, endpoint, learned, cfg=1.0):
    run = os.path.join(out, f"seed_{seed}", "runs", f"digits__{variant}")
    os.makedirs(run)
    g = f"{cfg:g}"
    scale = {"endpoint_rmse": endpoint, "frechet_to_teacher": 0.3, "frechet_floor": 0.2, "accuracy": {"student": 0.99},
             "frechet_to_real": {"student": 0.4, "teacher": 0.3}}
    with open(os.path.join(run, "metrics.json"), "w") as f:
        json.dump({"config": {"cfg": cfg}, "scales": {g: scale}, "train_seconds": 60.0,
                   "scan": {"student": {g: {"fd": learned}}, "teacher": {g: {"fd": 8.0}}}}, f)


def test_table_and_claims_read_the_means_over_seeds(tmp_path):
    out = str(tmp_path)
    for seed in (0, 1):
        fake_run(out, seed, "freeflow-g1", 0.10, 12.0)
        fake_run(out, seed, "data-shift0-g1", 0.08, 10.0 + seed)  # better on clean data: the trade
        fake_run(out, seed, "data-shift2-g1", 0.20, 30.0)  # worse when the data move away
    runs = mismatch.plan([0, 2], [1.0], [])
    text = mismatch.table(out, runs)
    assert "| FreeFlow | none (noise only) | 1 | 0.100 / 0.100 |" in text
    assert "| data-based | shifted up to 2 px | 1 | 0.200 / 0.200 |" in text and "10.00 / 11.00" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in mismatch.claims(out, [0, 2], [1.0]).splitlines()[2:]}
    assert all(line.endswith("| 2 of 2 | seen |") for line in rows.values()), rows
    assert "γ = 1 learned FreeFlow vs shift 2: 12.000 vs 30.000" in rows["FreeFlow, which reads no data, beats it "
                                                                        "under that mismatch"]


@pytest.mark.parametrize("argv, message", [
    (["--toy", "digits", "--states", "data", "--augment-shift", "9"], "--augment-shift must be an integer from 0 to 4"),
    (["--toy", "digits", "--states", "data", "--data-fraction", "0"], "the data-based baseline needs data (got 0.0)"),
    (["--toy", "moons", "--states", "data"], "--states data trains on noised data, and only --toy digits"),
    (["--toy", "digits", "--augment-shift", "1"], "--augment-shift shapes the data of --states data"),
    (["--toy", "digits", "--data-times", "meanflow"], "--data-times shapes the data of --states data"),
])
def test_bad_baseline_flags_are_one_sentence_and_write_nothing(tmp_path, capsys, argv, message):
    assert ff.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "o").exists(), err


@pytest.mark.parametrize("argv, message", [
    (["--shifts", "0", "9"], "--shifts takes pixels from 0 to 4 and must include 0"),
    (["--fractions", "0"], "the data-based baseline needs data (got 0)"),
    (["--table-only"], "there are no finished runs under"),
])
def test_the_command_refuses_bad_knobs_in_one_sentence(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: pytest.fail("a run was started"))
    with pytest.raises(SystemExit) as exit_:
        mismatch.main(["--out", str(tmp_path / "m"), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and not (tmp_path / "m").exists(), err


def test_the_command_starts_every_run_with_its_seed_and_the_shared_teacher(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or types.SimpleNamespace(returncode=0))
    with pytest.raises(SystemExit):  # nothing finished (the runs were not really run): the table is refused
        mismatch.main(["--out", str(tmp_path), "--quick"])
    assert len(seen) == 6 and all(cmd[cmd.index("--seed") + 1] == "0" for cmd in seen)
    assert all(cmd[cmd.index("--toy-teacher") + 1] == str(tmp_path / "seed_0" / "teachers" / "digits.pt")
               for cmd in seen)
    assert all(cmd[cmd.index("--steps") + 1] == "1000" for cmd in seen)


def test_help_explains_the_baseline():
    result = subprocess.run([sys.executable, "-m", "toy.mismatch", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "MeanFlow" in result.stdout and "--shifts" in result.stdout
