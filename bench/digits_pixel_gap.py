"""Where a converged digits student's pixel FD above its teacher's comes from: the Fréchet distance to the real
digits split into its mean term |μ - μ_real|² and its covariance term (the rest, tr(Σ + Σ_real - 2 (Σ Σ_real)^½)),
with each set's total variance tr Σ and its high-frequency energy (the mean squared difference between neighbouring
pixels: a smoother set has less).

    python bench/digits_pixel_gap.py out/converge/s0 --runs range1.5 deeper-range1.5 --gamma 1

For each seed folder of `python -m toy.converge` (its teacher's cached samples, references.pt: the teacher's
RK4 32-step solve on the scan's 1500 fixed noises) and each run's last EMA snapshot, sampled in one step from the
same noise and labels."""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
import sit  # noqa: E402
from freeflow import sample_one_step  # noqa: E402
from toy.digits import load_digits  # noqa: E402
from toy.digits_scan import scan_noise  # noqa: E402


def parts(x, real):
    """{fd, mean term, covariance term, tr Σ, neighbour energy} of images x (N x 8 x 8) against the real digits."""
    a, b = x.reshape(len(x), -1).astype(np.float64), real.reshape(len(real), -1).astype(np.float64)
    (mu, sigma), (mu_r, sigma_r) = fid.statistics(a), fid.statistics(b)
    fd, mean = fid.frechet_distance(mu, sigma, mu_r, sigma_r), float(((mu - mu_r) ** 2).sum())
    img = x.reshape(len(x), 8, 8)
    energy = float(((img[:, 1:, :] - img[:, :-1, :]) ** 2).mean() + ((img[:, :, 1:] - img[:, :, :-1]) ** 2).mean())
    return {"fd": fd, "mean": mean, "cov": fd - mean, "trace": float(np.trace(sigma)), "energy": energy}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", nargs="+", help="toy.converge seed folders (out/converge/s0 ...)")
    parser.add_argument("--runs", nargs="+", default=["range1.5"], help="variants whose last snapshot is measured")
    parser.add_argument("--gamma", type=float, default=1.0, help="the guidance scale (one of toy.converge's)")
    args = parser.parse_args()
    for folder in args.seeds:
        missing = [p for p in ["references.pt", *(os.path.join("runs", f"digits__{r}", "snapshots") for r in args.runs)]
                   if not os.path.exists(os.path.join(folder, p))]
        if missing:
            parser.error(f"{folder} has no {missing[0]}: give a seed folder of `python -m toy.converge` (e.g. "
                         "out/converge/s0) whose runs include --runs, measured once with --table-only.")
    if f"{args.gamma:g}" not in ("1", "1.25", "1.5"):
        parser.error(f"--gamma {args.gamma:g}: the teacher's cached samples are at γ 1, 1.25 and 1.5 only.")
    x_real = load_digits()[0]
    real = parts(x_real.reshape(len(x_real), 8, 8), x_real)
    print(f"real digits: tr Σ {real['trace']:.2f}, neighbour energy {real['energy']:.4f}\n")
    print("| seed | set | pixel FD | mean term | covariance term | tr Σ | neighbour energy |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.seeds:
        refs = torch.load(os.path.join(folder, "references.pt"), map_location="cpu", weights_only=True)
        teacher = refs["samples"][f"{args.gamma:g}"].numpy()
        rows = {"teacher (RK4 32)": parts(teacher, x_real)}
        for run in args.runs:
            snaps = sorted(f for f in os.listdir(os.path.join(folder, "runs", f"digits__{run}", "snapshots"))
                           if f.startswith("ema_0"))
            student = sit.load_teacher(os.path.join(folder, "runs", f"digits__{run}", "snapshots", snaps[-1]),
                                       resolution=None).eval()
            z, y = scan_noise(len(teacher), student.num_classes, "cpu")
            with torch.no_grad():
                x = sample_one_step(student, z, y, torch.full((len(z),), args.gamma)).numpy()
            rows[f"{run} ({snaps[-1][4:-3].lstrip('0')})"] = parts(x, x_real)
        for name, r in rows.items():
            print(f"| {os.path.basename(folder)} | {name} | {r['fd']:.3f} | {r['mean']:.3f} | {r['cov']:.3f} | "
                  f"{r['trace']:.2f} | {r['energy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
