"""Feature-extraction speed of fid.py's Inception: images/s at 256 and 512 px, on the CPU, and on a GPU
when one is present; and the time of one 2048-d Fréchet distance (scipy's sqrtm, as ADM computes it).

    python bench/fid_features.py [--batch 25] [--repeats 3]

Random weights: the time does not depend on them. Every image, whatever its size, is resized to 299
inside the network, so the resolution only changes the resize's cost. On a GPU, TF32 is off (as the
evaluation runs it)."""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
from sit_forward import timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=25, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (the median is shown)")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    print("\n| device | input | batch | seconds per batch | images/s |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for device in devices:
        model = fid.FIDInception().eval().to(device)
        batch = args.batch if device == "cpu" else 8 * args.batch
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for res in (256, 512):
            x = torch.randint(0, 256, (batch, 3, res, res), device=device).float()
            seconds = timed(torch.no_grad()(lambda: model.features(x)), args.repeats, sync)
            print(f"| {device} | {res} px | {batch} | {seconds:.3f} | {batch / seconds:.1f} |")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4096, 2048))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    start = time.perf_counter()
    fid.frechet_distance(a.mean(0), s1, b.mean(0), s2)
    print(f"\nOne Fréchet distance between full-rank 2048-d statistics: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
