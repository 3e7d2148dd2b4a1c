"""Teacher–data mismatch, shown: FreeFlow beside a data-based flow-map distillation, on the digits.

    python -m toy.mismatch                  # every knob, two seeds (about 1.5 hours on 2 cores, and the teachers)
    python -m toy.mismatch --shifts 0 2 --fractions   # the knobs the claims are judged on (about an hour, teachers cached)
    python -m toy.mismatch --quick          # 1000 steps, one seed, shifts 0 and 2, γ 1 and 2 (about 20 minutes)
    python -m toy.mismatch --table-only     # the table, claims and figure of runs already on disk

The paper's premise: distilling a flow map on states noised from a dataset goes wrong when the teacher's own
paths do not visit those states (guidance, a fine-tuned teacher, data that is not the teacher's), and FreeFlow,
which starts every state from the prior, is immune by construction. Its controlled experiment fixes the teacher
and augments the data a data-based distillation noises. Here the two methods share the teacher (the digits
teacher), the student's initialisation, steps, batch, optimiser, EMA and evaluation (`freeflow.py --toy
digits`); only where the training states come from differs (--states prior or data). The knobs, each a flag:

    --shifts      the data-based run's digits are shifted by up to N pixels along each axis (--augment-shift N)
    --gammas      the guidance scale a student is trained and evaluated at (--cfg γ --cfg-range γ γ)
    --fractions   the data-based run sees only this share of the digits (--data-fraction F), at the first γ

The data-based baseline (MeanFlow distillation). The student is the same two-time flow map,
    f_θ(x_t, t, s) = x_t + (s - t) F_θ(x_t, t, s),      x_t = (1 - t) x + t n,  x from the data,  s ≤ t,
and along the teacher's ODE d/dt f_θ(x_t, t, s) = 0, which gives MeanFlow's identity with the teacher's
velocity v = v_γ(x_t, t) in place of the conditional one:
    F_tgt = sg( v + (s - t) · dF/dt ),      dF/dt = ∂_t F + v · ∇_x F     (one JVP, tangent (v, 1, 0) on (x, t, s))
    loss = w · |F - F_tgt|² / d,            w = sg(1 / (|F - F_tgt|² / d + ε)^k)   (FreeFlow's weight)
(t, s) are two uniform times, t the later (--data-times uniform, one of the samplers MeanFlow's paper ablates,
Geng et al. 2025), or as MeanFlow's ImageNet default draws them (--data-times meanflow): two logit-normal(-0.4, 1)
times, with s = t on 75 % of the examples (there the identity is flow matching onto the teacher's velocity).
MeanFlow's default rarely trains the long jump that one-step sampling makes, and distils the digits teacher
half as well (docs/mismatch.md), so the stronger uniform draw is the default. One-step sampling is FreeFlow's:
x̂ = f_θ(z, 1, 0) = z - F_θ(z, 1, 0). FreeFlow is the case t = 1, with the identity differentiated in s instead
(freeflow.py, section 4)."""

import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freeflow import (DATA_TIMES, atomic_write, bcast, clip_and_step, exact_mode, full_precision, guided_velocity,  # noqa: E402
                      jvp, norm, predictor_loss, sample_conditions, with_zero_tangents)

T_MEAN, T_STD, EQUAL_FRACTION = -0.4, 1.0, 0.75  # MeanFlow's time sampler


# ---------------------------------------------------------------------------------------------------
# The data-based baseline
# ---------------------------------------------------------------------------------------------------


def sample_t_s(n, device="cpu", how=DATA_TIMES[0]):
    """(t, s), s ≤ t. uniform: two uniform times sorted, s < t on every example: a jump from t > 0.9 to s < 0.1
    on 2 % of the examples. meanflow: two logit-normal(-0.4, 1) times sorted, and s = t on 75 % of the examples
    (MeanFlow's default for generation from data; its paper ablates both): such a jump on about 0.01 %."""
    if how == "uniform":
        a, b = torch.rand(2, n, device=device)
        return torch.maximum(a, b), torch.minimum(a, b)
    a, b = torch.sigmoid(T_MEAN + T_STD * torch.randn(2, n, device=device))
    t, s = torch.maximum(a, b), torch.minimum(a, b)
    return t, torch.where(torch.rand(n, device=device) < EQUAL_FRACTION, t, s)


def shift(x, k):
    """Each image moved by its own random (dy, dx) in [-k, k]², the background (-1, no ink) shifted in."""
    if k == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (k, k, k, k), value=-1.0)
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :].expand(n, h, w)
    return padded[torch.arange(n, device=x.device)[:, None, None], 0, rows, cols][:, None]


def F_two_time(student, x, t, s, y, gamma):
    """F_θ(x_t, t, s, c, γ), float32 out: the student at a state x_t of time t (FreeFlow keeps t = 1)."""
    return full_precision(student(x, t, y, s=s, gamma=gamma))


@torch.no_grad()
def F_and_dF_dt(student, x, t, s, y, gamma, v):
    """(F_θ(x_t, t, s), dF/dt = ∂_t F + v · ∇_x F): the derivative along the teacher's flow through x_t, s held
    still, as one forward-mode JVP (freeflow.jvp, on the math attention path) with tangent v on x and 1 on t, in
    float32 and with zero tangents for 1-D parameters, as a training run's ∂_s F (freeflow.dF_ds_pass)."""
    with exact_mode(x.device.type):
        net = with_zero_tangents(student)
        return jvp(lambda x_, t_: F_two_time(net, x_, t_, s, y, gamma), (x, t), (v, torch.ones_like(t)))


@torch.no_grad()
def meanflow_target(student, teacher, x_t, t, s, y, gamma, interval):
    """F_tgt = sg( v_γ(x_t, t) + (s - t) dF/dt ): MeanFlow's identity with the teacher's velocity."""
    v = guided_velocity(teacher, x_t, t, y, gamma, interval)  # v(x_t, t)
    _, dF_dt = F_and_dF_dt(student, x_t, t, s, y, gamma, v)
    return v + bcast(s - t, x_t) * dF_dt


def data_subset(x, y, fraction, seed):
    """A seeded share of the data (all of it at fraction 1)."""
    if fraction >= 1:
        return x, y
    keep = np.random.default_rng(seed).permutation(len(x))[:max(1, round(fraction * len(x)))]
    return x[np.sort(keep)], y[np.sort(keep)]


def data_step(x_data, y_data, device):
    """A step for freeflow.distill (train_step's signature) that trains θ by MeanFlow distillation on noised
    data: x from the data (shifted by --augment-shift), its own labels, γ from --cfg-range, (t, s) by
    sample_t_s (--data-times). g_ψ is left alone (this baseline has no corrector)."""
    data, labels = torch.as_tensor(x_data, device=device), torch.as_tensor(y_data, device=device)

    def step(student, g_psi, teacher, opt_theta, opt_psi, cfg, shape, passes=None):
        student_w = passes.student if passes else student
        B = cfg.batch_size
        rows = torch.randint(0, len(data), (B,), device=device)
        x, y = shift(data[rows], cfg.augment_shift), labels[rows]
        gamma = sample_conditions(B, teacher.num_classes, cfg.cfg_range, device)[1]
        t, s = sample_t_s(B, device, cfg.data_times)
        x_t = (1 - bcast(t, x)) * x + bcast(t, x) * torch.randn_like(x)  # x_t = (1 - t) x + t n
        F_tgt = meanflow_target(student, teacher, x_t, t, s, y, gamma, cfg.guidance_interval)
        F = F_two_time(student_w, x_t, t, s, y, gamma)
        loss, delta = predictor_loss(F, F_tgt, cfg.k, cfg.weight_eps)
        opt_theta.zero_grad(set_to_none=True)
        loss.mean().backward()
        clip_and_step(opt_theta, cfg.grad_clip)
        opt_psi.step()  # over no gradients: g_ψ stays as it is, its learning-rate schedule in step with θ's
        return {"loss": loss.mean().item(), "loss_P": loss.mean().item(), "delta_G": norm(delta).mean().item()}
    return step


# ---------------------------------------------------------------------------------------------------
# The command: both methods at every knob, the table, the claims, the figure
# ---------------------------------------------------------------------------------------------------


def plan(shifts, gammas, fractions, data_times=DATA_TIMES[0]):
    """[(variant, flags)]: FreeFlow at each γ (it reads no data, so no other knob reaches it); the data-based
    baseline at each shift and γ, and at each fraction (no shift, the first γ), its (t, s) drawn by data_times."""
    guided = lambda g: ["--cfg", f"{g:g}", "--cfg-range", f"{g:g}", f"{g:g}", "--eval-cfg", f"{g:g}"]  # noqa: E731
    data = ["--states", "data"] + ([] if data_times == DATA_TIMES[0] else ["--data-times", data_times])
    runs = [(f"freeflow-g{g:g}", guided(g)) for g in gammas]
    runs += [(f"data-shift{k}-g{g:g}", [*data, "--augment-shift", str(k), *guided(g)]) for g in gammas for k in shifts]
    runs += [(f"data-frac{f:g}-g{gammas[0]:g}", [*data, "--data-fraction", f"{f:g}", *guided(gammas[0])])
             for f in fractions]
    return runs


def row_values(m):
    """The numbers of one run at the γ it was trained at."""
    g = f"{m['config']['cfg']:g}"
    r, scan = m["scales"][g], m["scan"]["student"][g]
    return {"endpoint": r["endpoint_rmse"], "fd_teacher": r["frechet_to_teacher"], "floor": r["frechet_floor"],
            "fd_real": r["frechet_to_real"]["student"], "fd_real_teacher": r["frechet_to_real"]["teacher"],
            "learned": scan["fd"], "learned_teacher": m["scan"]["teacher"][g]["fd"], "accuracy": r["accuracy"]["student"],
            "seconds": m["train_seconds"]}


def runs_of(out, variant):
    """The metrics of `variant` in each seed directory under out (seed_0, seed_1, ...) that finished."""
    found = []
    for seed_dir in sorted(d for d in os.listdir(out) if d.startswith("seed_")) if os.path.isdir(out) else []:
        path = os.path.join(out, seed_dir, "runs", f"digits__{variant}", "metrics.json")
        if os.path.exists(path):
            with open(path) as f:
                found.append(json.load(f))
    return found


def table(out, runs):
    lines = ["| method | data | γ | endpoint RMSE | Fréchet to the teacher (floor) | Fréchet to the real digits "
             "(teacher's) | learned FD to the real digits (teacher's) | class accuracy | distillation s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, _ in runs:
        ms = runs_of(out, variant)
        if not ms:
            continue
        vs = [row_values(m) for m in ms]
        cell = lambda key, fmt="{:.3f}": " / ".join(fmt.format(v[key]) for v in vs)  # noqa: E731 - one per seed
        method, *knob = variant.split("-")
        data = "none (noise only)" if method == "freeflow" else {"shift0": "all, as they are"}.get(
            knob[0], f"shifted up to {knob[0][5:]} px" if knob[0].startswith("shift") else f"{knob[0][4:]} of them")
        lines.append(f"| {'FreeFlow' if method == 'freeflow' else 'data-based'} | {data} | {knob[-1][1:]} | "
                     f"{cell('endpoint')} | {cell('fd_teacher')} ({cell('floor')}) | {cell('fd_real')} "
                     f"({cell('fd_real_teacher')}) | {cell('learned', '{:.2f}')} ({cell('learned_teacher', '{:.2f}')}) | "
                     f"{cell('accuracy', '{:.1%}')} | {cell('seconds', '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def mean_of(out, variant, key):
    vs = [row_values(m)[key] for m in runs_of(out, variant)]
    return float(np.mean(vs)) if vs else None


def claims(out, shifts, gammas):
    """The paper's claims against the runs: each compares two variants' means over the seeds, on the endpoint
    error and on the learned FD to the real digits, at every γ; seen if it holds on all, not seen on half or
    fewer, mixed between."""
    k = max(shifts)
    rows = [
        ("a data-based distillation degrades as its data move away from the teacher's (augmented)",
         lambda g: (f"data-shift{k}-g{g:g}", f"data-shift0-g{g:g}"), f"shift {k} vs 0", lambda a, b: a > b),
        ("FreeFlow, which reads no data, beats it under that mismatch",
         lambda g: (f"freeflow-g{g:g}", f"data-shift{k}-g{g:g}"), f"FreeFlow vs shift {k}", lambda a, b: a < b),
        ("(the trade) on the data as they are, the data-based distillation is at least as good",
         lambda g: (f"data-shift0-g{g:g}", f"freeflow-g{g:g}"), "data-based vs FreeFlow", lambda a, b: a <= b),
    ]
    lines = ["| paper's claim | our result: means over the seeds (endpoint RMSE; learned FD to the real digits) | "
             "holds on | seen? |", "|---|---|---|---|"]
    for claim, variants, what, holds in rows:
        shown, n, held = [], 0, 0
        for g in gammas:
            a_var, b_var = variants(g)
            for key in ("endpoint", "learned"):
                a, b = mean_of(out, a_var, key), mean_of(out, b_var, key)
                if a is None or b is None:
                    continue
                shown.append(f"γ = {g:g} {key} {what}: {a:.3f} vs {b:.3f}")
                n, held = n + 1, held + bool(holds(a, b))
        seen = "—" if n == 0 else "seen" if held == n else "not seen" if 2 * held <= n else "mixed"
        lines.append(f"| {claim} | {'; '.join(shown) or 'not run'} | {held} of {n} | {seen} |")
    return "\n".join(lines) + "\n"


def figure(out, shifts, gammas, path):
    """Left: at the strongest mismatch (largest shift, largest γ), the teacher's samples and both students' from
    the same noise, two per class. Right: the endpoint error and the learned FD against the shift, per γ; FreeFlow
    (which reads no data) as a flat line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    g, k = max(gammas), max(shifts)
    seed_dir = os.path.join(out, "seed_0", "runs")
    fig = plt.figure(figsize=(15, 4.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1.6])
    rows = []
    for name, variant, key in (("teacher (its ODE)", f"freeflow-g{g:g}", "teacher"),
                               ("FreeFlow, one step", f"freeflow-g{g:g}", "student"),
                               (f"data-based, shift {k}, one step", f"data-shift{k}-g{g:g}", "student")):
        samples = os.path.join(seed_dir, f"digits__{variant}", "samples.npz")
        if os.path.exists(samples):
            with np.load(samples) as f:
                pick = f["gamma"] == g
                x, y = f[key][pick][:, 0], f["labels"][pick]
            rows.append((name, np.concatenate([np.concatenate([x[y == c][i] for c in range(10)], 1) for i in (0, 1)], 0)))
    for ax, (name, grid) in zip(left.subplots(len(rows), 1, squeeze=False)[:, 0], rows):
        ax.imshow(grid, cmap="gray", vmin=-1, vmax=1)
        ax.set(title=name, xticks=[], yticks=[])
    left.suptitle(f"the same noise, γ = {g:g}", fontsize=10)
    axes = right.subplots(1, 2)
    for ax, key, what in ((axes[0], "endpoint", "endpoint RMSE to the teacher's ODE"),
                          (axes[1], "learned", "learned FD to the real digits")):
        for gg in gammas:
            data = [mean_of(out, f"data-shift{kk}-g{gg:g}", key) for kk in shifts]
            line = ax.plot(shifts, data, "o-", label=f"data-based, γ = {gg:g}")[0]
            free = mean_of(out, f"freeflow-g{gg:g}", key)
            if free is not None:
                ax.axhline(free, ls="--", color=line.get_color(), label=f"FreeFlow, γ = {gg:g}")
        ax.set(xlabel="augmentation: shift of the data (pixels)", title=what, xticks=list(shifts))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    """(parser, args, the flags for every run), every refusal made."""
    from freeflow import FreeFlowError, check_mode, parse_config
    from toy.suite import check_args, command_parser
    parser = command_parser("mismatch", __doc__)
    parser.add_argument("--out", default=os.path.join("out", "mismatch"), help="where the runs, table and figure go")
    parser.add_argument("--shifts", type=int, nargs="+", default=[0, 1, 2], help="augmentation strengths (pixels)")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 2.0], help="guidance scales")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.1], help="shares of the data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (each its own teacher)")
    parser.add_argument("--quick", action="store_true", help="1000 steps, seed 0, shifts 0 2, γ 1 2, no fraction")
    parser.add_argument("--data-times", choices=DATA_TIMES, default=DATA_TIMES[0],
                        help="how the data-based runs draw (t, s) (freeflow.py --data-times)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--table-only", action="store_true", help="only the table, claims and figure of finished runs")
    args, common = parser.parse_known_args(argv)
    args.claims = None
    if args.quick:
        args.shifts, args.gammas, args.fractions, args.seeds = [0, 2], [1.0, 2.0], [], [0]
        common = ["--steps", "1000", *common]
    bad = [k for k in args.shifts if not 0 <= k <= 4]
    if bad or 0 not in args.shifts:
        parser.error(f"--shifts takes pixels from 0 to 4 and must include 0, the data as they are (got "
                     f"{' '.join(map(str, args.shifts))})")
    if not all(0 < f < 1 for f in args.fractions):
        parser.error(f"--fractions are shares of the data in (0, 1): the data-based baseline needs data (got "
                     f"{' '.join(f'{f:g}' for f in args.fractions)})")
    if not all(np.isfinite(g) and g >= 0 for g in args.gammas):
        parser.error(f"--gammas takes guidance scales >= 0 (got {' '.join(f'{g:g}' for g in args.gammas)})")
    check_args(parser, args, common, "digits", "")
    try:  # the flags go to the data-based runs too, which refuse FreeFlow's own settings
        check_mode(parse_config(["--toy", "digits", "--states", "data", *common]).check())
    except FreeFlowError as e:
        parser.error(f"{e} (the flags given go to every run, the data-based ones included)")
    return parser, args, common


def main(argv=None):
    from toy.suite import run_sharing_teacher
    parser, args, common = parse_args(argv)
    runs = plan(sorted(set(args.shifts)), args.gammas, args.fractions, args.data_times)
    if not args.table_only:
        start = time.perf_counter()
        failed = 0
        for seed in args.seeds:  # every seed its own teacher, shared by its runs
            failed += run_sharing_teacher(os.path.join(args.out, f"seed_{seed}"), "digits", runs,
                                          [*common, "--seed", str(seed)], args.jobs)
        print(f"[mismatch] {len(runs) * len(args.seeds)} runs in {time.perf_counter() - start:.0f} s, {failed} failed")
    if not any(runs_of(args.out, v) for v, _ in runs):
        parser.error(f"there are no finished runs under {args.out}; run without --table-only first.")
    text = table(args.out, runs) + "\n" + claims(args.out, sorted(set(args.shifts)), args.gammas)
    atomic_write(os.path.join(args.out, "results.md"), lambda tmp: open(tmp, "w").write(text))
    figure(args.out, sorted(set(args.shifts)), args.gammas, os.path.join(args.out, "figure.png"))
    print(text + f"\nwrote {args.out}/results.md and {args.out}/figure.png")


if __name__ == "__main__":
    main()
