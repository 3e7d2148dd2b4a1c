"""The FLOPs of one digits training step for each setting the digits ablations compare (bench/flops.py's count).

    python bench/digits_step_flops.py

Sets toy/digits_ablations.py's EQUAL_FLOPS: how many steps of the predictor alone cost as much as the steps of
a corrector with 4 extra g_ψ updates. Counted on the digits SiT at its defaults (width 64, depth 4, batch 64),
untrained: the count depends on the shapes, not on the weights."""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeflow as ff  # noqa: E402
from flops import FlopsByDtype  # noqa: E402
from toy.digits import SHAPE, digits_sit  # noqa: E402

SETTINGS = {"predictor alone": ["--loss", "predictor"], "both (the default)": [],
            "both, --psi-steps 4": ["--alpha", "3", "--psi-steps", "4"]}


def main():
    counts = {}
    print("| setting | GFLOP per step | against the predictor alone |\n|---|---|---|")
    for name, flags in SETTINGS.items():
        cfg = ff.parse_config(["--toy", "digits", *flags]).resolve(True)
        torch.manual_seed(0)
        teacher = digits_sit(np.zeros((1, *SHAPE), np.float32), 10, cfg).eval().requires_grad_(False)
        student, g_psi = ff.make_student(teacher).train(), ff.make_aux(teacher).train()
        opts = (torch.optim.Adam(student.parameters()), torch.optim.Adam(g_psi.parameters()))
        passes = ff.training_passes(student, g_psi, teacher, cfg)  # as a training run's step
        with FlopsByDtype() as flops:
            ff.train_step(student, g_psi, teacher, *opts, cfg, SHAPE, passes)
        counts[name] = flops.total
        print(f"| {name} | {flops.total / 1e9:.3f} | {flops.total / counts['predictor alone']:.2f} |")


if __name__ == "__main__":
    main()
