"""`python freeflow.py --toy digits`: FreeFlow on real images, on a laptop.

The data are scikit-learn's bundled handwritten digits: 1797 grey 8 x 8 images of 10 classes, values 0 to
16, shipped inside the wheel (nothing is downloaded), scaled to x = pixel / 8 - 1 in [-1, 1]. Everything
else is what ImageNet uses:

- the teacher is a `sit.SiT` (1 channel, 8 x 8 pixels, patch 2: 16 tokens) trained by flow matching with
  labels dropped to ∅ so that classifier-free guidance works; it is trained once and cached in
  <out>/teacher.pt, which `sit.load_teacher(path, resolution=None)` loads;
- the distillation is `freeflow.distill`: the student and g_ψ are the teacher plus zero-initialised s and γ
  inputs, γ is drawn per example from --cfg-range so that one student serves every guidance scale, and the
  teacher's CFG is on for t in [0, 0.7] (--guidance-interval, the predictor) and r in [0, 0.7]
  (--corrector-interval), as on ImageNet.

The evaluation, at γ = 1 and at the guided γ = --cfg, on --eval-samples noises with labels spread evenly
over the classes (the same noise and labels at both scales):

- reference: the teacher's ODE from the same noise by RK4, the steps doubling from 16 until halving them
  moves no sample by more than --ode-tol (Euclidean norm over its 64 pixels);
- endpoint error: the root-mean-square over the 64 pixels of (one-step sample - reference), averaged over
  samples; beside it the same error of the teacher's own samplers (REPA's, `freeflow.sample_ode`) from the same
  noise: Euler at 1, 2, 4, 8 and 16 evaluations of v_γ, Heun at 3, 7 and 15 (2, 4, 8 steps; the last step
  is an Euler step). That table says how many teacher calls one student call is worth. (A guided
  evaluation costs two network calls; metrics.json counts both as "nfe".)
- class accuracy: a multinomial logistic regression on the 64 pixels (scikit-learn), fitted on 75 % of the
  real digits; its accuracy on the other 25 % is reported beside its accuracy on the samples;
- distances to the teacher's distribution, each with its floor, the same distance between two independent
  teacher sets (toy/evaluate.py's pairs, over a cycle of two): the exact 2-Wasserstein distance (W2 ratio =
  W2 / floor) and the Fréchet distance between Gaussians fitted to the pixels;
- Fréchet distance to the real digits: |μ - μ_real|² + Tr(Σ + Σ_real - 2 (Σ Σ_real)^½) over the 64 pixels
  (fid.frechet_distance), for the student's and the teacher's samples.

Outputs in --out (default out/toy/digits): metrics.json, figure.png, ckpt.pt, teacher.pt, log.jsonl and
samples.npz (noise N x 1 x 8 x 8, labels N, gamma N, student and teacher N x 1 x 8 x 8 in the model's space
[-1, 1]: the reference from the same noise; both scales, N = 2 x --eval-samples).
"""

import os
import time

import numpy as np
import torch
from tqdm import tqdm

import fid
import sit
from freeflow import (FreeFlowError, atomic_write, distill, output_dir, pick_device, resolve_precision,
                      sample_ode, sample_one_step, sample_prior, teacher_ode, watch)
from toy.evaluate import cycle_pairs, eval_conditions, reference_ode, w2_all
from toy.run import finish_run
from toy.teacher import check_teacher_cache, load_or_train_teacher

SHAPE = (1, 8, 8)
HEADS = 4  # the digits SiT's attention heads (its width must be a multiple of 4)
# the endpoint-error table: the teacher's own samplers (REPA's, freeflow.sample_ode) at small budgets: Euler with
# 1, 2, 4, 8, 16 steps (an evaluation each) and Heun with 2, 4, 8 steps (two evaluations a step but the last,
# which is an Euler step as in REPA and EDM: a Heun correction at t = 0 itself is badly off, see docs/digits.md)
TABLE = [("euler", steps) for steps in (1, 2, 4, 8, 16)] + [("heun", steps) for steps in (2, 4, 8)]
W2_SETS = 2  # independent teacher sets per scale: W2 and its floor over a two-pair cycle
CLASSIFIER_HELD_OUT = 0.25


def load_digits(seed=0):
    """(x float32 N x 1 x 8 x 8 in [-1, 1], labels int64 N, 10): the real digits, x = pixel / 8 - 1."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise FreeFlowError("--toy digits needs scikit-learn (its bundled handwritten digits): "
                            "pip install scikit-learn.") from None
    data = sklearn_digits()
    x = (data.images.astype(np.float32) / 8 - 1)[:, None]
    return x, data.target.astype(np.int64), 10


def digits_sit(x, num_classes, cfg):
    """The digits teacher, untrained: a SiT on 1 x 8 x 8 images, patch 2, --width and --depth."""
    return sit.SiT(input_size=x.shape[-1], patch=2, in_channels=x.shape[1], hidden=cfg.width, depth=cfg.depth,
                   heads=HEADS, num_classes=num_classes)


def fit_classifier(x, y, seed=0):
    """A multinomial logistic regression on the pixels, fitted on 75 % of the real digits (a seeded split).
    Returns (classifier, its accuracy on the held-out 25 %)."""
    from sklearn.linear_model import LogisticRegression
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1 - CLASSIFIER_HELD_OUT)))
    flat = x.reshape(len(x), -1)
    clf = LogisticRegression(max_iter=5000).fit(flat[order[:cut]], y[order[:cut]])
    return clf, float(clf.score(flat[order[cut:]], y[order[cut:]]))


def accuracy(clf, images, labels):
    """The fraction of images the classifier labels with their own class."""
    return float((clf.predict(np.asarray(images).reshape(len(images), -1)) == np.asarray(labels)).mean())


def classifier_verifier(clf):
    """The digits verifier for best-of-N (freeflow.best_of_n): log p(wanted class | image) under the classifier.
    A plain function of (images, labels) -> scores, higher is better."""
    def verify(images, y):
        log_p = clf.predict_log_proba(images.reshape(len(images), -1).float().cpu().numpy())
        return torch.from_numpy(log_p[np.arange(len(y)), y.cpu().numpy()]).to(y.device)
    return verify


def frechet_to(images, real_stats):
    """The Fréchet distance between Gaussians fitted to the images' pixels and to the real digits'."""
    return fid.frechet_distance(*fid.statistics(np.asarray(images).reshape(len(images), -1)), *real_stats)


def rmse(a, b):
    """Mean over samples of the root-mean-square difference over each sample's pixels."""
    return (a - b).pow(2).flatten(1).mean(1).sqrt().mean().item()


@torch.no_grad()
def evaluate_digits(student, teacher, x_real, y_real, cfg, device, progress=True):
    """Every metric of the module docstring at γ = 1 and γ = --cfg; returns (metrics, arrays for the
    figure and samples.npz)."""
    n = cfg.eval_samples
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    zs = [sample_prior(n, SHAPE, generator=gen).to(device) for _ in range(W2_SETS)]
    interval = cfg.guidance_interval
    clf, held_out = fit_classifier(x_real, y_real, cfg.seed)
    real_stats = fid.statistics(x_real.reshape(len(x_real), -1))
    metrics = {"classifier": {"kind": "logistic regression on the 64 pixels (scikit-learn)",
                              "held_out_accuracy": held_out, "held_out_fraction": CLASSIFIER_HELD_OUT},
               "eval_samples": n, "scales": {}}
    arrays = {k: [] for k in ("noise", "labels", "gamma", "student", "teacher")}
    scales = sorted({1.0, float(cfg.cfg)})
    # the teacher's solves are the long part: a bar that advances per solve (reference, W2 sets, table rows)
    bar = tqdm(total=len(scales) * (W2_SETS + len(TABLE)), desc="evaluate", disable=not progress, dynamic_ncols=True)
    for g in scales:
        y, gamma = eval_conditions(n, teacher.num_classes, cfg, device, gamma=g)
        ref, _, steps, change, nfe = reference_ode(teacher, zs[0], y, gamma, interval, cfg.ode_tol, record=(),
                                                   dtype=torch.float32)
        bar.update()
        one_step = [sample_one_step(student, z, y, gamma) for z in zs]
        teachers = [ref]
        for z in zs[1:]:
            teachers.append(teacher_ode(teacher, z, y, gamma, interval, steps, "rk4")[0])
            bar.update()
        table = {}
        for solver, steps_ in TABLE:
            x, calls = sample_ode(teacher, zs[0], y, steps_, g, interval, heun=solver == "heun")
            evals = steps_ if solver == "euler" else 2 * steps_ - 1
            table[f"{solver} {evals}"] = {"evals": evals, "steps": steps_, "nfe": calls, "endpoint_rmse": rmse(x, ref)}
            bar.update()
        S, T = [s.cpu().numpy() for s in one_step], [t.cpu().numpy() for t in teachers]
        distances = w2_all(cycle_pairs(S, T))
        w2_pairs, floor_pairs = distances[:W2_SETS], distances[W2_SETS:]
        w2, floor = float(np.mean(w2_pairs)), float(np.mean(floor_pairs))
        gaussian = lambda sets: [fid.statistics(a.reshape(n, -1)) for a in sets]  # noqa: E731 - (μ, Σ) of the pixels
        fd = [fid.frechet_distance(*a, *b) for a, b in cycle_pairs(gaussian(S), gaussian(T))]
        student_np, teacher_np, labels = S[0], T[0], y.cpu().numpy()
        metrics["scales"][f"{g:g}"] = {
            "gamma": g, "endpoint_rmse": rmse(one_step[0], ref), "teacher_solvers": table,
            "accuracy": {"student": accuracy(clf, student_np, labels), "teacher": accuracy(clf, teacher_np, labels)},
            "w2": w2, "w2_floor": floor, "w2_ratio": w2 / floor, "w2_pairs": w2_pairs, "w2_floor_pairs": floor_pairs,
            "frechet_to_teacher": float(np.mean(fd[:W2_SETS])), "frechet_floor": float(np.mean(fd[W2_SETS:])),
            "frechet_to_real": {"student": frechet_to(student_np, real_stats),
                                "teacher": frechet_to(teacher_np, real_stats)},
            "reference_solver": {"method": "rk4", "steps": steps, "halving_change": change, "tol": cfg.ode_tol,
                                 "nfe": nfe},
        }
        for key, value in (("noise", zs[0].cpu().numpy()), ("labels", labels), ("gamma", gamma.cpu().numpy()),
                           ("student", student_np), ("teacher", teacher_np)):
            arrays[key].append(value)
    bar.close()
    return metrics, {k: np.concatenate(v) for k, v in arrays.items()}


def save_samples(path, arrays):
    """samples.npz, written to a temporary file and renamed."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def digits_teacher(cfg, progress=True, default_out=os.path.join("out", "toy", "digits")):
    """The data, the device, the output directory and the (cached or newly trained) digits teacher of a run:
    (x, y, device, out, teacher_path, teacher, teacher_info). Every input is checked before anything is
    written."""
    x, y, num_classes = load_digits()
    cfg.resolve(has_labels=True)
    if cfg.width % HEADS:
        raise FreeFlowError(f"--width {cfg.width}: the digits SiT needs a width divisible by {HEADS} (e.g. 64).")
    device = pick_device(cfg.device)
    resolve_precision(cfg, device)
    from toy.digits_features import check_cnn_cache
    teacher_path = cfg.toy_teacher or os.path.join(cfg.out or default_out, "teacher.pt")
    # the teacher's cache, and the classifier's that the evaluation writes beside it, checked before any work
    out = output_dir(cfg, default_out, checks=[lambda: check_teacher_cache(teacher_path),
                                               lambda: check_cnn_cache(os.path.dirname(teacher_path) or ".")])
    teacher, teacher_info = load_or_train_teacher(teacher_path, x, y, num_classes, cfg, device, progress,
                                                  build=digits_sit)
    return x, y, device, out, teacher_path, teacher, teacher_info


def digit_images(x, zoom=4):
    """Digits in [-1, 1] (N x 1 x 8 x 8) -> uint8 grey images N x 8 zoom x 8 zoom x 3, for preview grids."""
    grey = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to("cpu", torch.uint8)[:, 0]
    return grey.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)[..., None].expand(-1, -1, -1, 3).numpy()


def digits_score(cfg, x_real, num_classes, device, features=None):
    """score(ema) for --fid-every on the digits: the Fréchet distance between --fid-samples one-step samples at
    γ = --cfg (labels spread evenly over the classes, the same noise every time) and the real digits, in the digits
    CNN's features (`learned_fd`, the digits' FID, when `features` is a toy.digits_features.DigitsFeatures; the
    best snapshot is chosen by it) and over the pixels (`frechet_to_real`)."""
    real_stats = fid.statistics(x_real.reshape(len(x_real), -1))
    g = torch.Generator().manual_seed(cfg.seed + 104_729)
    z = sample_prior(cfg.fid_samples, SHAPE, generator=g).to(device)
    y = (torch.arange(cfg.fid_samples) % num_classes).to(device)
    gamma = torch.full((cfg.fid_samples,), float(cfg.cfg), device=device)

    def score(ema):
        x = sample_one_step(ema, z, y, gamma).cpu().numpy()
        learned = {} if features is None else {"learned_fd": features.score(x)["fd"]}
        return {**learned, "frechet_to_real": frechet_to(x, real_stats)}
    return score


def run_digits(cfg, progress=True):
    start = time.perf_counter()
    x, y, device, out, teacher_path, teacher, teacher_info = digits_teacher(cfg, progress)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    from toy.digits_features import DigitsFeatures
    features = DigitsFeatures(os.path.dirname(os.path.abspath(teacher_path)), x, y) if cfg.fid_every else None
    score = digits_score(cfg, x, teacher.num_classes, device, features) if cfg.fid_every else None
    step_fn = None
    if cfg.states == "data":  # the data-based baseline: the same distillation, states noised from the digits
        from toy.mismatch import data_step, data_subset
        step_fn = data_step(*data_subset(x, y, cfg.data_fraction, cfg.seed), device)
    student, history = distill(teacher, cfg, SHAPE, out, progress,
                               watch(cfg, out, SHAPE, teacher.num_classes, device, digit_images, score), step_fn)
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics, arrays = evaluate_digits(student, teacher, x, y, cfg, device, progress)
    metrics |= {"toy": "digits", "steps": cfg.steps, "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - t0, "teacher": {"path": teacher_path, **teacher_info}}
    from toy.digits_scan import guidance_scan, plot
    features = features or DigitsFeatures(os.path.dirname(os.path.abspath(teacher_path)), x, y)
    metrics["scan"] = guidance_scan(teacher, student, features, x, cfg.eval_cfg or sorted({1.0, float(cfg.cfg)}),
                                    cfg.scan_samples, cfg.guidance_interval, device, progress)
    save_samples(os.path.join(out, "samples.npz"), arrays)
    from toy.figure import plot_digits
    plot_digits(os.path.join(out, "figure.png"), x, y, arrays, metrics)
    plot(os.path.join(out, "scan.png"), [("", metrics["scan"])], f"digits, {cfg.steps} steps")
    return finish_run(metrics, cfg, device, out, start, report)


def report(m, out):
    lines = [f"FreeFlow on 'digits' ({m['steps']} steps, {m['train_seconds']:.0f} s; teacher "
             f"{'cached' if m['teacher']['cached'] else 'trained in %.0f s' % m['teacher']['train_seconds']}; "
             f"whole run {m['total_seconds']:.0f} s)",
             f"  classifier: logistic regression, {100 * m['classifier']['held_out_accuracy']:.1f} % on held-out "
             f"real digits"]
    for g, r in m["scales"].items():
        euler = "  ".join(f"{k.split()[1]}: {v['endpoint_rmse']:.3f}" for k, v in r["teacher_solvers"].items()
                          if k.startswith("euler"))
        heun = "  ".join(f"{k.split()[1]}: {v['endpoint_rmse']:.3f}" for k, v in r["teacher_solvers"].items()
                         if k.startswith("heun"))
        lines += [f"  γ = {g}: endpoint RMSE one-step student {r['endpoint_rmse']:.3f} | teacher Euler {euler} | "
                  f"Heun {heun}",
                  f"          accuracy student {100 * r['accuracy']['student']:.1f} %, teacher "
                  f"{100 * r['accuracy']['teacher']:.1f} %   to the teacher: W2 {r['w2']:.3f} (floor "
                  f"{r['w2_floor']:.3f}), Fréchet {r['frechet_to_teacher']:.3f} (floor {r['frechet_floor']:.3f})",
                  f"          Fréchet to the real digits: student {r['frechet_to_real']['student']:.3f}, "
                  f"teacher {r['frechet_to_real']['teacher']:.3f}"]
    if "scan" in m:
        from toy.digits_scan import table
        best = m["scan"]["best"]
        lines += [f"  each at its best γ (Fréchet distance in a CNN's features / pixels, to the real digits; "
                  f"CNN {100 * m['scan']['classifier']['held_out_accuracy']:.1f} % on held-out digits):",
                  *("    " + line for line in table(m["scan"]).splitlines()),
                  f"    best γ: teacher {best['teacher']['fd']:g}, student {best['student']['fd']:g}"]
    lines.append(f"  wrote {out}/metrics.json, figure.png, scan.png, samples.npz, ckpt.pt, log.jsonl")
    return "\n".join(lines)
