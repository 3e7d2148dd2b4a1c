"""How exact each way of computing the predictor's ∂_s F is, in float32 and in bf16, against float64.

    python bench/dsdt_precision.py                                   # XL/2-shaped random student, batch 2
    python bench/dsdt_precision.py --digits out/toy/digits/ckpt.pt   # and the trained digits student

For a student F_θ(z, s, c, γ) and one batch (z ~ N(0, I), s ~ U[0, 1), labels uniform, γ = 1.5), the
reference ∂_s F is the forward-mode JVP in float64. Each row computes ∂_s F another way:

  JVP float32          --dsdt jvp-fp32 (today's ImageNet path): float32, attention on the math path
  JVP bf16             --dsdt jvp under bf16 autocast: every matrix product in bf16, attention by hand
  JVP bf16, cond fp32  the same with the conditioning path (the embeddings of t, s, γ and every adaLN
                       modulation) kept in float32: the part of the network that s enters first
  FD central h         --dsdt fd, (F(s + h) - F(s - h)) / 2h under bf16 autocast (and once in float32)
  FD forward h         --dsdt fd-forward, (F(s + h) - F(s)) / h under bf16 autocast

and reports two relative errors: of ∂_s F itself, |∂_s F - ref| / |ref| over the batch, and of what the
predictor's target receives, |(1 - s)(∂_s F - ref)| / |F|, the error as a share of the target's size
(F_tgt ≈ F near the fixed point). Both are norms over the whole batch. The random XL/2 student has every
weight drawn (matrices N(0, 1/fan_in), the adaLN modulations at half that
scale, vectors N(0, 0.1²)): a fresh SiT's zero-initialised layers would make ∂_s F vanish. bf16 autocast
on a CPU computes what it does on a GPU (bf16 matrix products, float32 accumulation), only slower."""

import argparse
import contextlib
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeflow as ff  # noqa: E402
import sit  # noqa: E402


def random_student(name, seed=0):
    """A SiT of config `name` at 256 px with s and γ inputs and every weight drawn (see the docstring)."""
    torch.manual_seed(seed)
    student = sit.build(name, 256).extended(("s", "gamma"))
    with torch.no_grad():
        for pname, p in student.named_parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
                continue
            fan_in = p[0].numel()
            half = "adaLN" in pname
            p.normal_(0, (0.5 if half else 1.0) / math.sqrt(fan_in))
    return student.eval().requires_grad_(False)


@contextlib.contextmanager
def conditioning_in_float32(net, final=False):
    """Run the embeddings of t, s, γ and every adaLN modulation (final=True: and the final layer) with autocast
    off (float32)."""
    mods = [m for m in net.modules() if isinstance(m, sit.TimestepEmbedder)]
    mods += [m.adaLN_modulation for m in net.modules() if hasattr(m, "adaLN_modulation")]
    mods += [net.final_layer.linear] if final else []
    for m in mods:
        forward = m.forward
        m.forward = lambda *a, _f=forward, **k: _run_float32(_f, *a, **k)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _run_float32(forward, *args, **kwargs):
    with torch.autocast(args[0].device.type, enabled=False):
        return forward(*(a.float() for a in args), **kwargs)


def rows(student, z, s, y, gamma):
    """(name, ∂_s F) for every method of the docstring."""
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    out = []

    def add(name, method, h=1e-3, autocast=True, ctx=contextlib.nullcontext):
        start = time.perf_counter()
        with (bf16() if autocast else contextlib.nullcontext()), ctx():
            out.append((name, ff.dF_ds_pass(student, z, s, y, gamma, method, h)[1].double(),
                        time.perf_counter() - start))
        print(f"  {name}: {out[-1][2]:.1f} s", file=sys.stderr, flush=True)

    add("JVP float32", "jvp-fp32", autocast=False)
    add("JVP bf16", "jvp")
    add("JVP bf16, conditioning fp32", "jvp", ctx=lambda: conditioning_in_float32(student))
    add("FD central float32, h = 1e-3", "fd", 1e-3, autocast=False)
    for h in (0.01, 0.02, 0.05):
        add(f"FD central bf16, h = {h}", "fd", h)
    for h in (0.01, 0.02, 0.05):
        add(f"FD forward bf16, h = {h}", "fd-forward", h)
    add("FD forward bf16, h = 0.02, conditioning fp32", "fd-forward", 0.02, ctx=lambda: conditioning_in_float32(student))
    add("FD forward bf16, h = 0.02, conditioning and final layer fp32", "fd-forward", 0.02,
        ctx=lambda: conditioning_in_float32(student, final=True))
    return out


def table(title, student, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (student.in_channels, student.input_size, student.input_size)
    z = torch.randn((batch, *shape), generator=g)
    s = torch.rand(batch, generator=g)
    y = torch.randint(0, student.num_classes, (batch,), generator=g)
    gamma = torch.full((batch,), 1.5)
    student64 = copy.deepcopy(student).double()
    F_ref, ref = ff.dF_ds_pass(student64, z.double(), s.double(), y, gamma.double(), "jvp")
    del student64
    weight = ff.bcast(1 - s.double(), ref)
    print(f"\n{title}: batch {batch}, |∂_s F| / |F| = {(ref.norm() / F_ref.norm()).item():.3f}\n")
    print("| ∂_s F | relative error of ∂_s F | error in the target, share of \\|F\\| | seconds (CPU) |")
    print("|---|---|---|---|")
    for name, dF, seconds in rows(student, z, s, y, gamma):
        rel = ((dF - ref).norm() / ref.norm()).item()
        target = ((weight * (dF - ref)).norm() / F_ref.norm()).item()
        print(f"| {name} | {rel:.2e} | {target:.2e} | {seconds:.1f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="XL/2", help="SiT config of the random student (default XL/2)")
    parser.add_argument("--batch", type=int, default=2, help="examples (default 2)")
    parser.add_argument("--digits", default=None, help="also a trained digits student: its ckpt.pt")
    parser.add_argument("--digits-batch", type=int, default=256, help="examples for the digits student")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads")
    if args.model != "none":
        table(f"random SiT-{args.model} student, 256 px", random_student(args.model), args.batch)
    if args.digits:
        student = sit.load_teacher(args.digits, resolution=None)
        table(f"trained digits student ({args.digits})", student, args.digits_batch)


if __name__ == "__main__":
    main()
