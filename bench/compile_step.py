"""Does `--compile` train the same student as eager? A few real distillation steps of a tiny SiT, both ways.

    python bench/compile_step.py                        # T/2 at 64 px, 6 steps, --dsdt jvp and fd-forward
    python bench/compile_step.py --precision bf16 --compile-mode reduce-overhead

First the ∂_s F pass alone on a student whose s embedding is drawn (a new student's starts at zero, and so does
its ∂_s F): the compiled pass against the eager one, as a relative difference. Then, for each ∂_s F path:
freeflow.distill from the same random teacher, seed and settings, once eager and once with
--compile (every pass of the step compiled: the student's and g_ψ's gradient passes, the teacher, the ∂_s F
pass), in one process. It prints the first step's time (compiling every pass), the median time of the other
steps, the losses of the last step, and how far apart the two runs' students end, as a share of how far
training moved them (rounding alone: well under 1 %; a pass that computed something else: tens of per cent).
Too slow for the test suite on a CPU (about a minute to compile a step there), hence a benchmark."""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeflow as ff  # noqa: E402
import sit  # noqa: E402


def random_teacher(res, seed=0):
    torch.manual_seed(seed)
    teacher = sit.build("T/2", res)
    with torch.no_grad():  # a teacher whose output depends on its inputs: perturb the zero-initialised layers
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher.eval().requires_grad_(False)


def run(teacher, cfg, shape):
    """(the trained student's state dict, the last step's stats, seconds of each step)."""
    times, clock = [], [time.perf_counter()]

    def tick(step, ema, stats):
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now

    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as out:
        ema, history = ff.distill(copy.deepcopy(teacher), cfg, shape, out, progress=False, callback=tick)
        student = ff.load_checkpoint(os.path.join(out, "ckpt.pt"))["student"]
    return student, history[-1], times


def distance(a, b):
    return torch.cat([(a[k].double() - b[k].double()).flatten() for k in a]).norm().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--res", type=int, default=64, help="image resolution of the tiny SiT (latents res / 8)")
    parser.add_argument("--steps", type=int, default=6, help="distillation steps per run")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--dsdt", nargs="+", default=["jvp", "fd-forward"], choices=ff.DSDT_METHODS)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = random_teacher(args.res).to(device)
    shape = (teacher.in_channels, teacher.input_size, teacher.input_size)
    print(f"SiT-T/2 at {args.res} px, batch {args.batch}, {args.steps} steps, {args.precision}, compile mode "
          f"{args.compile_mode}, torch {torch.__version__}, {device}"
          + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    student = ff.make_student(teacher)
    with torch.no_grad():
        for p in student.extra.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn((6, *shape), generator=g).to(device), torch.rand(8, generator=g)[:6].to(device)
    y, gamma = torch.arange(6, device=device), torch.full((6,), 1.5, device=device)
    print("\n| ∂_s F | \\|∂_s F\\| / \\|F\\| | compiled against eager, relative difference | compile (s) |")
    print("|---|---|---|---|")
    for dsdt in args.dsdt:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            F, eager = ff.dF_ds_pass(student, z, s, y, gamma, dsdt, 0.02)
            torch._dynamo.reset()
            start = time.perf_counter()
            _, compiled = torch.compile(ff.dF_ds_pass)(student, z, s, y, gamma, dsdt, 0.02, None)
        print(f"| {dsdt} | {(eager.norm() / F.norm()).item():.3f} | "
              f"{((compiled - eager).norm() / eager.norm()).item():.2e} | {time.perf_counter() - start:.1f} |")
    print("\n| ∂_s F | eager first step (s) | compiled first step (s) | eager step (s) | compiled step (s) | "
          "loss eager / compiled | students apart, share of the distance trained |")
    print("|---|---|---|---|---|---|---|")
    for dsdt in args.dsdt:
        cfg = ff.Config(batch_size=args.batch, steps=args.steps, lr=1e-3, lr_schedule="constant", dsdt=dsdt,
                        fd_eps=0.02, cfg_range=(1.0, 2.0), guidance_interval=(0.0, 0.7), precision=args.precision,
                        ckpt_every=args.steps, compile_mode=args.compile_mode).resolve(True)
        torch.manual_seed(cfg.seed)
        initial = ff.make_student(teacher).state_dict()
        eager, stats_e, times_e = run(teacher, cfg, shape)
        torch._dynamo.reset()
        compiled, stats_c, times_c = run(teacher, ff.Config(**{**vars(cfg), "compile": True}), shape)
        apart = distance(eager, compiled) / distance(eager, initial)
        print(f"| {dsdt} | {times_e[0]:.1f} | {times_c[0]:.1f} | {statistics.median(times_e[1:]):.3f} | "
              f"{statistics.median(times_c[1:]):.3f} | {stats_e['loss']:.5f} / {stats_c['loss']:.5f} | "
              f"{apart:.2e} |", flush=True)


if __name__ == "__main__":
    main()
