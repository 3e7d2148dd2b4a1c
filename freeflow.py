"""FreeFlow in PyTorch: flow map distillation without data.

A readable reimplementation of "Flow Map Distillation Without Data" (Tong, Ma, Xie, Jaakkola, 2025,
arXiv 2511.19428). A flow-matching teacher samples by integrating an ODE in many network calls; FreeFlow
distils it into a flow map that jumps from noise to data in ONE call, and it trains on no data at all:
every training state starts from the Gaussian prior, the one distribution teacher and student share.

Read this file top to bottom beside the paper and docs/method.md (the method written down, §1-8; what the paper
states and what this project chose; why the defaults are what they are, §11):

    0. Conventions                     the time direction, the network interface
    1. The prior                       z ~ N(0, I)
    2. The teacher                     velocity, classifier-free guidance, guidance interval, ODE sampler
    3. The student flow map            f(z, s) = z + (s - 1) F(z, s, c, γ)
    4. Predictor                       align the generating velocity  (docs/method.md §4)
    5. Corrector                       align the noising velocity, with the auxiliary network g_ψ (docs/method.md §5)
    6. One training step               the global batch, 75 / 25 split, balance λ  (docs/method.md §6)
    7. One-step sampling               x̂ = z - F(z, 0, c, γ)
    8. Configuration                   one dataclass, which also builds the command line
    9. The training loop               Adam, EMA, checkpoints; the JVP's precision, DDP, compile; a progress bar
   10. The ImageNet path               a SiT teacher, torchrun, REPA's samplers, sampling to an ADM .npz
   11. Command line                    python freeflow.py --toy moons | --teacher last.pt --res 256

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
import re
import shutil
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------
# 0. Conventions  (docs/method.md §2)
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
# embeddings of those inputs, so that the copy computes exactly what the original does (docs/method.md §3).
# ---------------------------------------------------------------------------------------------------


class FreeFlowError(Exception):
    """A problem with the user's input or run, told in one sentence; the command line prints it."""


def bcast(t, x):
    """Shape a per-example tensor (B,) so that it broadcasts against x (B, ...)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def device_of(net):
    """The device a network's weights (or buffers) live on."""
    return next(itertools.chain(net.parameters(), net.buffers()), torch.empty(0)).device


def full_precision(x):
    """A network's output in float32 when bf16 autocast produced it; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


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
    scale γ per example, uniform over cfg_range, so that one student serves every scale (docs/method.md §6)."""
    if num_classes > 0:
        y = torch.randint(0, num_classes, (batch,), device=device)
    else:
        y = torch.zeros(batch, dtype=torch.long, device=device)  # index 0 = num_classes = ∅
    lo, hi = cfg_range
    gamma = lo + (hi - lo) * torch.rand(batch, device=device)
    return y, gamma


# ---------------------------------------------------------------------------------------------------
# 2. The teacher  (docs/method.md §2)
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
        return full_precision(teacher(x, t, y))
    g = guide.nonzero().squeeze(1)
    v = teacher(torch.cat([x, x[g]]), torch.cat([t, t[g]]), torch.cat([y, torch.full_like(y[g], null)]))
    v = full_precision(v)
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
# 3. The student flow map  (docs/method.md §3)
#
#       f_θ(z, s) = z + (s - 1) · F_θ(z, s, c, γ)         z ~ N(0, I),  s ∈ [0, 1]
#
# The boundary f_θ(z, 1) = z holds by construction. F_θ is a copy of the teacher that still sees t = 1
# through its own time embedding, plus zero-initialised embeddings of s and γ: at initialisation
# F_θ(z, s) = v(z, 1), so f_θ(z, s) is the teacher's Euler step from z.
# ---------------------------------------------------------------------------------------------------


def make_student(teacher, extra_blocks=0):
    """F_θ: the teacher plus zero-initialised inputs s and γ, every weight trainable (a frozen teacher's
    copy would otherwise train only the new embeddings); extra_blocks (--extra-blocks, a SiT's): that many more
    blocks, each the identity at first, so the deeper student still starts as the teacher's Euler step."""
    student = teacher.extended(("s", "gamma"), extra_blocks) if extra_blocks else teacher.extended(("s", "gamma"))
    return student.requires_grad_(True)


def F_theta(student, z, s, y, gamma):
    """F_θ(z, s, c, γ): the student network, which always starts from t = 1 (float32 out, also under
    bf16 autocast, so that the losses are computed in float32)."""
    return full_precision(student(z, torch.ones_like(s), y, s=s, gamma=gamma))


def flow_map(student, z, s, y, gamma):
    """f_θ(z, s) = z + (s - 1) F_θ(z, s, c, γ): where the student says the teacher's path from z is at s."""
    return z + bcast(s - 1, z) * F_theta(student, z, s, y, gamma)


# ---------------------------------------------------------------------------------------------------
# 4. Predictor: align the generating velocity  (docs/method.md §4)
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


def jvp(f, primals, tangents):
    """(f(*primals), its derivative along `tangents`): forward-mode AD, one forward pass whose inputs carry
    tangents, so the derivative comes out beside the value. The inputs are copied (a slice of a batch cannot
    carry a tangent of its own); attention takes its plain math path (the fused kernels have no forward derivative)."""
    with sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
        out, d_out = fwAD.unpack_dual(f(*(fwAD.make_dual(p.clone(), d) for p, d in zip(primals, tangents))))
    return out, torch.zeros_like(out) if d_out is None else d_out  # None: f does not depend on its inputs


DSDT_METHODS = ("jvp", "jvp-fp32", "fd", "fd-forward")


@torch.no_grad()
def F_and_dF_ds(student, z, s, y, gamma, method="jvp", fd_eps=1e-3, F=None):
    """(F_θ(z, s), ∂_s F_θ(z, s)): the partial derivative in s only, z held still.

    method="jvp" (or "jvp-fp32", which only says in which precision a training run computes it: section 9):
    forward-mode AD with tangent 1 on s and 0 on z, exact. "fd": the central difference
    (F(s + h) - F(s - h)) / 2h, two extra forwards. "fd-forward": the one-sided (F(s + h) - F(s)) / h, one extra
    forward; its error is O(h) where the central one's is O(h²), and it looks past s = 1 only where the target's
    factor 1 - s is about 0. F: F_θ(z, s) when the caller already has it (the finite differences reuse it)."""
    F_of_s = lambda s_: F_theta(student, z, s_, y, gamma)  # noqa: E731
    if method in ("jvp", "jvp-fp32"):
        return jvp(F_of_s, (s,), (torch.ones_like(s),))  # ds = 1
    if method == "fd":
        F = F_of_s(s) if F is None else F
        return F, (F_of_s(s + fd_eps) - F_of_s(s - fd_eps)) / (2 * fd_eps)
    if method == "fd-forward":
        F = F_of_s(s) if F is None else F
        return F, (F_of_s(s + fd_eps) - F) / fd_eps
    raise ValueError(f"unknown ∂_s F method {method!r}; use one of {', '.join(DSDT_METHODS)}")


@torch.no_grad()
def predictor_target(teacher, z, s, y, gamma, interval, F, dF_ds):
    """F_tgt = sg( v_γ(f_θ(z, s), s) + (1 - s) ∂_s F ): the teacher queried at the student's own point,
    from the student's F_θ(z, s) and ∂_s F_θ(z, s) (F_and_dF_ds)."""
    x_s = z + bcast(s - 1, z) * F  # f_θ(z, s), the student's current point
    v = guided_velocity(teacher, x_s, s, y, gamma, interval)  # v(f_θ(z, s), s)
    return v + bcast(1 - s, z) * dF_ds  # F_tgt


def predictor_loss(F, F_tgt, k=1.0, eps=1e-3):
    """Per-example loss_P = w · |F - F_tgt|² / d with the power-law weight w = sg(1 / (|Δ_G|²/d + ε)^k).
    Returns (loss_P, Δ_G); Δ_G carries no gradient. With k = 1 the gradient is that of log(|Δ_G|²/d + ε), so ε
    sets where the weight turns: errors well under √ε pull like a squared error, larger ones less the larger
    they are. Too small an ε spends the gradient on examples that are already right (docs/toys.md)."""
    delta_G = F - F_tgt  # Δ_G = v_G - v = F - F_tgt
    sq = mean_sq(delta_G)  # |Δ_G|² / d
    w = 1.0 / (sq.detach() + eps) ** k  # w = sg(1 / (|Δ_G|²/d + ε)^k)
    return w * sq, delta_G.detach()


# ---------------------------------------------------------------------------------------------------
# 5. Corrector: align the noising velocity  (docs/method.md §5)
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
    return teacher.extended(("gamma",)).requires_grad_(True)


def flow_matching_loss(net, x, y, t, n, **inputs):
    """Plain flow matching in the project's convention: x_t = (1 - t) x + t n, target n - x.
    Returns (per-example |net(x_t, t) - (n - x)|² / d, the network's output). It trains the toy
    teacher on data and g_ψ on the student's samples."""
    x_t = (1 - bcast(t, x)) * x + bcast(t, x) * n
    out = full_precision(net(x_t, t, y, **inputs))
    return mean_sq(out - (n - x)), out


def sample_r(batch, mean=0.8, std=1.0, r_range=(0.0, 1.0), device="cpu"):
    """r ~ LogitNormal(mean, std): r = sigmoid(mean + std · N(0, 1)). Its mode r* solves
    2r* - 1 = (logit r* - mean) / std²; mean 0.8, std 1 put it at r* ≈ 0.8 (high noise), with mass on
    all of (0, 1): the paper finds that dropping the high-noise end is catastrophic. r_range = (lo, hi)
    truncates the distribution to [lo, hi] (for that ablation), drawing the normal by its inverse CDF
    between the quantiles of logit lo and logit hi."""
    if tuple(r_range) == (0.0, 1.0):  # the plain draw: the same random numbers as before --r-range existed
        return torch.sigmoid(mean + std * torch.randn(batch, device=device))
    ends = torch.special.ndtr((torch.logit(torch.tensor(r_range, dtype=torch.float64, device=device)) - mean) / std)
    u = ends[0] + (ends[1] - ends[0]) * torch.rand(batch, dtype=torch.float64, device=device)
    return torch.sigmoid(mean + std * torch.special.ndtri(u)).float()


def corrector_direction(g_psi, teacher, x_hat, y, gamma, interval, r, n):
    """Noise the detached one-step samples x̂ to level r with noise n and return (Δ_N, loss_ψ).

    One forward of g_ψ serves both of its uses: its detached output is v_N in Δ_N, and the same
    output, with gradients into ψ, is regressed onto n - x̂ (flow matching on the student's samples)."""
    x_hat = x_hat.detach()  # sg(x̂): g_ψ learns q, it does not move the student
    loss_psi, g = flow_matching_loss(g_psi, x_hat, y, r, n, gamma=gamma)  # loss_ψ, g_ψ(x_r, r)
    x_r = (1 - bcast(r, x_hat)) * x_hat + bcast(r, x_hat) * n
    u = guided_velocity(teacher, x_r, r, y, gamma, interval)  # u(x_r, r), guided only for r ≤ 0.7
    return g.detach() - u, loss_psi  # Δ_N = g_ψ(x_r, r) - u(x_r, r)


def corrector_loss(F0, delta_N, lam, r=None):
    """Per-example loss_C = λ · <F_θ(z, 0), sg(Δ_N)> / d. With r given, each example is weighted by the
    exact integral-KL factor (1 - r)² / r, which the paper drops (an option here)."""
    loss = lam * (F0 * delta_N.detach()).flatten(1).mean(1)
    return loss if r is None else loss * (1 - r) ** 2 / r


# ---------------------------------------------------------------------------------------------------
# 6. One training step  (docs/method.md §6)
#
# 75 % of the batch goes to the predictor, 25 % to the corrector; one joint update. The corrector's
# strength follows the predictor's error:
#       λ = sg( α · mean|Δ_G| / (mean|Δ_N| + ε) )
# g_ψ is updated once per step on the corrector's samples, plus --psi-steps extra times on fresh ones.
# Under torchrun the batch is the global batch: every process draws the same global noise and keeps its
# own share of the rows (rank_world, my_rows; global_mean averages over all of them).
# ---------------------------------------------------------------------------------------------------


def rank_world():
    """(this process's rank, number of processes): (0, 1) unless torchrun started several."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def global_mean(x):
    """The mean of x over the whole global batch, every process's rows included."""
    if rank_world()[1] == 1:
        return x.mean()
    total = torch.stack([x.sum(), torch.tensor(float(len(x)), device=x.device)])
    torch.distributed.all_reduce(total)
    return total[0] / total[1]


def my_rows(x, rank, world):
    """This process's share of rows drawn for the global batch (contiguous, equal shares)."""
    n = len(x) // world
    return x[rank * n:(rank + 1) * n]


class Passes(NamedTuple):
    """What a training step's passes run through: the student's and g_ψ's gradient passes, the teacher, and the
    ∂_s F pass. By default the plain networks and F_and_dF_ds; a training run wraps them (training_passes,
    section 9: DistributedDataParallel, torch.compile, the JVP's precision) around the same weights."""
    student: Callable
    g_psi: Callable
    teacher: Callable
    dF_ds: Callable = F_and_dF_ds


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
        return delta_N.new_tensor(alpha)  # in Δ_N's dtype
    return alpha * global_mean(norm(delta_G)) / (global_mean(norm(delta_N)) + eps)


def sample_s(batch, zero_frac=0.0, device="cpu"):
    """s ~ U[0, 1), with an optional fraction set to exactly 0, the one-step endpoint."""
    s = torch.rand(batch, device=device)
    return torch.where(torch.rand(batch, device=device) < zero_frac, torch.zeros_like(s), s)


def clip_and_step(optimizer, grad_clip):
    """Clip the gradient norm of the optimiser's parameters to grad_clip (0: off), then step."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()


def update_psi(student, g_psi, opt_psi, cfg, shape, n_C_all, device):
    """One extra flow-matching update of g_ψ on fresh one-step samples x̂ = f_θ(z, 0) (--psi-steps): g_ψ
    must follow the student's distribution as θ moves, or Δ_N points at where the student used to be."""
    rank, world = rank_world()
    y, gamma = sample_conditions(n_C_all, student.num_classes, cfg.cfg_range, device)
    if cfg.corrector_cfg is not None:
        gamma.fill_(cfg.corrector_cfg)
    z, y, gamma = (my_rows(v, rank, world) for v in (sample_prior(n_C_all, shape, device), y, gamma))
    x_hat = flow_map(student, z, torch.zeros(len(z), device=device), y, gamma).detach()  # sg(x̂)
    r = my_rows(sample_r(n_C_all, cfg.r_mean, cfg.r_std, cfg.r_range, device), rank, world)
    n = my_rows(sample_prior(n_C_all, shape, device), rank, world)
    loss_psi = flow_matching_loss(g_psi, x_hat, y, r, n, gamma=gamma)[0].mean()
    opt_psi.zero_grad(set_to_none=True)
    loss_psi.backward()
    clip_and_step(opt_psi, cfg.grad_clip)


def train_step(student, g_psi, teacher, opt_theta, opt_psi, cfg, shape, passes=None):
    """One FreeFlow update of θ (and of ψ). `cfg` is a Config (section 8); `shape` is one sample's shape;
    `passes` what the passes run through (Passes: the plain networks by default; a training run's, with the JVP's
    precision and speed, DDP and compile, come from training_passes, section 9). cfg.batch_size is the global
    batch: every process keeps its share of the predictor rows and of the corrector rows, so the result does not
    depend on how many processes share the work. Returns a dict of floats: the losses, mean|Δ_G|, mean|Δ_N|, λ
    and the split (this process's rows)."""
    passes = passes or Passes(student, g_psi, teacher)
    device = device_of(student)
    rank, world = rank_world()
    n_P_all = split_batch(cfg.batch_size, cfg.predictor_frac, cfg.loss)
    z = sample_prior(cfg.batch_size, shape, device)
    y, gamma = sample_conditions(cfg.batch_size, teacher.num_classes, cfg.cfg_range, device)
    if cfg.corrector_cfg is not None:  # the corrector's rows (the last) at one scale; the draw above is unchanged
        gamma[n_P_all:] = cfg.corrector_cfg
    s = sample_s(n_P_all, cfg.s_zero_frac, device)
    # this process keeps its share of the predictor rows (the first n_P_all) and of the corrector rows
    mine = lambda x: torch.cat([my_rows(x[:n_P_all], rank, world), my_rows(x[n_P_all:], rank, world)])  # noqa: E731
    z, y, gamma = mine(z), mine(y), mine(gamma)
    n_P, B = n_P_all // world, len(z)
    # predictor rows get s from its distribution; corrector rows sit at s = 0, the one-step endpoint
    s = torch.cat([my_rows(s, rank, world), torch.zeros(B - n_P, device=device)])
    P, C = slice(0, n_P), slice(n_P, B)

    F = F_theta(passes.student, z, s, y, gamma)  # one forward with gradients for every row
    stats = {"n_predictor": n_P, "n_corrector": B - n_P}
    loss_theta, loss_psi, delta_G = F.new_zeros(()), F.new_zeros(()), None
    if n_P > 0:  # ∂_s F on the plain student (this pass needs no gradient), then the teacher at f_θ(z, s)
        F_P, dF_ds = passes.dF_ds(student, z[P], s[P], y[P], gamma[P], cfg.dsdt, cfg.fd_eps, F[P].detach())
        F_tgt = predictor_target(passes.teacher, z[P], s[P], y[P], gamma[P], cfg.guidance_interval, F_P, dF_ds)
        loss_P, delta_G = predictor_loss(F[P], F_tgt, cfg.k, cfg.weight_eps)
        loss_theta = loss_theta + loss_P.mean()
        stats |= {"loss_P": loss_P.mean().item(), "delta_G": norm(delta_G).mean().item()}
    if n_P < B:
        x_hat = z[C] - F[C]  # x̂ = f_θ(z, 0) = z - F_θ(z, 0)
        n_C_all = cfg.batch_size - n_P_all
        r = my_rows(sample_r(n_C_all, cfg.r_mean, cfg.r_std, cfg.r_range, device), rank, world)  # noise level r
        n = my_rows(sample_prior(n_C_all, shape, device), rank, world)  # noise n
        delta_N, loss_psi = corrector_direction(passes.g_psi, passes.teacher, x_hat, y[C], gamma[C],
                                                cfg.corrector_interval, r, n)
        lam = balance(delta_G, delta_N, cfg.alpha)  # λ = sg(α mean|Δ_G| / (mean|Δ_N| + ε))
        loss_C = corrector_loss(F[C], delta_N, lam, r if cfg.kl_weight else None)
        loss_theta = loss_theta + loss_C.mean()
        loss_psi = loss_psi.mean()
        stats |= {"loss_C": loss_C.mean().item(), "loss_psi": loss_psi.item(),
                  "delta_N": norm(delta_N).mean().item(), "lambda": float(lam)}

    opt_theta.zero_grad(set_to_none=True)
    opt_psi.zero_grad(set_to_none=True)
    (loss_theta + loss_psi).backward()  # θ and ψ share no graph: one backward serves both
    for optimizer in (opt_theta, opt_psi):
        clip_and_step(optimizer, cfg.grad_clip)
    if n_P < B:
        for _ in range(cfg.psi_steps):
            update_psi(student, passes.g_psi, opt_psi, cfg, shape, cfg.batch_size - n_P_all, device)
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
DATA_TIMES = ("uniform", "meanflow")  # how the data-based baseline draws (t, s), its default first (toy/mismatch.py)


@dataclass
class Config:
    # the run
    toy: str = opt(None, "a 2D toy (" + ", ".join(TOY_NAMES) + ", or an N x 2 .npy, or an .npz with `points` and "
                   "optional `labels`), or digits: real 8 x 8 digits and a small SiT teacher (needs scikit-learn)")
    teacher: str = opt(None, "ImageNet: the SiT checkpoint to distil (REPA's last.pt, SiT-XL-2-256x256.pt); no data")
    res: int = opt(256, "ImageNet: image resolution (256 or 512; latents are res / 8); must match the teacher")
    out: str = opt(None, "output directory (default out/toy/<name>, out/imagenet, or out/samples)")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)", choices=("auto", "cpu", "cuda"))
    resume: bool = opt(False, "continue the run whose checkpoint is <out>/ckpt.pt")
    ckpt_every: int = opt(500, "write a checkpoint every N steps (and at the end)")
    log_every: int = opt(50, "update the progress bar's numbers every N steps")
    # the method
    loss: str = opt("both", "which FreeFlow losses train the student (ablations)",
                    choices=("both", "predictor", "corrector"))
    dsdt: str = opt("jvp", "∂_s F: forward-mode JVP in the run's precision, the JVP in float32, the central "
                    "difference (F(s+h) - F(s-h)) / 2h, or the one-sided (F(s+h) - F(s)) / h", choices=DSDT_METHODS)
    fd_eps: float = opt(1e-3, "finite-difference step h in s (0.05 under bf16: docs/imagenet.md)")
    k: float = opt(1.0, "power of the predictor's adaptive weight w = 1 / (|Δ_G|²/d + ε)^k")
    weight_eps: float = opt(1e-2, "ε of the predictor's adaptive weight: errors well under √ε are weighted alike")
    predictor_frac: float = opt(0.75, "fraction of each batch for the predictor (the rest: corrector)")
    alpha: float = opt(1.0, "corrector balance α in λ = α mean|Δ_G| / mean|Δ_N|")
    s_zero_frac: float = opt(0.0, "fraction of predictor examples drawn at s = 0 (the rest: s ~ U[0, 1))")
    r_mean: float = opt(0.8, "mean of the corrector's LogitNormal noise level r")
    r_std: float = opt(1.0, "std of the corrector's LogitNormal noise level r")
    r_range: tuple = opt((0.0, 1.0), "the corrector's r is drawn only in [LO, HI] (its LogitNormal truncated; an "
                         "ablation: the paper finds [0, 0.6] catastrophic)", nargs=2, type=float, metavar=("LO", "HI"))
    kl_weight: bool = opt(False, "weight the corrector by the integral-KL factor (1 - r)² / r")
    psi_steps: int = opt(None, "extra updates of g_ψ per step on fresh one-step samples (DMD2's two time scales); "
                               "default 4 with --loss corrector, where a lagging g_ψ collapsed the student, else 0")
    cfg: float = opt(None, "guidance scale γ for sampling and evaluation (default 1; needs class labels)")
    cfg_range: tuple = opt(None, "range of γ drawn per training example (default: γ alone)",
                           nargs=2, type=float, metavar=("LO", "HI"))
    guidance_interval: tuple = opt((0.0, 1.0), "times t where the teacher's CFG is on (sampling, predictor)",
                                   nargs=2, type=float, metavar=("LO", "HI"))
    corrector_interval: tuple = opt((0.0, 0.7), "times r where the corrector's teacher call uses CFG",
                                    nargs=2, type=float, metavar=("LO", "HI"))
    corrector_cfg: float = opt(None, "train the corrector's rows and g_ψ at this γ alone, e.g. 1: the teacher's own "
                               "distribution (default: drawn like the predictor's; docs/corrector.md)")
    extra_blocks: int = opt(0, "SiT students: this many transformer blocks more than the teacher, each the identity "
                            "at first (more capacity than the teacher; g_ψ keeps the teacher's size)")
    # optimisation
    steps: int = opt(3500, "distillation steps")
    batch_size: int = opt(256, "examples per step (predictor and corrector together)")
    lr: float = opt(1.5e-3, "Adam learning rate of the student θ (and of g_ψ, unless --psi-lr)")
    psi_lr: float = opt(None, "Adam learning rate of g_ψ (default: --lr)")
    lr_schedule: str = opt("cosine", "learning-rate schedule over the run", choices=("constant", "cosine"))
    warmup: int = opt(0, "linear learning-rate warm-up over the first N steps, under --lr-schedule (0: none)")
    ema: float = opt(0.995, "EMA decay of the student's weights (the EMA student is evaluated)")
    grad_clip: float = opt(1.0, "gradient-norm clip per network (0: off)")
    # the data-based baseline (digits, toy/mismatch.py)
    states: str = opt("prior", "where the training states come from: prior (FreeFlow: noise) or data (digits: "
                      "MeanFlow distillation on noised real digits, a baseline)", choices=("prior", "data"))
    augment_shift: int = opt(0, "with --states data: shift each digit by up to N pixels along each axis (random per "
                             "example): the augmentation of the noised data that makes it mismatch the teacher")
    data_fraction: float = opt(1.0, "with --states data: train on this share of the digits (a seeded subset)")
    data_times: str = opt(DATA_TIMES[0], "with --states data: how (t, s) are drawn: uniform (s < t on every row) "
                          "or meanflow (MeanFlow's: s = t on 75 %%); docs/mismatch.md", choices=DATA_TIMES)
    # precision and speed
    precision: str = opt("auto", "bf16: bf16 autocast for every pass (the JVP too unless --dsdt jvp-fp32); auto: "
                         "bf16 on a GPU, fp32 on the CPU", choices=("auto", "fp32", "bf16"))
    compile: bool = opt(False, "torch.compile every pass of the step (gradient passes, teacher, ∂_s F)")
    compile_mode: str = opt("default", "with --compile: reduce-overhead adds CUDA graphs (small networks), "
                            "max-autotune searches kernels longer", choices=("default", "reduce-overhead",
                                                                             "max-autotune"))
    # watching a run: previews, snapshots and a score while it trains; 0 turns each off
    preview_every: int = opt(0, "every N steps write preview/step_XXXXXXX.png: one-step samples of the EMA student "
                             "from 64 fixed noises and labels at γ = --cfg (ImageNet: decoded with --vae)")
    keep_every: int = opt(0, "every N steps keep the EMA student's weights in snapshots/ema_XXXXXXX.pt (no optimiser "
                          "state; loads with sit.load_teacher(path, resolution=None) and --student)")
    fid_every: int = opt(0, "every N steps score --fid-samples one-step samples of the EMA student at γ = --cfg "
                         "into log.jsonl and keep the best in snapshots/ema_best.pt (ImageNet: FID by fid.py, needs "
                         "--fid-ref, --fid-weights, --vae; digits: the Fréchet distance in the digits CNN's features)")
    fid_samples: int = opt(5000, "samples per --fid-every score (the same noise every time), over all processes")
    # ImageNet sampling
    student: str = opt(None, "ImageNet: sample from this FreeFlow checkpoint (one network call a sample)")
    sampler: str = opt(None, "ImageNet: sample from --teacher with its own sampler instead of distilling "
                       "(--steps N: 250 for sde, 50 for ode by default)", choices=("ode", "sde"))
    heun: bool = opt(False, "with --sampler ode: Heun steps instead of Euler")
    num_samples: int = opt(None, "ImageNet: how many samples to generate (with --student or --sampler)")
    sample_batch: int = opt(64, "ImageNet: samples per network batch on each GPU")
    vae: str = opt(None, "ImageNet: a local diffusers AutoencoderKL directory (e.g. sd-vae-ft-ema) to decode "
                   "latents into images; without it the latents are written")
    fid_ref: str = opt(None, "ImageNet: score the samples with fid.py against this ADM reference batch")
    fid_weights: str = opt(None, "with --fid-ref: the FID Inception weights (see fid.py --help); with --best-of: "
                                 "the verifier's Inception")
    best_of: int = opt(None, "ImageNet: best-of-N noise search: N noises per sample previewed by --student, the one "
                             "the Inception verifier finds most like its class sampled by --teacher's --sampler "
                             "(needs --vae, --fid-weights, --inception-labels)")
    inception_labels: str = opt(None, "with --best-of: the 2015 Inception graph's label map "
                                      "(imagenet_2012_challenge_label_map_proto.pbtxt, in inception-2015-12-05.tgz)")
    # the toys: the 2D toy's and the digits' teacher, networks and evaluation
    toy_teacher: str = opt(None, "where the toy teacher is cached (default <out>/teacher.pt); reused when "
                           "it was trained on the same data and settings")
    teacher_seed: int = opt(None, "toy teacher: the seed of its training and cache (default: --seed); another --seed "
                            "with the same --teacher-seed distils the same teacher again")
    teacher_steps: int = opt(2000, "toy teacher: flow-matching steps")
    teacher_batch: int = opt(512, "toy teacher: batch size")
    teacher_lr: float = opt(2e-3, "toy teacher: Adam learning rate (cosine decay)")
    width: int = opt(96, "toy network width (teacher, student and g_ψ): the 2D MLP's, or the digits SiT's")
    depth: int = opt(4, "toy network depth: the 2D MLP's residual blocks, or the digits SiT's blocks")
    x_freqs: int = opt(6, "toy MLP: sinusoidal features of x at N frequencies log-spaced from 1 to N (0: none)")
    label_dropout: float = opt(0.2, "toy teacher: probability a label is replaced by ∅ (for CFG)")
    eval_samples: int = opt(2000, "samples for the 2-Wasserstein distance and the errors")
    eval_cfg: tuple = opt(None, "digits: the guidance scales of the FD-vs-γ scan (toy/digits_scan.py), each model "
                          "measured at every one and its best named", nargs="+", type=float, metavar="γ")
    scan_samples: int = opt(1500, "digits: samples per scale in the FD-vs-γ scan")
    ode_tol: float = opt(1e-3, "reference ODE: double the RK4 steps until halving moves no sample more than this "
                         "(Euclidean norm); the finer solve is kept")

    def check(self):
        """Refuse bad values with one sentence that names the flag, the value and the fix (config_rules, then
        the flags that depend on each other)."""
        finite = math.isfinite
        for names, ok, what in config_rules():
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
        lo, hi = self.r_range
        if not (0 <= lo < hi <= 1):
            raise FreeFlowError(f"--r-range needs 0 <= LO < HI <= 1 (got {lo} {hi}).")
        if self.eval_cfg is not None and not all(finite(g) and g >= 0 for g in self.eval_cfg):
            raise FreeFlowError(f"--eval-cfg takes guidance scales >= 0 (got {' '.join(map(str, self.eval_cfg))}).")
        return self

    def resolve(self, has_labels):
        """Fill the defaults that depend on the data: γ = 1 and its training range."""
        guided = [flag(name) for name in ("cfg", "cfg_range", "corrector_cfg") if getattr(self, name) is not None]
        if not has_labels and guided:
            which = f"--{guided[0]}"
            raise FreeFlowError(f"{which} needs class labels, and toy '{self.toy}' has none; drop {which} or "
                                f"use a labelled toy (moons, 8gaussians, spirals, rings, or an .npz with `labels`).")
        if self.psi_steps is None:  # corrector alone: g_ψ must keep up (docs/corrector.md)
            self.psi_steps = 4 if self.loss == "corrector" else 0
        if self.cfg is None:
            self.cfg = 1.0
        if self.cfg_range is None:
            self.cfg_range = (self.cfg, self.cfg)
        self.cfg_range, self.guidance_interval = tuple(self.cfg_range), tuple(self.guidance_interval)
        self.corrector_interval, self.r_range = tuple(self.corrector_interval), tuple(self.r_range)
        return self


def config_rules():
    """Config.check's rules, one per kind of value: (fields, test, what the value must be)."""
    finite = math.isfinite
    positive_int, unit_lr, count = (lambda v: v >= 1), (lambda v: finite(v) and 0 < v <= 1), (lambda v: v >= 0)
    unset_or = lambda ok: lambda v: v is None or ok(v)  # noqa: E731 - None: the flag's default applies
    return [(("steps", "batch_size", "ckpt_every", "log_every", "teacher_steps", "teacher_batch", "width", "depth",
              "eval_samples", "res", "sample_batch", "scan_samples"), positive_int, "a positive integer"),
            (("num_samples", "best_of"), unset_or(positive_int), "a positive integer"),
            (("fid_samples",), lambda v: v >= 2, "at least 2 (a Fréchet distance needs two samples)"),
            (("fd_eps", "weight_eps", "ode_tol", "r_std"), lambda v: finite(v) and v > 0, "a positive number"),
            (("lr", "teacher_lr"), unit_lr, "a number in (0, 1], e.g. 1e-3"),
            (("psi_lr",), unset_or(unit_lr), "a number in (0, 1], e.g. 1e-3"),
            (("predictor_frac", "s_zero_frac", "label_dropout"), lambda v: 0 <= v <= 1, "in [0, 1]"),
            (("augment_shift",), lambda v: 0 <= v <= 4, "an integer from 0 to 4 (pixels of an 8 x 8 digit)"),
            (("data_fraction",), lambda v: 0 < v <= 1, "in (0, 1]: the data-based baseline needs data"),
            (("ema",), lambda v: 0 <= v < 1, "in [0, 1)"),
            (("k", "alpha", "grad_clip"), lambda v: finite(v) and v >= 0, "a finite number >= 0"),
            (("x_freqs", "extra_blocks", "warmup"), count, "an integer >= 0"),
            (("preview_every", "keep_every", "fid_every"), count, "an integer >= 0 (0: off)"),
            (("psi_steps",), unset_or(count), "an integer >= 0"),
            (("cfg", "corrector_cfg"), unset_or(lambda v: finite(v) and v >= 0), "a guidance scale >= 0, e.g. 1"),
            (("r_mean",), finite, "a finite number")]


def flag(name):
    return name.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside each flag; the examples keep their lines."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (and exit 2), like every other bad input here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see --help)\n")


# Defaults that differ on ImageNet (with --teacher or --student), on the digits and on a guided 2D toy; the dataclass
# holds the 2D toy's. Ours, not the paper's: why each is what it is, and what measured it, in docs/method.md §11.
IMAGENET_DEFAULTS = {"steps": 100_000, "batch_size": 256, "lr": 1e-4, "lr_schedule": "constant", "ema": 0.9999,
                     "weight_eps": 1e-3, "ckpt_every": 1000, "log_every": 100, "guidance_interval": (0.0, 0.7),
                     "cfg_range": (1.0, 2.0), "preview_every": 5000}
DIGITS_DEFAULTS = {"steps": 3000, "batch_size": 64, "lr": 3e-3, "alpha": 0.3, "width": 64, "teacher_steps": 3000,
                   "teacher_batch": 128, "teacher_lr": 1e-3, "label_dropout": 0.1, "cfg": 2.0, "cfg_range": (1.0, 3.0),
                   "guidance_interval": (0.0, 0.7), "eval_samples": 1000, "ode_tol": 0.08, "weight_eps": 1e-3,
                   "eval_cfg": (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)}
GUIDED_TOY_DEFAULTS = {"lr": 1e-3}
SAMPLER_STEPS = {"sde": 250, "ode": 50}  # REPA's SDE recipe; a 50-step ODE
# --help groups, each starting at the named Config field
HELP_GROUPS = {"toy": "the run", "loss": "the method", "steps": "optimisation",
               "states": "the data-based baseline (digits, toy/mismatch.py)", "precision": "precision and speed",
               "preview_every": "watching a run: previews, snapshots and a score while it trains; 0 turns each off",
               "student": "ImageNet sampling",
               "toy_teacher": "the toys: the 2D toy's and the digits' teacher, networks and evaluation"}


def build_parser(suppress=False):
    """The command line, one flag per Config field. suppress=True leaves unset flags out of the result
    (to tell which flags the user gave)."""
    parser = OneLineParser(
        prog="freeflow.py",
        description="FreeFlow: distil a flow-matching teacher into a one-step flow map, without data.",
        epilog="examples:\n"
               "  python freeflow.py --toy moons                 # teacher, distillation, evaluation, figure\n"
               "  python freeflow.py --toy digits                # the same on real 8 x 8 digits with a small SiT\n"
               "  torchrun --nproc-per-node 8 freeflow.py --teacher last.pt --res 256 --out out/repa256\n"
               "  python freeflow.py --student out/repa256/ckpt.pt --num-samples 50000 --cfg 1.5 --vae sd-vae-ft-ema",
        formatter_class=HelpFormatter)
    group = parser
    for f in dataclasses.fields(Config):
        if f.name in HELP_GROUPS:
            group = parser.add_argument_group(HELP_GROUPS[f.name])
        kw = dict(f.metadata)
        for what, defaults in (("ImageNet", IMAGENET_DEFAULTS), ("digits", DIGITS_DEFAULTS),
                               ("guided 2D toy", GUIDED_TOY_DEFAULTS)):
            if f.name in defaults:
                kw["help"] += f" [{what} default: {defaults[f.name]}]"
        default = argparse.SUPPRESS if suppress else f.default
        if f.type == "bool":
            group.add_argument(f"--{flag(f.name)}", action="store_true", default=default, **kw)
            continue
        kw.setdefault("type", {"int": int, "float": float, "str": str}.get(f.type, str))
        group.add_argument(f"--{flag(f.name)}", default=default, **kw)
    return parser


def parse_config(argv=None):
    args = build_parser().parse_args(argv)
    given = vars(build_parser(suppress=True).parse_args(argv))
    # the ImageNet path, the digits and a guided 2D toy have their own defaults for what was not given
    guided_toy = args.toy is not None and (args.cfg not in (None, 1.0) or args.cfg_range is not None)
    defaults = IMAGENET_DEFAULTS if args.teacher or args.student else DIGITS_DEFAULTS if args.toy == "digits" \
        else GUIDED_TOY_DEFAULTS if guided_toy else {}
    for name, value in defaults.items():
        if name not in given:
            setattr(args, name, value)
    if (args.teacher or args.student) and args.sampler and "steps" not in given:
        args.steps = SAMPLER_STEPS[args.sampler]
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


# Nothing lost: every path a command will write is checked before any work starts (a folder that can be made and
# written, a cache file that is ours or new), and a training run never replaces a run it should not (below).


def check_writable_dir(path, flag="--out", given=None):
    """Refuse, in one sentence, a directory this process could not create or write into: an existing file, or a
    folder (or the nearest existing folder above it) without write permission. Creates nothing. `given`: the path
    the user gave, when `path` is the folder of a file (named in the sentence instead)."""
    given = given or path
    if os.path.exists(path) and not os.path.isdir(path):
        if given != path:
            raise FreeFlowError(f"{flag} {given} cannot be written: {path} is a file, not a directory.")
        raise FreeFlowError(f"{flag} {path} is a file, not a directory; give a directory (it is created if needed).")
    here = os.path.abspath(path)
    while not os.path.exists(here):  # the folder would be made inside the nearest one that exists
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise FreeFlowError(f"{flag} {given} cannot be made: {here} is a file.")
    if not os.access(here, os.W_OK | os.X_OK):
        raise FreeFlowError(f"{flag} {given} cannot be written ({here} is read-only for this user); give a path you "
                            f"can write to.")


def saved_dict(path):
    """The dict a torch.save file holds, read without unpickling code and without reading its tensors (mmap);
    None if the file is not such a file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything torch.load raises means "not one of ours"
        return None
    return obj if isinstance(obj, dict) else None


def check_cache_file(path, flag, keys, what):
    """A cache this program writes (a toy teacher, the digits classifier) may replace only a file it recognises as
    its own (a dict with `keys`): refuse a directory, a foreign file, or a folder that cannot be written."""
    if os.path.isdir(path):
        raise FreeFlowError(f"{flag} {path} is a directory; give the path of a file (e.g. {path}/teacher.pt).")
    if os.path.exists(path):
        saved = saved_dict(path)
        if saved is None or not set(keys) <= set(saved):
            kind = "an unreadable file" if saved is None else f"a file with keys {', '.join(sorted(saved)[:6])}"
            raise FreeFlowError(f"{flag} {path} exists and is not {what} (it is {kind}); it would be overwritten, so "
                                f"give another path or move that file away.")
    check_writable_dir(os.path.dirname(path) or ".", flag, given=path)


CHECKPOINT_KEYS = ("step", "student", "ema", "g_psi", "opt_theta", "opt_psi", "config", "rng")
# what a training run writes into its folder: a new run replaces an older run's set of these as a whole
RUN_FILES = ("ckpt.pt", "log.jsonl", "metrics.json", "figure.png", "samples.npz", "scan.png", "preview", "snapshots")


def checkpoint_config(path):
    """The config of a FreeFlow training checkpoint, or one sentence saying what the file is instead."""
    saved = saved_dict(path)
    if saved is None:
        raise FreeFlowError(f"{path} is not a FreeFlow checkpoint (torch.load cannot read it).")
    if not set(CHECKPOINT_KEYS) <= set(saved):
        kind = "a SiT teacher or snapshot" if "ema" in saved or "model" in saved else "another kind of file"
        raise FreeFlowError(f"{path} is not a FreeFlow training checkpoint ({kind}: keys "
                            f"{', '.join(sorted(saved)[:6])}); a run's ckpt.pt holds {', '.join(CHECKPOINT_KEYS)}.")
    return saved["config"], int(saved["step"])


def check_run_folder(cfg, out):
    """Before any work, what a training run may do in its folder. --resume: the checkpoint exists, is one, was
    written with this run's settings, and is short of --steps. A new run: a ckpt.pt there must be a FreeFlow run's,
    and not an ImageNet distillation's (days of GPU time): a new run never replaces one (--resume continues it).
    A toy or digits run there is replaced, but only once the new run has its first checkpoint (distill)."""
    path = os.path.join(out, "ckpt.pt")
    if cfg.resume:
        if not os.path.exists(path):
            raise FreeFlowError(f"--resume: there is no checkpoint at {path}; drop --resume to start a new run.")
        saved, step = checkpoint_config(path)
        now = dataclasses.asdict(cfg)
        for key in now:
            if key not in RESUMABLE and key in saved and _plain(saved[key]) != _plain(now[key]):
                raise FreeFlowError(f"--resume: {path} was written with --{flag(key)} {_plain(saved[key])}, this run "
                                    f"has {_plain(now[key])}; use the same setting or another --out.")
        if step >= cfg.steps:
            raise FreeFlowError(f"--resume: {path} is at step {step}, and --steps is {cfg.steps}; raise --steps to "
                                f"train further.")
    elif os.path.exists(path):
        saved, step = checkpoint_config(path)
        if saved.get("teacher"):
            raise FreeFlowError(f"--out {out} holds an ImageNet distillation of {saved['teacher']} (ckpt.pt at step "
                                f"{step}), which a new run would replace; continue it with --resume (and --steps N to "
                                f"go further), or give another --out.")


def output_dir(cfg, default, training=True, checks=()):
    """--out (or `default`), created if needed, once every check has passed: check_writable_dir, for a training run
    check_run_folder, then each of `checks` (callables: a cache the run will write, say)."""
    out = cfg.out or default
    check_writable_dir(out)
    if training:
        check_run_folder(cfg, out)
    for check in checks:
        check()
    os.makedirs(out, exist_ok=True)
    return out


def set_aside(out_dir):
    """Move an earlier run's files (RUN_FILES) into <out>/.replaced, one rename each, so that a new run can be put in
    their place; returns that folder, or None if there was nothing to move. A .replaced left by a new run that was
    killed before its first checkpoint is put back first: the run it held is the folder's last complete one."""
    aside = os.path.join(out_dir, ".replaced")
    if os.path.isdir(aside):
        put_back(out_dir, aside)
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(out_dir, name))]
    if not present:
        return None
    os.makedirs(aside)
    for name in present:
        os.replace(os.path.join(out_dir, name), os.path.join(aside, name))
    return aside


def put_back(out_dir, aside):
    """Undo set_aside: remove what the new run wrote of RUN_FILES and move the earlier run's files back."""
    for name in RUN_FILES:
        mine, theirs = os.path.join(out_dir, name), os.path.join(aside, name)
        if os.path.isdir(mine) and not os.path.islink(mine):
            shutil.rmtree(mine)
        elif os.path.lexists(mine):
            os.remove(mine)
        if os.path.lexists(theirs):
            os.replace(theirs, mine)
    shutil.rmtree(aside)


@contextlib.contextmanager
def replacing_earlier_run(out_dir, new_run):
    """For a new run (new_run true): set an earlier run's files aside, yield superseded(), which deletes them (call it
    once the new run has written its first checkpoint), and put them back if the run stops before that, by an
    error or Ctrl-C: the folder then holds the earlier run as it was. For a resumed run it does nothing."""
    aside = set_aside(out_dir) if new_run else None

    def superseded():
        nonlocal aside
        if aside is not None:
            shutil.rmtree(aside)
            aside = None
    try:
        yield superseded
    except BaseException:
        if aside is not None:
            put_back(out_dir, aside)
        raise


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


def save_grid(path, images, cols=8, pad=0):
    """The first cols² uint8 images (N x H x W x 3) as one PNG, `pad` grey pixels between them, written atomically."""
    import matplotlib.image
    import numpy as np
    images = images[: cols * cols]
    rows = math.ceil(len(images) / cols)
    n, h, w, c = images.shape
    H, W = h + pad, w + pad
    grid = np.full((rows * H - pad, cols * W - pad, c), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * H:(i // cols) * H + h, (i % cols) * W:(i % cols) * W + w] = img
    atomic_write(path, lambda tmp: matplotlib.image.imsave(tmp, grid, format="png"))


# Settings that may change when a run is resumed (how long, where, how fast, and the sampling flags that
# training ignores); any other difference is refused.
RESUMABLE = ("steps", "out", "resume", "ckpt_every", "log_every", "device", "compile", "compile_mode", "precision",
             "student", "sampler", "heun", "num_samples", "sample_batch", "vae", "fid_ref", "fid_weights",
             "best_of", "inception_labels", "preview_every", "keep_every", "fid_every", "fid_samples", "eval_cfg",
             "scan_samples")


def save_checkpoint(path, step, nets, opts, schedules, cfg):
    """Everything a run needs to continue exactly: weights, optimiser and schedule states, the step, the
    random state and the config. Written atomically (temporary file, then rename)."""
    student, ema, g_psi = nets
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    obj = {"step": step, "student": student.state_dict(), "ema": ema.state_dict(), "g_psi": g_psi.state_dict(),
           "opt_theta": opts[0].state_dict(), "opt_psi": opts[1].state_dict(),
           "schedules": [sch.state_dict() for sch in schedules], "config": dataclasses.asdict(cfg), "rng": rng}
    if hasattr(ema, "config"):  # what rebuilds the network besides its weights (sit.load_teacher reads a SiT's
        obj["net"] = ema.config()  # head count and time convention here)
    atomic_save(obj, path)


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, read without unpickling code (weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FreeFlowError(f"no checkpoint at {path}.") from None
    except Exception as e:  # noqa: BLE001 - anything torch.load raises means "not a checkpoint"
        raise FreeFlowError(f"{path} is not a FreeFlow checkpoint ({type(e).__name__}).") from None


def progress_bar(iterable, desc, progress, rank, **kw):
    """A tqdm bar over `iterable`, shown when `progress` is asked for and by process 0 alone."""
    return tqdm(iterable, desc=desc, disable=not progress or rank > 0, dynamic_ncols=True, **kw)


def lr_factor(cfg, i):
    """The learning rate of step i + 1 over --lr: min(1, (i + 1) / warm-up) · ½ (1 + cos(π i / steps)) under the
    cosine schedule, the warm-up alone under the constant one (both networks)."""
    warm = min(1.0, (i + 1) / cfg.warmup) if cfg.warmup else 1.0
    return warm * (0.5 * (1 + math.cos(math.pi * i / cfg.steps)) if cfg.lr_schedule == "cosine" else 1.0)


def resume_from(path, cfg, nets, opts, schedules):
    """Load a checkpoint into the run's networks, optimisers and random state; return its step.
    Refuses (check_run_folder) a file that is no training checkpoint, one written with other settings (naming the
    first that differs), or one already at --steps; the commands have made these checks before any work."""
    check_run_folder(cfg, os.path.dirname(path))
    ckpt = load_checkpoint(path)
    for net, key in zip(nets, ("student", "ema", "g_psi")):
        net.load_state_dict(ckpt[key])
    opts[0].load_state_dict(ckpt["opt_theta"])
    opts[1].load_state_dict(ckpt["opt_psi"])
    for sch, state in zip(schedules, ckpt.get("schedules", [])):
        sch.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def finite_weights(*nets):
    return all(bool(torch.isfinite(p).all()) for net in nets for p in net.parameters())


class Diverged(FreeFlowError):
    """The loss stopped being finite."""


# The JVP's precision and speed. Section 4's F_and_dF_ds is the method; a training run computes it through
# dF_ds_pass, which adds what a real network needs: attention the forward mode can differentiate, the run's
# precision, and explicit zero tangents where PyTorch would otherwise take a slow path.

def exact_mode(device_type):
    """float32: autocast off, for a float32 JVP (--dsdt jvp-fp32, or any JVP of a float32 run); section 4's jvp
    already takes the math attention path, which has a forward derivative."""
    return torch.autocast(device_type, enabled=False)


_ATTENTION = weakref.WeakKeyDictionary()  # network -> its modules with a fused attention path, found once


@contextlib.contextmanager
def hand_written_attention(net):
    """For a bf16 JVP: every module of `net` with a fused attention path (a `fused_attention` attribute, as
    sit.SiT has) computes softmax(q kᵀ / √d) v by hand instead. The fused kernels have no forward derivative,
    and the math path of scaled_dot_product_attention computes bf16 inputs in float32 (so the JVP's attention
    would stay float32); by hand, its matrix products run in bf16 under autocast like every other pass's."""
    if net not in _ATTENTION:
        _ATTENTION[net] = [m for m in net.modules() if getattr(m, "fused_attention", False)]
    for m in _ATTENTION[net]:
        m.fused_attention = False
    try:
        yield
    finally:
        for m in _ATTENTION[net]:
            m.fused_attention = True


_ZERO_TANGENT = weakref.WeakKeyDictionary()  # network -> its zero-tangent parameters, found once


def zero_tangent_params(net):
    """(name, parameter) of the biases, other 1-D parameters and embedding tables of `net` (see with_zero_tangents).
    Found once per network: walking the modules every step cost about 0.6 ms of a 15 ms toy step."""
    if net not in _ZERO_TANGENT:
        tables = {f"{name}.weight" for name, m in net.named_modules() if isinstance(m, torch.nn.Embedding)}
        _ZERO_TANGENT[net] = [(name, p) for name, p in net.named_parameters() if p.dim() <= 1 or name in tables]
    return _ZERO_TANGENT[net]


def with_zero_tangents(net):
    """`net` as a function whose biases, other 1-D parameters and embedding tables carry explicit zero tangents
    (call it inside a forward-mode JVP). Without them autograd gives them lazy "ZeroTensor" tangents, and each add
    that meets one takes a slow path in PyTorch (shape inference in Python, 0.1-0.4 ms an op on CPU): once per
    linear layer. The numbers are the same; weight matrices keep lazy tangents (a real zero there costs a matrix
    product, where a zero table costs only a lookup)."""
    def call(*args, **kwargs):
        zeros = {name: fwAD.make_dual(p, torch.zeros_like(p)) for name, p in zero_tangent_params(net)}
        return torch.func.functional_call(net, zeros, args, kwargs)
    return call


def dF_ds_pass(student, z, s, y, gamma, method="jvp", fd_eps=1e-3, F=None):
    """F_and_dF_ds as a training run computes it. A JVP runs in the run's precision: bf16 under bf16 autocast,
    with attention by hand (hand_written_attention), or float32 with --dsdt jvp-fp32 or in a float32 run
    (exact_mode); its network carries zero tangents (with_zero_tangents). The finite differences are
    F_and_dF_ds's own."""
    if method not in ("jvp", "jvp-fp32"):
        return F_and_dF_ds(student, z, s, y, gamma, method, fd_eps, F)
    float32 = method == "jvp-fp32" or not torch.is_autocast_enabled(z.device.type)
    with exact_mode(z.device.type) if float32 else hand_written_attention(student):
        return F_and_dF_ds(with_zero_tangents(student), z, s, y, gamma, method, fd_eps, F)


def compiled(fn, cfg):
    """torch.compile(fn) with --compile (in --compile-mode), fn itself without."""
    return torch.compile(fn, mode=None if cfg.compile_mode == "default" else cfg.compile_mode) if cfg.compile else fn


def wrap_for_training(net, cfg):
    """The module the gradient passes go through: DistributedDataParallel (its backward averages the
    gradients over the processes) and/or torch.compile, around the same weights."""
    if rank_world()[1] > 1:
        device = device_of(net)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    return compiled(net, cfg)


def training_passes(student, g_psi, teacher, cfg):
    """The Passes of a training run: the student's and g_ψ's gradient passes (wrap_for_training), the teacher,
    and the ∂_s F pass dF_ds_pass, the last two compiled too with --compile. The ∂_s F pass runs on the plain
    student: DDP's wrapper is for gradients, and this pass has none."""
    return Passes(wrap_for_training(student, cfg), wrap_for_training(g_psi, cfg), compiled(teacher, cfg),
                  compiled(dF_ds_pass, cfg))


def autocast(cfg, device):
    """bf16 autocast for every pass (a --dsdt jvp-fp32 JVP turns it off again, see exact_mode)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def memory_in_use(device):
    """Peak memory in GiB: the GPU's allocator peak, or this process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ranks_agree(*nets):
    """After training, every process must hold the same weights (DDP keeps them in step)."""
    world = rank_world()[1]
    if world == 1:
        return True
    sums = torch.stack([torch.cat([p.detach().double().flatten() for p in net.parameters()]).sum()
                        for net in nets]).to(device_of(nets[0]))
    gathered = [torch.empty_like(sums) for _ in range(world)]
    torch.distributed.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def distill(teacher, cfg, shape, out_dir, progress=True, callback=None, step_fn=None):
    """Train a student (and g_ψ) from `teacher` with FreeFlow up to cfg.steps steps.

    Writes out_dir/ckpt.pt every cfg.ckpt_every steps and at the end (process 0 only), and with cfg.resume
    continues from it. If a loss turns NaN or infinite, stops with Diverged, naming the step and leaving
    the last good checkpoint untouched. Every cfg.log_every steps process 0 appends the losses, |Δ_G|,
    |Δ_N|, λ, images/s and peak memory to out_dir/log.jsonl. callback(step, ema student, stats), if given,
    runs after every step (e.g. to measure a learning curve). step_fn, with train_step's signature, replaces
    FreeFlow's step and nothing else (a baseline, toy/mismatch.py). Returns (EMA student, history of stats)."""
    rank, world = rank_world()
    n_P = split_batch(cfg.batch_size, cfg.predictor_frac, cfg.loss)
    if n_P % world or (cfg.batch_size - n_P) % world:  # train_step gives each process equal shares
        raise FreeFlowError(f"--batch-size {cfg.batch_size} ({n_P} predictor + {cfg.batch_size - n_P} corrector "
                            f"rows) does not split evenly over {world} processes; use a multiple of {4 * world}.")
    device = device_of(teacher)
    teacher.eval().requires_grad_(False)
    student, g_psi = make_student(teacher, cfg.extra_blocks).train(), make_aux(teacher).train()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opts = (torch.optim.Adam(student.parameters(), lr=cfg.lr, fused=True),
            torch.optim.Adam(g_psi.parameters(), lr=cfg.psi_lr or cfg.lr, fused=True))
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: lr_factor(cfg, i)) for o in opts] \
        if cfg.lr_schedule == "cosine" or cfg.warmup else []
    ckpt, log = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
    first = resume_from(ckpt, cfg, (student, ema, g_psi), opts, schedules) + 1 if cfg.resume else 1
    with replacing_earlier_run(out_dir, first == 1 and rank == 0) as superseded:
        if first == 1 and rank == 0:
            open(log, "w").close()  # a new run starts a new log; a resumed one appends
        last_good = first - 1 if first > 1 else None
        passes = training_passes(student, g_psi, teacher, cfg)
        history, clock, clock_step = [], time.perf_counter(), first - 1
        bar = progress_bar(range(first, cfg.steps + 1), "distil", progress, rank, initial=first - 1, total=cfg.steps)
        for step in bar:
            with autocast(cfg, device):
                stats = (step_fn or train_step)(student, g_psi, teacher, *opts, cfg, shape, passes)
            checkpoint_now = step % cfg.ckpt_every == 0 or step == cfg.steps
            # a non-finite loss, or (checked before a checkpoint is written) a non-finite weight, stops the run
            broken = (checkpoint_now and not finite_weights(student, g_psi)) or \
                not all(math.isfinite(v) for v in stats.values())
            if world > 1:  # every process stops together, whichever saw it (the others would wait forever)
                flag = torch.tensor(float(broken), device=device)
                torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                broken = bool(flag.item())
            if broken:  # (leaving the loop closes the bar, so the message starts on a line of its own)
                kept = (f"the last good checkpoint (step {last_good}) is {ckpt}" if last_good
                        else "no checkpoint was written")
                raise Diverged(f"training became non-finite at step {step} (loss {stats['loss']:.3g}); stopped, and "
                               f"{kept}; try a lower --lr or --grad-clip.")
            for schedule in schedules:
                schedule.step()
            ema_update(ema, student, cfg.ema, step)
            history.append(stats)
            if callback is not None:
                watched = time.perf_counter()
                callback(step, ema, stats)
                clock += time.perf_counter() - watched  # previews and scores do not count against images/s
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                stats["images_per_s"] = cfg.batch_size * (step - clock_step) / (now - clock)
                stats["memory_gib"] = memory_in_use(device)
                clock, clock_step = now, step
                bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()
                                 if k in ("loss", "delta_G", "delta_N", "lambda", "images_per_s")})
                if rank == 0:
                    with open(log, "a") as f:
                        f.write(json.dumps({"step": step, **stats}) + "\n")
            if checkpoint_now:
                if rank == 0:
                    save_checkpoint(ckpt, step, (student, ema, g_psi), opts, schedules, cfg)
                    superseded()  # the new run has a checkpoint: an earlier run's files go
                last_good = step
    if not ranks_agree(student, ema, g_psi):
        raise FreeFlowError("the processes ended with different weights: gradient synchronisation failed.")
    return ema, history


# Watching a long run: the callback distill() calls after every step (built by the run: the toys, the digits and
# ImageNet each say how their samples become images and how they are scored). Previews, snapshots and scores are
# written by process 0, atomically; none of them draws from the training's random stream, so a run watched or
# not, resumed or not, trains the same weights bit for bit.

PREVIEWS = 64  # an 8 x 8 grid


def preview_inputs(num_classes, shape, cfg, device):
    """The noises z, labels and γ of every preview of a run: the same at every step (their own generator, seeded
    by --seed), the labels spread evenly over the classes (∅ when there are none), γ = --cfg."""
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    z = torch.randn((PREVIEWS, *shape), generator=g).to(device)
    y = torch.arange(PREVIEWS) * num_classes // PREVIEWS if num_classes else torch.zeros(PREVIEWS, dtype=torch.long)
    return z, y.to(device), torch.full((PREVIEWS,), float(cfg.cfg), device=device)


def save_snapshot(path, ema, step, cfg):
    """The EMA student's weights alone (no optimiser state), in the layout sit.load_teacher reads."""
    obj = {"ema": ema.state_dict(), "step": step, "config": dataclasses.asdict(cfg)}
    if hasattr(ema, "config"):
        obj["net"] = ema.config()
    atomic_save(obj, path)


def logged_best(log, key):
    """(value, step) of the lowest `key` in a run's log.jsonl so far ((inf, None) if none): a resumed run keeps
    its best."""
    best = (math.inf, None)
    if os.path.exists(log):
        with open(log) as f:
            for entry in map(json.loads, filter(str.strip, f)):
                if key in entry and entry[key] < best[0]:
                    best = (entry[key], entry["step"])
    return best


def watch(cfg, out_dir, shape, num_classes, device, to_images, score=None):
    """callback(step, ema, stats) for distill(): every --preview-every steps preview/step_XXXXXXX.png (the EMA
    student's one-step samples from preview_inputs, made into uint8 images N x H x W x 3 by to_images); every
    --keep-every steps snapshots/ema_XXXXXXX.pt; every --fid-every steps score(ema) -> {name: value, ...}, lower
    first value is better (every process takes part, process 0 gets the numbers), appended to log.jsonl, printed
    with the best so far, whose weights go to snapshots/ema_best.pt."""
    z, y, gamma = preview_inputs(num_classes, shape, cfg, device)
    log, snapshots = os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "snapshots")
    best = {}
    every = lambda n, step: n > 0 and step % n == 0  # noqa: E731

    def callback(step, ema, stats):
        rank = rank_world()[0]
        if not any(every(n, step) for n in (cfg.preview_every, cfg.keep_every, cfg.fid_every)):
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if every(cfg.preview_every, step) and rank == 0:
                with torch.no_grad(), autocast(cfg, device):
                    x = sample_one_step(ema, z, y, gamma)
                os.makedirs(os.path.join(out_dir, "preview"), exist_ok=True)
                save_grid(os.path.join(out_dir, "preview", f"step_{step:07d}.png"), to_images(x.float()), pad=2)
            if every(cfg.keep_every, step) and rank == 0:
                os.makedirs(snapshots, exist_ok=True)
                save_snapshot(os.path.join(snapshots, f"ema_{step:07d}.pt"), ema, step, cfg)
            if score is not None and every(cfg.fid_every, step):
                result = score(ema)
                if rank == 0:
                    key = next(iter(result))
                    if key not in best:
                        best[key] = logged_best(log, key)
                    if result[key] < best[key][0]:
                        best[key] = (result[key], step)
                        os.makedirs(snapshots, exist_ok=True)
                        save_snapshot(os.path.join(snapshots, "ema_best.pt"), ema, step, cfg)
                    with open(log, "a") as f:
                        f.write(json.dumps({"step": step, **result, f"best_{key}": best[key][0],
                                            "best_step": best[key][1]}) + "\n")
                    tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items())
                               + f" (best {best[key][0]:.4g} at step {best[key][1]})")
    return callback


# ---------------------------------------------------------------------------------------------------
# 10. The ImageNet path: a SiT teacher on SD-VAE latents, and still no data
#
# Nothing here reads a dataset: the teacher's checkpoint is the only input of distillation. Training
# states come from the prior (section 1); labels are uniform over the 1000 classes. The same distill()
# as the toy runs, on one process or many (torchrun: one process per GPU, DistributedDataParallel).
# Images appear only when samples are decoded: image = VAE.decode(latent / 0.18215).
# ---------------------------------------------------------------------------------------------------

LATENT_SCALE = 0.18215  # SD-VAE latents are scaled by this factor for SiT


def start_processes(cfg):
    """The device of this process; with torchrun (WORLD_SIZE > 1) also joins the process group: NCCL on
    GPUs (one GPU per process, LOCAL_RANK), gloo on the CPU."""
    device = pick_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    resolve_precision(cfg, device)
    return device


def resolve_precision(cfg, device):
    if cfg.precision == "auto":
        cfg.precision = "bf16" if device.type == "cuda" else "fp32"


def stop_processes():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def load_sit(path, cfg, device, role="teacher"):
    """A SiT teacher (role "teacher": a plain velocity network) or a FreeFlow student (role "student": with the inputs
    s and γ) through sit.load_teacher, its refusals and the wrong kind of network as one-line errors."""
    import sit
    try:
        net = sit.load_teacher(path, resolution=cfg.res).to(device)
    except sit.CheckpointError as e:
        raise FreeFlowError(str(e).rstrip(".") + ".") from None
    if role == "teacher" and net.inputs:
        raise FreeFlowError(f"--teacher {path} is a FreeFlow student (its network takes {', '.join(net.inputs)}), not a "
                            f"SiT teacher; sample it with --student {path}, or give the teacher it was distilled from.")
    if role == "student" and set(net.inputs) != {"s", "gamma"}:
        raise FreeFlowError(f"--student {path} is a plain SiT (no s and γ inputs), not a FreeFlow student; sample it "
                            f"with --teacher {path} --sampler sde.")
    return net


def check_vae_fits(vae, net, flag):
    """The VAE decodes the network's latents: the same number of channels."""
    if vae is not None and vae.config.latent_channels != net.in_channels:
        raise FreeFlowError(f"--vae has {vae.config.latent_channels} latent channels and {flag} makes "
                            f"{net.in_channels}-channel samples: they do not fit; give the VAE the network was trained "
                            f"with (sd-vae-ft-ema for SiT), or drop --vae to write the raw samples.")


def run_imagenet(cfg, progress=True):
    """python freeflow.py --teacher last.pt --res 256: distil a SiT teacher into a one-step student."""
    device = start_processes(cfg)
    rank, world = rank_world()
    cfg.resolve(has_labels=True)
    teacher = load_sit(cfg.teacher, cfg, device)
    shape = (teacher.in_channels, teacher.input_size, teacher.input_size)
    vae = load_vae(cfg.vae, device) if cfg.vae else None
    check_vae_fits(vae, teacher, f"--teacher {cfg.teacher}")
    score = imagenet_score(cfg, teacher.num_classes, shape, device, vae) if cfg.fid_every else None
    to_images = latent_images if vae is None else (lambda x: decode(vae, x))  # noqa: E731
    out = output_dir(cfg, os.path.join("out", "imagenet"))
    if rank == 0:
        print(f"FreeFlow: distilling {cfg.teacher} (SiT depth {teacher.depth}, width {teacher.hidden}, "
              f"{cfg.res} px) on {world} process(es), {device}, {cfg.precision}; no data is read.")
    torch.manual_seed(cfg.seed)  # the same on every process: each keeps its share of the global draws
    start = time.perf_counter()
    distill(teacher, cfg, shape, out, progress, watch(cfg, out, shape, teacher.num_classes, device, to_images, score))
    if rank == 0:
        print(f"done: {cfg.steps} steps in {time.perf_counter() - start:.0f} s; the EMA student is in "
              f"{out}/ckpt.pt (sample with --student {out}/ckpt.pt --num-samples N)")


def load_vae(path, device):
    """diffusers' AutoencoderKL from a local directory; nothing is downloaded."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FreeFlowError(f"--vae {path} is not a diffusers model directory (no config.json); give a local "
                            f"copy of an AutoencoderKL such as stabilityai/sd-vae-ft-ema.")
    with open(config) as f:
        kind = json.load(f).get("_class_name")
    if kind != "AutoencoderKL":
        raise FreeFlowError(f"--vae {path} holds a {kind}, not an AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema).")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise FreeFlowError("--vae needs the diffusers package: pip install diffusers.") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - a broken directory, in any of the ways diffusers reports it
        raise FreeFlowError(f"--vae {path}: the AutoencoderKL could not be loaded ({type(e).__name__}).") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, latents):
    """Latents -> uint8 images N x H x W x 3: VAE.decode(latent / 0.18215), then [-1, 1] -> [0, 255],
    truncated as REPA does."""
    images = vae.decode(latents.float() / LATENT_SCALE).sample
    return torch.clamp(255 * (images + 1) / 2, 0, 255).permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def latent_images(latents):
    """Latents -> uint8 images without a VAE: the first three channels, [-3, 3] mapped to [0, 255] (previews)."""
    x = (latents[:, :3].float().clamp(-3, 3) + 3) * (255 / 6)
    return x.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def imagenet_score(cfg, num_classes, shape, device, vae):
    """score(ema) for --fid-every on ImageNet: FID and Inception Score (fid.py) of --fid-samples one-step samples
    at γ = --cfg, decoded by --vae, against --fid-ref. Every process makes its share from its own generator, the
    same noise and labels at every evaluation; process 0 gathers the Inception features and gets the numbers.
    The reference statistics are read (or computed) once, here, before training starts."""
    import fid
    if not (cfg.fid_ref and cfg.vae):
        raise FreeFlowError("--fid-every scores decoded images against a reference batch: give --fid-ref REF.npz, "
                            "--fid-weights FILE and --vae DIR.")
    rank, world = rank_world()
    try:
        fid.image_header(cfg.fid_ref)
        inception = fid.load_inception(fid.find_weights(cfg.fid_weights), device)
        reference = None
        if rank == 0:
            stored = fid.stored_statistics(cfg.fid_ref)
            reference = stored[0] if stored else fid.statistics(
                fid.activations(inception, cfg.fid_ref, device=str(device), desc="FID reference")[0])
    except fid.FIDError as e:
        raise FreeFlowError(str(e)) from None
    share = cfg.fid_samples // world
    if share == 0:
        raise FreeFlowError(f"--fid-samples {cfg.fid_samples} leaves no samples for each of {world} processes; give "
                            f"at least {world}.")

    @torch.no_grad()
    def score(ema):
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + 999_983 + rank)  # the same every time
        pools, probs = [], []
        for lo in range(0, share, cfg.sample_batch):
            n = min(cfg.sample_batch, share - lo)
            z = torch.randn((n, *shape), generator=g, device=device)
            y = torch.randint(0, num_classes, (n,), generator=g, device=device)
            with autocast(cfg, device):
                x = sample_one_step(ema, z, y, torch.full((n,), float(cfg.cfg), device=device))
            images = torch.from_numpy(decode(vae, x)).permute(0, 3, 1, 2).float().to(device)
            pool, _, logits = inception.features(images)
            pools.append(pool.double())
            probs.append(logits.double().softmax(-1))
        pool, prob = torch.cat(pools), torch.cat(probs)
        if world > 1:
            gathered = [torch.empty_like(t) for t in (pool, prob) for _ in range(world)]
            torch.distributed.all_gather(gathered[:world], pool)
            torch.distributed.all_gather(gathered[world:], prob)
            pool, prob = torch.cat(gathered[:world]), torch.cat(gathered[world:])
        if rank > 0:
            return None
        return {"fid": fid.frechet_distance(*fid.statistics(pool.cpu().numpy()), *reference),
                "inception_score": fid.inception_score(prob.cpu().numpy()), "fid_samples": len(pool)}
    return score


def write_npz(path, arrays):
    """An .npz (uncompressed, ZIP64) written member by member from .npy files on disk, then renamed into
    place: a 50k x 512² batch never has to fit in memory twice."""
    import zipfile

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, npy in arrays.items():
                z.write(npy, f"{name}.npy")
    atomic_write(path, write)


# The teacher's own samplers (REPA's): baselines for the student (--teacher PATH --sampler ode|sde, the
# digits run's table) and a check of a teacher before distilling it. Both run on a float64 time grid,
# with classifier-free guidance (guided_velocity, section 2) while a step's start time lies in the
# guidance interval, and count network calls per sample exactly: a guided evaluation is two calls.
# Two rules for the interval, on purpose. These samplers test it at each step's start, as REPA's code does
# (Heun's second evaluation included), so that their numbers are REPA's: on the 50-step grid the step that
# starts at t = 0.7 is guided, the one that ends there is not. Section 2's teacher_ode, the reference the
# student is measured against, puts grid knots on the interval's edges and tests each step at its midpoint,
# so no step straddles an edge and the solver keeps its order there (docs/method.md §2).


def _velocity(model, x, t, y, scale, interval, t_check):
    """v_γ at one time for the whole batch at guidance scale γ = `scale`, the interval tested at t_check, plus the
    calls per sample it cost."""
    n = len(x)
    tt = torch.full((n,), float(t), device=x.device, dtype=x.dtype)
    tc = torch.full((n,), float(t_check), device=x.device, dtype=torch.float64)
    gamma = torch.full((n,), float(scale), device=x.device, dtype=x.dtype)
    return (guided_velocity(model, x, tt, y, gamma, interval, tc),
            calls_per_sample(model, y, gamma, interval, t_check))


@torch.no_grad()
def sample_ode(model, z, y, steps=50, gamma=1.0, interval=(0.0, 1.0), heun=False):
    """REPA's ODE sampler at guidance scale γ: Euler from t = 1 to 0 on linspace(1, 0, steps + 1); with heun=True
    a Heun correction on every step but the last. Returns (x at t = 0, network calls per sample)."""
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
    x, nfe = z, 0
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        v0, calls = _velocity(model, x, t0, y, gamma, interval, t0)
        x_next, nfe = x + (t1 - t0) * v0, nfe + calls
        if heun and i < steps - 1:
            v1, calls = _velocity(model, x_next, t1, y, gamma, interval, t0)  # REPA tests the interval at t0
            x_next, nfe = x + (t1 - t0) * 0.5 * (v0 + v1), nfe + calls
        x = x_next
    return x, nfe


@torch.no_grad()
def sample_sde(model, z, y, steps=250, gamma=1.0, interval=(0.0, 1.0), generator=None, t_last=0.04):
    """REPA's Euler-Maruyama sampler (its FID 1.42 recipe: 250 steps, CFG 1.8, interval [0, 0.7]).

    Times linspace(1, t_last, steps), then one deterministic step from t_last to 0. With diffusion
    coefficient w(t) = 2t and the score of the linear path, score = -(x + (1 - t) v) / t:
        x ← x + (v - ½ w score) dt + √(w |dt|) ε        (dt < 0)
    CFG on v equals REPA's CFG on the drift, which is affine in v. Returns (x at t = 0, calls per sample)."""
    ts = torch.linspace(1, t_last, steps, dtype=torch.float64).tolist() + [0.0]
    x, nfe = z, 0
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        v, calls = _velocity(model, x, t0, y, gamma, interval, t0)
        nfe += calls
        w, dt = 2 * t0, t1 - t0
        score = -(x + (1 - t0) * v) / t0
        x = x + (v - 0.5 * w * score) * dt
        if i < len(ts) - 2:  # every step but the last adds noise
            x = x + math.sqrt(w * abs(dt)) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return x, nfe


# Inference-time scaling: best-of-N noise search. The one-step student follows the teacher's trajectories,
# so its one-call image previews the image the teacher will make from the same noise: screen N noises with
# the student, score the previews with a verifier, and give the teacher's sampler only the best noise.


@torch.no_grad()
def best_of_n(screen, verifier, sampler, y, n, shape, generator=None):
    """For each wanted label y_i: draw n noises, preview them with screen(z, y) -> (x, calls per sample),
    score the previews with verifier(x, y) -> (B,) scores (higher is better), and run sampler(z, y) ->
    (x, calls per sample) from the best noise of each row. Returns (samples, the chosen noise z, network
    calls per sample: n previews plus the sampler's)."""
    B, device = len(y), y.device
    z = torch.randn((B, n, *shape), generator=generator, device=device)
    y_n = y.repeat_interleave(n)  # row i's candidates are rows i n .. i n + n - 1
    preview, screen_calls = screen(z.flatten(0, 1), y_n)
    best = verifier(preview, y_n).view(B, n).argmax(1)  # the verifier's choice among each row's n noises
    z_best = z[torch.arange(B, device=device), best]
    x, calls = sampler(z_best, y)
    return x, z_best, n * screen_calls + calls


def inception_class_index(path):
    """Where each ImageNet class of SiT (the 1000 synsets in sorted order, as ImageFolder numbers them) sits
    among the 1008 outputs of the 2015 Inception graph (fid.py's network), read from the graph's label map:
    entries `target_class: 449  target_class_string: "n01440764"`, the output index and its synset."""
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FreeFlowError(f"--inception-labels {path} cannot be read ({type(e).__name__}); give "
                            f"imagenet_2012_challenge_label_map_proto.pbtxt from inception-2015-12-05.tgz.") from None
    pairs = re.findall(r'target_class:\s*(\d+)\s*target_class_string:\s*"(n\d{8})"', text)
    by_synset = {synset: int(index) for index, synset in pairs}
    if len(by_synset) != 1000 or not all(1 <= i < 1008 for i in by_synset.values()):
        raise FreeFlowError(f"--inception-labels {path} maps {len(by_synset)} synsets, not ImageNet's 1000 to the "
                            f"Inception's outputs; give imagenet_2012_challenge_label_map_proto.pbtxt.")
    return [by_synset[s] for s in sorted(by_synset)]


def inception_verifier(vae, inception, class_index):
    """The ImageNet verifier: log p(wanted class | image) under the Inception (its 1008 logits, softmax), of
    the VAE-decoded latents. A plain function of (latents, labels); replace it with any scorer."""
    index = torch.as_tensor(class_index)

    def verify(latents, y):
        images = torch.from_numpy(decode(vae, latents)).permute(0, 3, 1, 2).float().to(latents.device)
        logits = inception.features(images)[2].double()
        return torch.log_softmax(logits, 1)[torch.arange(len(y), device=y.device), index.to(y.device)[y]]
    return verify


def check_sampling(cfg):
    """generate's refusals that need no network, before anything loads: the sample count, and what --fid-ref and
    --best-of need (fid.py checks the reference's header and finds the Inception weights). Returns the weights'
    path, or None."""
    if cfg.num_samples is None:
        raise FreeFlowError("--num-samples N is needed to sample (e.g. --num-samples 50000 for FID-50K).")
    if cfg.fid_ref and not cfg.vae:
        raise FreeFlowError("--fid-ref scores images: give --vae DIR to decode the latents.")
    if cfg.best_of and not (cfg.vae and cfg.inception_labels):
        raise FreeFlowError("--best-of scores decoded previews with the Inception verifier: give --vae DIR, "
                            "--fid-weights FILE and --inception-labels FILE.")
    if not (cfg.fid_ref or cfg.best_of):
        return None
    import fid
    try:
        if cfg.fid_ref:
            fid.image_header(cfg.fid_ref)
        return fid.find_weights(cfg.fid_weights)
    except fid.FIDError as e:
        raise FreeFlowError(str(e)) from None


def sampler_for(cfg, student, teacher, verify, shape, device):
    """(what it is, sample(z, y, generator) -> (x, network calls per sample)): the student's one step, the
    teacher's own sampler (REPA's) from the same noise, or best-of-N (the student screens --best-of noises per
    sample with the verifier, the teacher samples from the best; its candidates come from the generator)."""
    what = f"teacher, {cfg.sampler} sampler, {cfg.steps} steps" if teacher is not None else "one-step student"

    def preview(z, y):  # the student's one step: x̂ = z - F_θ(z, 0, c, γ), one call
        return sample_one_step(student, z, y, torch.full((len(z),), cfg.cfg, device=device)), 1

    def teacher_sampler(z, y, generator):
        if cfg.sampler == "sde":
            return sample_sde(teacher, z, y, cfg.steps, cfg.cfg, cfg.guidance_interval, generator=generator)
        return sample_ode(teacher, z, y, cfg.steps, cfg.cfg, cfg.guidance_interval, cfg.heun)

    if cfg.best_of:
        def best(z, y, g):
            x, _, nfe = best_of_n(preview, verify, lambda z_, y_: teacher_sampler(z_, y_, g), y, cfg.best_of, shape,
                                  generator=g)
            return x, nfe
        return f"best of {cfg.best_of} student previews, then the {what}", best
    if teacher is None:
        return what, lambda z, y, g: preview(z, y)
    return what, teacher_sampler


def join_parts(out, name, world, num_samples, grid):
    """Process 0, once every process has written its share (.part<rank>.npy, .labels<rank>.npy: consecutive
    batches): join them in process order into out/name, ADM's .npz (arr_0 the samples, arr_1 the labels), through
    memory-mapped files so that 50 000 images need not fit in memory; with grid, also out/grid.png of the first 64.
    Removes the parts."""
    import numpy as np
    parts = [os.path.join(out, f".part{r}.npy") for r in range(world)]
    label_parts = [os.path.join(out, f".labels{r}.npy") for r in range(world)]
    full, full_labels = os.path.join(out, ".arr_0.npy"), os.path.join(out, ".arr_1.npy")
    shares = [np.load(p, mmap_mode="r") for p in parts]
    arr = np.lib.format.open_memmap(full, "w+", shares[0].dtype, (num_samples, *shares[0].shape[1:]))
    lo = 0
    for share in shares:
        arr[lo:lo + len(share)] = share
        lo += len(share)
    arr.flush()
    np.save(full_labels, np.concatenate([np.load(p) for p in label_parts]))
    write_npz(os.path.join(out, name), {"arr_0": full, "arr_1": full_labels})
    if grid:
        save_grid(os.path.join(out, "grid.png"), np.asarray(arr[:64]))
    del arr, shares
    for f in [full, full_labels, *parts, *label_parts]:
        os.remove(f)


def report_samples(cfg, out, name, what, nfe, decoded, device):
    """Process 0: say what was written, and score it with fid.py when --fid-ref is given (out/fid.json)."""
    calls = (f"{cfg.best_of} student + {nfe - cfg.best_of} teacher = " if cfg.best_of else "") + str(nfe)
    print(f"{cfg.num_samples} samples from the {what} ({calls} network call(s) per sample, γ = {cfg.cfg})")
    if decoded:
        print(f"wrote {out}/{name} (arr_0: uint8 images, arr_1: labels) and {out}/grid.png")
    else:
        print(f"no --vae: wrote latents, not images, to {out}/{name} (arr_0: N x C x H x W, scaled by "
              f"{LATENT_SCALE}; arr_1: labels); give --vae DIR to decode them")
    if cfg.fid_ref:
        import fid
        try:
            metrics = fid.evaluate(os.path.join(out, name), cfg.fid_ref, cfg.fid_weights, device=str(device))
        except fid.FIDError as e:
            raise FreeFlowError(f"scoring {out}/{name}: {e}") from None
        print(fid.report(metrics))
        write_json(metrics, os.path.join(out, "fid.json"))


@torch.no_grad()
def generate(cfg, progress=True):
    """--student CKPT (one step), --teacher PATH --sampler ode|sde, or both with --best-of N (sampler_for):
    --num-samples samples in batches over every process, decoded with --vae into the ADM .npz (arr_0: uint8
    N x H x W x 3, arr_1: labels) plus a PNG grid, or written as latents without --vae; scored with fid.py when
    --fid-ref is given. Batch i's noise and labels come from a generator seeded with (seed, i), so the student and
    the teacher see the same noise and labels for the same --seed and --sample-batch."""
    import numpy as np
    device = start_processes(cfg)
    rank, world = rank_world()
    inception_path = check_sampling(cfg)
    cfg.resolve(has_labels=True)
    student = load_sit(cfg.student, cfg, device, "student") if cfg.student else None
    teacher = load_sit(cfg.teacher, cfg, device) if cfg.teacher else None
    model = teacher if teacher is not None else student
    vae = load_vae(cfg.vae, device) if cfg.vae else None
    for net, name in ((student, "--student"), (teacher, "--teacher")):
        if net is not None:
            check_vae_fits(vae, net, f"{name} {getattr(cfg, name[2:])}")
    verify = None
    if cfg.best_of:
        import fid
        try:
            inception = fid.load_inception(inception_path, device)
        except fid.FIDError as e:
            raise FreeFlowError(str(e)) from None
        verify = inception_verifier(vae, inception, inception_class_index(cfg.inception_labels))
    shape = (model.in_channels, model.input_size, model.input_size)
    batches = math.ceil(cfg.num_samples / cfg.sample_batch)
    if batches < world:
        raise FreeFlowError(f"--num-samples {cfg.num_samples} makes {batches} batch(es) of {cfg.sample_batch} for "
                            f"{world} processes; lower --sample-batch or use fewer processes.")
    out = output_dir(cfg, os.path.join("out", "samples"), training=False)
    what, sample = sampler_for(cfg, student, teacher, verify, shape, device)
    chunks, labels, nfe = [], [], 0
    for i in progress_bar(range(rank * batches // world, (rank + 1) * batches // world), f"sample ({what})",
                          progress, rank):  # this process's consecutive batches
        n = min(cfg.sample_batch, cfg.num_samples - i * cfg.sample_batch)
        g = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + i)
        z = torch.randn((n, *shape), generator=g, device=device)
        y = torch.randint(0, model.num_classes, (n,), generator=g, device=device)
        with autocast(cfg, device):  # best-of-N draws its candidates from g after z and y: the same labels
            x, nfe = sample(z, y, g)
        chunks.append(decode(vae, x) if vae is not None else x.float().cpu().numpy())
        labels.append(y.cpu().numpy())
    np.save(os.path.join(out, f".part{rank}.npy"), np.concatenate(chunks))  # every process writes its share
    np.save(os.path.join(out, f".labels{rank}.npy"), np.concatenate(labels))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        name = "samples.npz" if vae is not None else "latents.npz"
        join_parts(out, name, world, cfg.num_samples, grid=vae is not None)
        report_samples(cfg, out, name, what, nfe, vae is not None, device)
    if world > 1:
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------------------------
# 11. Command line
# ---------------------------------------------------------------------------------------------------


# FreeFlow's own training settings: the data-based baseline (--states data) reads none of them
FREEFLOW_ONLY = ("loss", "alpha", "predictor_frac", "s_zero_frac", "r_mean", "r_std", "r_range", "kl_weight",
                 "psi_steps", "psi_lr", "corrector_interval", "corrector_cfg", "dsdt", "fd_eps")


def check_mode(cfg):
    """One thing to do per command: a toy, a distillation, or sampling; and no flag that the command would ignore."""
    if cfg.toy is not None and (cfg.teacher or cfg.student):
        raise FreeFlowError("--toy runs the 2D suite; --teacher / --student are for ImageNet: give one or the other.")
    if cfg.states == "data" and cfg.toy != "digits":
        raise FreeFlowError("--states data trains on noised data, and only --toy digits brings data here (FreeFlow "
                            "itself needs none); use --toy digits, or drop --states data.")
    for name in ("augment_shift", "data_fraction", "data_times"):  # off at their defaults
        if getattr(cfg, name) != Config.__dataclass_fields__[name].default and cfg.states != "data":
            raise FreeFlowError(f"--{flag(name)} shapes the data of --states data; FreeFlow reads no data (add "
                                f"--states data or drop --{flag(name)}).")
    if cfg.states == "data":  # the baseline's step reads none of FreeFlow's own settings: say so, not ignore them
        for name in FREEFLOW_ONLY:
            if _plain(getattr(cfg, name)) != _plain(DIGITS_DEFAULTS.get(name, Config.__dataclass_fields__[name].default)):
                raise FreeFlowError(f"--{flag(name)} sets FreeFlow's own training, which --states data (the data-based "
                                    f"baseline, one loss and no corrector) does not use; drop --{flag(name)}.")
    if cfg.compile_mode != "default" and not cfg.compile:
        raise FreeFlowError(f"--compile-mode {cfg.compile_mode} chooses how --compile compiles; add --compile or drop "
                            f"--compile-mode.")
    if cfg.best_of is not None and not (cfg.student and cfg.teacher and cfg.sampler):
        raise FreeFlowError("--best-of N needs --student CKPT (the previews), --teacher PATH and --sampler ode|sde "
                            "(the sample from the chosen noise).")
    if cfg.student and not cfg.teacher and cfg.sampler:
        raise FreeFlowError("--sampler ode|sde is the teacher's sampler, and a --student samples in one step; drop "
                            "--sampler (or add --teacher PATH and --best-of N to sample the teacher from the student's "
                            "best noise).")
    if cfg.heun and cfg.sampler != "ode":
        raise FreeFlowError("--heun is a step of the ODE sampler; add --sampler ode (with --teacher) or drop --heun.")
    if cfg.student and cfg.teacher and cfg.best_of is None:
        raise FreeFlowError("give --student CKPT to sample the student, or --teacher PATH --sampler ode|sde to "
                            "sample the teacher, not both (both go together only with --best-of N).")
    if cfg.teacher and not cfg.sampler and cfg.num_samples is not None:
        raise FreeFlowError("--num-samples with --teacher needs --sampler ode|sde (without it --teacher distils); "
                            "to sample a distilled student use --student CKPT.")


def main(argv=None):
    cfg = parse_config(argv)
    try:
        cfg.check()
        check_mode(cfg)
        if cfg.toy == "digits":
            from toy.digits import run_digits
            run_digits(cfg)
        elif cfg.toy is not None:
            from toy.run import run_toy
            run_toy(cfg)
        elif cfg.student or (cfg.teacher and cfg.sampler):
            generate(cfg)
        elif cfg.teacher:
            run_imagenet(cfg)
        else:
            raise FreeFlowError("nothing to do: give --toy NAME (e.g. --toy moons), --teacher SIT.pt to distil, "
                                "or --student CKPT --num-samples N to sample; see --help.")
    except FreeFlowError as e:
        print(f"freeflow.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print("freeflow.py: interrupted; checkpoints written so far are intact.", file=sys.stderr)
        return 130
    finally:
        stop_processes()
    return 0


if __name__ == "__main__":
    # Import this file once more under its own name: the toy package imports `freeflow`, and its errors
    # must be the same FreeFlowError class that main() catches, not a copy living in `__main__`.
    from freeflow import main as freeflow_main

    sys.exit(freeflow_main())
