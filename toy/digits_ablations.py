"""The paper's ablations on the digits, where the corrector is active: one command runs them, one prints
the table, one the claims.

    python -m toy.digits_ablations                                   # 9 runs, about an hour on 2 cores
    python -m toy.digits_ablations --seed 1 --out out/digits_ablations_s1   # a second seed (its own teacher)
    python -m toy.digits_ablations --only both,predictor,alpha3-psi4,predictor-equal   # the corrector's question
    python -m toy.digits_ablations --teacher-steps 800 --out out/digits_weak   # a teacher that guidance helps
    python -m toy.digits_ablations --table-only                      # the table of runs already on disk
    python -m toy.digits_ablations --claims out/digits_ablations out/digits_ablations_s1

Every run is `python freeflow.py --toy digits` at the digits defaults (one thread each, `--jobs` at a time,
the teacher trained once by the first run and shared), with the variant's flags:

    both          the default: predictor + corrector
    predictor     the predictor loss only
    corrector     the corrector loss only (with its default of 4 extra g_ψ updates a step)
    k0            the predictor's adaptive weight off (k = 0)
    r06           the corrector's noise level r drawn only in [0, 0.6]
    corr01        the corrector's teacher guided on [0, 1] instead of [0, 0.7]
    alpha1-psi4   both, with α = 1 and 4 extra g_ψ updates a step (ours, not the paper's)
    alpha3-psi4   both, with α = 3 and 4 extra g_ψ updates a step: a corrector with a real share (ours)
    predictor-equal   the predictor alone given alpha3-psi4's compute: 1.5 times the steps (EQUAL_FLOPS)
    alpha3-psi4-c1    alpha3-psi4 with the corrector's rows at γ = 1 (--corrector-cfg 1), the predictor's over
                      the γ range: the corrector where its target is the teacher's own distribution (ours)

The claims are judged twice. As FID papers judge them: each run at its own best guidance scale (the FD-vs-γ
scan every digits run ends with, toy/digits_scan.py), in the features of a CNN classifier of the digits and,
separately, in pixels. And at two fixed scales, γ = 1 and the guided γ = 2, by the pixel Fréchet distance to
the real digits (how they were judged before the scan existed). Every label is a comparison of its own;
"breaks" is read as 1.5 times the distance, as in toy/suite.py.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freeflow import parse_config  # noqa: E402
from toy.suite import check_args, claims, command_main, command_parser, run_metrics, run_sharing_teacher  # noqa: E402

# The FLOPs of one digits step with 4 extra g_ψ updates over one of the predictor alone: 4.96 / 3.31 GFLOP
# (`python bench/digits_step_flops.py`, 2026-12-01), so predictor-equal trains 1.5 times the steps.
EQUAL_FLOPS = 1.5
VARIANTS = {
    "both": [],
    "predictor": ["--loss", "predictor"],
    "corrector": ["--loss", "corrector"],
    "k0": ["--k", "0"],
    "r06": ["--r-range", "0", "0.6"],
    "corr01": ["--corrector-interval", "0", "1"],
    "alpha1-psi4": ["--alpha", "1", "--psi-steps", "4"],
    "alpha3-psi4": ["--alpha", "3", "--psi-steps", "4"],
    "predictor-equal": ["--loss", "predictor"],  # and EQUAL_FLOPS times the steps (variant_flags)
    "alpha3-psi4-c1": ["--alpha", "3", "--psi-steps", "4", "--corrector-cfg", "1"],
}
D = "digits"
CLAIMS = [
    ("both losses beat the predictor alone", [(D, "both", D, "predictor")], lambda a, b: a < b),
    ("the corrector alone is worse than both", [(D, "corrector", D, "both")], lambda a, b: a > b),
    ("k = 0 breaks the full method", [(D, "k0", D, "both")], lambda a, b: a > 1.5 * b),
    ("guiding the corrector's teacher on [0, 1] instead of [0, 0.7] breaks it", [(D, "corr01", D, "both")],
     lambda a, b: a > 1.5 * b),
    ("drawing the corrector's r only in [0, 0.6] breaks it", [(D, "r06", D, "both")], lambda a, b: a > 1.5 * b),
    ("(ours) both losses with α = 1 and 4 extra g_ψ updates beat the predictor alone",
     [(D, "alpha1-psi4", D, "predictor")], lambda a, b: a < b),
    ("(ours) both losses with α = 3 and 4 extra g_ψ updates beat the predictor alone",
     [(D, "alpha3-psi4", D, "predictor")], lambda a, b: a < b),
    ("(ours) ... and beat the predictor alone given the same FLOPs", [(D, "alpha3-psi4", D, "predictor-equal")],
     lambda a, b: a < b),
    ("(ours) ... with the corrector's rows at γ = 1 beat the predictor alone given the same FLOPs",
     [(D, "alpha3-psi4-c1", D, "predictor-equal")], lambda a, b: a < b),
]


def variant_flags(variant, common):
    """The flags of a variant's run: its own, with predictor-equal's steps scaled from the run's --steps."""
    if variant != "predictor-equal":
        return VARIANTS[variant]
    steps = parse_config(["--toy", D, *common]).steps
    return [*VARIANTS[variant], "--steps", str(round(EQUAL_FLOPS * steps))]


def frechet_to_real(m):
    """A digits run's Fréchet distances to the real digits, by scale: {"γ = 1": ..., "γ = 2": ...}."""
    return {f"γ = {g}": s["frechet_to_real"]["student"] for g, s in m["scales"].items()}


def at_best_scale(m):
    """A digits run's student at its own best γ of the scan: {"learned": FD in the CNN's features, "pixels": ...},
    each at the scale that is best for it."""
    scan = m["scan"]
    return {key_label: scan["student"][f"{scan['best']['student'][key]:g}"][key]
            for key, key_label in (("fd", "learned"), ("pixel_fd", "pixels"))}


def table(out):
    """One row per finished run: each at its best γ of the scan (the scale, the learned FD with precision and recall
    there, the pixel FD at its own best scale), both scales of the endpoint error, the Fréchet distances (to the
    real digits and to the teacher, with the teacher's own), class accuracy, and the distillation time; then the
    teacher at its best γ."""
    lines = ["| variant | best γ: learned FD (precision / recall) | best γ: pixel FD | endpoint RMSE γ = 1 / 2 | "
             "Fréchet to the real digits γ = 1 / 2 (teacher's) | Fréchet to the teacher γ = 1 / 2 (floor) | "
             "class accuracy γ = 1 / 2 | train s |", "|---|---|---|---|---|---|---|---|"]
    teacher = None

    def at_best(scan, model):
        best = scan["best"][model]
        learned, pixels = scan[model][f"{best['fd']:g}"], scan[model][f"{best['pixel_fd']:g}"]
        return (f"{best['fd']:g}: {learned['fd']:.2f} ({learned['precision']:.3f} / {learned['recall']:.3f}) | "
                f"{best['pixel_fd']:g}: {pixels['pixel_fd']:.3f}")

    for variant in VARIANTS:
        m = run_metrics(out, f"{D}__{variant}")
        if m is None:
            continue
        a, b = m["scales"].values()
        teacher = teacher or m["scan"]
        lines.append(
            f"| {variant} | {at_best(m['scan'], 'student')} | {a['endpoint_rmse']:.3f} / {b['endpoint_rmse']:.3f} | "
            f"{a['frechet_to_real']['student']:.3f} / {b['frechet_to_real']['student']:.3f} "
            f"({a['frechet_to_real']['teacher']:.3f} / {b['frechet_to_real']['teacher']:.3f}) | "
            f"{a['frechet_to_teacher']:.3f} / {b['frechet_to_teacher']:.3f} "
            f"({a['frechet_floor']:.3f} / {b['frechet_floor']:.3f}) | "
            f"{100 * a['accuracy']['student']:.1f} % / {100 * b['accuracy']['student']:.1f} % | "
            f"{m['train_seconds']:.0f} |")
    if teacher is not None:
        lines.append(f"| teacher ({teacher['teacher_solver']}) | {at_best(teacher, 'teacher')} | | | | | |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    """(parser, args, the flags for every run), every refusal made."""
    parser = command_parser("digits_ablations", __doc__, argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=os.path.join("out", "digits_ablations"), help="where the runs go")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--table-only", action="store_true", help="only print the table of finished runs")
    parser.add_argument("--claims", nargs="+", metavar="OUT", default=None,
                        help="only print the paper's claims against these directories' runs (one per seed)")
    args, common = parser.parse_known_args(argv)
    check_args(parser, args, common, D, "finished digits ablations", only=VARIANTS, what="variant")
    return parser, args, common


def run(parser, args, common):
    if args.claims:
        print(claims(args.claims, CLAIMS, at_best_scale, "each at its own best γ: FD to the real digits (learned, "
                     "pixels)"))
        print(claims(args.claims, CLAIMS, frechet_to_real, "at γ = 1 and 2: pixel Fréchet distances to the real digits"))
        return
    only = [v for v in args.only.split(",") if v]
    if not args.table_only:
        start = time.perf_counter()
        runs = [(v, variant_flags(v, common)) for v in VARIANTS if not only or v in only]
        failed = run_sharing_teacher(args.out, D, runs, common, args.jobs)
        print(f"[digits] {len(runs)} runs in {time.perf_counter() - start:.0f} s, {failed} failed")
    if not os.path.isdir(os.path.join(args.out, "runs")):
        parser.error(f"there are no runs under {args.out}; run the ablations without --table-only.")
    print(table(args.out))


main = command_main(parse_args, run)

if __name__ == "__main__":
    main()
