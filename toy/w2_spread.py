"""How noisy is one W2 floor? Draw K independent teacher sample sets and print W2 for every pair.

    python -m toy.w2_spread --toy moons                 # 6 sets, 15 pairs; the teacher of out/toy/moons
    python -m toy.w2_spread --sets 8 --toy rings --cfg 2

Every other flag is freeflow.py's (the teacher's settings, --eval-samples, --toy-teacher, --out). The
teacher is the cached one of `python freeflow.py` with the same flags (trained here if there is none).
Each set is a float32 RK4 solve from fresh noise with the steps the evaluation's reference would take
(toy/evaluate.py), the same balanced labels and γ in every set. This is what made the evaluation average
its W2 and floor over four pairs instead of taking one.
"""

import itertools
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freeflow import FreeFlowError, parse_config, sample_prior, teacher_ode  # noqa: E402
from toy.data import toy_label  # noqa: E402
from toy.evaluate import eval_conditions, reference_ode, w2_all  # noqa: E402
from toy.run import script_flags, toy_teacher  # noqa: E402


@torch.no_grad()
def floor_pairs(teacher, cfg, num_classes, sets, device):
    """W2 between every pair of `sets` independent teacher sample sets of cfg.eval_samples points."""
    n = cfg.eval_samples
    gen = torch.Generator().manual_seed(cfg.seed + 100)  # not the evaluation's noise (seed + 1)
    y, gamma = eval_conditions(n, num_classes, cfg, device)
    zs = [sample_prior(n, (2,), generator=gen).to(device) for _ in range(sets)]
    steps = reference_ode(teacher, zs[0], y, gamma, cfg.guidance_interval, cfg.ode_tol)[2]
    T = [teacher_ode(teacher, z, y, gamma, cfg.guidance_interval, steps, "rk4")[0].cpu() for z in zs]
    pairs = list(itertools.combinations(range(sets), 2))
    return dict(zip(pairs, w2_all([(T[i], T[j]) for i, j in pairs]))), steps


def main(argv=None):
    own = {"--sets": dict(type=int, default=6, help="independent teacher sample sets (pairs: K(K-1)/2)")}
    args, rest = script_flags(__doc__, argv, own)
    if args.help:
        print(__doc__)
        return 0
    try:
        if args.sets < 2:
            raise FreeFlowError(f"--sets must be at least 2 (got {args.sets}).")
        cfg = parse_config(rest).check()
        if cfg.toy is None:
            raise FreeFlowError("give --toy NAME (e.g. --toy moons) or a points file.")
        _, _, num_classes, device, _, path, teacher, _ = toy_teacher(cfg)
        pairs, steps = floor_pairs(teacher, cfg, num_classes, args.sets, device)
    except FreeFlowError as e:
        print(f"python -m toy.w2_spread: error: {e}", file=sys.stderr)
        return 2
    d = np.array(list(pairs.values()))
    print(f"W2 between independent teacher sets of {cfg.eval_samples} ({toy_label(cfg.toy)}, teacher {path}, "
          f"RK4 {steps} steps):")
    print("  " + "  ".join(f"{i}-{j}: {v:.4f}" for (i, j), v in pairs.items()))
    print(f"  {len(d)} pairs: mean {d.mean():.4f}, std {d.std(ddof=1):.4f}, min {d.min():.4f}, max {d.max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
