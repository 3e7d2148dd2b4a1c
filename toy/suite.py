"""The toy suite: every 2D data set and the ablations, one Markdown table.

    python -m toy.suite                      # everything (42 runs, 30 to 36 minutes on 2 cores)
    python -m toy.suite --only moons,rings   # a subset of the data sets
    python -m toy.suite --full-only          # the full method on every set, no ablations (17 runs)
    python -m toy.suite --table-only         # rebuild the table from runs already on disk
    python -m toy.suite --full-only --steps 3000 --lr 2e-3   # any other flag goes to every run
    python -m toy.suite --seed 1 --out out/suite_s1          # a second seed of every row
    python -m toy.suite --claims out/suite out/suite_s1      # the paper's ablation claims, seen or not

Each run is `python freeflow.py --toy ...` in its own process (one thread each, `--jobs` at a time); each
data set's teacher is trained once, by its first run, and shared by the others. Variants:

    both         the full method: predictor + corrector, ∂_s F by forward-mode JVP (the default)
    fd           the same with ∂_s F by a central finite difference
    predictor    predictor loss only
    corrector    corrector loss only
    s0           25 % of the predictor's s drawn at exactly 0 (the one-step endpoint); moons, spirals

plus the EXTRA runs below (k = 0; a guided class-conditional teacher, 8gaussians with CFG 3; the
corrector's guidance interval and its r range), and twelve data sets written as .npy / .npz files and
run through the user-file path with the defaults. How untouched each is:

- pinwheel, swissroll, grid25 were run with the first defaults (3000 steps), where two missed the bounds;
  that made the default 6000 steps. swissroll (with checkerboard) then made the toy width 96.
- grid25 kept missing (its teacher smeared its tight clusters); trying sinusoidal x features on it, and
  then on spirals, chose the toy MLP's `--x-freqs 6`, and checkerboard and moons chose a cosine
  learning-rate decay. A full suite at 4000 steps (to bring moons' from-scratch run under 180 s)
  missed the W2 bound on pinwheel, swissroll and cardioid (1.41 to 1.44), so the default went back to
  6000 steps.
- crescent, sineband, squares were written after the width change; no default was chosen on them.
- hexagon, cardioid, zigzag, clock were written for the 4000-step suite and first run by it; cardioid
  is one of the misses that restored 6000 steps.
- rose and blobs3 were written after that; the --full-only suite on commit 62eafd2 was their first run
  (both within the bounds), and no default has changed because of them.
- The 4000-step schedule at batch 256 (for a 90 s quick start) was screened on moons, checkerboard,
  pinwheel, swissroll, cardioid, clock and rose; a seed-1 suite then missed pinwheel's endpoint bound,
  and the predictor weight's ε = 1e-2 (with 3500 steps) was chosen on pinwheel, spirals, moons, clock,
  cardioid and guided 8gaussians. rings, crescent, sineband, squares, hexagon, zigzag and blobs3 had no
  say in either.

The table marks each full-method run against the acceptance bounds (moons: W2 ratio <= 1.25, endpoint
<= 0.05; every other set: <= 1.4 and <= 0.08).
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freeflow import TOY_NAMES, FreeFlowError, OneLineParser, check_writable_dir, parse_config  # noqa: E402

VARIANTS = {
    "both": [],
    "fd": ["--dsdt", "fd"],
    "predictor": ["--loss", "predictor"],
    "corrector": ["--loss", "corrector"],
    "s0": ["--s-zero-frac", "0.25"],
}
# runs beyond "every variant on every named set": (row name, variant, --toy, flags)
EXTRA = [
    # without the adaptive weight (k = 0) the corrector's gradient is as large as the predictor's
    ("moons-k0", "both", "moons", ["--k", "0"]),
    ("moons-k0", "predictor", "moons", ["--k", "0", "--loss", "predictor"]),
    # a guided class-conditional teacher: CFG 3 over the whole ODE
    ("8gaussians-cfg3", "both", "8gaussians", ["--cfg", "3"]),
    ("8gaussians-cfg3", "predictor", "8gaussians", ["--cfg", "3", "--loss", "predictor"]),
    ("8gaussians-cfg3", "corrector", "8gaussians", ["--cfg", "3", "--loss", "corrector"]),
    # the corrector's teacher guided over all of [0, 1] instead of the paper's [0, 0.7]
    ("8gaussians-cfg3", "corr01", "8gaussians", ["--cfg", "3", "--corrector-interval", "0", "1"]),
    # the corrector's noise level r drawn only in [0, 0.6] (no high-noise end), unguided and guided
    ("moons", "r06", "moons", ["--r-range", "0", "0.6"]),
    ("8gaussians-cfg3", "r06", "8gaussians", ["--cfg", "3", "--r-range", "0", "0.6"]),
]


def user_sets(rng):
    """2D sets that no default was tuned on, saved as user files (see the module docstring)."""
    n = 20_000
    # pinwheel: 5 curved arms
    arm = rng.integers(0, 5, n)
    r = rng.normal(1.0, 0.3, n)
    angle = 2 * np.pi * arm / 5 + 0.25 * np.exp(r) + rng.normal(0, 0.05, n)
    pinwheel = np.c_[r * np.cos(angle), r * np.sin(angle)]
    # swiss roll, 2D
    u = 1.5 * np.pi * (1 + 2 * rng.uniform(0, 1, n))
    swissroll = np.c_[u * np.cos(u), u * np.sin(u)] + rng.normal(0, 0.5, (n, 2))
    # a 5 x 5 grid of small Gaussians, labelled by row
    cell = rng.integers(0, 25, n)
    grid = np.c_[cell % 5, cell // 5] + rng.normal(0, 0.08, (n, 2))
    # a crescent with two blobs inside it
    part = rng.integers(0, 4, n)  # 0, 1: the crescent (twice the mass), 2, 3: the blobs
    a = rng.uniform(0.15 * np.pi, 0.85 * np.pi, n)
    crescent = np.c_[2 * np.cos(a), 2 * np.sin(a) - 1] + rng.normal(0, 0.1, (n, 2))
    blobs = np.c_[np.where(part == 2, -0.5, 0.5), np.zeros(n)] + rng.normal(0, 0.15, (n, 2))
    crescent = np.where((part < 2)[:, None], crescent, blobs)
    # a band along a sine wave
    u = rng.uniform(-3, 3, n)
    sineband = np.c_[u, np.sin(2 * u)] + rng.normal(0, 0.1, (n, 2))
    # three concentric square outlines, labelled by square
    sq = rng.integers(0, 3, n)
    side, pos = rng.integers(0, 4, n), rng.uniform(-1, 1, n)
    one = np.ones(n)
    edge = np.select([(side == k)[:, None] for k in range(3)],
                     [np.c_[pos, one], np.c_[one, pos], np.c_[pos, -one]], np.c_[-one, pos])
    squares = edge * (sq + 1)[:, None] + rng.normal(0, 0.05, (n, 2))
    return {"pinwheel.npy": (pinwheel, None), "swissroll.npy": (swissroll, None), "grid25.npz": (grid, cell // 5),
            "crescent.npy": (crescent, None), "sineband.npy": (sineband, None), "squares.npz": (squares, sq)}


def new_user_sets(rng):
    """Four more sets, written after the x features and the cosine decay were chosen, and first run by the
    4000-step suite (see the module docstring)."""
    n = 20_000
    # hexagon: a cluster at the centre (twice the mass) and one at each vertex of a unit hexagon
    k = rng.integers(0, 8, n)
    vertex = np.where(k < 2, -1, k - 2)  # -1: the centre
    angle = np.pi / 3 * vertex
    hexagon = np.where((vertex < 0)[:, None], 0.0, np.c_[np.cos(angle), np.sin(angle)]) + rng.normal(0, 0.12, (n, 2))
    # cardioid: the curve r = 1 - cos θ
    theta = rng.uniform(0, 2 * np.pi, n)
    radius = 1 - np.cos(theta)
    cardioid = np.c_[radius * np.cos(theta), radius * np.sin(theta)] + rng.normal(0, 0.05, (n, 2))
    # zigzag: four straight segments, labelled by segment
    seg, u = rng.integers(0, 4, n), rng.uniform(0, 1, n)
    corners = np.array([[0.0, 0.0], [1.0, 1.5], [2.0, 0.0], [3.0, 1.5], [4.0, 0.0]])
    zigzag = corners[seg] + u[:, None] * (corners[seg + 1] - corners[seg]) + rng.normal(0, 0.06, (n, 2))
    # clock: twelve tight clusters on a circle of radius 2, labelled by cluster
    hour = rng.integers(0, 12, n)
    clock = 2 * np.c_[np.cos(np.pi / 6 * hour), np.sin(np.pi / 6 * hour)] + rng.normal(0, 0.1, (n, 2))
    return {"hexagon.npy": (hexagon, None), "cardioid.npy": (cardioid, None), "zigzag.npz": (zigzag, seg),
            "clock.npz": (clock, hour)}


def last_user_sets(rng):
    """Two more, written after the default went back to 6000 steps (see the module docstring)."""
    n = 20_000
    # rose: the three-petalled curve r = cos 3θ
    theta = rng.uniform(0, np.pi, n)
    rose = np.cos(3 * theta)[:, None] * np.c_[np.cos(theta), np.sin(theta)] + rng.normal(0, 0.04, (n, 2))
    # blobs3: three Gaussians with different shapes and weights, labelled
    k = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    centres = np.array([[-1.5, 0.0], [1.0, 1.0], [1.0, -1.2]])
    scales = np.array([[0.6, 0.15], [0.2, 0.5], [0.3, 0.3]])
    blobs3 = centres[k] + scales[k] * rng.normal(0, 1, (n, 2))
    return {"rose.npy": (rose, None), "blobs3.npz": (blobs3, k)}


USER_FILES = ("pinwheel.npy", "swissroll.npy", "grid25.npz", "crescent.npy", "sineband.npy", "squares.npz",
              "hexagon.npy", "cardioid.npy", "zigzag.npz", "clock.npz", "rose.npy", "blobs3.npz")


def bounds_ok(name, m):
    w2_max, end_max = (1.25, 0.05) if name == "moons" else (1.4, 0.08)
    return m["w2_ratio"] <= w2_max and m["endpoint_error"] <= end_max


def plan(out, only):
    """(name, variant, toy argument, extra flags) for every run, in an order where each data set's first
    run trains its teacher before the others need it."""
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    files = []
    sets = (user_sets(np.random.default_rng(2025)) | new_user_sets(np.random.default_rng(2026))
            | last_user_sets(np.random.default_rng(2027)))
    for fname, (x, y) in sets.items():
        path = os.path.join(data_dir, fname)
        if fname.endswith(".npz"):
            np.savez(path, points=x, labels=y)
        else:
            np.save(path, x)
        files.append((os.path.splitext(fname)[0], path))
    names = [n for n in TOY_NAMES if not only or n in only]
    first = [(n, "both", n, []) for n in names]
    first += [(f, "both", p, []) for f, p in files if not only or f in only]
    rest = [(n, v, n, flags) for n in names for v, flags in VARIANTS.items()
            if v != "both" and (v != "s0" or n in ("moons", "spirals"))]
    rest += [run for run in EXTRA if not only or run[2] in only]
    return first, rest


def run_one(out, name, variant, toy, flags, common=(), resume=False):
    """One run in its own process (one thread) under out/runs/<name>__<variant>, its output in log.txt. With
    resume, a run that has a checkpoint but no metrics.json (it was stopped) continues with --resume."""
    run_dir = os.path.join(out, "runs", f"{name}__{variant}")
    teacher = os.path.join(out, "teachers", f"{os.path.basename(str(toy)).split('.')[0]}.pt")
    os.makedirs(os.path.dirname(teacher), exist_ok=True)
    resume = resume and os.path.exists(os.path.join(run_dir, "ckpt.pt")) and \
        not os.path.exists(os.path.join(run_dir, "metrics.json"))
    cmd = [sys.executable, os.path.join(ROOT, "freeflow.py"), "--toy", toy, "--out", run_dir,
           "--toy-teacher", teacher, "--device", "cpu", *common, *flags, *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "log.txt"), "a" if resume else "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    print(f"[suite] {name:>16s} {variant:<10s} {'ok' if code == 0 else f'FAILED ({code}), see ' + run_dir}",
          flush=True)
    return code


def run_sharing_teacher(out, toy, runs, common, jobs):
    """Run [(variant, flags)] of `toy` under `out`, `jobs` at a time, and return how many failed. Without a cached
    teacher the first run trains it, alone, and the others share it (toy/digits_ablations.py, toy/mismatch.py)."""
    first = [] if os.path.exists(os.path.join(out, "teachers", f"{toy}.pt")) else runs[:1]
    failed = sum(run_one(out, toy, variant, toy, flags, common) != 0 for variant, flags in first)
    with ThreadPoolExecutor(jobs) as pool:
        failed += sum(c != 0 for c in pool.map(lambda r: run_one(out, toy, r[0], toy, r[1], common), runs[len(first):]))
    return failed


def run_metrics(out, run):
    """The metrics.json of run `<data>__<variant>` of the suite in `out`, or None if it has not finished (a damaged one
    is a FreeFlowError)."""
    from toy.run import read_metrics
    run_dir = os.path.join(out, "runs", run)
    return read_metrics(run_dir, "") if os.path.exists(os.path.join(run_dir, "metrics.json")) else None


def table(out):
    rows = [(run, m) for run in sorted(os.listdir(os.path.join(out, "runs")))
            if (m := run_metrics(out, run)) is not None]
    names = (*TOY_NAMES, *dict.fromkeys(r[0] for r in EXTRA), *(os.path.splitext(f)[0] for f in USER_FILES))
    order = {n: i for i, n in enumerate(names)}
    vorder = {v: i for i, v in enumerate(dict.fromkeys((*VARIANTS, *(r[1] for r in EXTRA))))}
    rows.sort(key=lambda r: (order.get(r[0].split("__")[0], 99), vorder.get(r[0].split("__")[1], 99)))
    lines = ["| data | variant | W2 | W2 floor | ratio | endpoint | traj. s=.75 / .5 / .25 | teacher NFE | "
             "speed-up | train s | bounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, m in rows:
        name, variant = run.split("__")
        tr = " / ".join(f"{m['trajectory_error'][s]:.4f}" for s in ("0.75", "0.5", "0.25"))
        mark = ("pass" if bounds_ok(m["toy"], m) else "FAIL") if variant == "both" and name == m["toy"] else ""
        lines.append(f"| {name} | {variant} | {m['w2']:.4f} | {m['w2_floor']:.4f} | {m['w2_ratio']:.3f} | "
                     f"{m['endpoint_error']:.4f} | {tr} | {m['teacher_nfe']} | {m['sampling_speedup']:.0f}x | "
                     f"{m['train_seconds']:.0f} | {mark} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


# The paper's ablation claims that the suite's rows can test: (claim, the runs compared, the test on their
# W2 ratios). "Breaks" is read as at least a 1.5-fold W2 ratio (the paper's k = 0 and [0, 1] rows are 8-fold
# worse in FID, its r range [0, 0.6] 15-fold).
CLAIMS = [
    ("both losses beat the predictor alone", [(n, "both", n, "predictor") for n in TOY_NAMES],
     lambda a, b: a < b),
    ("the corrector alone is worse than both", [(n, "corrector", n, "both") for n in TOY_NAMES],
     lambda a, b: a > b),
    ("k = 0 breaks the full method", [("moons-k0", "both", "moons", "both")], lambda a, b: a > 1.5 * b),
    ("guiding the corrector's teacher on [0, 1] instead of [0, 0.7] breaks it",
     [("8gaussians-cfg3", "corr01", "8gaussians-cfg3", "both")], lambda a, b: a > 1.5 * b),
    ("drawing the corrector's r only in [0, 0.6] breaks it",
     [("moons", "r06", "moons", "both"), ("8gaussians-cfg3", "r06", "8gaussians-cfg3", "both")],
     lambda a, b: a > 1.5 * b),
]


def claims(outs, rows=CLAIMS, measure=lambda m: {"": m["w2_ratio"]}, what="W2 ratios"):
    """The paper's claims against the runs of one or more suites (one per seed): for each, the values
    compared, on how many comparisons the claim holds, and a verdict: seen (all), not seen (at most half),
    mixed (between). `measure` gives a run's values to compare, by label (one W2 ratio here; the digits
    compare Fréchet distances at two scales, toy/digits_ablations.py): every label is one comparison."""
    lines = [f"| paper's claim | {what} compared, per seed | holds on | seen? |", "|---|---|---|---|"]
    for claim, pairs, holds in rows:
        shown, n, k = [], 0, 0
        for a_name, a_var, b_name, b_var in pairs:
            values = []  # (label, a, b) for every seed and label
            for o in outs:
                a, b = run_metrics(o, f"{a_name}__{a_var}"), run_metrics(o, f"{b_name}__{b_var}")
                if a is not None and b is not None:
                    a, b = measure(a), measure(b)
                    values += [(label, a[label], b[label]) for label in a]
            if values:
                shown.append(f"{a_name} {a_var} / {b_name} {b_var}: "
                             + ", ".join(f"{label + ' ' if label else ''}{x:.3f} / {y:.3f}" for label, x, y in values))
                n += len(values)
                k += sum(bool(holds(x, y)) for _, x, y in values)
        verdict = "—" if n == 0 else "seen" if k == n else "not seen" if 2 * k <= n else "mixed"
        lines.append(f"| {claim} | {'; '.join(shown) or 'not run'} | {k} of {n} | {verdict} |")
    return "\n".join(lines) + "\n"


def command_parser(module, doc, formatter=argparse.RawDescriptionHelpFormatter):
    """The parser of a `python -m toy.<module>` command: one-line errors like freeflow.py's, the module docstring's
    first paragraph as its description and the rest as its epilog."""
    return OneLineParser(prog=f"python -m toy.{module}", description=doc.split("\n\n")[0], formatter_class=formatter,
                         epilog=doc.split("\n\n", 1)[1] if formatter is argparse.RawDescriptionHelpFormatter else None)


def command_main(parse_args, run):
    """main(argv) of a suite-like command: parse_args(argv) -> (parser, args, flags for every run), then run(...),
    whose FreeFlowError (a damaged run on disk, say) is one line like every other refusal."""
    def main(argv=None):
        parser, args, common = parse_args(argv)
        try:
            run(parser, args, common)
        except FreeFlowError as e:
            parser.error(str(e))
    return main


def check_args(parser, args, common, toy, finished, only=(), what="data set"):
    """Refuse, in one sentence each, what a suite-like command (this one, toy/digits_ablations.py) cannot
    run. With --claims no flags for runs may be given, and every directory must hold runs (`finished` names
    what it should be, e.g. "a finished suite"); otherwise --jobs must be positive, --out writable, every name of
    --only one of `only` (a `what`), and the flags for every run must pass `python freeflow.py --toy <toy>`'s
    checks, once here rather than once per run."""
    if args.claims:
        if common:
            parser.error(f"--claims only reads finished runs; it takes no flags for runs (got {' '.join(common)}).")
        missing = [o for o in args.claims if not os.path.isdir(os.path.join(o, "runs"))]
        if missing:
            parser.error(f"there are no runs under {missing[0]}; give the --out of {finished}.")
        return
    if args.jobs < 1:
        parser.error(f"--jobs must be a positive integer (got {args.jobs})")
    try:
        parse_config(["--toy", toy, *common]).check()
        check_writable_dir(args.out)
    except FreeFlowError as e:
        parser.error(str(e))
    unknown = [name for name in getattr(args, "only", "").split(",") if name and name not in only]
    if unknown:
        parser.error(f"--only: there is no {what} {unknown[0]!r}; choose from {', '.join(only)}")


def parse_args(argv=None):
    """(args, the flags for every run), every refusal made: what main runs, and what the README's test parses."""
    parser = command_parser("suite", __doc__, argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join("out", "suite"), help="where runs and results.md go")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--only", default="", help="comma-separated data sets (default: all)")
    parser.add_argument("--full-only", action="store_true",
                        help="only the full method on every data set (the rows the bounds apply to), no ablations")
    parser.add_argument("--table-only", action="store_true", help="only rebuild results.md from finished runs")
    parser.add_argument("--claims", nargs="+", metavar="OUT", default=None,
                        help="only print the paper's ablation claims against these suites' runs (one per seed, "
                             "e.g. out/suite out/suite_s1)")
    args, common = parser.parse_known_args(argv)
    check_args(parser, args, common, "moons", "a finished suite",
               only=(*TOY_NAMES, *(os.path.splitext(f)[0] for f in USER_FILES)))
    return parser, args, common


def run(parser, args, common):
    if args.claims:
        print(claims(args.claims))
        return
    if not args.table_only:
        start = time.perf_counter()
        first, rest = plan(args.out, set(filter(None, args.only.split(","))))
        rest = [] if args.full_only else rest
        failed = 0
        for batch in (first, rest):
            with ThreadPoolExecutor(args.jobs) as pool:
                failed += sum(c != 0 for c in pool.map(lambda r: run_one(args.out, *r, common), batch))
        print(f"[suite] {len(first) + len(rest)} runs in {time.perf_counter() - start:.0f} s, {failed} failed")
    if not os.path.isdir(os.path.join(args.out, "runs")):
        parser.error(f"there are no runs under {args.out} to make a table of; run the suite without --table-only.")
    print(table(args.out))


main = command_main(parse_args, run)

if __name__ == "__main__":
    main()
