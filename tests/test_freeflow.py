"""The method in freeflow.py, checked against closed forms: boundary, ∂_s F, predictor target, a short
distillation of an analytic teacher, the corrector's direction, CFG, the batch split and λ, checkpoints,
and the stop on a non-finite loss."""

import glob
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import ExactGaussianStudent, assert_close_at_scale, tiny_mlp

import freeflow as ff


def conds(n, num_classes=2, gamma=1.0, dtype=torch.float32):
    return torch.arange(n) % max(num_classes, 1), torch.full((n,), gamma, dtype=dtype)


# --- the student flow map -------------------------------------------------------------------------


def test_flow_map_at_s_equal_1_returns_z_exactly():
    student = tiny_mlp(inputs=("s", "gamma"))  # random s-embedding: F(z, 1) is far from 0
    z = torch.randn(64, 2)
    y, g = conds(64)
    assert ff.F_theta(student, z, torch.ones(64), y, g).abs().max() > 0.1
    assert torch.equal(ff.flow_map(student, z, torch.ones(64), y, g), z)


def test_student_built_from_teacher_is_the_teachers_euler_step():
    teacher = tiny_mlp()
    student = ff.make_student(teacher)
    z, s = torch.randn(32, 2), torch.rand(32)
    y, g = conds(32, gamma=3.0)
    euler = z + (s - 1)[:, None] * teacher(z, torch.ones(32), y)  # z + (s - 1) v(z, 1)
    torch.testing.assert_close(ff.flow_map(student, z, s, y, g), euler, rtol=0, atol=1e-6)


def test_jvp_of_F_in_s_equals_central_difference():
    student = tiny_mlp(inputs=("s", "gamma")).double()
    z, s = torch.randn(50, 2, dtype=torch.float64), torch.rand(50, dtype=torch.float64)
    y, g = conds(50, dtype=torch.float64)
    F_jvp, dF_jvp = ff.F_and_dF_ds(student, z, s, y, g, "jvp")
    F_fd, dF_fd = ff.F_and_dF_ds(student, z, s, y, g, "fd", fd_eps=1e-5)
    assert dF_jvp.abs().max() > 0.1  # a derivative worth comparing
    assert_close_at_scale(F_jvp, F_fd, 1e-14, "F from the JVP and from a plain forward")  # float64: a few ulps
    torch.testing.assert_close(dF_jvp, dF_fd, rtol=1e-5, atol=1e-6)  # FD truncation: O(h²)
    # z is held still: the JVP is not the total derivative along a moving z
    F_moving = lambda e: ff.F_theta(student, z + e * z, s + e, y, g)  # noqa: E731
    total = (F_moving(1e-5) - F_moving(-1e-5)) / 2e-5
    assert (total - dF_jvp).abs().max() > 1e-3


def test_the_one_sided_difference_reuses_F_and_converges_to_the_jvp_at_first_order(gaussian_teacher):
    student = ExactGaussianStudent(gaussian_teacher.double())  # smooth in s: |∂²F| of a few units on [0, 0.9]
    z, s = torch.randn(50, 2, dtype=torch.float64), 0.9 * torch.rand(50, dtype=torch.float64)
    y, g = conds(50, 0, dtype=torch.float64)
    _, dF = ff.F_and_dF_ds(student, z, s, y, g, "jvp")
    errors = [(ff.F_and_dF_ds(student, z, s, y, g, "fd-forward", fd_eps=h)[1] - dF).abs().max().item()
              for h in (1e-3, 1e-4)]
    assert errors[1] > 1e-6 and 8 < errors[0] / errors[1] < 12  # error ∝ h: a tenth of h, a tenth of the error
    # a given F(s) is used as it is, not recomputed: shifted by 1, the difference moves by -1 / h
    F = ff.F_theta(student, z, s, y, g)
    _, shifted = ff.F_and_dF_ds(student, z, s, y, g, "fd-forward", fd_eps=1e-3, F=F + 1)
    _, plain = ff.F_and_dF_ds(student, z, s, y, g, "fd-forward", fd_eps=1e-3, F=F)
    torch.testing.assert_close(shifted, plain - 1e3)


def test_conditions_draw_every_class_alike_and_gamma_uniform_over_its_range():
    torch.manual_seed(0)
    y, gamma = ff.sample_conditions(30_000, 3, (1.0, 3.0))
    assert torch.bincount(y, minlength=4).tolist()[3] == 0  # never ∅: the null class is not a label
    assert (torch.bincount(y).double() / 30_000 - 1 / 3).abs().max() < 0.01  # classes 0, 1, 2 alike
    assert 1 <= gamma.min() and gamma.max() <= 3 and abs(gamma.mean().item() - 2) < 0.02
    assert abs(gamma.var().item() - 4 / 12) < 0.01  # uniform on [1, 3]: variance (3 - 1)² / 12
    y0, g0 = ff.sample_conditions(5, 0, (2.0, 2.0))  # no classes: every label is ∅ (index 0), γ alone
    assert y0.tolist() == [0] * 5 and g0.tolist() == [2.0] * 5


# --- the teacher: CFG, guidance interval, ODE -----------------------------------------------------


class ConstantTeacher(nn.Module):
    """v(x, t, c) = c + 1 for a class, 10 for the null class; records the batch sizes it is called with."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return torch.where(y == self.num_classes, 10.0, y + 1.0)[:, None].expand_as(x).clone()


def test_cfg_combines_conditional_and_null_only_inside_the_interval():
    teacher = ConstantTeacher()
    x = torch.zeros(4, 2)
    t = torch.tensor([0.2, 0.5, 0.9, 0.2])
    y = torch.tensor([0, 1, 2, 1])
    gamma = torch.tensor([2.0, 3.0, 4.0, 1.0])
    v = ff.guided_velocity(teacher, x, t, y, gamma, interval=(0.0, 0.7))
    expected = torch.tensor([10 + 2.0 * (1 - 10),  # inside: v(∅) + γ (v(c) - v(∅))
                             10 + 3.0 * (2 - 10),
                             3.0,  # t = 0.9 is outside [0, 0.7]: conditional only
                             2.0])  # γ = 1: conditional only
    torch.testing.assert_close(v[:, 0], expected)
    assert teacher.calls == [4 + 2]  # one batched call; only the two guided rows ran twice


def test_cfg_skips_the_null_call_when_no_row_needs_it():
    teacher = ConstantTeacher()
    v = ff.guided_velocity(teacher, torch.zeros(3, 2), torch.full((3,), 0.9), torch.tensor([0, 1, 2]),
                           torch.full((3,), 5.0), interval=(0.0, 0.7))
    torch.testing.assert_close(v[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert teacher.calls == [3]


def test_teacher_ode_counts_two_calls_per_guided_evaluation():
    teacher = ConstantTeacher()
    y, g = torch.tensor([0, 1]), torch.full((2,), 2.0)
    # 10 Euler steps; the interval edge 0.5 is a grid point; 5 steps lie inside [0, 0.5]
    _, _, nfe = ff.teacher_ode(teacher, torch.zeros(2, 2), y, g, (0.0, 0.5), 10, solver="euler")
    assert nfe == 5 * 1 + 5 * 2
    _, _, nfe = ff.teacher_ode(teacher, torch.zeros(2, 2), y, g, (0.0, 0.5), 10, solver="rk4")
    assert nfe == 4 * (5 * 1 + 5 * 2)
    _, _, nfe = ff.teacher_ode(teacher, torch.zeros(2, 2), y, torch.ones(2), (0.0, 0.5), 10, solver="heun")
    assert nfe == 2 * 10  # γ = 1: never guided


def test_time_grid_puts_knots_on_the_grid_once():
    grid = ff.time_grid(4, knots=(0.7, 0.5, 0.0, 1.0))
    assert grid.tolist() == [1.0, 0.75, 0.7, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("solver,steps,tol", [("euler", 400, 1e-2), ("heun", 100, 2e-4), ("rk4", 50, 1e-6)])
def test_teacher_ode_reaches_the_closed_form_flow(gaussian_teacher, solver, steps, tol):
    teacher = gaussian_teacher.double()
    z = torch.randn(100, 2, dtype=torch.float64)
    y, g = conds(100, 0, dtype=torch.float64)
    end, states, _ = ff.teacher_ode(teacher, z, y, g, (0.0, 1.0), steps, solver, record=(0.5,))
    assert (end - teacher.flow(z, torch.zeros(100))).abs().max() < tol
    assert (states[0.5] - teacher.flow(z, torch.full((100,), 0.5))).abs().max() < tol


# --- predictor -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["jvp", "jvp-fp32", "fd", "fd-forward"])
def test_predictor_target_of_the_exact_flow_map_is_itself(gaussian_teacher, method):
    """The exact flow map is the predictor's fixed point: F_tgt = F*, so Δ_G = 0 (to the truncation error of a
    finite difference over h = 1e-6: O(h²) central, O(h) one-sided, times |∂²F| of a few units)."""
    teacher = gaussian_teacher.double()
    student = ExactGaussianStudent(teacher)
    z, s = torch.randn(200, 2, dtype=torch.float64), 0.95 * torch.rand(200, dtype=torch.float64)
    y, g = conds(200, 0, dtype=torch.float64)
    F_tgt = ff.predictor_target(teacher, z, s, y, g, (0.0, 1.0), *ff.F_and_dF_ds(student, z, s, y, g, method, fd_eps=1e-6))
    F_star = ff.F_theta(student, z, s, y, g)
    atol = {"jvp": 1e-12, "jvp-fp32": 1e-12, "fd": 1e-8, "fd-forward": 1e-5}[method]
    torch.testing.assert_close(F_tgt, F_star, rtol=0, atol=atol)


def test_predictor_target_of_a_wrong_student_matches_the_hand_formula(gaussian_teacher):
    teacher = gaussian_teacher.double()
    eps = 0.3
    student = ExactGaussianStudent(teacher, eps=eps)  # F = F* + eps s z
    z, s = torch.randn(100, 2, dtype=torch.float64), 0.9 * torch.rand(100, dtype=torch.float64)
    y, g = conds(100, 0, dtype=torch.float64)
    # by hand: ∂_s F = ∂_s F* + eps z, with ∂_s F* from reverse-mode autograd of the closed form
    s_req = s.clone().requires_grad_(True)
    F = student(z, None, y, s_req, g)
    dF_ds = torch.stack([torch.autograd.grad(F[:, i].sum(), s_req, retain_graph=True)[0] for i in range(2)], 1)
    x_s = z + (s - 1)[:, None] * F.detach()
    expected = teacher(x_s, s, y) + (1 - s)[:, None] * dF_ds
    got = ff.predictor_target(teacher, z, s, y, g, (0.0, 1.0), *ff.F_and_dF_ds(student, z, s, y, g, "jvp"))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert (got - ff.F_theta(student, z, s, y, g)).abs().max() > 0.01  # a wrong student has Δ_G ≠ 0


def test_the_method_functions_default_to_the_papers_values():
    """Called without a Config, as a reader of sections 4-6 would call them, the functions compute the paper's
    method (docs/method.md §4-6): the weight's power k = 1 with MeanFlow's ε = 1e-3, r ~ LogitNormal(0.8, 1) over
    all of (0, 1), α = 1, no predictor row pinned at s = 0; and the Config's defaults are the same where they are
    the paper's (the 75 / 25 split too)."""
    def defaults(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}
    assert defaults(ff.predictor_loss) == {"k": 1.0, "eps": 1e-3}
    assert defaults(ff.sample_r) == {"mean": 0.8, "std": 1.0, "r_range": (0.0, 1.0), "device": "cpu"}
    assert defaults(ff.balance) == {"alpha": 1.0, "eps": 1e-8}
    assert defaults(ff.sample_s) == {"zero_frac": 0.0, "device": "cpu"}
    cfg = ff.Config()
    assert (cfg.k, cfg.r_mean, cfg.r_std, cfg.r_range, cfg.alpha, cfg.predictor_frac, cfg.s_zero_frac) == \
        (1.0, 0.8, 1.0, (0.0, 1.0), 1.0, 0.75, 0.0)


def test_predictor_weight_is_the_power_law_of_the_error():
    F = torch.tensor([[1.0, 1.0], [0.0, 0.1]], requires_grad=True)
    F_tgt = torch.zeros(2, 2)
    loss, delta_G = ff.predictor_loss(F, F_tgt, k=1.0, eps=0.01)
    sq = torch.tensor([1.0, 0.005])  # |Δ_G|² / d
    torch.testing.assert_close(loss, sq / (sq + 0.01))
    torch.testing.assert_close(delta_G, F.detach())
    loss.sum().backward()  # w is under stop-gradient: d/dF (w |Δ|²/d) = w · 2 Δ / d
    torch.testing.assert_close(F.grad, (1 / (sq + 0.01))[:, None] * F.detach())


@pytest.mark.parametrize("eps", [1e-3, 1e-2, 1e-1])
def test_the_weighted_predictor_loss_pulls_like_the_log_of_the_error_plus_eps(eps):
    # with k = 1 and w under stop-gradient, w |Δ|²/d has the gradient of log(|Δ|²/d + ε): ε sets the scale of
    # error below which examples pull like a squared error and above which they pull less the larger they are
    torch.manual_seed(0)
    F, F_tgt = torch.randn(64, 3, requires_grad=True), torch.randn(64, 3)
    ff.predictor_loss(F, F_tgt, k=1.0, eps=eps)[0].sum().backward()
    G = F.detach().clone().requires_grad_(True)
    torch.log(ff.mean_sq(G - F_tgt) + eps).sum().backward()
    torch.testing.assert_close(F.grad, G.grad)


def test_a_short_distillation_puts_the_flow_map_on_the_analytic_gaussian_flow(gaussian_teacher, tmp_path):
    # the whole map, endpoint and trajectory: the predictor's work (it alone meets the same bound; what the
    # corrector does in training is the next test's, and its wiring is pinned in test_freeflow_step.py)
    torch.manual_seed(0)
    # a constant learning rate: the test is about the method; the toy's cosine decay halves the learning
    # done in 500 steps (the endpoint error is then 0.025)
    cfg = ff.Config(steps=500, batch_size=128, lr_schedule="constant", ckpt_every=10_000,
                    log_every=10_000).resolve(False)
    student, _ = ff.distill(gaussian_teacher, cfg, (2,), str(tmp_path), progress=False)
    z = torch.randn(2000, 2)
    y, g = conds(2000, 0)
    errors = {s: (ff.flow_map(student, z, torch.full((2000,), s), y, g)
                  - gaussian_teacher.flow(z, torch.full((2000,), s))).norm(dim=1).mean().item()
              for s in (0.0, 0.25, 0.5, 0.75)}
    assert max(errors.values()) < 0.02, errors  # endpoint (s = 0) and trajectory
    # the same bound is far from met by the untrained student (a random MLP)
    untrained = ff.make_student(gaussian_teacher)
    e0 = (ff.sample_one_step(untrained, z, y, g) - gaussian_teacher.flow(z, torch.zeros(2000))).norm(dim=1)
    assert e0.mean() > 0.3


def test_the_corrector_alone_moves_a_random_student_onto_the_gaussian_teachers_distribution(gaussian_teacher, tmp_path):
    # the student (and g_ψ) start as random MLPs, far from the teacher's N(μ, σ²). The corrector alone (no predictor)
    # must give the one-step samples the teacher's mean and spread; pushed the wrong way (Δ_N's sign flipped) the
    # same run leaves the plane (its samples reach 1e9).
    torch.manual_seed(0)
    cfg = ff.Config(steps=300, batch_size=64, loss="corrector", psi_steps=2, lr_schedule="constant", ckpt_every=10_000,
                    log_every=10_000).resolve(False)
    z, y, g = torch.randn(4000, 2), *conds(4000, 0)
    start = ff.sample_one_step(ff.make_student(gaussian_teacher), z, y, g)
    assert (start.std(0) - gaussian_teacher.sig).abs().max() > 0.3  # the start is far off
    student, _ = ff.distill(gaussian_teacher, cfg, (2,), str(tmp_path), progress=False)
    x = ff.sample_one_step(student, z, y, g)
    assert (x.mean(0) - gaussian_teacher.mu).abs().max() < 0.1  # seeds 0 to 3: at most 0.015
    assert (x.std(0) - gaussian_teacher.sig).abs().max() < 0.1  # seeds 0 to 3: at most 0.043 (the start: 0.5 and more)


# --- corrector -------------------------------------------------------------------------------------


class PointMassTeacher(nn.Module):
    """Data: a point mass at 0. Then x_t = t n and v(x, t) = E[n - 0 | x_t = x] = x / t."""

    num_classes = 0

    def forward(self, x, t, y):
        return x / t[:, None]


class PointMassStudent(nn.Module):
    """F(z, s) = z - a: every one-step sample x̂ = z - F(z, 0) is the point a."""

    num_classes = 0

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x, t, y, s, gamma):
        return x - self.a


class ExactNoisingVelocity(nn.Module):
    """g(x, r) for a point mass at a: x_r = (1 - r) a + r n, so E[n - a | x_r = x] = (x - a) / r."""

    num_classes = 0

    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", a.detach().clone())

    def forward(self, x, t, y, gamma):
        return (x - self.a) / t[:, None]


def test_corrector_moves_a_point_mass_student_toward_the_point_mass_teacher():
    a0 = [0.8, -0.6]
    student = PointMassStudent(a0)
    teacher, g_psi = PointMassTeacher(), ExactNoisingVelocity(student.a)
    B = 4096
    z = torch.randn(B, 2, dtype=torch.float64)
    y, g = conds(B, 0, dtype=torch.float64)
    F0 = ff.F_theta(student, z, torch.zeros(B, dtype=torch.float64), y, g)
    x_hat = z - F0
    torch.testing.assert_close(x_hat, student.a.detach().expand(B, 2))
    r = ff.sample_r(B).double()
    delta_N, _ = ff.corrector_direction(g_psi, teacher, x_hat, y, g, (0.0, 0.7), r, torch.randn_like(x_hat))
    # Δ_N = g_ψ - u = (x_r - a) / r - x_r / r = -a / r, exactly
    torch.testing.assert_close(delta_N, -student.a.detach() / r[:, None])
    ff.corrector_loss(F0, delta_N, lam=1.0).mean().backward()
    # the gradient on a is -mean(Δ_N) / d = a · mean(1/r) / 2: a descent step shrinks a along itself
    grad = student.a.grad
    cos = torch.dot(grad, student.a.detach()) / (grad.norm() * student.a.detach().norm())
    assert cos > 1 - 1e-12
    with torch.no_grad():
        a1 = student.a - 0.1 * grad
    assert a1.norm() < student.a.norm()


def test_kl_weight_scales_each_example_by_one_minus_r_squared_over_r():
    F0, delta_N, r = torch.ones(3, 2), torch.ones(3, 2), torch.tensor([0.2, 0.5, 0.8])
    plain = ff.corrector_loss(F0, delta_N, 2.0)
    torch.testing.assert_close(ff.corrector_loss(F0, delta_N, 2.0, r), plain * (1 - r) ** 2 / r)


def test_noise_level_r_is_logit_normal_with_its_mode_near_0_8():
    torch.manual_seed(0)
    r = ff.sample_r(400_000, 0.8, 1.0)
    assert 0 < r.min() and r.max() < 1
    assert abs(torch.logit(r.double()).mean().item() - 0.8) < 0.01
    hist = torch.histc(r, bins=50, min=0, max=1)
    mode = (hist.argmax().item() + 0.5) / 50
    assert abs(mode - 0.8) <= 0.04, mode


@pytest.mark.parametrize("std", [1.0, 2.0])
def test_a_truncated_r_range_draws_the_logit_normal_conditioned_on_that_range(std):
    torch.manual_seed(0)
    full = ff.sample_r(400_000, 0.8, std)
    r = ff.sample_r(400_000, 0.8, std, (0.0, 0.6))
    assert r.dtype == torch.float32 and 0 < r.min() and r.max() <= 0.6
    # the conditional CDF of the untruncated draws on [0, 0.6] is the truncated one's CDF
    kept = full[full <= 0.6]
    for q in (0.1, 0.3, 0.5):
        assert abs((r <= q).double().mean() - (kept <= q).double().mean()) < 0.005, q
    low = ff.sample_r(100_000, 0.8, 1.0, (0.3, 0.9))
    assert 0.3 <= low.min() and low.max() <= 0.9
    torch.manual_seed(1)
    a = ff.sample_r(10, 0.8, std, (0.0, 1.0))
    torch.manual_seed(1)
    # the full range draws as it always did: sigmoid(mean + std · N(0, 1)) from the stream, so runs reproduce
    torch.testing.assert_close(a, torch.sigmoid(0.8 + std * torch.randn(10)), rtol=0, atol=0)


# --- one training step: split, balance, joint update -----------------------------------------------


class RecordingTeacher(nn.Module):
    """A tiny MLP teacher that records how many rows each call carries."""

    def __init__(self):
        super().__init__()
        self.net = tiny_mlp(num_classes=2)
        self.num_classes = 2
        self.rows = []

    def forward(self, x, t, y):
        self.rows.append(len(x))
        return self.net(x, t, y)

    def extended(self, names):
        return self.net.extended(names)


def test_train_step_splits_75_25_and_balances_lambda():
    torch.manual_seed(0)
    teacher = RecordingTeacher().requires_grad_(False)
    student, g_psi = ff.make_student(teacher), ff.make_aux(teacher)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (student, g_psi)]
    cfg = ff.Config(batch_size=16, alpha=0.7).resolve(True)
    stats = ff.train_step(student, g_psi, teacher, *opts, cfg, (2,))
    assert stats["delta_N"] == 0  # g_ψ starts as the teacher: Δ_N = 0 until g_ψ has learned something
    stats = ff.train_step(student, g_psi, teacher, *opts, cfg, (2,))
    assert stats["delta_N"] > 0
    assert (stats["n_predictor"], stats["n_corrector"]) == (12, 4)
    assert teacher.rows == [12, 4] * 2  # γ = 1: the predictor's rows, then the corrector's
    assert math.isclose(stats["lambda"], 0.7 * stats["delta_G"] / stats["delta_N"], rel_tol=1e-5)
    assert ff.split_batch(1024, 0.75) == 768
    assert ff.split_batch(2, 0.75) == 1 and ff.split_batch(7, 0.75, "predictor") == 7
    assert ff.split_batch(8, 0.0) == 1 and ff.split_batch(8, 1.0) == 7  # both losses keep a row each
    assert ff.split_batch(7, 0.75, "corrector") == 0


def test_train_step_moves_both_networks_and_never_the_teacher():
    torch.manual_seed(0)
    teacher = tiny_mlp().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, g_psi = ff.make_student(teacher), ff.make_aux(teacher)
    s0, g0 = [p.clone() for p in student.parameters()], [p.clone() for p in g_psi.parameters()]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (student, g_psi)]
    ff.train_step(student, g_psi, teacher, *opts, ff.Config(batch_size=32).resolve(True), (2,))
    assert any(not torch.equal(a, b) for a, b in zip(s0, student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(g0, g_psi.parameters()))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_psi_steps_give_g_psi_extra_updates_on_fresh_samples_and_leave_the_student_alone():
    torch.manual_seed(0)
    teacher = tiny_mlp().requires_grad_(False)
    student, g_psi = ff.make_student(teacher), ff.make_aux(teacher)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (student, g_psi)]
    adam_steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    cfg = ff.Config(batch_size=32, psi_steps=3).resolve(True)
    ff.train_step(student, g_psi, teacher, *opts, cfg, (2,))
    assert (adam_steps(opts[0]), adam_steps(opts[1])) == (1, 4)  # θ once, ψ once plus 3 extra updates
    # an extra update moves ψ only, and trains g_ψ toward the student's own one-step samples
    theta = [p.clone() for p in student.parameters()]
    z = torch.randn(256, 2)
    y, gamma = ff.sample_conditions(256, teacher.num_classes, cfg.cfg_range)
    x_hat = ff.sample_one_step(student, z, y, gamma)
    r, n = ff.sample_r(256), torch.randn(256, 2)
    fm = lambda: ff.flow_matching_loss(g_psi, x_hat, y, r, n, gamma=gamma)[0].mean().item()  # noqa: E731
    before = fm()
    for _ in range(20):
        ff.update_psi(student, g_psi, opts[1], cfg, (2,), 32, "cpu")
    assert fm() < before and all(torch.equal(a, b) for a, b in zip(theta, student.parameters()))
    # with the predictor alone there is no corrector, so g_ψ is never trained
    g0 = [p.clone() for p in g_psi.parameters()]
    ff.train_step(student, g_psi, teacher, *opts, ff.Config(batch_size=32, psi_steps=3, loss="predictor").resolve(True),
                  (2,))
    assert all(torch.equal(a, b) for a, b in zip(g0, g_psi.parameters()))
    with pytest.raises(ff.FreeFlowError, match="--psi-steps must be an integer >= 0"):
        ff.Config(psi_steps=-1).check()
    # the default: 4 extra updates when the corrector trains alone, none otherwise; a given value is kept
    psi = lambda *argv: ff.parse_config(["--toy", "moons", *argv]).check().resolve(True).psi_steps  # noqa: E731
    assert (psi("--loss", "corrector"), psi(), psi("--loss", "predictor")) == (4, 0, 0)
    assert (psi("--loss", "corrector", "--psi-steps", "0"), psi("--psi-steps", "2")) == (0, 2)


def test_corrector_cfg_trains_the_corrector_rows_and_g_psi_at_one_scale_and_leaves_the_predictors(monkeypatch):
    def run(**kw):  # three steps from the same start and seed; the networks' weights after them
        torch.manual_seed(0)
        teacher = tiny_mlp(num_classes=2).requires_grad_(False)
        student, g_psi = ff.make_student(teacher), ff.make_aux(teacher)
        opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (student, g_psi)]
        cfg = ff.Config(batch_size=16, psi_steps=2, **kw).check().resolve(True)
        for _ in range(3):
            ff.train_step(student, g_psi, teacher, *opts, cfg, (2,))
        return [p.detach().clone() for m in (student, g_psi) for p in m.parameters()]

    # the corrector alone at γ = 1 from a γ range is the run trained at γ = 1: the draw of the stream is unchanged
    one = run(loss="corrector", cfg_range=(1.0, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(one, run(loss="corrector", cfg_range=(1.0, 3.0), corrector_cfg=1.0)))
    assert not all(torch.equal(a, b) for a, b in zip(one, run(loss="corrector", cfg_range=(1.0, 3.0))))
    # with both losses the predictor's rows keep their drawn γ, the corrector's (and g_ψ's extra updates) get 1
    seen = {}
    for name, key, at in (("predictor_target", "predictor", 4), ("corrector_direction", "corrector", 4)):
        original = getattr(ff, name)
        monkeypatch.setattr(ff, name, lambda *a, _o=original, _k=key, _i=at, **k: (
            seen.setdefault(_k, []).append(a[_i].clone()), _o(*a, **k))[1])
    original_fm = ff.flow_matching_loss
    monkeypatch.setattr(ff, "flow_matching_loss", lambda *a, **k: (
        seen.setdefault("g_psi", []).append(k["gamma"].clone()), original_fm(*a, **k))[1])
    run(cfg_range=(1.0, 3.0), corrector_cfg=1.0)
    predictor = torch.cat(seen["predictor"])
    assert predictor.min() >= 1 and predictor.max() <= 3 and predictor.std() > 0.3
    assert len(seen["g_psi"]) == 9  # 3 steps, each one corrector call and 2 extra updates of g_ψ
    assert all(torch.all(g == 1) for g in seen["corrector"] + seen["g_psi"])
    for bad in (-1.0, float("nan")):
        with pytest.raises(ff.FreeFlowError, match="--corrector-cfg must be a guidance scale >= 0"):
            ff.Config(corrector_cfg=bad).check()
    with pytest.raises(ff.FreeFlowError, match="--corrector-cfg needs class labels"):
        ff.Config(corrector_cfg=1.0).resolve(False)


def test_psi_lr_sets_the_learning_rate_of_g_psi_alone(tmp_path):
    torch.manual_seed(0)
    lrs = {}
    for name, psi_lr in (("default", None), ("given", 1e-2)):
        cfg = ff.Config(steps=2, batch_size=16, lr=1e-3, psi_lr=psi_lr, lr_schedule="constant", toy="moons")
        (tmp_path / name).mkdir()
        ff.distill(tiny_mlp(), cfg.check().resolve(True), (2,), str(tmp_path / name), progress=False)
        ckpt = ff.load_checkpoint(str(tmp_path / name / "ckpt.pt"))
        lrs[name] = [ckpt[k]["param_groups"][0]["lr"] for k in ("opt_theta", "opt_psi")]
    assert lrs == {"default": [1e-3, 1e-3], "given": [1e-3, 1e-2]}
    for bad in (0.0, -1e-3, 2.0, float("nan")):
        with pytest.raises(ff.FreeFlowError, match=r"--psi-lr must be a number in \(0, 1\]"):
            ff.Config(psi_lr=bad).check()


def test_a_guided_2d_toy_defaults_to_the_lower_learning_rate_unless_one_is_given():
    lr = lambda *argv: ff.parse_config(["--toy", "moons", *argv]).lr  # noqa: E731
    assert lr() == ff.Config().lr == 1.5e-3 and lr("--cfg", "1") == 1.5e-3  # γ = 1 is no guidance
    assert lr("--cfg", "3") == lr("--cfg-range", "1", "3") == ff.GUIDED_TOY_DEFAULTS["lr"] == 1e-3
    assert lr("--cfg", "3", "--lr", "2e-3") == 2e-3
    assert ff.parse_config(["--toy", "digits"]).lr == ff.DIGITS_DEFAULTS["lr"]  # digits keep their own


def test_the_2d_toys_default_to_a_larger_weight_eps_than_imagenet_and_digits():
    eps = lambda *argv: ff.parse_config(list(argv)).weight_eps  # noqa: E731
    assert eps("--toy", "moons") == eps("--toy", "moons", "--cfg", "3") == ff.Config().weight_eps == 1e-2
    assert eps("--teacher", "x.pt") == eps("--toy", "digits") == 1e-3
    assert eps("--teacher", "x.pt", "--weight-eps", "0.05") == 0.05  # a given value wins


# --- the training loop: checkpoints and a non-finite loss -----------------------------------------


def test_checkpoint_round_trip_restores_student_and_config(tmp_path):
    torch.manual_seed(0)
    teacher = tiny_mlp()
    cfg = ff.Config(steps=3, batch_size=16, ckpt_every=2, toy="moons").resolve(True)
    ema, _ = ff.distill(teacher, cfg, (2,), str(tmp_path), progress=False)
    ckpt = ff.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 3
    assert ff.Config(**ckpt["config"]).resolve(True) == cfg
    restored = ff.make_student(teacher)
    restored.load_state_dict(ckpt["ema"])
    z = torch.randn(20, 2)
    y, g = conds(20)
    assert torch.equal(ff.sample_one_step(restored, z, y, g), ff.sample_one_step(ema, z, y, g))
    assert not glob.glob(str(tmp_path / "*.tmp*"))


def test_load_checkpoint_refuses_a_file_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ff.FreeFlowError, match="not a FreeFlow checkpoint"):
        ff.load_checkpoint(str(bad))
    with pytest.raises(ff.FreeFlowError, match="no checkpoint"):
        ff.load_checkpoint(str(tmp_path / "missing.pt"))


class BreaksAfter(nn.Module):
    """A teacher that answers NaN from its n-th call on."""

    def __init__(self, net, n):
        super().__init__()
        self.net, self.n, self.num_classes, self.calls = net, n, net.num_classes, 0

    def forward(self, x, t, y):
        self.calls += 1
        out = self.net(x, t, y)
        return out * float("nan") if self.calls >= self.n else out

    def extended(self, names):
        return self.net.extended(names)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher = BreaksAfter(tiny_mlp(), n=2 * 7 + 1)  # two teacher calls a step: step 8 sees NaN
    cfg = ff.Config(steps=20, batch_size=16, ckpt_every=3).resolve(True)
    with pytest.raises(ff.Diverged, match=r"non-finite at step 8 .*last good checkpoint \(step 6\)"):
        ff.distill(teacher, cfg, (2,), str(tmp_path), progress=False)
    ckpt = ff.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.jsonl"]  # no temporary file left


def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(tmp_path, monkeypatch):
    cfg = lambda **kw: ff.Config(**{"steps": 10, "batch_size": 16, "ckpt_every": 4, **kw}).resolve(True)  # noqa: E731
    torch.manual_seed(0)
    ff.distill(tiny_mlp(), cfg(steps=4), (2,), str(tmp_path), progress=False)
    real_step = ff.train_step

    def nan_at_first_step(*args):  # the first step after the resume (step 5) ends with a non-finite loss
        return {**real_step(*args), "loss": float("nan")}
    monkeypatch.setattr(ff, "train_step", nan_at_first_step)
    with pytest.raises(ff.Diverged, match=r"non-finite at step 5 .*last good checkpoint \(step 4\)"):
        ff.distill(tiny_mlp(), cfg(resume=True), (2,), str(tmp_path), progress=False)


ONE_PROCESS_DIVERGES = """
import sys, torch, freeflow as ff
from toy.net import MLPVelocity
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
def step(*args):  # train_step's signature; only process 1's loss turns NaN, at step 2
    step.n += 1
    return {"loss": float("nan") if rank == 1 and step.n == 2 else 1.0}
step.n = 0
torch.manual_seed(0)
try:
    ff.distill(MLPVelocity(2, 8, 1, 2), ff.Config(steps=4, batch_size=8).resolve(True), (2,), sys.argv[1],
               progress=False, step_fn=step)
except ff.Diverged as e:
    print(f"process {rank}: {e}", file=sys.stderr)
"""


def test_when_one_process_diverges_under_torchrun_every_process_stops(tmp_path):
    """Alone, process 0 would train on and then wait forever for process 1 at the next collective."""
    (tmp_path / "run.py").write_text(ONE_PROCESS_DIVERGES)
    (tmp_path / "o").mkdir()
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.abspath(ff.__file__)), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(tmp_path / "run.py"), str(tmp_path / "o")], capture_output=True, text=True,
                            timeout=120, env=env)
    for rank in (0, 1):
        assert f"process {rank}: training became non-finite at step 2" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_distill_itself_refuses_to_resume_with_other_settings(tmp_path):
    """The commands check before any work; distill() called from Python checks too, before loading anything."""
    cfg = lambda **kw: ff.Config(**{"steps": 4, "batch_size": 16, **kw}).resolve(True)  # noqa: E731
    torch.manual_seed(0)
    ff.distill(tiny_mlp(), cfg(steps=2), (2,), str(tmp_path), progress=False)
    with pytest.raises(ff.FreeFlowError, match=r"written with --lr 0.0015, this run has 0.002"):
        ff.distill(tiny_mlp(), cfg(resume=True, lr=2e-3), (2,), str(tmp_path), progress=False)


def test_resume_sets_the_gpus_random_state_only_from_a_checkpoint_with_one_on_a_machine_with_one(tmp_path,
                                                                                                monkeypatch):
    """A checkpoint written on a CPU resumes on a GPU and the other way round (faked here: torch.cuda's two calls)."""
    cfg = lambda **kw: ff.Config(**{"steps": 4, "batch_size": 16, **kw}).resolve(True)  # noqa: E731
    torch.manual_seed(0)
    ff.distill(tiny_mlp(), cfg(steps=2), (2,), str(tmp_path), progress=False)  # written here: no "cuda" state
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)

    def resume(gpu_here):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu_here)
        teacher = tiny_mlp()
        nets = (ff.make_student(teacher), ff.make_student(teacher), ff.make_aux(teacher))
        opts = (torch.optim.Adam(nets[0].parameters()), torch.optim.Adam(nets[2].parameters()))
        return ff.resume_from(str(tmp_path / "ckpt.pt"), cfg(resume=True), nets, opts, [])
    assert resume(False) == 2 and resume(True) == 2 and restored == []
    ckpt = ff.load_checkpoint(str(tmp_path / "ckpt.pt"))
    ckpt["rng"]["cuda"] = [torch.arange(16, dtype=torch.uint8)]  # as if written on one GPU
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert resume(False) == 2 and restored == []
    assert resume(True) == 2 and len(restored) == 1 and torch.equal(restored[0][0], torch.arange(16, dtype=torch.uint8))


@pytest.mark.parametrize("resume", [False, True])
def test_images_per_second_counts_the_steps_since_the_last_log_over_their_time(tmp_path, monkeypatch, resume):
    """A clock that moves one second a step, and three more during each call of the callback (previews, scores):
    every logged images_per_s is then the batch size exactly, the first interval of a run (and of a resumed run)
    included, and the callback's time is not counted against it."""
    cfg = lambda **kw: ff.Config(**{"steps": 6, "batch_size": 16, "ckpt_every": 2, "log_every": 2,  # noqa: E731
                                    **kw}).resolve(True)
    if resume:
        torch.manual_seed(0)
        ff.distill(tiny_mlp(), cfg(steps=3), (2,), str(tmp_path), progress=False)  # a checkpoint at step 3
    steps, real_step = [0], ff.train_step

    def counted(*args):
        steps[0] += 1
        return real_step(*args)
    monkeypatch.setattr(ff, "train_step", counted)
    watching = [0.0]

    def callback(step, ema, stats):
        watching[0] += 3.0
    monkeypatch.setattr(ff.time, "perf_counter", lambda: steps[0] + watching[0])
    torch.manual_seed(0)
    _, history = ff.distill(tiny_mlp(), cfg(resume=resume), (2,), str(tmp_path), progress=False, callback=callback)
    logged = [h["images_per_s"] for h in history if "images_per_s" in h]
    assert len(logged) == (2 if resume else 3) and all(v == 16 for v in logged), logged


def test_the_log_has_a_line_every_log_every_steps_and_at_the_last_with_the_peak_memory(tmp_path):
    import resource
    ff.distill(tiny_mlp(), ff.Config(steps=5, batch_size=16, log_every=2).resolve(True), (2,), str(tmp_path),
               progress=False)
    with open(tmp_path / "log.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [2, 4, 5]
    # on a CPU the process's peak resident set in GiB: more than the 0.05 GiB that importing torch takes, and at
    # most the peak read after the run (Linux gives it in KiB)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert all(0.05 < line["memory_gib"] <= peak for line in lines)


def test_the_progress_bar_shows_only_when_asked_and_on_process_0_alone(tmp_path, capfd):
    for progress in (False, True):
        (tmp_path / str(progress)).mkdir()
        ff.distill(tiny_mlp(), ff.Config(steps=2, batch_size=16).resolve(True), (2,), str(tmp_path / str(progress)),
                   progress=progress)
        assert ("distil" in capfd.readouterr().err) is progress
    shown = {(p, r): not ff.progress_bar(range(1), "x", p, r).disable for p in (False, True) for r in (0, 1, 2)}
    assert shown == {(p, r): p and r == 0 for p in (False, True) for r in (0, 1, 2)}


def test_a_resumed_runs_progress_bar_starts_at_its_checkpoints_step(tmp_path, monkeypatch):
    cfg = lambda **kw: ff.Config(**{"steps": 6, "batch_size": 16, "ckpt_every": 4, **kw}).resolve(True)  # noqa: E731
    ff.distill(tiny_mlp(), cfg(steps=4), (2,), str(tmp_path), progress=False)
    bars, real_bar = [], ff.progress_bar
    monkeypatch.setattr(ff, "progress_bar", lambda *a, **kw: bars.append(real_bar(*a, **kw)) or bars[-1])
    ff.distill(tiny_mlp(), cfg(resume=True), (2,), str(tmp_path), progress=False)
    assert (bars[0].n, bars[0].total) == (4, 6)  # a disabled bar keeps the count it started from


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "x.pt")
    ff.atomic_save({"a": torch.ones(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        ff.atomic_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(1))
    assert os.listdir(tmp_path) == ["x.pt"]


def test_non_finite_weights_are_caught_before_they_reach_a_checkpoint(tmp_path, monkeypatch):
    real_step, calls = ff.train_step, []

    def poisoning_step(student, *args):
        stats = real_step(student, *args)
        calls.append(1)
        if len(calls) == 6:  # the losses of step 6 are finite, but its update leaves a NaN weight
            with torch.no_grad():
                next(student.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(ff, "train_step", poisoning_step)
    cfg = ff.Config(steps=10, batch_size=16, ckpt_every=3).resolve(True)
    with pytest.raises(ff.Diverged, match=r"non-finite at step 6 .*last good checkpoint \(step 3\)"):
        ff.distill(tiny_mlp(), cfg, (2,), str(tmp_path), progress=False)
    assert ff.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 3


def test_best_of_n_keeps_the_verifiers_choice_and_counts_every_call():
    """best_of_n: the chosen noise is the argmax of the verifier over each row's own candidates, the sample is
    the sampler run on exactly that noise, and the calls are n previews plus the sampler's."""
    n, shape, y = 5, (3,), torch.tensor([0, 1, 2, 1])
    screen = lambda z, y_: (2 * z + y_[:, None], 3)  # noqa: E731 - a preview that depends on the label
    verifier = lambda x, y_: -(x - y_[:, None]).pow(2).sum(1)  # noqa: E731 - prefers 2 z close to 0
    sampler = lambda z, y_: (z * 10 + y_[:, None], 7)  # noqa: E731
    x, z_best, nfe = ff.best_of_n(screen, verifier, sampler, y, n, shape, torch.Generator().manual_seed(0))
    candidates = torch.randn((4, n, *shape), generator=torch.Generator().manual_seed(0))
    expected = candidates[torch.arange(4), candidates.norm(dim=2).argmin(1)]
    assert torch.equal(z_best, expected) and nfe == n * 3 + 7
    assert torch.equal(x, sampler(expected, y)[0])
    # N = 1 is no search: the sampler runs on the one noise drawn
    x1, z1, nfe1 = ff.best_of_n(screen, verifier, sampler, y, 1, shape, torch.Generator().manual_seed(0))
    assert torch.equal(z1, torch.randn((4, *shape), generator=torch.Generator().manual_seed(0))) and nfe1 == 3 + 7


def folder_sha1(folder):
    import hashlib
    return {os.path.relpath(os.path.join(root, f), folder): hashlib.sha1(open(os.path.join(root, f), "rb").read()).hexdigest()
            for root, _, files in os.walk(folder) for f in files}


def test_a_new_run_replaces_an_earlier_run_only_once_it_has_a_checkpoint(tmp_path):
    cfg = ff.Config(toy="moons", steps=4, batch_size=16, ckpt_every=2).resolve(True)
    torch.manual_seed(0)
    ff.distill(tiny_mlp(), cfg, (2,), str(tmp_path), progress=False)
    (tmp_path / "metrics.json").write_text('{"earlier": true}')  # what a toy run writes after training
    (tmp_path / "preview").mkdir()
    (tmp_path / "preview" / "step_0000002.png").write_bytes(b"an earlier preview")
    (tmp_path / "teacher.pt").write_bytes(b"a cache, not the run's")
    earlier = folder_sha1(tmp_path)

    def stop_at_step_1(step, ema, stats):
        raise KeyboardInterrupt

    # stopped before its first checkpoint, by a non-finite loss or by Ctrl-C: the earlier run is there as it was
    with pytest.raises(ff.Diverged, match="non-finite at step 1"):
        ff.distill(BreaksAfter(tiny_mlp(seed=3), n=1), cfg, (2,), str(tmp_path), progress=False)
    assert folder_sha1(tmp_path) == earlier
    with pytest.raises(KeyboardInterrupt):
        ff.distill(tiny_mlp(seed=3), cfg, (2,), str(tmp_path), progress=False, callback=stop_at_step_1)
    assert folder_sha1(tmp_path) == earlier
    # killed outright before its first checkpoint (the set-aside files left behind): the next new run puts them
    # back first, and a run that fails leaves the earlier run again
    aside = ff.set_aside(str(tmp_path))
    assert sorted(os.listdir(aside)) == ["ckpt.pt", "log.jsonl", "metrics.json", "preview"]
    with pytest.raises(ff.Diverged):
        ff.distill(BreaksAfter(tiny_mlp(seed=3), n=1), cfg, (2,), str(tmp_path), progress=False)
    assert folder_sha1(tmp_path) == earlier
    # a new run that reaches its first checkpoint replaces the earlier run's files as a whole
    ff.distill(tiny_mlp(seed=3), cfg, (2,), str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.jsonl", "teacher.pt"]
    assert (tmp_path / "teacher.pt").read_bytes() == b"a cache, not the run's"
