"""The digits run's learning curve: the one-step student's endpoint error every few steps.

    python bench/digits_curve.py --toy-teacher out/toy/digits/teacher.pt [freeflow.py flags] [--every 250]

Takes the digits teacher of `python freeflow.py --toy digits` with the same flags (trained here if there is
none), distils it with freeflow.distill, and every --every steps measures the EMA student's endpoint RMSE at
γ = 1 and γ = --cfg on --curve-samples fixed noises against the teacher's RK4 solve (steps doubled until
--ode-tol, as in the evaluation). Prints a row per measurement and the seconds spent training (measurement
excluded); with --jsonl FILE appends the whole curve as one line. Its output directory defaults to
out/bench/digits_curve (checkpoints of the run land there). docs/digits.md lists the runs that chose the
digits defaults with this command.
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from freeflow import FreeFlowError, distill, parse_config, sample_one_step, sample_prior  # noqa: E402
from toy.digits import SHAPE, digits_teacher, rmse  # noqa: E402
from toy.evaluate import eval_conditions, reference_ode  # noqa: E402
from toy.run import script_flags  # noqa: E402


def main(argv=None):
    args, rest = script_flags(__doc__, argv, {
        "--every": dict(type=int, default=250, help="measure every N steps"),
        "--curve-samples": dict(type=int, default=500, help="noises the error is measured on"),
        "--jsonl": dict(help="append the curve to this file")})
    if args.help:
        print(__doc__)
        return 0
    try:
        if args.every < 1 or args.curve_samples < 1:
            raise FreeFlowError("--every and --curve-samples must be positive integers.")
        cfg = parse_config(["--toy", "digits", *rest]).check()
        if cfg.toy != "digits":
            raise FreeFlowError("this benchmark runs the digits only; drop --toy.")
        cfg.out = cfg.out or os.path.join("out", "bench", "digits_curve")
        _, _, device, out, _, teacher, _ = digits_teacher(cfg)
    except FreeFlowError as e:
        print(f"digits_curve: error: {e}", file=sys.stderr)
        return 2
    n = args.curve_samples
    z = sample_prior(n, SHAPE, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
    scales = sorted({1.0, float(cfg.cfg)})
    targets = {}
    for g in scales:
        y, gamma = eval_conditions(n, teacher.num_classes, cfg, device, gamma=g)
        ref = reference_ode(teacher, z, y, gamma, cfg.guidance_interval, cfg.ode_tol, record=(), dtype=torch.float32)
        targets[g] = (y, gamma, ref[0])
    curve, measuring = [], [0.0]

    def measure(step, ema, stats):
        if step % args.every and step != cfg.steps:
            return
        start = time.perf_counter()
        errors = {f"{g:g}": rmse(sample_one_step(ema, z, y, gamma), ref) for g, (y, gamma, ref) in targets.items()}
        measuring[0] += time.perf_counter() - start
        row = {"step": step, "endpoint_rmse": errors, "delta_G": stats.get("delta_G"), "delta_N": stats.get("delta_N")}
        curve.append(row)
        print(json.dumps(row), flush=True)

    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    distill(teacher, cfg, SHAPE, out, progress=False, callback=measure)
    seconds = time.perf_counter() - start - measuring[0]
    flags = " ".join(rest)
    print(f"{flags or '(defaults)'}: endpoint RMSE at step {cfg.steps}: "
          + ", ".join(f"γ = {g}: {e:.4f}" for g, e in curve[-1]["endpoint_rmse"].items())
          + f" ({seconds:.0f} s of training)")
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps({"flags": flags, "train_seconds": seconds, "curve": curve}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
