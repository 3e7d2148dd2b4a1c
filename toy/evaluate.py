"""How well does the one-step student reproduce the teacher? Measured against a high-accuracy solution of
the teacher's ODE from the same prior noise, per sample, and as distributions.

- Reference solution: classical fourth-order Runge-Kutta (freeflow.teacher_ode, solver "rk4") on a
  float64 time grid with knots at the guidance-interval edges and at the compared times, on a float64
  copy of the teacher; the number of steps doubles from 16 until halving the step moves no sample
  (endpoint or compared state) by more than `tol` (--ode-tol, 1e-3), and the finer of the two solves is
  kept: RK4's error falls sixteen-fold per halving, so the kept solve's error is about change / 15, under
  7e-5, far below the smallest error the toy suite reports (1.9e-3). float64 matters: near t = 0 the
  teacher's flow amplifies round-off, and in float32 the endpoint change on halving *grew* with the
  step count (spirals: 1.2e-4 at 256 steps, 6.6e-4 at 2048), while in float64 it fell sixteen-fold per
  halving, as fourth order should (6.4e-6 at 256 steps). The fresh teacher samples for W2 below take the
  same number of steps, in float32.
- endpoint_error:   mean over samples of |f_θ(z, 0) - Φ(z)|, Φ the teacher's ODE endpoint from z.
- trajectory_error: the same at s = 0.75, 0.5, 0.25: |f_θ(z, s) - x_s(z)|, x_s the teacher's path.
- w2:  exact 2-Wasserstein distance (an optimal assignment by scipy's linear_sum_assignment) between n
  one-step samples and n teacher samples from independent noise; w2_floor: the same between two
  independent teacher sample sets of size n, the distance sampling noise alone gives; w2_ratio =
  w2 / w2_floor. One such distance is a noisy number: on the moons teacher, 15 pairs of independent
  2000-sample teacher sets gave floors from 0.066 to 0.121 (mean 0.092, std 0.017; `python -m
  toy.w2_spread --toy moons`), so a single pair can make the ratio look 30 % better or worse than it
  is. Both are therefore means over W2_PAIRS pairs in a cycle: K sets of noise z_1..z_K give teacher
  sets T_k and one-step sets S_k, and
      w2 = mean_k W2(S_k, T_k+1)        w2_floor = mean_k W2(T_k, T_k+1)        (k + 1 taken mod K)
  so student and floor pairs are alike: never the same noise on both sides. Each pair's value is kept
  (w2_pairs, w2_floor_pairs). T_1 is the float64 reference below; the others are fresh solves.
- teacher_nfe: network calls per sample of that reference solution (4 per RK4 step, twice that while
  CFG is on); sampling_speedup: the wall time of the teacher's solve from z2 (the W2 samples) over the
  one-step student's on the same noise (the fastest of 5 calls).
"""

import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from freeflow import FreeFlowError, flow_map, sample_one_step, sample_prior, teacher_ode

TRAJECTORY_TIMES = (0.75, 0.5, 0.25)
W2_PAIRS = 4  # K: noise sets, and pairs in each of the two W2 means


def w2(a, b):
    """Exact 2-Wasserstein distance between two equal-size point sets (uniform weights); each point may be
    an array of any shape (an image is a point of its pixels)."""
    a, b = (np.asarray(p, np.float64).reshape(len(p), -1) for p in (a, b))
    cost = cdist(a, b, "sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(cost[rows, cols].mean()))


def w2_all(pairs):
    """w2 of each (a, b) in `pairs`, one thread per core: scipy's assignment releases the GIL."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(lambda pair: w2(*pair), pairs))


def cycle_pairs(S, T):
    """The pairs a distance and its floor are averaged over: one-step sets against teacher sets from other
    noise, (S_k, T_k+1) for each k, then teacher against teacher, (T_k, T_k+1) for each k; k + 1 mod K.
    Never the same noise on both sides of a pair."""
    K = len(T)
    return [(S[k], T[(k + 1) % K]) for k in range(K)] + [(T[k], T[(k + 1) % K]) for k in range(K)]


@torch.no_grad()
def reference_ode(teacher, z, y, gamma, interval, tol=1e-3, record=TRAJECTORY_TIMES, max_steps=4096,
                  dtype=torch.float64):
    """The teacher's ODE solved to `tol` by RK4 with step doubling, on a copy of the teacher in `dtype`
    (float64 by default). The change is the largest Euclidean norm, over samples, of the difference
    between two solves. Returns (endpoint, {s: x_s}, steps, change on the last halving, nfe per sample),
    in z's dtype."""
    teacher_d, z_d, gamma_d = copy.deepcopy(teacher).to(dtype), z.to(dtype), gamma.to(dtype)

    def solve(steps):
        return teacher_ode(teacher_d, z_d, y, gamma_d, interval, steps, "rk4", record)

    steps = 16
    prev = solve(steps)
    while True:
        steps *= 2
        cur = solve(steps)
        # the change is measured in the solve's dtype: after rounding float64 solves to float32 it could not
        # fall below float32's spacing (2.4e-7 near |x| = 2), and a tolerance under that would never be met
        change = max((a - b).flatten(1).norm(dim=1).max().item()
                     for a, b in [(cur[0], prev[0]), *((cur[1][s], prev[1][s]) for s in cur[1])])
        if change <= tol:
            return cur[0].to(z.dtype), {s: x.to(z.dtype) for s, x in cur[1].items()}, steps, change, cur[2]
        if steps >= max_steps:
            raise FreeFlowError(f"the teacher's ODE did not converge to {tol:g} within {max_steps} RK4 steps "
                                f"(last change {change:.2g}); raise --ode-tol.")
        prev = cur


def best_time(fn, repeats=3):
    """The fastest of a few wall-clock timings of fn() (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def eval_conditions(n, num_classes, cfg, device, gamma=None):
    """Balanced labels and the evaluation's γ (cfg.cfg unless given), the same for every sample set, so
    only the noise differs."""
    y = torch.arange(n, device=device) % num_classes if num_classes else torch.zeros(n, dtype=torch.long, device=device)
    return y, torch.full((n,), float(cfg.cfg if gamma is None else gamma), device=device)


@torch.no_grad()
def evaluate(student, teacher, cfg, num_classes, device):
    """All metrics of the module docstring, plus the arrays the figure draws."""
    n = cfg.eval_samples
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    zs = [sample_prior(n, (2,), generator=gen).to(device) for _ in range(W2_PAIRS)]
    z1 = zs[0]
    y, gamma = eval_conditions(n, num_classes, cfg, device)
    interval = cfg.guidance_interval

    # z1 is compared per sample, against the float64 reference; the teacher's samples from the other
    # noise sets (for W2 and its floor) take the same number of RK4 steps, in float32: a distance between
    # distributions of about 0.1 does not see differences of 1e-4. The solve from z2 is the one timed.
    ref_end, states, steps, change, nfe = reference_ode(teacher, z1, y, gamma, interval, cfg.ode_tol)
    start = time.perf_counter()
    T = [ref_end, teacher_ode(teacher, zs[1], y, gamma, interval, steps, "rk4")[0]]
    t_teacher = time.perf_counter() - start
    T += [teacher_ode(teacher, z, y, gamma, interval, steps, "rk4")[0] for z in zs[2:]]
    student_end = sample_one_step(student, z1, y, gamma)
    S = [student_end.cpu()] + [sample_one_step(student, z, y, gamma).cpu() for z in zs[1:]]
    T = [t.cpu() for t in T]
    endpoint_error = (student_end - ref_end).norm(dim=1).mean().item()
    trajectory_error = {}
    for s in TRAJECTORY_TIMES:
        f_s = flow_map(student, z1, torch.full((n,), s, device=device), y, gamma)
        trajectory_error[str(s)] = (f_s - states[s]).norm(dim=1).mean().item()
    distances = w2_all(cycle_pairs(S, T))
    w2_pairs, floor_pairs = distances[:W2_PAIRS], distances[W2_PAIRS:]  # W2(S_k, T_k+1), W2(T_k, T_k+1)
    w2_student, w2_floor = float(np.mean(w2_pairs)), float(np.mean(floor_pairs))

    t_student = best_time(lambda: sample_one_step(student, zs[1], y, gamma), repeats=5)  # the same noise

    metrics = {
        "w2": w2_student, "w2_floor": w2_floor, "w2_ratio": w2_student / w2_floor,
        "w2_pairs": w2_pairs, "w2_floor_pairs": floor_pairs,
        "endpoint_error": endpoint_error, "trajectory_error": trajectory_error,
        "teacher_nfe": nfe, "student_nfe": 1, "sampling_speedup": t_teacher / t_student,
        "teacher_sampling_seconds": t_teacher, "student_sampling_seconds": t_student,
        "reference_solver": {"method": "rk4", "steps": steps, "halving_change": change,
                             "tol": cfg.ode_tol},
        "eval_samples": n, "cfg": cfg.cfg,
    }
    arrays = {"z": z1, "y": y, "gamma": gamma, "student": student_end, "teacher": T[1]}
    return metrics, arrays
