"""The wiring of freeflow.py's training step, pinned by hand: an affine student, g_ψ and teacher whose every
derivative is known in closed form, a scripted batch (z, c, γ, s, r, n), and the update that train_step (and the
data-based baseline's step, toy/mismatch.py) must make, computed here without the code under test: the predictor's
rows and target, the corrector's rows, direction, balance λ and guidance interval, --kl-weight, --s-zero-frac,
--psi-steps, --corrector-cfg, --loss, the split, the gradient clip. Then the edges a step meets: the guidance
interval's two ends in every sampler, the EMA, the cosine schedule, the warm-up, and their restore on --resume."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import assert_close_at_scale, tiny_mlp

import freeflow as ff
from toy import mismatch

D = 2  # every state is a point in the plane
REL = 1e-12  # float64 throughout: the code and the hand computation agree to rounding


class Affine(nn.Module):
    """net(x, t, y, **inputs) = x W + t a + E[y] + Σ_k input_k u_k: affine in x, t and every extra input, so
    ∂F/∂s = u_s, ∂F/∂t = a and ∇_x F · v = v W exactly. Every weight random (a zero would hide a wrong formula);
    extended(names) copies W, a, E and gives the new inputs their own random u."""

    def __init__(self, num_classes=2, inputs=(), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        rand = lambda *shape: nn.Parameter(0.5 * torch.randn(*shape, generator=g, dtype=torch.float64))  # noqa: E731
        self.num_classes = num_classes
        self.W, self.a, self.E = rand(D, D), rand(D), rand(num_classes + 1, D)
        self.u = nn.ParameterDict({name: rand(D) for name in inputs})

    def forward(self, x, t, y, **inputs):
        assert set(inputs) == set(self.u), (sorted(inputs), sorted(self.u))
        out = x @ self.W + t.to(x.dtype)[:, None] * self.a + self.E[y]
        for name, value in inputs.items():
            out = out + value.to(x.dtype)[:, None] * self.u[name]
        return out

    def extended(self, names):
        new = Affine(self.num_classes, (*self.u, *names), seed=len(names) + 10)
        with torch.no_grad():
            for name in ("W", "a", "E"):
                getattr(new, name).copy_(getattr(self, name))
            for name, u in self.u.items():
                new.u[name].copy_(u)
        return new


# --- the hand computation -------------------------------------------------------------------------


def guided_by_hand(teacher, x, t, y, gamma, interval):
    """v_γ row by row: v(∅) + γ (v(c) - v(∅)) where lo <= t <= hi (both ends in), γ ≠ 1 and c is a class."""
    lo, hi = interval
    null = torch.full_like(y, teacher.num_classes)
    v_c, v_u = teacher(x, t, y), teacher(x, t, null)
    rows = [v_u[i] + gamma[i] * (v_c[i] - v_u[i])
            if lo <= float(t[i]) <= hi and float(gamma[i]) != 1 and int(y[i]) != teacher.num_classes else v_c[i]
            for i in range(len(x))]
    return torch.stack(rows)


def F_of(student, z, s, y, gamma):
    """The student at t = 1, as FreeFlow calls it."""
    return student(z, torch.ones_like(s), y, s=s, gamma=gamma)


def step_by_hand(student, g_psi, teacher, cfg, d):
    """The gradients (on θ, on ψ) and the numbers of one FreeFlow step on the scripted draws d, written from the
    method's equations alone: λ, mean|Δ_G|, mean|Δ_N|."""
    B = len(d["z"])
    n_P = {"predictor": B, "corrector": 0}.get(cfg.loss, min(B - 1, max(1, round(cfg.predictor_frac * B))))
    z, y, gamma = d["z"], d["y"], d["gamma"].clone()
    if cfg.corrector_cfg is not None:
        gamma[n_P:] = cfg.corrector_cfg
    theta, psi = list(student.parameters()), list(g_psi.parameters())
    loss_theta, out = 0.0, {}
    dG = None
    if n_P > 0:
        zP, yP, gP, s = z[:n_P], y[:n_P], gamma[:n_P], d["s"]
        F = F_of(student, zP, s, yP, gP)
        x_s = zP + (s - 1)[:, None] * F.detach()  # f_θ(z, s)
        F_tgt = guided_by_hand(teacher, x_s, s, yP, gP, cfg.guidance_interval) + (1 - s)[:, None] * student.u["s"].detach()
        dG = F - F_tgt
        sq = dG.pow(2).mean(1)
        loss_theta = loss_theta + (sq / (sq.detach() + cfg.weight_eps) ** cfg.k).mean()
        out["delta_G"] = dG.detach().norm(dim=1).mean().item()
    loss_psi = 0.0
    if n_P < B:
        zC, yC, gC, r, n = z[n_P:], y[n_P:], gamma[n_P:], d["r"], d["n"]
        F0 = F_of(student, zC, torch.zeros(B - n_P, dtype=z.dtype), yC, gC)
        x_hat = zC - F0.detach()
        x_r = (1 - r)[:, None] * x_hat + r[:, None] * n
        g = g_psi(x_r, r, yC, gamma=gC)
        loss_psi = (g - (n - x_hat)).pow(2).mean(1).mean()
        dN = g.detach() - guided_by_hand(teacher, x_r, r, yC, gC, cfg.corrector_interval)
        lam = cfg.alpha if dG is None else cfg.alpha * out["delta_G"] / (dN.norm(dim=1).mean().item() + 1e-8)
        per_row = lam * (F0 * dN).mean(1) * ((1 - r) ** 2 / r if cfg.kl_weight else 1)
        loss_theta = loss_theta + per_row.mean()
        out |= {"delta_N": dN.norm(dim=1).mean().item(), "lambda": lam}
    grad_theta = torch.autograd.grad(loss_theta, theta, allow_unused=True)
    grad_psi = torch.autograd.grad(loss_psi, psi, allow_unused=True) if n_P < B else [None] * len(psi)
    zero = lambda gs, ps: [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]  # noqa: E731
    return zero(grad_theta, theta), zero(grad_psi, psi), out, n_P


def psi_update_by_hand(student, g_psi, teacher, cfg, d):
    """The gradient on ψ of one extra g_ψ update (--psi-steps) on the fresh draws d, at the student's current θ."""
    gamma = d["gamma"].clone()
    if cfg.corrector_cfg is not None:
        gamma[:] = cfg.corrector_cfg
    x_hat = (d["z"] - F_of(student, d["z"], torch.zeros(len(d["z"]), dtype=d["z"].dtype), d["y"], gamma)).detach()
    x_r = (1 - d["r"])[:, None] * x_hat + d["r"][:, None] * d["n"]
    loss = (g_psi(x_r, d["r"], d["y"], gamma=gamma) - (d["n"] - x_hat)).pow(2).mean(1).mean()
    return torch.autograd.grad(loss, list(g_psi.parameters()), allow_unused=True)


# --- scripted draws ---------------------------------------------------------------------------------


def draws(B, n_P, seed=0, s=None, r=None):
    """z, c, γ for the batch, s for the predictor's rows, r and n for the corrector's."""
    g = torch.Generator().manual_seed(seed)
    n_C = B - n_P
    s = torch.tensor(s, dtype=torch.float64) if s is not None else torch.rand(n_P, generator=g, dtype=torch.float64)
    r = torch.tensor(r, dtype=torch.float64) if r is not None else 0.05 + 0.9 * torch.rand(n_C, generator=g,
                                                                                             dtype=torch.float64)
    y = torch.arange(B) % 3  # class 2 is ∅ for a 2-class teacher: one row in three is unconditional
    gamma = 1 + 2 * torch.rand(B, generator=g, dtype=torch.float64)
    if B > 3:
        gamma[3] = 1.0  # γ = 1: no guidance needed
    return {"z": torch.randn(B, D, generator=g, dtype=torch.float64), "y": y, "gamma": gamma, "s": s, "r": r,
            "n": torch.randn(n_C, D, generator=g, dtype=torch.float64)}


class Script:
    """Replaces the step's random draws with scripted ones (monkeypatch), and checks what each draw was asked for."""

    def __init__(self, monkeypatch, cfg, *batches):
        self.cfg, self.calls = cfg, []
        self.prior = [x for b in batches for x in (b["z"], b["n"]) if len(x)]
        self.conditions = [(b["y"], b["gamma"]) for b in batches]
        self.s = [b["s"] for b in batches[:1]]
        self.r = [b["r"] for b in batches if len(b["r"])]
        for name in ("sample_prior", "sample_conditions", "sample_s", "sample_r"):
            monkeypatch.setattr(ff, name, getattr(self, name))

    def sample_prior(self, batch, shape, device="cpu", generator=None):
        x = self.prior.pop(0)
        assert (batch, *shape) == x.shape
        return x.clone()

    def sample_conditions(self, batch, num_classes, cfg_range, device="cpu"):
        y, gamma = self.conditions.pop(0)
        assert batch == len(y) and tuple(cfg_range) == tuple(self.cfg.cfg_range)
        return y.clone(), gamma.clone()

    def sample_s(self, batch, zero_frac=0.0, device="cpu"):
        assert zero_frac == self.cfg.s_zero_frac
        s = self.s.pop(0)
        assert batch == len(s)
        self.calls.append(("s", batch, zero_frac))
        return s.clone()

    def sample_r(self, batch, mean=0.8, std=1.0, r_range=(0.0, 1.0), device="cpu"):
        assert (mean, std, tuple(r_range)) == (self.cfg.r_mean, self.cfg.r_std, tuple(self.cfg.r_range))
        r = self.r.pop(0)
        assert batch == len(r)
        return r.clone()

    def used_up(self):
        return not (self.prior or self.conditions or self.s or self.r)


def networks(num_classes=2):
    teacher = Affine(num_classes).requires_grad_(False)
    return teacher, ff.make_student(teacher), ff.make_aux(teacher)


def sgd(*nets, lr=1.0):
    return [torch.optim.SGD(net.parameters(), lr=lr) for net in nets]


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def assert_moved_by(after, before, grads, lr=1.0, what="θ"):
    for a, b, g in zip(after, before, grads):
        assert_close_at_scale(a - b, -lr * g, REL, what)


# Both guidance intervals have grid points on their ends: s = 0.2 and 0.7 sit on the predictor's [0.2, 0.7];
# r = 0.5 on the corrector's [0, 0.5], and r = 0.6 inside the predictor's but outside the corrector's.
S_ROWS = [0.2, 0.7, 0.45, 0.9, 0.1, 0.69999, 0.0, 0.71, 0.3]
R_ROWS = [0.5, 0.6, 0.3]
CASES = {
    "both": {},
    "kl weight": {"kl_weight": True},
    "corrector cfg 1": {"corrector_cfg": 1.0},
    "k 0, eps 0.1": {"k": 0.0, "weight_eps": 0.1},
    "k 2": {"k": 2.0},
    "alpha 3": {"alpha": 3.0},
    "half and half": {"predictor_frac": 0.5},
    "predictor alone": {"loss": "predictor"},
    "corrector alone": {"loss": "corrector", "psi_steps": 0},
    "dsdt fd": {"dsdt": "fd", "fd_eps": 1e-2},  # affine in s: the central difference is exact up to rounding
    "one row each": {"batch_size": 2},  # the smallest batch: one predictor row, one corrector row
}


def config(**kw):
    base = dict(batch_size=12, guidance_interval=(0.2, 0.7), corrector_interval=(0.0, 0.5), cfg_range=(1.0, 3.0),
                grad_clip=0.0, alpha=0.7)
    return ff.Config(**{**base, **kw}).check().resolve(True)


@pytest.mark.parametrize("case", CASES)
def test_one_step_moves_theta_and_psi_exactly_as_the_equations_say(case, monkeypatch):
    cfg = config(**CASES[case])
    teacher, student, g_psi = networks()
    n_P = ff.split_batch(cfg.batch_size, cfg.predictor_frac, cfg.loss)
    assert n_P == {"predictor alone": 12, "corrector alone": 0, "half and half": 6, "one row each": 1}.get(case, 9)
    d = draws(cfg.batch_size, n_P, s=S_ROWS[:n_P] if n_P == 9 else None, r=R_ROWS if n_P == 9 else None)
    grad_theta, grad_psi, expect, n_P_hand = step_by_hand(student, g_psi, teacher, cfg, d)
    theta0, psi0 = params(student), params(g_psi)
    script = Script(monkeypatch, cfg, d)
    stats = ff.train_step(student, g_psi, teacher, *sgd(student, g_psi), cfg, (D,))
    assert script.used_up() and n_P_hand == n_P
    assert (stats["n_predictor"], stats["n_corrector"]) == (n_P, cfg.batch_size - n_P)
    assert_moved_by(params(student), theta0, grad_theta, what="θ")
    assert_moved_by(params(g_psi), psi0, grad_psi, what="ψ")
    for key, value in expect.items():
        assert math.isclose(stats[key], value, rel_tol=1e-9), (key, stats[key], value)
    if cfg.loss == "predictor":
        assert all(torch.equal(a, b) for a, b in zip(params(g_psi), psi0))  # no corrector: g_ψ is not trained


def test_the_hand_step_sees_what_each_setting_changes(monkeypatch):
    """The cases above are not alike: each setting moves θ differently, the corrector's interval included (r = 0.6
    is guided under the predictor's interval only), so a step that wired one setting to the wrong place would fail."""
    updates = {}
    for case in ("both", "kl weight", "corrector cfg 1", "alpha 3"):
        cfg = config(**CASES[case])
        teacher, student, g_psi = networks()
        updates[case] = step_by_hand(student, g_psi, teacher, cfg, draws(12, 9, s=S_ROWS, r=R_ROWS))[0]
    cfg = config(corrector_interval=(0.2, 0.7))
    teacher, student, g_psi = networks()
    updates["corrector on the predictor's interval"] = step_by_hand(student, g_psi, teacher, cfg,
                                                                    draws(12, 9, s=S_ROWS, r=R_ROWS))[0]
    cases = list(updates)
    for i, a in enumerate(cases):
        for b in cases[i + 1:]:
            gap = max((x - y).abs().max().item() for x, y in zip(updates[a], updates[b]))
            assert gap > 1e-6, (a, b)


def test_the_corrector_pushes_the_student_along_plus_delta_N(monkeypatch):
    """loss_C = λ <F(z, 0), sg(Δ_N)> / d: a step lowers F along Δ_N, i.e. moves the one-step sample x̂ = z - F
    along +Δ_N. With the corrector alone and only the bias of F free, the update of the bias is -lr λ mean(Δ_N)/d."""
    cfg = config(loss="corrector", psi_steps=0, alpha=1.0)
    teacher, student, g_psi = networks()
    d = draws(12, 0)
    _, _, expect, _ = step_by_hand(student, g_psi, teacher, cfg, d)
    with torch.no_grad():
        x_hat = d["z"] - F_of(student, d["z"], torch.zeros(12, dtype=torch.float64), d["y"], d["gamma"])
        x_r = (1 - d["r"])[:, None] * x_hat + d["r"][:, None] * d["n"]
        delta_N = g_psi(x_r, d["r"], d["y"], gamma=d["gamma"]) - guided_by_hand(teacher, x_r, d["r"], d["y"],
                                                                                d["gamma"], cfg.corrector_interval)
    a0 = student.a.detach().clone()
    Script(monkeypatch, cfg, d)
    ff.train_step(student, g_psi, teacher, *sgd(student, g_psi), cfg, (D,))
    # F's bias a (the student sees t = 1) moves by -λ mean_rows(Δ_N) / d: x̂ = z - F moves by +λ mean(Δ_N) / d
    torch.testing.assert_close(student.a.detach() - a0, -expect["lambda"] * delta_N.mean(0) / D, rtol=1e-10, atol=0)


@pytest.mark.parametrize("psi_steps", [1, 3])
def test_extra_g_psi_updates_train_on_fresh_samples_of_the_updated_student(psi_steps, monkeypatch):
    cfg = config(psi_steps=psi_steps, corrector_cfg=1.5)
    teacher, student, g_psi = networks()
    batches = [draws(12, 9, seed=0, s=S_ROWS, r=R_ROWS)] + [draws(3, 0, seed=1 + i) for i in range(psi_steps)]
    grad_theta, grad_psi, _, _ = step_by_hand(student, g_psi, teacher, cfg, batches[0])
    Script(monkeypatch, cfg, *batches)
    opts = sgd(student, g_psi)
    theta0, psi0 = params(student), params(g_psi)
    ff.train_step(student, g_psi, teacher, *opts, cfg, (D,))
    assert_moved_by(params(student), theta0, grad_theta)  # θ once
    # by hand: ψ after the step's own update, then each extra update on its fresh draws, at the new θ
    hand = Affine(2, ("gamma",))
    with torch.no_grad():
        for p, q, g in zip(hand.parameters(), psi0, grad_psi):
            p.copy_(q - g)
    for extra in batches[1:]:
        grads = psi_update_by_hand(student, hand, teacher, cfg, extra)
        with torch.no_grad():
            for p, g in zip(hand.parameters(), grads):
                p.sub_(g)
    assert_moved_by(params(g_psi), psi0, [a - b for a, b in zip(psi0, params(hand))], what="ψ after extra updates")


def test_the_gradient_clip_scales_each_networks_update_to_the_clip(monkeypatch):
    cfg = config(grad_clip=0.05)
    teacher, student, g_psi = networks()
    d = draws(12, 9, s=S_ROWS, r=R_ROWS)
    grad_theta, grad_psi, _, _ = step_by_hand(student, g_psi, teacher, cfg, d)
    theta0, psi0 = params(student), params(g_psi)
    Script(monkeypatch, cfg, d)
    ff.train_step(student, g_psi, teacher, *sgd(student, g_psi), cfg, (D,))
    for after, before, grads in ((params(student), theta0, grad_theta), (params(g_psi), psi0, grad_psi)):
        total = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
        assert total > 0.05  # the clip is active
        # torch.nn.utils.clip_grad_norm_ scales by clip / (norm + 1e-6)
        assert_moved_by(after, before, [g * 0.05 / (total + 1e-6) for g in grads], what="clipped update")


def test_s_zero_frac_sets_that_share_of_the_predictors_s_to_exactly_zero():
    torch.manual_seed(0)
    s = ff.sample_s(100_000, 0.25)
    assert abs((s == 0).double().mean().item() - 0.25) < 0.01
    rest = s[s > 0]
    assert abs(rest.mean().item() - 0.5) < 0.01 and rest.max() < 1  # the others uniform on [0, 1)
    assert (ff.sample_s(10_000, 0.0) == 0).sum() == 0


# --- the data-based baseline's step (toy/mismatch.py) -------------------------------------------------


def test_the_baselines_step_is_meanflow_distillation_on_noised_data_by_hand(monkeypatch):
    cfg = ff.Config(toy="digits", states="data", batch_size=6, guidance_interval=(0.2, 0.7), cfg_range=(1.0, 3.0),
                    grad_clip=0.0, augment_shift=2).check().resolve(True)
    teacher, student, g_psi = networks()
    g = torch.Generator().manual_seed(3)
    data = torch.randn(10, D, generator=g, dtype=torch.float64)
    labels = torch.arange(10) % 2
    rows = torch.tensor([3, 0, 7, 7, 9, 1])
    t = torch.tensor([0.7, 0.9, 0.2, 0.5, 0.71, 0.3], dtype=torch.float64)
    s = torch.tensor([0.1, 0.9, 0.0, 0.2, 0.7, 0.29], dtype=torch.float64)
    gamma = torch.tensor([2.0, 1.0, 2.5, 1.5, 3.0, 2.0], dtype=torch.float64)
    n = torch.randn(6, D, generator=g, dtype=torch.float64)
    shifted = lambda x: x.flip(1) + 0.25  # noqa: E731 - a stand-in for the pixel shift: any known map of x

    def fake_randint(low, high, size, device=None):
        assert (low, high, tuple(size)) == (0, 10, (6,))
        return rows.clone()

    def fake_shift(x, k):
        assert k == cfg.augment_shift
        return shifted(x)

    monkeypatch.setattr(mismatch, "shift", fake_shift)
    monkeypatch.setattr(mismatch, "sample_t_s", lambda n_, device="cpu", how="uniform": (t.clone(), s.clone()))
    monkeypatch.setattr(mismatch, "sample_conditions", lambda *a: (torch.zeros(6, dtype=torch.long), gamma.clone()))
    step = mismatch.data_step(data, labels, "cpu")
    # by hand: x_t = (1 - t) x + t n, F_tgt = v + (s - t)(∂_t F + v · ∇_x F) = v + (s - t)(a + v W)
    x, y = shifted(data[rows]), labels[rows]
    x_t = (1 - t)[:, None] * x + t[:, None] * n
    v = guided_by_hand(teacher, x_t, t, y, gamma, cfg.guidance_interval)
    F_tgt = v + (s - t)[:, None] * (student.a.detach() + v @ student.W.detach())
    F = student(x_t, t, y, s=s, gamma=gamma)
    sq = (F - F_tgt).pow(2).mean(1)
    grads = torch.autograd.grad((sq / (sq.detach() + cfg.weight_eps) ** cfg.k).mean(), list(student.parameters()))
    theta0, psi0 = params(student), params(g_psi)
    for p in student.parameters():  # a gradient left over from an earlier step, which the step must drop
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    monkeypatch.setattr(torch, "randint", fake_randint)
    monkeypatch.setattr(torch, "randn_like", lambda x_: n.clone())
    step(student, g_psi, teacher, *sgd(student, g_psi), cfg, (D,))
    monkeypatch.undo()
    assert_moved_by(params(student), theta0, grads, what="θ of the data-based step")
    assert all(torch.equal(a, b) for a, b in zip(params(g_psi), psi0))  # no corrector here


# --- edges: the guidance interval's ends in every sampler ---------------------------------------------


class Constant(nn.Module):
    """v(x, t, c) = c + 1 for a class, 10 for ∅, whatever x and t: every sampler's endpoint is z minus the time
    it spent guided times v_γ and unguided times v_c."""

    num_classes = 3

    def forward(self, x, t, y):
        return torch.where(y == self.num_classes, 10.0, y + 1.0).to(x.dtype)[:, None].expand_as(x).clone()


@pytest.mark.parametrize("interval", [(0.2, 0.7), (0.0, 0.7), (0.3, 1.0)])
def test_guided_velocity_guides_on_both_ends_of_the_interval_and_not_beyond(interval):
    lo, hi = interval
    t = torch.tensor([lo, hi, lo - 1e-9, hi + 1e-9, 0.5 * (lo + hi)], dtype=torch.float64)
    y, gamma = torch.zeros(5, dtype=torch.long), torch.full((5,), 3.0, dtype=torch.float64)
    v = ff.guided_velocity(Constant(), torch.zeros(5, 1, dtype=torch.float64), t, y, gamma, interval)[:, 0]
    guided, plain = 10 + 3 * (1 - 10), 1.0
    assert v.tolist() == [guided, guided, plain, plain, guided]


def test_repas_samplers_guide_the_step_that_starts_on_the_intervals_top():
    # REPA's 50-step grid lands on 0.7: that step is guided (the interval is closed), so 35 of 50 steps are guided
    teacher, z = Constant(), torch.zeros(2, 1, dtype=torch.float64)
    y = torch.tensor([0, 1])
    for lo, guided_steps in ((0.0, 35), (0.3, 21)):  # 0.7 down to 0.02, or to 0.3 (also a grid point)
        x, nfe = ff.sample_ode(teacher, z, y, steps=50, gamma=2.0, interval=(lo, 0.7))
        v_c = y.double() + 1
        v_g = 10 + 2 * (v_c - 10)
        expected = -(guided_steps * v_g + (50 - guided_steps) * v_c) / 50
        assert nfe == 50 + guided_steps
        torch.testing.assert_close(x[:, 0], expected, rtol=1e-12, atol=1e-12)
    # the SDE sampler tests the same closed interval at each step's start: 250 steps on linspace(1, 0.04, 250)
    ts = torch.linspace(1, 0.04, 250, dtype=torch.float64)
    _, nfe = ff.sample_sde(teacher, z, y, steps=250, gamma=2.0, interval=(0.0, float(ts[100])),
                           generator=torch.Generator().manual_seed(0))
    assert nfe == 250 + (250 - 100)  # steps 100 .. 249 start inside [0, t_100], the first on its top


@pytest.mark.parametrize("interval", [(0.3, 0.6), (0.25, 0.65)])
def test_teacher_ode_spends_exactly_the_intervals_length_guided(interval):
    # knots at the interval's ends: no step straddles one, whether or not the ends are grid points
    lo, hi = interval
    teacher, z = Constant(), torch.zeros(3, 1, dtype=torch.float64)
    y, gamma = torch.tensor([0, 1, 2]), torch.full((3,), 2.0, dtype=torch.float64)
    for solver in ("euler", "heun", "rk4"):
        x, _, _ = ff.teacher_ode(teacher, z, y, gamma, interval, 10, solver)
        v_c = y.double() + 1
        v_g = 10 + 2 * (v_c - 10)
        torch.testing.assert_close(x[:, 0], -((hi - lo) * v_g + (1 - (hi - lo)) * v_c), rtol=1e-12, atol=1e-12)


# --- edges: the EMA and the learning-rate schedule ------------------------------------------------------


def test_the_ema_moves_toward_the_student_with_a_warm_up():
    model, ema = tiny_mlp(seed=1), tiny_mlp(seed=2)
    for step, decay, beta in ((0, 0.999, 0.1), (10, 0.999, 11 / 20), (5000, 0.995, 0.995), (5000, 0.0, 0.0)):
        e0, m0 = params(ema), params(model)
        ff.ema_update(ema, model, decay, step)
        for e1, e, m in zip(params(ema), e0, m0):
            torch.testing.assert_close(e1, beta * e + (1 - beta) * m, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(params(model), m0))  # the student is never moved


def record_lrs(monkeypatch):
    """Record (step, θ's lr, ψ's lr) as train_step sees them."""
    seen, real = [], ff.train_step

    def step(student, g_psi, teacher, opt_theta, opt_psi, *rest):
        seen.append((opt_theta.param_groups[0]["lr"], opt_psi.param_groups[0]["lr"]))
        return real(student, g_psi, teacher, opt_theta, opt_psi, *rest)
    monkeypatch.setattr(ff, "train_step", step)
    return seen


def test_the_cosine_schedule_decays_both_learning_rates_from_lr_to_zero(tmp_path, monkeypatch):
    seen = record_lrs(monkeypatch)
    cfg = ff.Config(toy="moons", steps=8, batch_size=8, lr=1e-3, psi_lr=4e-3, ckpt_every=100).check().resolve(True)
    torch.manual_seed(0)
    ff.distill(tiny_mlp(), cfg, (D,), str(tmp_path), progress=False)
    for i, (lr_theta, lr_psi) in enumerate(seen):  # step i + 1 trains at lr · ½ (1 + cos(π i / steps))
        factor = 0.5 * (1 + math.cos(math.pi * i / 8))
        assert math.isclose(lr_theta, 1e-3 * factor, rel_tol=1e-12) and math.isclose(lr_psi, 4e-3 * factor, rel_tol=1e-12)
    assert len(seen) == 8 and seen[0] == (1e-3, 4e-3) and seen[-1][0] < 1e-4


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_a_warm_up_ramps_both_learning_rates_linearly_then_follows_the_schedule(tmp_path, monkeypatch, schedule):
    seen = record_lrs(monkeypatch)
    cfg = ff.Config(toy="moons", steps=8, batch_size=8, lr=1e-3, psi_lr=4e-3, warmup=4, lr_schedule=schedule,
                    ckpt_every=100).check().resolve(True)
    torch.manual_seed(0)
    ff.distill(tiny_mlp(), cfg, (D,), str(tmp_path), progress=False)
    for i, (lr_theta, lr_psi) in enumerate(seen):  # step i + 1: lr · min(1, (i + 1) / 4) · the schedule's factor
        factor = min(1, (i + 1) / 4) * (0.5 * (1 + math.cos(math.pi * i / 8)) if schedule == "cosine" else 1)
        assert math.isclose(lr_theta, 1e-3 * factor, rel_tol=1e-12) and math.isclose(lr_psi, 4e-3 * factor, rel_tol=1e-12)
    assert len(seen) == 8 and math.isclose(seen[0][0], 2.5e-4, rel_tol=1e-12)


class Stop(Exception):
    pass


@pytest.mark.parametrize("warmup", [0, 5])
def test_a_toy_run_stopped_and_resumed_keeps_its_cosine_schedule_bit_for_bit(tmp_path, monkeypatch, warmup):
    cfg = lambda **kw: ff.Config(toy="moons", steps=9, batch_size=8, ckpt_every=3, warmup=warmup,  # noqa: E731
                                 **kw).check().resolve(True)
    for name in ("full", "cut"):
        (tmp_path / name).mkdir()
    torch.manual_seed(0)
    full, _ = ff.distill(tiny_mlp(), cfg(), (D,), str(tmp_path / "full"), progress=False)

    def stop_after_step_5(step, ema, stats):
        if step == 5:
            raise Stop
    torch.manual_seed(0)
    with pytest.raises(Stop):
        ff.distill(tiny_mlp(), cfg(), (D,), str(tmp_path / "cut"), progress=False, callback=stop_after_step_5)
    assert ff.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["step"] == 3
    seen = record_lrs(monkeypatch)
    teacher = tiny_mlp()
    torch.manual_seed(123)  # the checkpoint's random state, not this one, must drive the rest
    resumed, _ = ff.distill(teacher, cfg(resume=True), (D,), str(tmp_path / "cut"), progress=False)
    assert [lr for lr, _ in seen] == [1.5e-3 * ((min(1, (i + 1) / warmup) if warmup else 1) *
                                                (0.5 * (1 + math.cos(math.pi * i / 9)))) for i in range(3, 9)]
    a, b = (ff.load_checkpoint(str(tmp_path / name / "ckpt.pt")) for name in ("full", "cut"))
    for key in ("student", "ema", "g_psi"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["schedules"] == b["schedules"] and a["opt_theta"]["param_groups"] == b["opt_theta"]["param_groups"]
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), resumed.parameters()))


# --- --compile: the same step, compiled --------------------------------------------------------------


def test_a_compiled_step_makes_the_eager_steps_update(monkeypatch):
    """--compile wraps every pass of the step in torch.compile (the student's and g_ψ's gradient passes, the teacher,
    the forward-mode JVP of ∂_s F): three steps compiled move the weights as three eager steps do. Inductor's code
    generation takes minutes on a CPU, so torch.compile runs here with AOTAutograd's eager backend: the graphs the
    compiler captures, the JVP's included, run without generated kernels (bench/compile_step.py times inductor)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: real(fn, backend="aot_eager"))
    weights = {}
    for compile in (False, True):
        cfg = ff.Config(toy="moons", batch_size=16, psi_steps=1, compile=compile).check().resolve(True)
        teacher = tiny_mlp().requires_grad_(False)
        student, g_psi = ff.make_student(teacher), ff.make_aux(teacher)
        opts = [torch.optim.Adam(net.parameters(), lr=1e-2) for net in (student, g_psi)]
        passes = ff.training_passes(student, g_psi, teacher, cfg)
        assert (passes.student is student) != compile  # compiled: a wrapper around the same weights
        torch.manual_seed(1)
        for _ in range(3):
            ff.train_step(student, g_psi, teacher, *opts, cfg, (D,), passes)
        weights[compile] = params(student) + params(g_psi)
    torch._dynamo.reset()
    moved = max((a - b).abs().max().item() for a, b in zip(weights[False], params(ff.make_student(tiny_mlp()))))
    assert moved > 1e-3  # the steps did something
    for a, b in zip(weights[False], weights[True]):
        assert_close_at_scale(b, a, 1e-5, "compiled against eager")
