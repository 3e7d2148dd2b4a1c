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
from toy.converge import GAMMAS, snapshots  # noqa: E402
from toy.digits import SHAPE, load_digits  # noqa: E402
from toy.digits_scan import scan_noise  # noqa: E402


def parts(x, real_stats):
    """{fd, mean term, covariance term, tr Σ, neighbour energy} of digits x against the real digits' (μ, Σ)."""
    mu, sigma = fid.statistics(x.reshape(len(x), -1).astype(np.float64))
    mu_r, sigma_r = real_stats
    fd, mean = fid.frechet_distance(mu, sigma, mu_r, sigma_r), float(((mu - mu_r) ** 2).sum())
    img = x.reshape(len(x), *SHAPE[-2:])
    energy = float(((img[:, 1:, :] - img[:, :-1, :]) ** 2).mean() + ((img[:, :, 1:] - img[:, :, :-1]) ** 2).mean())
    return {"fd": fd, "mean": mean, "cov": fd - mean, "trace": float(np.trace(sigma)), "energy": energy}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seeds", nargs="+", help="toy.converge seed folders (out/converge/s0 ...)")
    parser.add_argument("--runs", nargs="+", default=["range1.5"], help="variants whose last snapshot is measured")
    parser.add_argument("--gamma", type=float, default=1.0, help="the guidance scale (one of toy.converge's)")
    args = parser.parse_args()
    if args.gamma not in GAMMAS:
        parser.error(f"--gamma {args.gamma:g}: the teacher's cached samples are at γ "
                     f"{', '.join(f'{g:g}' for g in GAMMAS)} only.")
    teachers, runs = {}, {}  # every input is read or found before anything is printed
    for folder in args.seeds:
        cache = os.path.join(folder, "references.pt")
        try:
            refs = torch.load(cache, map_location="cpu", weights_only=True)
            teachers[folder] = refs["samples"][f"{args.gamma:g}"].numpy()
        except Exception:  # noqa: BLE001 - a missing or unreadable cache is the same one-line refusal
            parser.error(f"{cache} is missing or not toy.converge's teacher cache: give a seed folder of `python -m "
                         f"toy.converge` (e.g. out/converge/s0), its cache made with --table-only.")
        for run in args.runs:
            snaps = snapshots(os.path.join(folder, "runs", f"digits__{run}"))
            if not snaps:
                parser.error(f"{folder} has no EMA snapshot of the variant {run}: its runs are in {folder}/runs.")
            runs[folder, run] = list(snaps.items())[-1]
    x_real = load_digits()[0]
    real_stats = fid.statistics(x_real.reshape(len(x_real), -1).astype(np.float64))
    real = parts(x_real, real_stats)
    print(f"real digits: tr Σ {real['trace']:.2f}, neighbour energy {real['energy']:.4f}\n")
    print("| seed | set | pixel FD | mean term | covariance term | tr Σ | neighbour energy |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.seeds:
        teacher = teachers[folder]
        rows = {"teacher (RK4 32)": parts(teacher, real_stats)}
        for run in args.runs:
            step, path = runs[folder, run]
            student = sit.load_teacher(path, resolution=None).eval()
            z, y = scan_noise(len(teacher), student.num_classes, "cpu")
            with torch.no_grad():
                x = sample_one_step(student, z, y, torch.full((len(z),), args.gamma)).numpy()
            rows[f"{run} ({step})"] = parts(x, real_stats)
        for name, r in rows.items():
            print(f"| {os.path.basename(folder)} | {name} | {r['fd']:.3f} | {r['mean']:.3f} | {r['cov']:.3f} | "
                  f"{r['trace']:.2f} | {r['energy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
