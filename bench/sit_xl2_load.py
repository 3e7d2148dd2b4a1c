"""Acceptance check for sit.py at full size: a SiT-XL/2 state dict in REPA's layout (projector keys
included) and one in the original SiT's layout (32-row final layer, t = 1 data) both load strictly
through sit.load_teacher, and the loaded models reproduce the source models' outputs.

    python bench/sit_xl2_load.py [--dir /tmp]

Random weights (no download); about 8 GB of memory and 2 x 2.7 GB of disk in --dir, removed at the end.
The original-layout reference is the hand-written forward used by tests/test_sit.py."""

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import sit  # noqa: E402
from test_sit import PROJECTORS, original_sit_forward, original_sit_state  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the two temporary files go")
    args = parser.parse_args()
    torch.manual_seed(0)
    source = sit.build("XL/2", 256).eval()
    with torch.no_grad():  # a fresh model's adaLN and output layers are PyTorch defaults: random, not zero
        x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([0.3, 0.8]), torch.tensor([207, 1000])
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            start = time.perf_counter()
            state = source.state_dict() | {k: 0.01 * torch.randn(v) for k, v in PROJECTORS.items()}
            torch.save(state, os.path.join(tmp, "last.pt"))
            del state
            loaded = sit.load_teacher(os.path.join(tmp, "last.pt"), 256)
            diff = (loaded(x, t, y) - source(x, t, y)).abs().max().item()
            print(f"REPA layout, {len(PROJECTORS)} projector keys dropped, strict load: "
                  f"max |output difference| = {diff:.3g} ({time.perf_counter() - start:.0f} s)", flush=True)
            del loaded

            start = time.perf_counter()
            final8 = sit.FinalLayer(1152, 2, 8)
            torch.save(original_sit_state(source, final8), os.path.join(tmp, "SiT-XL-2-256x256.pt"))
            loaded = sit.load_teacher(os.path.join(tmp, "SiT-XL-2-256x256.pt"), 256)
            reference = -original_sit_forward(source, final8, x, 1 - t, y)[:, :4]
            diff = (loaded(x, t, y) - reference).abs().max().item()
            scale = reference.abs().max().item()
            print(f"original SiT layout (32 rows -> 16, time flipped), strict load: max |output difference| = "
                  f"{diff:.3g} (outputs up to {scale:.3g}; {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
