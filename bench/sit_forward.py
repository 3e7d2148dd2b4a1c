"""Forward time of the bundled SiT: S/2 and B/2 on the CPU, XL/2 too when a GPU is present.

    python bench/sit_forward.py [--batch 4] [--res 256] [--repeats 5]

Prints one Markdown row per model and device: parameter count (state-dict tensors, pos_embed included,
as REPA counts them), the median time of one forward pass, and images per second. Random weights: the
time does not depend on them. On a GPU the pass runs in bfloat16 autocast and in float32."""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sit  # noqa: E402


def timed(fn, repeats, sync):
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="images per forward pass")
    parser.add_argument("--res", type=int, default=256, choices=(256, 512), help="image resolution")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (the median is shown)")
    args = parser.parse_args()
    runs = [("S/2", "cpu", torch.float32), ("B/2", "cpu", torch.float32)]
    if torch.cuda.is_available():
        runs += [(name, "cuda", dt) for name in ("S/2", "B/2", "XL/2") for dt in (torch.bfloat16, torch.float32)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    print(f"\n| model | device | dtype | parameters | forward, batch {args.batch} at {args.res} px | images/s |")
    print("|---|---|---|---|---|---|")
    for name, device, dtype in runs:
        torch.manual_seed(0)
        model = sit.build(name, args.res).to(device).eval()
        count = sum(v.numel() for v in model.state_dict().values())
        size = args.res // 8
        x = torch.randn(args.batch, 4, size, size, device=device)
        t, y = torch.rand(args.batch, device=device), torch.randint(0, 1000, (args.batch,), device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        @torch.no_grad()
        def forward():
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                return model(x, t, y)

        seconds = timed(forward, args.repeats, sync)
        print(f"| SiT-{name} | {device} | {str(dtype).split('.')[1]} | {count / 1e6:.1f} M | "
              f"{seconds * 1e3:.1f} ms | {args.batch / seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
