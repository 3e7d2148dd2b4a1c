"""toy/evaluate.py: exact W2, the reference ODE's accuracy, and the metrics on students whose errors are
known."""

import itertools

import numpy as np
import torch
from conftest import ExactGaussianStudent, GaussianTeacher

import freeflow as ff
from toy.evaluate import W2_PAIRS, evaluate, reference_ode, w2


def test_w2_is_exact_on_small_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    brute = min(np.mean(np.sum((a - b[list(p)]) ** 2, 1)) for p in itertools.permutations(range(6)))
    assert np.isclose(w2(a, b), np.sqrt(brute))
    assert w2(a, a[::-1]) == 0
    assert np.isclose(w2(a, a + [0.3, -0.4]), 0.5)  # a translation moves every point by 0.5


def test_reference_ode_meets_its_tolerance_against_the_closed_form():
    teacher = GaussianTeacher()
    z = torch.randn(300, 2)
    y, g = torch.zeros(300, dtype=torch.long), torch.ones(300)
    end, states, steps, change, nfe = reference_ode(teacher, z, y, g, (0.0, 1.0), tol=1e-4)
    assert change <= 1e-4 and nfe == 4 * steps
    assert (end - teacher.flow(z, torch.zeros(300))).norm(dim=1).max() < 1e-4
    for s, x_s in states.items():
        assert (x_s - teacher.flow(z, torch.full((300,), s))).norm(dim=1).max() < 1e-4


def test_the_kept_finer_solve_is_much_closer_than_the_halving_change():
    # RK4's error falls 16-fold per halving: the kept (finer) solve's error is about change / 15 or less,
    # which lets --ode-tol be 1e-3 while the reference stays accurate to 1e-4. A sharp Gaussian (a stiff
    # flow near t = 0) needs 128 steps here, so the doubling really runs.
    teacher = GaussianTeacher(sig=(0.05, 0.02))
    torch.manual_seed(0)
    z = torch.randn(300, 2)
    y, g = torch.zeros(300, dtype=torch.long), torch.ones(300)
    end, _, steps, change, _ = reference_ode(teacher, z, y, g, (0.0, 1.0), tol=1e-3, record=())
    error = (end.double() - teacher.double().flow(z.double(), torch.zeros(300, dtype=torch.float64))).norm(dim=1).max()
    assert steps >= 64 and change <= 1e-3 and error < change / 8 and error < 1e-4


def test_reference_ode_runs_in_float64_so_it_converges_below_float32_round_off():
    teacher = GaussianTeacher()
    z = torch.randn(300, 2)
    y, g = torch.zeros(300, dtype=torch.long), torch.ones(300)
    # in float32 the halving change stalls near 1e-6, so 1e-8 is reachable only in float64
    end, states, steps, change, _ = reference_ode(teacher, z, y, g, (0.0, 1.0), tol=1e-8)
    assert change <= 1e-8 and end.dtype == torch.float32 and teacher.mu.dtype == torch.float32
    exact = teacher.double().flow(z.double(), torch.zeros(300, dtype=torch.float64))
    assert (end.double() - exact).norm(dim=1).max() < 1e-6  # float32 rounding of the answer only


def test_metrics_of_the_exact_student_are_zero_and_of_a_wrong_one_are_not():
    teacher = GaussianTeacher()
    cfg = ff.Config(eval_samples=1000, ode_tol=1e-5).resolve(False)
    exact, _ = evaluate(ExactGaussianStudent(teacher), teacher, cfg, 0, "cpu")
    assert exact["endpoint_error"] < 1e-4
    assert max(exact["trajectory_error"].values()) < 1e-4
    # S_k equals T_k up to the ODE's error and each mean pairs S_k and T_k with the same T_k+1, so the
    # ratio is 1 without sampling noise; a pair that shared noise on both sides would give W2 near 0
    assert abs(exact["w2_ratio"] - 1) < 0.01
    assert len(exact["w2_pairs"]) == len(exact["w2_floor_pairs"]) == W2_PAIRS
    assert np.isclose(exact["w2"], np.mean(exact["w2_pairs"]))
    assert np.isclose(exact["w2_floor"], np.mean(exact["w2_floor_pairs"]))
    assert exact["student_nfe"] == 1 and exact["teacher_nfe"] == 4 * exact["reference_solver"]["steps"]
    wrong, _ = evaluate(ExactGaussianStudent(teacher, eps=0.5), teacher, cfg, 0, "cpu")  # F + 0.5 s z
    assert wrong["endpoint_error"] < 1e-4  # s = 0 is untouched by the perturbation ...
    assert wrong["trajectory_error"]["0.5"] > 0.1  # ... but the path is wrong
