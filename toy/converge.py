"""Can one student call reach its teacher's many? The digits distilled to convergence, as learning curves.

    python -m toy.converge                                  # 3 variants x 2 seeds, 20 000 steps (see docs/converge.md)
    python -m toy.converge --variants predictor --seeds 0 --steps 6000 --out out/converge_6k
    python -m toy.converge --table-only                     # curves, table and figure of the runs on disk
    python -m toy.converge --steps 20000 --lr 2e-3          # any other flag goes to every run

Every run is `python freeflow.py --toy digits` at the digits defaults with its variant's flags, one thread, --jobs
at a time, keeping the EMA student every --keep-every steps (snapshots/ema_XXXXXXX.pt), and ending with a light
evaluation of its own (LIGHT_EVALUATION, unless those flags are given: the curves below are the measurement). A
run that was stopped is continued with --resume (bit for bit), so the command can be run again until every run is
finished. Each seed's teacher is trained once, by that seed's first run, and shared by its other runs. Variants:

    predictor     the predictor loss alone
    both          the default: predictor + corrector (the digits' α = 0.3)
    alpha3-psi4   both losses, α = 3 and 4 extra g_ψ updates a step: the best corrector setting known
    gamma1        the predictor alone trained at γ = 1 alone (--cfg 1 --cfg-range 1 1): does the γ range hold it back?
    deeper        the predictor alone with a student twice as deep as its teacher (--extra-blocks 4): does capacity?
    range1.5      the predictor alone trained over γ in [1, 1.5] instead of [1, 3], where every model's best has been
    both-range1.5 both losses (α 0.3) over [1, 1.5]: what the corrector changes once the student meets its teacher
    deeper-range1.5  the predictor alone over [1, 1.5], twice as deep: what capacity adds to the range (pixel FD)

(The diagnoses start from the predictor alone, the lowest plateau, so that the corrector's share does not blur the
cause they isolate.)

Every snapshot is then measured on the scan's 1500 fixed noises (toy/digits_scan.py, labels spread evenly) at
γ = 1, 1.25 and 1.5, where every model's best has been: the Fréchet distance in the digits CNN's features to the
real digits (the digits' FID, toy/digits_features.py), the same in pixels, the learned FD to the teacher's own
samples at that γ, and the endpoint RMSE against the teacher's RK4 solve from the same noise. The teacher is
measured once per seed on the same noise and cached beside the runs (references.pt):

    the teacher's line   its RK4 samples at 8 steps (the scan's teacher), with 16 and 32 steps beside them: the
                         step count is converged when 8 steps already give the 32-step FD
    the floor            a second set of the teacher's RK4 samples from independent noise, same labels and count:
                         how far two samplings of one model are from each other (the learned FD to the teacher
                         that no student can beat), and how much the teacher's own FD to the real digits moves

Writes <out>/curves.json (every measurement), <out>/converge.md (the table) and <out>/converge.png (learned FD at
each model's best γ against steps and against training FLOPs, with each seed's teacher line and floor)."""

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
import sit  # noqa: E402
from freeflow import (FreeFlowError, atomic_save, atomic_write, check_writable_dir, parse_config,  # noqa: E402
                      sample_one_step, teacher_ode, write_json)

VARIANTS = {
    "predictor": ["--loss", "predictor"],
    "both": [],
    "alpha3-psi4": ["--alpha", "3", "--psi-steps", "4"],
    "gamma1": ["--loss", "predictor", "--cfg", "1", "--cfg-range", "1", "1"],
    "deeper": ["--loss", "predictor", "--extra-blocks", "4"],
    "range1.5": ["--loss", "predictor", "--cfg-range", "1", "1.5"],
    "both-range1.5": ["--cfg-range", "1", "1.5"],
    "deeper-range1.5": ["--loss", "predictor", "--extra-blocks", "4", "--cfg-range", "1", "1.5"],
}
DEFAULT_VARIANTS = ("predictor", "both", "alpha3-psi4")
GAMMAS = (1.0, 1.25, 1.5)
TEACHER_STEPS = (8, 16, 32)  # RK4 steps of the teacher's line (the first) and of its convergence check
FLOOR_SEED = 20_261_203  # the second, independent teacher set
# a run's own end-of-run evaluation at the digits defaults (1000 samples, a 1500-sample scan over six scales) took 5
# to 12 min of a 5000-step run's 25 on one thread (2026-12-03); the curves measure the snapshots themselves
LIGHT_EVALUATION = {"--eval-samples": ["200"], "--scan-samples": ["200"], "--eval-cfg": ["1"]}


# ---------------------------------------------------------------------------------------------------
# Measuring: the teacher once per seed, then every snapshot against it
# ---------------------------------------------------------------------------------------------------


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


@torch.no_grad()
def teacher_references(teacher_path, features, x_real, interval, n, progress=True):
    """The teacher's samples and measurements on the scan's noise at every γ of GAMMAS: {"key", "gammas": {γ:
    {"rk4_<steps>": measure(...), "floor": ..., "floor_fd_to_teacher": ..., "rk4_8_vs_32_rmse": ...}},
    "samples": {γ: the finest RK4 solve}, "teacher_features": {γ: (μ, Σ) of the 8-step set's features},
    "floor_features": {γ: the same of the second set, from independent noise}}."""
    from tqdm import tqdm

    from toy.digits import rmse
    from toy.digits_scan import measure, scan_noise
    teacher = sit.load_teacher(teacher_path, resolution=None)
    real_pixels = fid.statistics(x_real.reshape(len(x_real), -1))
    z, y = scan_noise(n, teacher.num_classes, "cpu")
    z_floor = torch.randn(z.shape, generator=torch.Generator().manual_seed(FLOOR_SEED))
    refs = {"gammas": {}, "samples": {}, "teacher_features": {}, "floor_features": {}}
    for g in tqdm(GAMMAS, desc="teacher references", disable=not progress, dynamic_ncols=True):
        gamma = torch.full((n,), g)
        solves = {steps: teacher_ode(teacher, z, y, gamma, interval, steps, "rk4")[0] for steps in TEACHER_STEPS}
        floor = teacher_ode(teacher, z_floor, y, gamma, interval, TEACHER_STEPS[0], "rk4")[0]
        row = {f"rk4_{steps}": measure(x.numpy(), features, real_pixels) for steps, x in solves.items()}
        row["floor"] = measure(floor.numpy(), features, real_pixels)
        line = fid.statistics(features.features(solves[TEACHER_STEPS[0]].numpy()))
        second = fid.statistics(features.features(floor.numpy()))
        row["floor_fd_to_teacher"] = fid.frechet_distance(*second, *line)
        refs["floor_features"][f"{g:g}"] = [torch.from_numpy(a) for a in second]
        finest = solves[TEACHER_STEPS[-1]]
        row |= {f"rk4_{steps}_vs_{TEACHER_STEPS[-1]}_rmse": rmse(solves[steps], finest) for steps in TEACHER_STEPS[:-1]}
        refs["gammas"][f"{g:g}"] = row
        refs["samples"][f"{g:g}"] = finest
        refs["teacher_features"][f"{g:g}"] = [torch.from_numpy(a) for a in line]
    return refs


def load_or_make_references(path, teacher_path, features, x_real, interval, n, progress=True):
    """teacher_references, cached at `path` for this teacher file and these settings (recomputed otherwise)."""
    key = {"teacher": file_digest(teacher_path), "gammas": list(GAMMAS), "samples": n, "interval": list(interval),
           "steps": list(TEACHER_STEPS), "classifier": features.seed}
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache of ours is recomputed
            saved = {}
        if saved.get("key") == key and "floor_features" in saved:  # (a cache without them is made again)
            return saved
    refs = {"key": key, **teacher_references(teacher_path, features, x_real, interval, n, progress)}
    atomic_save(refs, path)
    return refs


MEASURE = 2  # the version of measure_student: a curve measured by another is measured again


@torch.no_grad()
def measure_student(student, refs, features, x_real, n):
    """One snapshot at every γ of GAMMAS: {γ: {"fd", "precision", "recall", "pixel_fd", "fd_to_teacher",
    "endpoint_rmse"}}. fd_to_teacher is measured against the teacher's second set, from noise the student does not
    see, so that it compares with the floor (the teacher's first set against that second set); against the
    teacher's samples from the student's own noise it would reward the coupling as well (0.96 for a student whose
    FD to the real digits is 24 % above the teacher's, where the floor is 4.3)."""
    from toy.digits import rmse
    from toy.digits_scan import measure, scan_noise
    real_pixels = fid.statistics(x_real.reshape(len(x_real), -1))
    z, y = scan_noise(n, student.num_classes, "cpu")
    out = {}
    for g in GAMMAS:
        x = sample_one_step(student, z, y, torch.full((n,), g))
        row = measure(x.numpy(), features, real_pixels)
        teacher_stats = [a.numpy() for a in refs["floor_features"][f"{g:g}"]]
        row["fd_to_teacher"] = fid.frechet_distance(*fid.statistics(features.features(x.numpy())), *teacher_stats)
        row["endpoint_rmse"] = rmse(x, refs["samples"][f"{g:g}"])
        out[f"{g:g}"] = row
    return out


def snapshots(run):
    """{step: path} of a run's EMA snapshots, in step order."""
    folder = os.path.join(run, "snapshots")
    names = sorted(f for f in os.listdir(folder) if f.startswith("ema_") and f[4:-3].isdigit()) \
        if os.path.isdir(folder) else []
    return {int(f[4:-3]): os.path.join(folder, f) for f in names}


def run_curve(run, refs, features, x_real, n):
    """The measurements of every snapshot of a run, {step: measure_student}, cached in <run>/curve.json (for these
    references): only new snapshots are measured."""
    path = os.path.join(run, "curve.json")
    cached = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
            cached = saved["points"] if saved.get("key") == {**refs["key"], "measure": MEASURE} else {}
        except (OSError, ValueError, KeyError, TypeError):
            cached = {}
    points = {}
    for step, snap in snapshots(run).items():
        if str(step) not in cached:
            student = sit.load_teacher(snap, resolution=None).eval()
            cached[str(step)] = measure_student(student, refs, features, x_real, n)
        points[step] = cached[str(step)]
    write_json({"key": {**refs["key"], "measure": MEASURE}, "points": {str(k): v for k, v in points.items()}}, path)
    return points


# ---------------------------------------------------------------------------------------------------
# Summaries: the best γ of each point, the plateau, FLOPs
# ---------------------------------------------------------------------------------------------------


def at_best(point, key="fd", gammas=None):
    """(γ, value) with the lowest `key` among the point's scales (or among `gammas`)."""
    g = min((g for g in point if gammas is None or float(g) in gammas), key=lambda g: point[g][key])
    return float(g), point[g][key]


def last_quarter_change(curve, key="fd"):
    """The relative change of the best-γ value over the last quarter of the steps: (last - the value a quarter of
    the run before the end) / that value, negative when the distance fell; None with fewer than two points."""
    steps = sorted(curve)
    if len(steps) < 2:
        return None
    end = steps[-1]
    before = min(steps, key=lambda s: abs(s - 0.75 * end))
    then, last = at_best(curve[before], key)[1], at_best(curve[end], key)[1]
    return (last - then) / then


def gflops_per_step(flags):
    """FLOPs of one digits training step with these flags (torch.utils.flop_counter's rules), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    import freeflow as ff
    from toy.digits import SHAPE, digits_sit
    cfg = ff.parse_config(["--toy", "digits", *flags]).check().resolve(True)
    torch.manual_seed(0)
    teacher = digits_sit(np.zeros((1, *SHAPE), np.float32), 10, cfg).eval().requires_grad_(False)
    student, g_psi = ff.make_student(teacher, cfg.extra_blocks).train(), ff.make_aux(teacher).train()
    opts = (torch.optim.Adam(student.parameters()), torch.optim.Adam(g_psi.parameters()))
    passes = ff.training_passes(student, g_psi, teacher, cfg)  # as a training run's step
    with FlopCounterMode(display=False) as counter:
        ff.train_step(student, g_psi, teacher, *opts, cfg, SHAPE, passes)
    return counter.get_total_flops() / 1e9


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------


def seed_dir(out, seed):
    return os.path.join(out, f"s{seed}")


def run_dir(out, seed, variant):
    return os.path.join(seed_dir(out, seed), "runs", f"digits__{variant}")


def teacher_path(out, seed):
    return os.path.join(seed_dir(out, seed), "teachers", "digits.pt")


def run_flags(variant, seed, common, keep_every):
    return [*VARIANTS[variant], "--seed", str(seed), "--keep-every", str(keep_every), *common]


def run_all(out, variants, seeds, common, keep_every, jobs):
    """Every (variant, seed) run that has not finished, `jobs` at a time; each seed's first run alone first when its
    teacher is not cached. Returns how many failed."""
    from toy.suite import run_one
    todo = [(s, v) for s in seeds for v in variants if not os.path.exists(os.path.join(run_dir(out, s, v), "metrics.json"))]
    go = lambda sv: run_one(seed_dir(out, sv[0]), "digits", sv[1], "digits",  # noqa: E731
                            run_flags(sv[1], sv[0], common, keep_every), resume=True)
    first = [next(sv for sv in todo if sv[0] == s) for s in seeds
             if not os.path.exists(teacher_path(out, s)) and any(sv[0] == s for sv in todo)]
    with ThreadPoolExecutor(jobs) as pool:  # the teachers (one per seed) in parallel, then everything else
        failed = sum(c != 0 for c in pool.map(go, first))
        failed += sum(c != 0 for c in pool.map(go, [sv for sv in todo if sv not in first]))
    return failed


# ---------------------------------------------------------------------------------------------------
# The table and the figure
# ---------------------------------------------------------------------------------------------------


def collect(out, variants, seeds, n, progress=True):
    """{"teacher": {seed: refs["gammas"]}, "runs": {variant: {seed: {step: point}}}, "gflops": {variant: ...}}
    for every run on disk; the measurements are cached in each run."""
    from toy.digits import load_digits
    from toy.digits_features import DigitsFeatures
    x, y, _ = load_digits()
    result = {"gammas": list(GAMMAS), "samples": n, "teacher": {}, "runs": {}, "gflops": {}}
    for seed in seeds:
        tpath = teacher_path(out, seed)
        if not os.path.exists(tpath):
            continue
        features = DigitsFeatures(os.path.dirname(tpath), x, y)
        interval = tuple(parse_config(["--toy", "digits"]).guidance_interval)
        refs = load_or_make_references(os.path.join(seed_dir(out, seed), "references.pt"), tpath, features, x,
                                       interval, n, progress)
        result["teacher"][seed] = refs["gammas"]
        for variant in variants:
            run = run_dir(out, seed, variant)
            if os.path.isdir(run):
                curve = run_curve(run, refs, features, x, n)
                if curve:
                    result["runs"].setdefault(variant, {})[seed] = curve
    result["gflops"] = {v: gflops_per_step(VARIANTS[v]) for v in result["runs"]}
    return result


def teacher_best(row, gammas=None):
    """(γ, learned FD) of the teacher's line at its best γ (among `gammas` if given)."""
    line = f"rk4_{TEACHER_STEPS[0]}"
    g = min((g for g in row if gammas is None or float(g) in gammas), key=lambda g: row[g][line]["fd"])
    return float(g), row[g][line]["fd"]


def judged_at(variant):
    """The scales a variant is judged at: a student trained at γ = 1 alone is judged there alone."""
    return (1.0,) if variant == "gamma1" else None


def table(result):
    """Markdown: the teacher per seed (its line at 8/16/32 RK4 steps, the floor), then each run's last point."""
    lines = ["| seed | γ | teacher learned FD, RK4 8 / 16 / 32 steps | pixel FD (8 steps) | second teacher set: "
             "learned FD to the real digits / to the first set (the floor) | RMSE 8 vs 32 steps |",
             "|---|---|---|---|---|---|"]
    for seed, rows in result["teacher"].items():
        for g, r in rows.items():
            fds = " / ".join(f"{r[f'rk4_{s}']['fd']:.2f}" for s in TEACHER_STEPS)
            lines.append(f"| {seed} | {g} | {fds} | {r['rk4_8']['pixel_fd']:.3f} | {r['floor']['fd']:.2f} / "
                         f"{r['floor_fd_to_teacher']:.2f} | {r['rk4_8_vs_32_rmse']:.4f} |")
    lines += ["", "| variant | seed | steps | GFLOP a step | best γ | learned FD at best γ (teacher's at its best) | "
              "/ teacher | change over the last quarter (-: fell) | learned FD to the teacher (floor) | "
              "pixel FD at best γ | endpoint RMSE γ = 1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, seeds in result["runs"].items():
        for seed, curve in seeds.items():
            step = max(curve)
            point = curve[step]
            g, fd = at_best(point, gammas=judged_at(variant))
            tg, tfd = teacher_best(result["teacher"][seed], judged_at(variant))
            change = last_quarter_change(curve)
            gp, pfd = at_best(point, "pixel_fd", judged_at(variant))
            floor = result["teacher"][seed][f"{g:g}"]["floor_fd_to_teacher"]
            lines.append(f"| {variant} | {seed} | {step} | {result['gflops'][variant]:.2f} | {g:g} | {fd:.2f} "
                         f"({tfd:.2f} at {tg:g}) | {fd / tfd:.2f}x | "
                         f"{'' if change is None else f'{100 * change:+.1f} %'} | "
                         f"{point[f'{g:g}']['fd_to_teacher']:.2f} ({floor:.2f}) | {pfd:.3f} at {gp:g} | "
                         f"{point['1']['endpoint_rmse']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(path, result):
    """Learned FD at each model's best γ against steps and against training FLOPs; each seed's teacher (its best γ)
    dashed, its floor-set dotted; and the endpoint RMSE at γ = 1 against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    colours = {variant: f"C{i % 10}" for i, variant in enumerate(VARIANTS)}
    styles = ["-", "--", ":", "-."]
    for i, (seed, rows) in enumerate(result["teacher"].items()):
        tg, tfd = teacher_best(rows)
        for ax in axes[:2]:
            ax.axhline(tfd, color="k", ls=styles[i % 4], lw=1, label=f"teacher, seed {seed} (RK4 8, γ {tg:g})")
            ax.axhline(rows[f"{tg:g}"]["floor"]["fd"], color="grey", ls=styles[i % 4], lw=1,
                       label=f"teacher's second set, seed {seed}")
    for variant, seeds in result["runs"].items():
        for i, (seed, curve) in enumerate(seeds.items()):
            steps = sorted(curve)
            fd = [at_best(curve[s], gammas=judged_at(variant))[1] for s in steps]
            kw = dict(color=colours[variant], ls=styles[i % 4], marker="o", ms=2, label=f"{variant}, seed {seed}")
            axes[0].plot(steps, fd, **kw)
            axes[1].plot([s * result["gflops"][variant] / 1e3 for s in steps], fd, **kw)
            axes[2].plot(steps, [curve[s]["1"]["endpoint_rmse"] for s in steps], **kw)
    axes[0].set(xlabel="step", ylabel="learned FD to the real digits, at the best γ", yscale="log")
    axes[1].set(xlabel="training TFLOP", ylabel="learned FD to the real digits, at the best γ", yscale="log")
    axes[2].set(xlabel="step", ylabel="endpoint RMSE at γ = 1 (vs the teacher's RK4)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"digits distilled to convergence: {result['samples']} samples at γ ∈ "
                 f"{{{', '.join(f'{g:g}' for g in GAMMAS)}}}, each model at its best", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    """(args, the flags for every run), every refusal made: what main runs, and what the README's test parses."""
    from toy.suite import command_parser
    parser = command_parser("converge", __doc__)
    parser.add_argument("--out", default=os.path.join("out", "converge"), help="where the runs and results go")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        metavar="V", help=f"variants to run: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (each its own teacher)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--keep-every", type=int, default=500, help="EMA snapshots every N steps (the curves' points)")
    parser.add_argument("--samples", type=int, default=1500, help="samples per measurement (the scan's noise)")
    parser.add_argument("--table-only", action="store_true", help="measure and tabulate the runs on disk, run nothing")
    args, common = parser.parse_known_args(argv)
    if args.jobs < 1 or args.keep_every < 1 or args.samples < 2:
        parser.error(f"--jobs and --keep-every must be positive and --samples at least 2 (got {args.jobs}, "
                     f"{args.keep_every}, {args.samples})")
    if "--steps" not in common:
        common = ["--steps", "20000", *common]
    # each run's own end-of-run evaluation is only a report here (the curves measure its snapshots): a light one
    for name, values in LIGHT_EVALUATION.items():
        if name not in common:
            common = [*common, name, *values]
    try:
        parse_config(["--toy", "digits", *common]).check()  # every run's flags, refused once, here
        check_writable_dir(args.out)
    except FreeFlowError as e:
        parser.error(str(e))
    return args, common


def main(argv=None):
    args, common = parse_args(argv)
    try:
        if not args.table_only:
            start = time.perf_counter()
            failed = run_all(args.out, args.variants, args.seeds, common, args.keep_every, args.jobs)
            print(f"[converge] runs done in {time.perf_counter() - start:.0f} s, {failed} failed")
        result = collect(args.out, args.variants, args.seeds, args.samples)
        if not result["runs"]:
            raise FreeFlowError(f"there are no runs with snapshots under {args.out}; run without --table-only.")
    except FreeFlowError as e:
        print(f"python -m toy.converge: error: {e}", file=sys.stderr)
        return 2
    text = table(result)
    write_json(result, os.path.join(args.out, "curves.json"))
    with open(os.path.join(args.out, "converge.md"), "w") as f:
        f.write(text)
    plot(os.path.join(args.out, "converge.png"), result)
    print(text + f"\nwrote {args.out}/curves.json, converge.md and converge.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
