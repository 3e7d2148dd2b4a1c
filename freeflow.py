"""FreeFlow in PyTorch: flow map distillation without data.

A readable reimplementation of "Flow Map Distillation Without Data" (Tong, Ma, Xie, Jaakkola, 2025,
arXiv 2511.19428). A flow-matching teacher samples by integrating an ODE in many network calls; FreeFlow
distils it into a flow map that jumps from noise to data in ONE call, and it trains on no data at all:
every training state starts from the Gaussian prior, the one distribution teacher and student share.

Read this file top to bottom beside the paper and ../shared/spec/freeflow-method.md (the "spec"):

    0. Conventions                     the time direction, the network interface
    1. The prior                       z ~ N(0, I)
    2. The teacher                     velocity, classifier-free guidance, guidance interval, ODE sampler
    3. The student flow map            f(z, s) = z + (s - 1) F(z, s, c, γ)
    4. Predictor                       align the generating velocity  (spec §4)
    5. Corrector                       align the noising velocity, with the auxiliary network g_ψ (spec §5)
    6. One training step               75 / 25 split, balance λ  (spec §6)
    7. One-step sampling               x̂ = z - F(z, 0, c, γ)
    8. Configuration                   one dataclass, which also builds the command line
    9. The training loop               Adam, EMA, checkpoints, a progress bar
   10. Command line                    python freeflow.py --toy moons

The algorithm (sections 1-7) never asks what the networks are: the 2D toy's MLPs (toy/net.py) and a
SiT on ImageNet latents go through the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------
# 0. Conventions  (spec §2)
#
# Time t ∈ [0, 1]; t = 1 is the prior (pure noise), t = 0 is data. The interpolant between a data point
# x and noise n ~ N(0, I) is
#       x_t = (1 - t) x + t n
# and the teacher's velocity is v(x, t, c) ≈ E[n - x | x_t = x] = dx_t/dt. Sampling integrates from
# t = 1 down to t = 0 (negative dt). Classes are 0 .. num_classes - 1; the null class ∅ (no condition,
# for classifier-free guidance) is the index num_classes.
#
# Every network in this file is a callable
#       net(x, t, y, **inputs) -> a tensor shaped like x
# with x of shape (B, ...), t a float tensor (B,), y a long tensor (B,), and an attribute `num_classes`.
# The student and the auxiliary network take extra conditioning inputs by keyword (s: the target time,
# gamma: the guidance scale); `net.extended(names)` returns a copy of a network with new zero-initialised
# embeddings of those inputs, so that the copy computes exactly what the original does (spec §3).
# ---------------------------------------------------------------------------------------------------


class FreeFlowError(Exception):
    """A problem with the user's input or run, told in one sentence; the command line prints it."""


def bcast(t, x):
    """Shape a per-example tensor (B,) so that it broadcasts against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def device_of(net):
    """The device a network's weights (or buffers) live on."""
    return next(itertools.chain(net.parameters(), net.buffers()), torch.empty(0)).device


def mean_sq(x):
    """Per-example mean of squares over every non-batch dimension: |x|² / d."""
    return x.pow(2).flatten(1).mean(1)


def norm(x):
    """Per-example Euclidean norm |x|."""
    return x.flatten(1).norm(dim=1)


# ---------------------------------------------------------------------------------------------------
# 1. The prior
# ---------------------------------------------------------------------------------------------------


def sample_prior(batch, shape, device="cpu", generator=None):
    """z ~ N(0, I): where the teacher's ODE starts (t = 1), and the only training input FreeFlow needs."""
    return torch.randn((batch, *shape), device=device, generator=generator)


def sample_conditions(batch, num_classes, cfg_range, device="cpu"):
    """Class labels c uniform over the classes (the null class when there are none), and a guidance
    scale γ per example, uniform over cfg_range, so that one student serves every scale (spec §6)."""
    if num_classes > 0:
        y = torch.randint(0, num_classes, (batch,), device=device)
    else:
        y = torch.zeros(batch, dtype=torch.long, device=device)  # index 0 = num_classes = ∅
    lo, hi = cfg_range
    gamma = lo + (hi - lo) * torch.rand(batch, device=device)
    return y, gamma


# ---------------------------------------------------------------------------------------------------
# 2. The teacher  (spec §2)
#
# Classifier-free guidance with scale γ, only while t lies inside the guidance interval [lo, hi]:
#       v_γ(x, t, c) = v(x, t, ∅) + γ (v(x, t, c) - v(x, t, ∅))     t ∈ [lo, hi]
#       v_γ(x, t, c) = v(x, t, c)                                   otherwise
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def guided_velocity(teacher, x, t, y, gamma, interval, t_interval=None):
    """The teacher's velocity v_γ(x, t, c) with classifier-free guidance inside `interval`.

    Rows that need guidance (inside the interval, γ ≠ 1, a real class) get a second, unconditional
    call; both go through the network as one batch. `t_interval` is the time at which the interval is
    tested (default t); the ODE sampler passes each step's midpoint so no step straddles an edge."""
    lo, hi = interval
    tg = t if t_interval is None else t_interval
    null = teacher.num_classes
    guide = (tg >= lo) & (tg <= hi) & (gamma != 1) & (y != null)
    if not bool(guide.any()):
        return teacher(x, t, y)
    g = guide.nonzero().squeeze(1)
    v = teacher(torch.cat([x, x[g]]), torch.cat([t, t[g]]), torch.cat([y, torch.full_like(y[g], null)]))
    v_c, v_u = v[: len(x)], v[len(x):]
    v_c[g] = v_u + bcast(gamma[g], v_u) * (v_c[g] - v_u)  # v_γ = v(∅) + γ (v(c) - v(∅))
    return v_c


def time_grid(steps, knots=(), dtype=torch.float64):
    """A decreasing time grid from 1 to 0 with `steps` uniform steps, plus every knot in (0, 1): the
    guidance-interval edges (the velocity jumps there) and the times at which states are recorded."""
    ts = {round(t, 12) for t in torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()}
    ts |= {round(float(k), 12) for k in knots if 0 < k < 1}  # rounded, so a knot on the grid is one time
    return torch.tensor(sorted(ts, reverse=True), dtype=dtype)


def calls_per_sample(teacher, y, gamma, interval, t):
    """Network calls per sample that one guided_velocity at time t is counted as (NFE): 2 while guidance
    is on for the batch (t inside the interval, some γ ≠ 1 on a real class), otherwise 1."""
    lo, hi = interval
    return 2 if lo <= t <= hi and bool(((gamma != 1) & (y != teacher.num_classes)).any()) else 1


@torch.no_grad()
def teacher_ode(teacher, z, y, gamma, interval, steps, solver="heun", record=()):
    """Integrate the teacher's ODE dx/dt = v_γ(x, t, c) from t = 1 (x = z) to t = 0.

    solver: "euler" (1 evaluation a step), "heun" (2, second order) or "rk4" (4, classical fourth-order
    Runge-Kutta), on a float64 time grid with knots at the guidance-interval edges and at the `record`
    times. Returns (x at t = 0, {t: x_t for t in record}, nfe): nfe counts network calls per sample,
    two per evaluation while guidance is on."""
    stages = {"euler": 1, "heun": 2, "rk4": 4}[solver]
    grid = time_grid(steps, (*interval, *record))
    wanted = {round(float(t), 12) for t in record}
    x, states, nfe = z, {}, 0
    ones = torch.ones(len(z), dtype=z.dtype, device=z.device)
    for t0, t1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h, mid = t1 - t0, 0.5 * (t0 + t1)  # h < 0: we move toward data
        v = lambda x_, t_: guided_velocity(teacher, x_, ones * t_, y, gamma, interval, ones * mid)  # noqa: E731
        k1 = v(x, t0)
        if solver == "euler":
            x = x + h * k1
        elif solver == "heun":
            x = x + h * 0.5 * (k1 + v(x + h * k1, t1))
        else:
            k2 = v(x + 0.5 * h * k1, mid)
            k3 = v(x + 0.5 * h * k2, mid)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + v(x + h * k3, t1))
        nfe += stages * calls_per_sample(teacher, y, gamma, interval, mid)
        if t1 in wanted:
            states[t1] = x
    return x, states, nfe


# ---------------------------------------------------------------------------------------------------
# 3. The student flow map  (spec §3)
#
#       f_θ(z, s) = z + (s - 1) · F_θ(z, s, c, γ)         z ~ N(0, I),  s ∈ [0, 1]
#
# The boundary f_θ(z, 1) = z holds by construction. F_θ is a copy of the teacher that still sees t = 1
# through its own time embedding, plus zero-initialised embeddings of s and γ: at initialisation
# F_θ(z, s) = v(z, 1), so f_θ(z, s) is the teacher's Euler step from z.
# ---------------------------------------------------------------------------------------------------


def make_student(teacher):
    """F_θ: the teacher plus zero-initialised inputs s and γ."""
    return teacher.extended(("s", "gamma"))


def F_theta(student, z, s, y, gamma):
    """F_θ(z, s, c, γ): the student network, which always starts from t = 1."""
    return student(z, torch.ones_like(s), y, s=s, gamma=gamma)


def flow_map(student, z, s, y, gamma):
    """f_θ(z, s) = z + (s - 1) F_θ(z, s, c, γ): where the student says the teacher's path from z is at s."""
    return z + bcast(s - 1, z) * F_theta(student, z, s, y, gamma)


# ---------------------------------------------------------------------------------------------------
# 4. Predictor: align the generating velocity  (spec §4)
#
# Differentiating f_θ along s gives the student's generating velocity
#       v_G(z, s) = d/ds f_θ(z, s) = F + (s - 1) ∂_s F.
# If the student traces the teacher's path, v_G equals the teacher's velocity at the student's own
# point, v(f_θ(z, s), s). No data is needed: z comes from the prior and the teacher is asked where the
# student already is. As a regression on a stop-gradient target:
#       F_tgt = sg( v(f_θ(z, s), s) + (1 - s) ∂_s F )
#       Δ_G   = v_G - v(f_θ(z, s), s) = F - F_tgt
#       loss_P = w · |Δ_G|² / d,    w = sg( 1 / (|Δ_G|² / d + ε)^k )
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_mode(device_type):
    """float32 and the plain math attention path: fused attention kernels and bf16 autocast have no
    (or an inexact) forward-mode derivative, so the JVP runs here."""
    with torch.autocast(device_type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        yield


@torch.no_grad()
def F_and_dF_ds(student, z, s, y, gamma, method="jvp", fd_eps=1e-3):
    """(F_θ(z, s), ∂_s F_θ(z, s)): the partial derivative in s only, z held still.

    method="jvp": forward-mode AD, tangent 1 on s and 0 on z: exact, one forward pass that carries
    tangents. method="fd": the central difference (F(s + h) - F(s - h)) / 2h, three plain forwards."""
    F_of_s = lambda s_: F_theta(student, z, s_, y, gamma)  # noqa: E731
    if method == "jvp":
        with exact_mode(z.device.type), fwAD.dual_level():
            # Biases and other 1-D parameters get explicit zero tangents. Without them autograd gives
            # them lazy "ZeroTensor" tangents, and each add that meets one takes a slow path in PyTorch
            # (shape inference in Python, 0.1-0.4 ms an op on CPU): once per linear layer. The numbers
            # are the same; weight matrices keep lazy tangents (a real zero there costs a matrix product).
            zeros = {name: fwAD.make_dual(p, torch.zeros_like(p))
                     for name, p in student.named_parameters() if p.dim() <= 1}
            net = lambda *args, **kwargs: torch.func.functional_call(student, zeros, args, kwargs)  # noqa: E731
            F, dF_ds = fwAD.unpack_dual(F_theta(net, z, fwAD.make_dual(s, torch.ones_like(s)), y, gamma))  # ds = 1
        return F, torch.zeros_like(F) if dF_ds is None else dF_ds  # None: F does not depend on s
    if method == "fd":
        return F_of_s(s), (F_of_s(s + fd_eps) - F_of_s(s - fd_eps)) / (2 * fd_eps)
    raise ValueError(f"unknown ∂_s F method {method!r}; use 'jvp' or 'fd'")


@torch.no_grad()
def predictor_target(student, teacher, z, s, y, gamma, interval, method="jvp", fd_eps=1e-3):
    """F_tgt = sg( v_γ(f_θ(z, s), s) + (1 - s) ∂_s F ): the teacher queried at the student's own point."""
    F, dF_ds = F_and_dF_ds(student, z, s, y, gamma, method, fd_eps)
    x_s = z + bcast(s - 1, z) * F  # f_θ(z, s), the student's current point
    v = guided_velocity(teacher, x_s, s, y, gamma, interval)  # v(f_θ(z, s), s)
    return v + bcast(1 - s, z) * dF_ds  # F_tgt


def predictor_loss(F, F_tgt, k=1.0, eps=1e-3):
    """Per-example loss_P = w · |F - F_tgt|² / d with the power-law weight w = sg(1 / (|Δ_G|²/d + ε)^k).
    Returns (loss_P, Δ_G); Δ_G carries no gradient."""
    delta_G = F - F_tgt  # Δ_G = v_G - v = F - F_tgt
    sq = mean_sq(delta_G)  # |Δ_G|² / d
    w = 1.0 / (sq.detach() + eps) ** k  # w = sg(1 / (|Δ_G|²/d + ε)^k)
    return w * sq, delta_G.detach()


# ---------------------------------------------------------------------------------------------------
# 5. Corrector: align the noising velocity  (spec §5)
#
# Noise the one-step samples x̂ = f_θ(z, 0):  x_r = (1 - r) x̂ + r n. The marginal velocity v_N of this
# noising process belongs to the student's distribution q; the teacher's u = v(x_r, r) belongs to the
# teacher's p. v_N = u for every r means q = p. An auxiliary network g_ψ(x, r, c, γ) (a copy of the
# teacher) learns v_N online by flow matching on the student's detached samples:
#       loss_ψ = |g_ψ((1 - r) sg(x̂) + r n, r) - (n - sg(x̂))|² / d
# and the student is pushed along their difference, all of it under stop-gradient:
#       Δ_N = g_ψ(x_r, r) - u(x_r, r)          loss_C = λ · < F_θ(z, 0), sg(Δ_N) > / d
# The gradient of loss_C moves x̂ = z - F along +Δ_N. (Point mass: teacher at 0, student at a > 0 gives
# Δ_N = -a / r, so x̂ moves toward 0.)  r ~ LogitNormal over all of (0, 1), biased to high noise; the
# teacher's call here uses a narrower guidance interval, [0, 0.7] by default.
# ---------------------------------------------------------------------------------------------------


def make_aux(teacher):
    """g_ψ: the teacher plus a zero-initialised γ input (the student's samples depend on γ)."""
    return teacher.extended(("gamma",))


def flow_matching_loss(net, x, y, t, n, **inputs):
    """Plain flow matching in the project's convention: x_t = (1 - t) x + t n, target n - x.
    Returns (per-example |net(x_t, t) - (n - x)|² / d, the network's output). It trains the toy
    teacher on data and g_ψ on the student's samples."""
    x_t = (1 - bcast(t, x)) * x + bcast(t, x) * n
    out = net(x_t, t, y, **inputs)
    return mean_sq(out - (n - x)), out


def sample_r(batch, mean=0.8, std=1.0, device="cpu"):
    """r ~ LogitNormal(mean, std): r = sigmoid(mean + std · N(0, 1)). Its mode r* solves
    2r* - 1 = (logit r* - mean) / std²; mean 0.8, std 1 put it at r* ≈ 0.8 (high noise), with mass on
    all of (0, 1): the paper finds that dropping the high-noise end is catastrophic."""
    return torch.sigmoid(mean + std * torch.randn(batch, device=device))


def corrector_direction(g_psi, teacher, x_hat, y, gamma, interval, r_mean=0.8, r_std=1.0):
    """Noise the detached one-step samples once and return (Δ_N, loss_ψ, r).

    One forward of g_ψ serves both of its uses: its detached output is v_N in Δ_N, and the same
    output, with gradients into ψ, is regressed onto n - x̂ (flow matching on the student's samples)."""
    x_hat = x_hat.detach()  # sg(x̂): g_ψ learns q, it does not move the student
    r = sample_r(len(x_hat), r_mean, r_std, x_hat.device)
    n = torch.randn_like(x_hat)
    loss_psi, g = flow_matching_loss(g_psi, x_hat, y, r, n, gamma=gamma)  # loss_ψ, g_ψ(x_r, r)
    x_r = (1 - bcast(r, x_hat)) * x_hat + bcast(r, x_hat) * n
    u = guided_velocity(teacher, x_r, r, y, gamma, interval)  # u(x_r, r), guided only for r ≤ 0.7
    return g.detach() - u, loss_psi, r  # Δ_N = g_ψ(x_r, r) - u(x_r, r)


def corrector_loss(F0, delta_N, lam, r=None):
    """Per-example loss_C = λ · <F_θ(z, 0), sg(Δ_N)> / d. With r given, each example is weighted by the
    exact integral-KL factor (1 - r)² / r, which the paper drops (an option here)."""
    loss = lam * (F0 * delta_N.detach()).flatten(1).mean(1)
    return loss if r is None else loss * (1 - r) ** 2 / r


# ---------------------------------------------------------------------------------------------------
# 6. One training step  (spec §6)
#
# 75 % of the batch goes to the predictor, 25 % to the corrector; one joint update. The corrector's
# strength follows the predictor's error:
#       λ = sg( α · mean|Δ_G| / (mean|Δ_N| + ε) )
# g_ψ is updated once per step on the corrector's samples.
# ---------------------------------------------------------------------------------------------------


def split_batch(batch, predictor_frac, loss="both"):
    """How many examples of a batch go to the predictor; the rest go to the corrector."""
    if loss == "predictor":
        return batch
    if loss == "corrector":
        return 0
    return min(batch - 1, max(1, round(predictor_frac * batch)))


def balance(delta_G, delta_N, alpha=1.0, eps=1e-8):
    """λ = sg(α · mean|Δ_G| / (mean|Δ_N| + ε)); α alone when there is no predictor term."""
    if delta_G is None or len(delta_G) == 0:
        return torch.tensor(alpha, device=delta_N.device)
    return alpha * norm(delta_G).mean() / (norm(delta_N).mean() + eps)


def sample_s(batch, zero_frac=0.0, device="cpu"):
    """s ~ U[0, 1), with an optional fraction set to exactly 0, the one-step endpoint."""
    s = torch.rand(batch, device=device)
    return torch.where(torch.rand(batch, device=device) < zero_frac, torch.zeros_like(s), s)


def train_step(student, g_psi, teacher, opt_theta, opt_psi, cfg, shape):
    """One FreeFlow update of θ (and of ψ). `cfg` is a Config (section 8); `shape` is one sample's shape.
    Returns a dict of floats: the losses, mean|Δ_G|, mean|Δ_N|, λ and the split."""
    device = device_of(student)
    B = cfg.batch_size
    n_P = split_batch(B, cfg.predictor_frac, cfg.loss)
    z = sample_prior(B, shape, device)
    y, gamma = sample_conditions(B, teacher.num_classes, cfg.cfg_range, device)
    # predictor rows get s from its distribution; corrector rows sit at s = 0, the one-step endpoint
    s = torch.cat([sample_s(n_P, cfg.s_zero_frac, device), torch.zeros(B - n_P, device=device)])
    P, C = slice(0, n_P), slice(n_P, B)

    F_tgt = predictor_target(student, teacher, z[P], s[P], y[P], gamma[P], cfg.guidance_interval,
                             cfg.dsdt, cfg.fd_eps) if n_P > 0 else None
    F = F_theta(student, z, s, y, gamma)  # one forward with gradients for every row

    stats = {"n_predictor": n_P, "n_corrector": B - n_P}
    loss_theta = F.new_zeros(())
    delta_G = None
    if n_P > 0:
        loss_P, delta_G = predictor_loss(F[P], F_tgt, cfg.k, cfg.weight_eps)
        loss_theta = loss_theta + loss_P.mean()
        stats |= {"loss_P": loss_P.mean().item(), "delta_G": norm(delta_G).mean().item()}
    loss_psi = F.new_zeros(())
    if n_P < B:
        x_hat = z[C] - F[C]  # x̂ = f_θ(z, 0) = z - F_θ(z, 0)
        delta_N, loss_psi, r = corrector_direction(g_psi, teacher, x_hat, y[C], gamma[C],
                                                   cfg.corrector_interval, cfg.r_mean, cfg.r_std)
        lam = balance(delta_G, delta_N, cfg.alpha)  # λ = sg(α mean|Δ_G| / (mean|Δ_N| + ε))
        loss_C = corrector_loss(F[C], delta_N, lam, r if cfg.kl_weight else None)
        loss_theta = loss_theta + loss_C.mean()
        loss_psi = loss_psi.mean()
        stats |= {"loss_C": loss_C.mean().item(), "loss_psi": loss_psi.item(),
                  "delta_N": norm(delta_N).mean().item(), "lambda": float(lam)}

    opt_theta.zero_grad(set_to_none=True)
    opt_psi.zero_grad(set_to_none=True)
    (loss_theta + loss_psi).backward()  # θ and ψ share no graph: one backward serves both
    for opt in (opt_theta, opt_psi):
        params = [p for group in opt.param_groups for p in group["params"]]
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    stats["loss"] = loss_theta.item()
    return stats


# ---------------------------------------------------------------------------------------------------
# 7. One-step sampling
#
#       x̂ = f_θ(z, 0) = z - F_θ(z, 0, c, γ)          one network call
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_one_step(student, z, y, gamma):
    """One-step samples x̂ = f_θ(z, 0) from prior noise z."""
    return flow_map(student, z, torch.zeros(len(z), device=z.device), y, gamma)


# ---------------------------------------------------------------------------------------------------
# 8. Configuration: one dataclass; its fields are the command line's flags.
# ---------------------------------------------------------------------------------------------------


def opt(default, help, **argparse_kw):
    """A Config field: its default, its --help text, and any extra argparse settings."""
    return field(default=default, metadata={"help": help, **argparse_kw})


TOY_NAMES = ("moons", "8gaussians", "checkerboard", "spirals", "rings")


@dataclass
class Config:
    # what to run
    toy: str = opt(None, "2D toy: one of " + ", ".join(TOY_NAMES) + ", or a path to an N x 2 .npy "
                   "(or .npz with arrays `points` and optional `labels`)")
    out: str = opt(None, "output directory (default out/toy/<name>): metrics.json, figure, checkpoints")
    seed: int = opt(0, "random seed")
    toy_teacher: str = opt(None, "where the toy teacher is cached (default <out>/teacher.pt); reused when "
                           "it was trained on the same data and settings")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)", choices=("auto", "cpu", "cuda"))
    # the method
    loss: str = opt("both", "which FreeFlow losses train the student (ablations)",
                    choices=("both", "predictor", "corrector"))
    dsdt: str = opt("jvp", "∂_s F by forward-mode JVP or by a central finite difference", choices=("jvp", "fd"))
    fd_eps: float = opt(1e-3, "finite-difference step h in s")
    k: float = opt(1.0, "power of the predictor's adaptive weight w = 1 / (|Δ_G|²/d + ε)^k")
    weight_eps: float = opt(1e-3, "ε of the predictor's adaptive weight")
    predictor_frac: float = opt(0.75, "fraction of each batch for the predictor (the rest: corrector)")
    alpha: float = opt(1.0, "corrector balance α in λ = α mean|Δ_G| / mean|Δ_N|")
    s_zero_frac: float = opt(0.0, "fraction of predictor examples drawn at s = 0 (the rest: s ~ U[0, 1))")
    r_mean: float = opt(0.8, "mean of the corrector's LogitNormal noise level r")
    r_std: float = opt(1.0, "std of the corrector's LogitNormal noise level r")
    kl_weight: bool = opt(False, "weight the corrector by the integral-KL factor (1 - r)² / r")
    cfg: float = opt(None, "guidance scale γ for sampling and evaluation (needs class labels; default 1)")
    cfg_range: tuple = opt(None, "range of γ drawn per training example (default: γ alone)",
                           nargs=2, type=float, metavar=("LO", "HI"))
    guidance_interval: tuple = opt((0.0, 1.0), "times t where the teacher's CFG is on (sampling, predictor)",
                                   nargs=2, type=float, metavar=("LO", "HI"))
    corrector_interval: tuple = opt((0.0, 0.7), "times r where the corrector's teacher call uses CFG",
                                    nargs=2, type=float, metavar=("LO", "HI"))
    # optimisation
    steps: int = opt(6000, "distillation steps")
    batch_size: int = opt(512, "examples per step (predictor and corrector together)")
    lr: float = opt(1e-3, "Adam learning rate of the student θ and of g_ψ")
    lr_schedule: str = opt("constant", "learning-rate schedule over the run", choices=("constant", "cosine"))
    ema: float = opt(0.995, "EMA decay of the student's weights (the EMA student is evaluated)")
    grad_clip: float = opt(1.0, "gradient-norm clip per network (0: off)")
    ckpt_every: int = opt(500, "write a checkpoint every N steps (and at the end)")
    log_every: int = opt(50, "update the progress bar's numbers every N steps")
    # the 2D toy's teacher (trained once per data set, cached in the output directory)
    teacher_steps: int = opt(4000, "toy teacher: flow-matching steps")
    teacher_batch: int = opt(512, "toy teacher: batch size")
    teacher_lr: float = opt(2e-3, "toy teacher: Adam learning rate (cosine decay)")
    width: int = opt(96, "toy MLP width (teacher, student and g_ψ)")
    depth: int = opt(4, "toy MLP residual blocks")
    label_dropout: float = opt(0.2, "toy teacher: probability a label is replaced by ∅ (for CFG)")
    # evaluation of the toy
    eval_samples: int = opt(2000, "samples for the 2-Wasserstein distance and the errors")
    ode_tol: float = opt(1e-4, "reference ODE: double the RK4 steps until halving moves no sample more than this")

    POSITIVE_INTS = ("steps", "batch_size", "ckpt_every", "log_every", "teacher_steps", "teacher_batch",
                     "width", "depth", "eval_samples")

    def check(self):
        """Refuse bad values with one sentence that names the flag, the value and the fix."""
        finite = math.isfinite
        rules = [(self.POSITIVE_INTS, lambda v: v >= 1, "a positive integer"),
                 (("fd_eps", "weight_eps", "ode_tol", "r_std"), lambda v: finite(v) and v > 0, "a positive number"),
                 (("lr", "teacher_lr"), lambda v: finite(v) and 0 < v <= 1, "a number in (0, 1], e.g. 1e-3"),
                 (("predictor_frac", "s_zero_frac", "label_dropout"), lambda v: 0 <= v <= 1, "in [0, 1]"),
                 (("ema",), lambda v: 0 <= v < 1, "in [0, 1)"),
                 (("k", "alpha", "grad_clip"), lambda v: finite(v) and v >= 0, "a finite number >= 0"),
                 (("r_mean",), finite, "a finite number")]
        for names, ok, what in rules:
            for name in names:
                if not ok(getattr(self, name)):
                    raise FreeFlowError(f"--{flag(name)} must be {what} (got {getattr(self, name)}).")
        if self.batch_size < 2 and self.loss == "both":
            raise FreeFlowError("--batch-size must be at least 2 with --loss both (predictor and corrector).")
        for name in ("guidance_interval", "corrector_interval", "cfg_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not (finite(lo_hi[0]) and finite(lo_hi[1]) and lo_hi[0] <= lo_hi[1]):
                raise FreeFlowError(f"--{flag(name)} needs LO <= HI (got {lo_hi[0]} {lo_hi[1]}).")
        for name in ("guidance_interval", "corrector_interval"):
            lo, hi = getattr(self, name)
            if not (0 <= lo and hi <= 1):
                raise FreeFlowError(f"--{flag(name)} must lie within [0, 1] (got {lo} {hi}).")
        if self.cfg is not None and not finite(self.cfg):
            raise FreeFlowError(f"--cfg must be a finite number (got {self.cfg}).")
        return self

    def resolve(self, has_labels):
        """Fill the defaults that depend on the data: γ = 1 and its training range."""
        if not has_labels and (self.cfg is not None or self.cfg_range is not None):
            which = "--cfg" if self.cfg is not None else "--cfg-range"
            raise FreeFlowError(f"{which} needs class labels, and toy '{self.toy}' has none; drop {which} or "
                                f"use a labelled toy (moons, 8gaussians, spirals, rings, or an .npz with `labels`).")
        if self.cfg is None:
            self.cfg = 1.0
        if self.cfg_range is None:
            self.cfg_range = (self.cfg, self.cfg)
        self.cfg_range, self.guidance_interval = tuple(self.cfg_range), tuple(self.guidance_interval)
        self.corrector_interval = tuple(self.corrector_interval)
        return self


def flag(name):
    return name.replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2), like every other bad input here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = OneLineParser(
        prog="freeflow.py",
        description="FreeFlow: distil a flow-matching teacher into a one-step flow map, without data.",
        epilog="Example: python freeflow.py --toy moons   (teacher, distillation, evaluation, figure)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        kw = dict(f.metadata)
        if f.type == "bool":
            parser.add_argument(f"--{flag(f.name)}", action="store_true", **kw)
            continue
        kw.setdefault("type", {"int": int, "float": float, "str": str}.get(f.type, str))
        parser.add_argument(f"--{flag(f.name)}", default=f.default, **kw)
    return parser


def parse_config(argv=None):
    args = build_parser().parse_args(argv)
    return Config(**vars(args))


# ---------------------------------------------------------------------------------------------------
# 9. The training loop: Adam, an EMA of θ, atomic checkpoints, a progress bar.
# ---------------------------------------------------------------------------------------------------


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FreeFlowError("--device cuda was asked for, but PyTorch sees no GPU; use --device cpu.")
    return torch.device(name)


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """θ_ema ← β θ_ema + (1 - β) θ with a warm-up, β = min(decay, (1 + step) / (10 + step)), so that a
    short run's EMA is not stuck near the initial weights."""
    beta = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - beta)


def atomic_write(path, write):
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`: a crash or an error
    never leaves half a file, and an older file at `path` survives until the new one is complete."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def save_checkpoint(path, step, student, ema, g_psi, opt_theta, opt_psi, cfg):
    atomic_save({"step": step, "student": student.state_dict(), "ema": ema.state_dict(),
                 "g_psi": g_psi.state_dict(), "opt_theta": opt_theta.state_dict(),
                 "opt_psi": opt_psi.state_dict(), "config": dataclasses.asdict(cfg),
                 "rng": torch.get_rng_state()}, path)


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, read without unpickling code (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FreeFlowError(f"no checkpoint at {path}.") from None
    except Exception as e:  # noqa: BLE001 - anything torch.load raises means "not a checkpoint"
        raise FreeFlowError(f"{path} is not a FreeFlow checkpoint ({type(e).__name__}).") from None


def finite_weights(*nets):
    return all(bool(torch.isfinite(p).all()) for net in nets for p in net.parameters())


class Diverged(FreeFlowError):
    """The loss stopped being finite."""


def distill(teacher, cfg, shape, out_dir, progress=True):
    """Train a student (and g_ψ) from `teacher` with FreeFlow for cfg.steps steps.

    Writes out_dir/ckpt.pt every cfg.ckpt_every steps and at the end; if a loss turns NaN or infinite,
    stops with Diverged, naming the step and leaving the last good checkpoint untouched.
    Returns (EMA student, history of per-step stats)."""
    teacher.eval().requires_grad_(False)
    student, g_psi = make_student(teacher).train(), make_aux(teacher).train()
    student.requires_grad_(True)
    g_psi.requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt_theta = torch.optim.Adam(student.parameters(), lr=cfg.lr, foreach=True)
    opt_psi = torch.optim.Adam(g_psi.parameters(), lr=cfg.lr, foreach=True)
    if cfg.lr_schedule == "cosine":  # lr · ½ (1 + cos(π step / steps)), for both networks
        decay = lambda i: 0.5 * (1 + math.cos(math.pi * i / cfg.steps))  # noqa: E731
        schedules = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_theta, opt_psi)]
    else:
        schedules = []
    ckpt, last_good = os.path.join(out_dir, "ckpt.pt"), None
    history = []
    bar = tqdm(range(1, cfg.steps + 1), desc="distil", disable=not progress, dynamic_ncols=True)
    for step in bar:
        stats = train_step(student, g_psi, teacher, opt_theta, opt_psi, cfg, shape)
        checkpoint_now = step % cfg.ckpt_every == 0 or step == cfg.steps
        # a non-finite loss, or (checked before a checkpoint is written) a non-finite weight, stops the run
        broken_weights = checkpoint_now and not finite_weights(student, g_psi)
        if broken_weights or not all(math.isfinite(v) for v in stats.values()):
            bar.close()
            kept = (f"the last good checkpoint (step {last_good}) is {ckpt}" if last_good
                    else "no checkpoint was written")
            raise Diverged(f"training became non-finite at step {step} (loss {stats['loss']:.3g}); stopped, and "
                           f"{kept}; try a lower --lr or --grad-clip.")
        for schedule in schedules:
            schedule.step()
        ema_update(ema, student, cfg.ema, step)
        history.append(stats)
        if step % cfg.log_every == 0 or step == cfg.steps:
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "delta_G", "delta_N", "lambda")})
        if checkpoint_now:
            save_checkpoint(ckpt, step, student, ema, g_psi, opt_theta, opt_psi, cfg)
            last_good = step
    return ema, history


# ---------------------------------------------------------------------------------------------------
# 10. Command line
# ---------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    try:
        cfg.check()
        if cfg.toy is None:
            raise FreeFlowError("nothing to do: give --toy NAME (e.g. --toy moons); see --help.")
        from toy.run import run_toy

        run_toy(cfg)
    except FreeFlowError as e:
        print(f"freeflow.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print("freeflow.py: interrupted; checkpoints written so far are intact.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Import this file once more under its own name: the toy package imports `freeflow`, and its errors
    # must be the same FreeFlowError class that main() catches, not a copy living in `__main__`.
    from freeflow import main as freeflow_main

    sys.exit(freeflow_main())
