"""Each model at its own best guidance scale, in a learned feature space: the digits' FD-vs-γ scan.

    python -m toy.digits_scan out/toy/digits                   # a finished digits run: student and teacher
    python -m toy.digits_scan RUN1 RUN2 --eval-cfg 1 1.5 2     # several runs, other scales
    python -m toy.digits_scan --teacher-only --teacher-steps 800   # a teacher alone, before distilling it

FID papers compare each method at its own best guidance scale, in Inception's features. Here, at every scale γ
of --eval-cfg (default 1, 1.25, 1.5, 2, 2.5, 3), the same --scan-samples noises (1500, labels spread evenly over
the classes; one fixed generator, so every run and teacher sees the same noise) give

    the teacher's samples   RK4 with 8 steps (32 evaluations of its guided velocity)
    the student's samples   one step, x̂ = z - F_θ(z, 0, c, γ)

and each set is measured against the 1797 real digits: the Fréchet distance in the features of a CNN
classifier of the digits (toy/digits_features.py: the digits' FID), ADM's precision and recall in those
features, and the Fréchet distance over the 64 pixels. The best scale of each model is the one with the lowest
learned FD (and, separately, the lowest pixel FD). `python freeflow.py --toy digits` runs this scan at the end
of every run (metrics.json "scan", figure scan.png); this command rescans finished runs, or checks a teacher's
curve before any distillation is spent on it."""

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
import sit  # noqa: E402
from freeflow import FreeFlowError, atomic_write, parse_config, sample_one_step, teacher_ode, write_json  # noqa: E402

SCAN_SEED = 20_261_201  # one generator for every scan: every run and teacher sees the same noise
TEACHER_SOLVER = ("rk4", 8)


def scan_noise(n, num_classes, device):
    g = torch.Generator().manual_seed(SCAN_SEED)
    z = torch.randn((n, 1, 8, 8), generator=g).to(device)
    return z, (torch.arange(n) % num_classes).to(device)


def measure(images, features, real_pixels):
    """The learned FD, precision and recall (features.score) and the pixel FD of a set of digits."""
    images = np.asarray(images).reshape(len(images), -1)
    return {**features.score(images), "pixel_fd": fid.frechet_distance(*fid.statistics(images), *real_pixels)}


def best(curve, key):
    """The scale with the lowest `key` in {γ: metrics}."""
    return min(curve, key=lambda g: curve[g][key])


@torch.no_grad()
def guidance_scan(teacher, student, features, x_real, scales, n, interval, device, progress=False):
    """{"scales", "samples", "teacher": {γ: metrics}, "student": ..., "best": {model: {"fd": γ, "pixel_fd": γ}},
    "classifier": ...}; student may be None (the teacher alone)."""
    from tqdm import tqdm
    real_pixels = fid.statistics(x_real.reshape(len(x_real), -1))
    z, y = scan_noise(n, teacher.num_classes, device)
    out = {"scales": [float(g) for g in scales], "samples": n,
           "teacher_solver": f"{TEACHER_SOLVER[0]}, {TEACHER_SOLVER[1]} steps", "teacher": {}, "student": {},
           "classifier": {"seed": features.seed, "held_out_accuracy": features.held_out_accuracy}}
    for g in tqdm(scales, desc="scan γ", disable=not progress, dynamic_ncols=True):
        gamma = torch.full((n,), float(g), device=device)
        x = teacher_ode(teacher, z, y, gamma, interval, TEACHER_SOLVER[1], TEACHER_SOLVER[0])[0]
        out["teacher"][f"{g:g}"] = measure(x.cpu().numpy(), features, real_pixels)
        if student is not None:
            out["student"][f"{g:g}"] = measure(sample_one_step(student, z, y, gamma).cpu().numpy(), features,
                                               real_pixels)
    out["best"] = {model: {key: float(best(out[model], key)) for key in ("fd", "pixel_fd")}
                   for model in ("teacher", "student") if out[model]}
    return out


def table(scan, name=""):
    """Markdown: one row per model, learned FD (pixel FD) at each scale, the best of each in bold."""
    gs = list(scan["teacher"])
    lines = [f"| {name or 'model'} | " + " | ".join(f"γ = {g}" for g in gs) + " | best γ (learned / pixel) |",
             "|---" * (len(gs) + 2) + "|"]
    for model in ("teacher", "student"):
        if not scan[model]:
            continue
        b = scan["best"][model]
        cells = []
        for g in gs:
            m = scan[model][g]
            fd = f"**{m['fd']:.2f}**" if float(g) == b["fd"] else f"{m['fd']:.2f}"
            px = f"**{m['pixel_fd']:.3f}**" if float(g) == b["pixel_fd"] else f"{m['pixel_fd']:.3f}"
            cells.append(f"{fd} ({px})")
        label = f"teacher ({scan['teacher_solver']})" if model == "teacher" else "student (1 step)"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {b['fd']:g} / {b['pixel_fd']:g} |")
    return "\n".join(lines)


def plot(path, scans, title=""):
    """FD against γ, learned and pixel, for each (label, scan): every distinct teacher dashed, every student solid,
    each model's best scale starred."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for ax, key, what in ((axes[0], "fd", "Fréchet distance, CNN features"), (axes[1], "pixel_fd", "Fréchet distance, pixels")):
        teachers = []
        for label, scan in scans:
            curves = [("student", f"{label + ': ' if label else ''}student (1 step)", "-")]
            if scan["teacher"] not in teachers:
                teachers.append(scan["teacher"])
                curves.insert(0, ("teacher", f"teacher ({scan['teacher_solver']})", "--"))
            for model, name, style in curves:
                curve = scan[model]
                if curve:
                    ax.plot([float(g) for g in curve], [m[key] for m in curve.values()], style, marker="o", ms=3,
                            label=name)
                    b = scan["best"][model][key]
                    ax.plot([b], [curve[f"{b:g}"][key]], "k*", ms=9)
        ax.set(xlabel="guidance scale γ", title=what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}  (★: each model's best γ)", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def rescan(run, classifier_seed, scales, samples, x, y):
    """The scan of a finished digits run, written to <run>/scan_classifier<seed>.json."""
    from toy.digits_features import DigitsFeatures
    from toy.run import read_metrics
    saved = read_metrics(run, f"{run} holds no finished digits run (no metrics.json).")
    if saved.get("toy") != "digits" or not isinstance(saved.get("teacher"), dict) or "path" not in saved["teacher"]:
        raise FreeFlowError(f"{run} is not a finished digits run (its metrics.json names toy {saved.get('toy')!r} and "
                            f"no digits teacher).")
    teacher_path = saved["teacher"]["path"]
    if not os.path.exists(teacher_path):
        raise FreeFlowError(f"the teacher of {run}, {teacher_path}, is gone; the scan needs the run's own teacher.")
    teacher = sit.load_teacher(teacher_path, resolution=None)
    student = sit.load_teacher(os.path.join(run, "ckpt.pt"), resolution=None)
    features = DigitsFeatures(os.path.dirname(teacher_path), x, y, classifier_seed)
    scan = guidance_scan(teacher, student, features, x, scales, samples, tuple(saved["config"]["guidance_interval"]),
                         "cpu", progress=True)
    write_json(scan, os.path.join(run, f"scan_classifier{classifier_seed}.json"))
    return scan


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m toy.digits_scan", description=__doc__.split("\n\n")[0],
                                     usage="python -m toy.digits_scan [RUN ...] [--teacher-only] [--classifier-seed N] "
                                           "[freeflow.py's digits flags: --eval-cfg, --scan-samples, the teacher's]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--teacher-only", action="store_true", help="scan only the teacher that the digits flags "
                        "given make (trained and cached as a run would)")
    parser.add_argument("--classifier-seed", type=int, default=0, help="seed of the CNN whose features are used")
    argv = sys.argv[1:] if argv is None else argv
    first_flag = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    runs = argv[:first_flag]  # finished runs first (directories), then the flags
    args, rest = parser.parse_known_args(argv[first_flag:])
    args.runs = runs
    try:
        cfg = parse_config(["--toy", "digits", *rest]).check()  # --eval-cfg, --scan-samples and the teacher's flags
        if args.teacher_only == bool(args.runs):
            raise FreeFlowError("give finished runs to rescan, or --teacher-only with the teacher's flags, not both.")
        from toy.digits import digits_teacher, load_digits
        if args.teacher_only:
            from toy.digits_features import DigitsFeatures
            cfg.out = cfg.out or os.path.join("out", "toy", "digits_scan")
            x, y, device, out, teacher_path, teacher, _ = digits_teacher(cfg)
            features = DigitsFeatures(os.path.dirname(teacher_path), x, y, args.classifier_seed)
            scan = guidance_scan(teacher, None, features, x, cfg.eval_cfg, cfg.scan_samples, cfg.guidance_interval,
                                 device, progress=True)
            write_json(scan, os.path.join(out, "teacher_scan.json"))
            plot(os.path.join(out, "teacher_scan.png"), [("", scan)], teacher_path)
            print(table(scan) + f"\n\nwrote {out}/teacher_scan.json and teacher_scan.png")
            return 0
        x, y, _ = load_digits()
        scans = [(os.path.basename(os.path.normpath(run)), rescan(run, args.classifier_seed, cfg.eval_cfg,
                                                                  cfg.scan_samples, x, y)) for run in args.runs]
        for (name, scan), run in zip(scans, args.runs):
            print(f"\n{run}\n\n{table(scan)}")
        plot(os.path.join(args.runs[0], "scan_runs.png"), scans, " vs ".join(name for name, _ in scans))
    except (FreeFlowError, sit.CheckpointError) as e:
        print(f"python -m toy.digits_scan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
