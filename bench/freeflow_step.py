"""One FreeFlow training step on a SiT, split into its parts, and one-step sampling against the teacher.

    python bench/freeflow_step.py                  # SiT-XL/2 on a GPU; SiT-S/2 on the CPU
    python bench/freeflow_step.py --model B/2 --batch 32 --compile off on
    python bench/freeflow_step.py --precision bf16 --compile on --dsdt jvp fd-forward --sde-steps 0

Random weights (the time does not depend on them), 256 px (32 x 32 latents). One row per precision (fp32,
and bf16 on a GPU), compile setting and way of computing ∂_s F (--dsdt: jvp-fp32, today's float32 JVP; jvp,
the JVP in the run's precision; fd and fd-forward, the central and one-sided differences over --fd-eps). The
networks are built once; each row times, as medians over --repeats after a warm-up:

  predictor target   ∂_s F of F_θ (the --dsdt pass) and the teacher at f_θ(z, s)
  student fwd+bwd    F_θ on every row with gradients, and the backward of both losses
  corrector teacher  the guided teacher velocity u(x_r, r) on the corrector's rows
  g_ψ fwd+bwd        the auxiliary network's flow-matching pass on the corrector's rows
  whole step         freeflow.train_step: the parts above and the two optimiser updates

and reports images/s of the whole step, peak memory, model FLOPs utilisation (the step's FLOPs, counted by
torch.utils.flop_counter's rules on one eager step: matrix products and attention, forward, backward and the
JVP's tangents, over its time, against the device's peak: --peak-tflops, or on the CPU the best measured
float32 matrix-product rate), the share of those FLOPs computed in bf16 (bench/flops.py; it needs no GPU),
and the first step's time: with --compile on, the compilation of every pass of the step. TF32 is off unless
--tf32 (it speeds up float32 matrix products on a GPU and rounds them to 10 bits). Then the sampling
throughput of the one-step student against the teacher's 250-step SDE with CFG 1.8 on [0, 0.7] (REPA's FID
recipe), in each precision (--sde-steps 0 skips it)."""

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeflow as ff  # noqa: E402
import sit  # noqa: E402
from flops import FlopsByDtype  # noqa: E402
from sit_forward import timed  # noqa: E402

# Dense peak TFLOP/s (no sparsity) by GPU name: bf16 tensor cores, and fp32 without TF32 (TF32 is left off).
PEAKS = {"H200": {"bf16": 989.4, "fp32": 66.9}, "H100": {"bf16": 989.4, "fp32": 66.9},
         "A100": {"bf16": 312.0, "fp32": 19.5}}
PARTS = ["predictor target", "student fwd+bwd", "corrector teacher", "g_ψ fwd+bwd", "whole step"]


def cpu_peak_tflops():
    """The best float32 matrix-product rate this CPU reaches (a practical peak)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    seconds = timed(lambda: a @ b, 5, lambda: None)
    return 2 * 2048 ** 3 / seconds / 1e12


def peak_tflops(device, precision, override):
    if override:
        return override
    if device.type == "cpu":
        return cpu_peak_tflops()
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks[precision]
    return None


def build_networks(model_name, device):
    """(teacher, student, g_ψ, their two Adam optimisers), built once for every row, directly on the device."""
    torch.manual_seed(0)
    with torch.device(device):
        teacher = sit.build(model_name, 256).eval().requires_grad_(False)
        student, g_psi = ff.make_student(teacher).train(), ff.make_aux(teacher).train()
    opts = (torch.optim.Adam(student.parameters(), lr=1e-4), torch.optim.Adam(g_psi.parameters(), lr=1e-4))
    return teacher, student, g_psi, opts


def bench_row(nets, device, precision, compiled, dsdt, fd_eps, batch, repeats):
    """The times of the parts (with the first step's), FLOPs by dtype, and peak memory of one configuration."""
    teacher, student, g_psi, opts = nets
    cfg = ff.Config(batch_size=batch, cfg_range=(1.0, 2.0), guidance_interval=(0.0, 0.7), lr=1e-4,
                    precision=precision, compile=compiled, dsdt=dsdt, fd_eps=fd_eps).resolve(True)
    torch._dynamo.reset()  # every compiled row compiles from scratch, so its first step is its compile time
    passes = ff.training_passes(student, g_psi, teacher, cfg)
    shape = (4, 32, 32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_P = ff.split_batch(batch, cfg.predictor_frac)
    z = torch.randn(batch, *shape, device=device)
    y, gamma = ff.sample_conditions(batch, 1000, cfg.cfg_range, device)
    s = torch.cat([torch.rand(n_P, device=device), torch.zeros(batch - n_P, device=device)])
    r = ff.sample_r(batch - n_P, device=device)
    n = torch.randn(batch - n_P, *shape, device=device)
    x_hat = z[n_P:] - ff.F_theta(student, z[n_P:], s[n_P:], y[n_P:], gamma[n_P:]).detach()
    x_r = (1 - ff.bcast(r, x_hat)) * x_hat + ff.bcast(r, x_hat) * n

    def with_autocast(fn):
        def run():
            with ff.autocast(cfg, device):
                return fn()
        return run

    def student_pass():
        F = ff.F_theta(passes.student, z, s, y, gamma)
        F.pow(2).mean().backward()
        student.zero_grad(set_to_none=True)

    def g_psi_pass():
        loss, _ = ff.flow_matching_loss(passes.g_psi, x_hat, y[n_P:], r, n, gamma=gamma[n_P:])
        loss.mean().backward()
        g_psi.zero_grad(set_to_none=True)

    def target():  # as train_step computes it: the finite differences reuse the gradient pass's F(s)
        F = ff.F_theta(student, z[:n_P], s[:n_P], y[:n_P], gamma[:n_P]) if dsdt.startswith("fd") else None
        F, dF_ds = passes.dF_ds(student, z[:n_P], s[:n_P], y[:n_P], gamma[:n_P], dsdt, fd_eps, F)
        return ff.predictor_target(passes.teacher, z[:n_P], s[:n_P], y[:n_P], gamma[:n_P],
                                   cfg.guidance_interval, F, dF_ds)

    parts = {
        "predictor target": target,
        "student fwd+bwd": student_pass,
        "corrector teacher": lambda: ff.guided_velocity(passes.teacher, x_r, r, y[n_P:], gamma[n_P:],
                                                        cfg.corrector_interval),
        "g_ψ fwd+bwd": g_psi_pass,
        "whole step": lambda: ff.train_step(student, g_psi, teacher, *opts, cfg, shape, passes),
    }
    sync()
    start = time.perf_counter()
    with_autocast(parts["whole step"])()  # the first step: every pass compiles here with --compile on
    sync()
    first = time.perf_counter() - start
    times = {name: timed(with_autocast(fn), repeats, sync) for name, fn in parts.items()}
    times["first step"] = first
    # the FLOPs of one step of the uncompiled passes, by dtype: the counter sees eager operators, and a compiled
    # step does the same model FLOPs
    eager = ff.training_passes(student, g_psi, teacher, dataclasses.replace(cfg, compile=False))
    with FlopsByDtype() as flops:
        with_autocast(lambda: ff.train_step(student, g_psi, teacher, *opts, cfg, shape, eager))()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        with_autocast(parts["whole step"])()
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        memory = ff.memory_in_use(device)
    return times, flops, memory


@torch.no_grad()
def bench_sampling(model_name, device, precision, batch, sde_steps):
    torch.manual_seed(0)
    with torch.device(device):
        teacher = sit.build(model_name, 256).eval()
        student = ff.make_student(teacher).eval()
    cfg = ff.Config(precision=precision).resolve(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    z = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    gamma = torch.full((batch,), 1.8, device=device)
    nfe = []

    def teacher_run():
        x, calls = ff.sample_sde(teacher, z, y, sde_steps, 1.8, (0.0, 0.7))
        nfe.append(calls)

    with ff.autocast(cfg, device):
        one = timed(lambda: ff.sample_one_step(student, z, y, gamma), 3, sync)
        start = time.perf_counter()
        teacher_run()  # one run: it is long
        sync()
        slow = time.perf_counter() - start
    return batch / one, batch / slow, nfe[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="SiT config (default: XL/2 on a GPU, S/2 on the CPU)")
    parser.add_argument("--batch", type=int, default=None, help="examples per step (default: 32 GPU, 4 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per part (the median is shown)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None,
                        help="precisions to time (default: fp32 and bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=None,
                        help="torch.compile settings to time (default: off and on on a GPU, off on the CPU, where "
                        "compiling is slow)")
    parser.add_argument("--dsdt", nargs="+", choices=ff.DSDT_METHODS, default=["jvp-fp32", "jvp", "fd-forward"],
                        help="ways of computing ∂_s F to time (jvp-fp32 and jvp are one row in fp32)")
    parser.add_argument("--fd-eps", type=float, default=0.05, help="h of the finite differences (0.05: docs/imagenet.md)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matrix products on a GPU")
    parser.add_argument("--sde-steps", type=int, default=250, help="teacher SDE steps for the sampling comparison "
                        "(0: skip it)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known "
                        "GPUs' dense peak; CPU: measured float32 matrix-product rate)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = args.model or ("XL/2" if gpu else "S/2")
    batch = args.batch or (32 if gpu else 4)
    if args.batch is not None and args.batch < 2:
        parser.error(f"--batch {args.batch} leaves no corrector rows; use 2 or more")
    if args.sde_steps < 0:
        parser.error(f"--sde-steps {args.sde_steps} is negative; use 0 to skip the sampling comparison")
    if not args.fd_eps > 0:
        parser.error(f"--fd-eps {args.fd_eps} must be positive, e.g. 0.02")
    precisions = args.precision or (("fp32", "bf16") if gpu else ("fp32",))
    compiles = [c == "on" for c in args.compile] if args.compile else ([False, True] if gpu else [False])
    compiles.sort()  # eager rows first
    print(f"SiT-{model} at 256 px, batch {batch} ({ff.split_batch(batch, 0.75)} predictor + "
          f"{batch - ff.split_batch(batch, 0.75)} corrector), torch {torch.__version__}, "
          + (f"{torch.cuda.get_device_name()}, TF32 {'on' if args.tf32 else 'off'}" if gpu
             else f"CPU, {torch.get_num_threads()} threads") + f", finite differences over h = {args.fd_eps}")
    print("\n| precision | compile | ∂_s F | " + " | ".join(f"{n} (s)" for n in PARTS)
          + " | images/s | peak memory (GiB) | TFLOP/step | MFU | bf16 share of FLOPs | first step (s) |")
    print("|---" * (len(PARTS) + 9) + "|")
    nets = build_networks(model, device)
    for precision in precisions:
        peak = peak_tflops(device, precision, args.peak_tflops)
        # in fp32 the JVP runs in float32 either way: jvp-fp32 and jvp are the same row
        dsdts = [d for d in args.dsdt if not (precision == "fp32" and d == "jvp-fp32" and "jvp" in args.dsdt)]
        for compiled in compiles:
            for dsdt in dsdts:
                times, flops, memory = bench_row(nets, device, precision, compiled, dsdt, args.fd_eps, batch,
                                                 args.repeats)
                step = times["whole step"]
                mfu = f"{flops.total / step / 1e12 / peak:.1%}" if peak else "n/a"
                print(f"| {precision} | {'on' if compiled else 'off'} | {dsdt} | "
                      + " | ".join(f"{times[n]:.3f}" for n in PARTS)
                      + f" | {batch / step:.1f} | {memory:.2f} | {flops.total / 1e12:.3f} | {mfu} | "
                      f"{flops.share(torch.bfloat16):.1%} | {times['first step']:.1f} |", flush=True)
    del nets
    if device.type == "cpu":
        print(f"\nCPU peak used for MFU: {peak_tflops(device, 'fp32', args.peak_tflops):.3f} TFLOP/s "
              f"(measured float32 2048² matrix product); peak memory on the CPU is the process's peak resident set.")
    if args.sde_steps == 0:
        return
    print("\n| precision | one-step student (images/s) | teacher SDE, CFG 1.8 (images/s) | teacher NFE | speed-up |")
    print("|---|---|---|---|---|")
    for precision in precisions:
        fast, slow, nfe = bench_sampling(model, device, precision, batch, args.sde_steps)
        print(f"| {precision} | {fast:.1f} | {slow:.3f} | {nfe} | {fast / slow:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
