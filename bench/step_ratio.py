"""What one FreeFlow step costs against one plain flow-matching step of the same network and batch.

    python bench/step_ratio.py                 # the toy MLP (moons) and the digits SiT
    python bench/step_ratio.py --sit S/2       # and a SiT-S/2 on 32 x 32 latents (slow on a CPU)
    python bench/step_ratio.py --batches 128 256 512 1024   # then the toy step's time against its batch
    python bench/step_ratio.py --teacher-calls  # then the step's two teacher calls, apart and as one batch

FreeFlow step: freeflow.train_step at the defaults of `python freeflow.py --toy moons` (for the SiT rows:
of `--toy digits`, whose γ is drawn from [1, 3] with guidance on t, r in [0, 0.7]): the predictor's JVP of
F_θ and its teacher call, the student's forward and backward on the whole batch, the corrector's teacher
call, g_ψ's flow-matching pass, two clipped Adam updates. Flow-matching step: what trains a teacher, on
the same network (g_ψ's: the teacher plus its γ input) and batch size: one forward, the flow-matching
loss, the backward, one clipped Adam update. Random weights: the time does not depend on them.

Both are timed in one process, alternating: each round times a block of --block steps of each, so a change
in the machine's speed during the run reaches both. The table gives the median per-step time over the
rounds and the ratio of the two medians, and the operator calls of one step of each (the top-level ATen
calls `torch.profiler` sees: on a GPU each launches at least one kernel, so for a small network they, not
the arithmetic, set the step's time)."""

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeflow as ff  # noqa: E402
import sit  # noqa: E402
from toy.digits import SHAPE as DIGITS_SHAPE, digits_sit  # noqa: E402
from toy.teacher import mlp_teacher  # noqa: E402


def networks(which, sit_name):
    """(name, teacher network, Config, one sample's shape) of a benchmarked model, untrained."""
    if which == "mlp":
        cfg = ff.parse_config(["--toy", "moons"]).resolve(True)
        return "toy MLP (moons)", mlp_teacher(np.zeros((1, 2), np.float32), 2, cfg), cfg, (2,)
    cfg = ff.parse_config(["--toy", "digits"]).resolve(True)
    if which == "digits":
        net = digits_sit(np.zeros((1, *DIGITS_SHAPE), np.float32), 10, cfg)
        return f"digits SiT (8 x 8, width {cfg.width}, depth {cfg.depth})", net, cfg, DIGITS_SHAPE
    net = sit.build(sit_name, 256, num_classes=10)
    cfg.batch_size = 8
    return f"SiT-{sit_name} (4 x 32 x 32 latents)", net, cfg, (4, 32, 32)


def steppers(teacher, cfg, shape):
    """(FreeFlow step, flow-matching step): two closures that each run one full training step."""
    teacher.eval().requires_grad_(False)
    student, g_psi = ff.make_student(teacher).train(), ff.make_aux(teacher).train()
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=True)  # noqa: E731
    opt_theta, opt_psi = adam(student), adam(g_psi)
    plain = ff.make_aux(teacher).train()  # the same network, trained by flow matching
    opt_plain = adam(plain)
    B = cfg.batch_size
    passes = ff.training_passes(student, g_psi, teacher, cfg)  # as a training run's step

    def freeflow_step():
        ff.train_step(student, g_psi, teacher, opt_theta, opt_psi, cfg, shape, passes)

    def flow_matching_step():
        x, n = torch.randn(B, *shape), torch.randn(B, *shape)  # stand-ins for data and noise
        y, gamma = ff.sample_conditions(B, teacher.num_classes, cfg.cfg_range)
        loss, _ = ff.flow_matching_loss(plain, x, y, torch.rand(B), n, gamma=gamma)
        opt_plain.zero_grad(set_to_none=True)
        loss.mean().backward()
        ff.clip_and_step(opt_plain, cfg.grad_clip)

    return freeflow_step, flow_matching_step


def per_step(fn, block):
    start = time.perf_counter()
    for _ in range(block):
        fn()
    return (time.perf_counter() - start) / block


def operator_calls(fn):
    """The top-level ATen operator calls of one call of fn (those no other operator call made)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def alternate(steps, rounds, block):
    """Time each of {key: step function} in turn, a block of `block` steps each, `rounds` times, after two
    warm-up steps of each: {key: median ms per step}."""
    for fn in steps.values():
        per_step(fn, 2)
    times = {key: [] for key in steps}
    for _ in range(rounds):
        for key, fn in steps.items():
            times[key].append(per_step(fn, block))
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


def bench(which, sit_name, rounds, block):
    torch.manual_seed(0)
    name, teacher, cfg, shape = networks(which, sit_name)
    freeflow_step, flow_matching_step = steppers(teacher, cfg, shape)
    ms = alternate({"freeflow": freeflow_step, "fm": flow_matching_step}, rounds, block)
    ops = operator_calls(freeflow_step), operator_calls(flow_matching_step)
    return name, cfg.batch_size, ms["freeflow"], ms["fm"], ops


def batch_scaling(batches, rounds, block):
    """The toy MLP's FreeFlow step at each batch size, timed in alternation: {batch: median ms}."""
    torch.manual_seed(0)
    _, teacher, cfg, shape = networks("mlp", None)
    steps = {batch: steppers(teacher, dataclasses.replace(cfg, batch_size=batch), shape)[0] for batch in batches}
    return alternate(steps, rounds, block)


def teacher_calls(which, sit_name, rounds, block):
    """A step's two teacher calls (the predictor's at f_θ(z, s), s on its rows and the corrector's at x_r, r on
    its own, each inside its own guidance interval) as train_step makes them, against one call on both sets of
    rows, each row keeping its interval (guided_velocity takes per-row interval edges): (name, ms apart, ms
    merged, operator calls apart, merged, the largest difference between their velocities). The inputs are
    random: the time does not depend on them."""
    torch.manual_seed(0)
    name, teacher, cfg, shape = networks(which, sit_name)
    teacher.eval().requires_grad_(False)
    B = cfg.batch_size
    n_P = ff.split_batch(B, cfg.predictor_frac)
    x, t = torch.randn(B, *shape), torch.cat([torch.rand(n_P), ff.sample_r(B - n_P)])
    y, gamma = ff.sample_conditions(B, teacher.num_classes, cfg.cfg_range)
    P, C = slice(0, n_P), slice(n_P, B)
    edges = [torch.cat([torch.full((n_P,), a), torch.full((B - n_P,), b)])
             for a, b in zip(cfg.guidance_interval, cfg.corrector_interval)]

    def apart():
        return torch.cat([ff.guided_velocity(teacher, x[P], t[P], y[P], gamma[P], cfg.guidance_interval),
                          ff.guided_velocity(teacher, x[C], t[C], y[C], gamma[C], cfg.corrector_interval)])

    def merged():
        return ff.guided_velocity(teacher, x, t, y, gamma, edges)

    ms = alternate({"apart": apart, "merged": merged}, rounds, block)
    diff = (apart() - merged()).abs().max().item()
    return name, ms["apart"], ms["merged"], operator_calls(apart), operator_calls(merged), diff


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds (medians are taken over them)")
    parser.add_argument("--block", type=int, default=20, help="steps of each kind timed together in a round")
    parser.add_argument("--sit", default=None, help="also a sit.build SiT config, e.g. S/2 (batch 8, 10 classes)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, metavar="B",
                        help="also time the toy MLP's FreeFlow step at each of these batch sizes")
    parser.add_argument("--teacher-calls", action="store_true",
                        help="also time a step's two teacher calls apart against one call on both sets of rows")
    args = parser.parse_args()
    if args.rounds < 1 or args.block < 1:
        parser.error(f"--rounds and --block must be positive integers (got {args.rounds}, {args.block}).")
    if args.batches and min(args.batches) < 2:
        parser.error(f"--batches must be integers >= 2, a predictor and a corrector row (got {min(args.batches)}).")
    if args.sit is not None and args.sit not in sit.CONFIGS:
        parser.error(f"--sit {args.sit} is not a SiT config; use one of {', '.join(sit.CONFIGS)}.")
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; {args.rounds} rounds of "
          f"{args.block} steps of each kind, alternating\n")
    print("| network | batch | FreeFlow step (ms) | flow-matching step (ms) | ratio | operator calls a step, FreeFlow "
          "/ flow matching |")
    print("|---|---|---|---|---|---|")
    for which in ("mlp", "digits") + (("sit",) if args.sit else ()):
        name, batch, ff_ms, fm_ms, ops = bench(which, args.sit, args.rounds, args.block)
        print(f"| {name} | {batch} | {ff_ms:.2f} | {fm_ms:.2f} | {ff_ms / fm_ms:.2f} | {ops[0]} / {ops[1]} |", flush=True)
    if args.batches:
        ms = batch_scaling(args.batches, args.rounds, args.block)
        first = args.batches[0]
        print(f"\n| toy MLP batch | FreeFlow step (ms) | per row (µs) | relative to batch {first} |")
        print("|---|---|---|---|")
        for batch, t in ms.items():
            print(f"| {batch} | {t:.2f} | {1e3 * t / batch:.1f} | {t / ms[first]:.2f} |")
    if args.teacher_calls:
        print("\n| network | the two teacher calls apart (ms) | as one call (ms) | one / apart | operator calls, apart "
              "/ one | largest velocity difference |")
        print("|---|---|---|---|---|---|")
        for which in ("mlp", "digits") + (("sit",) if args.sit else ()):
            name, apart, merged, ops_apart, ops_merged, diff = teacher_calls(which, args.sit, args.rounds, args.block)
            print(f"| {name} | {apart:.2f} | {merged:.2f} | {merged / apart:.2f} | {ops_apart} / {ops_merged} | "
                  f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
