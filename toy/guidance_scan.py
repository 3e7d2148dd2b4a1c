"""Which guidance scale does a guided student really sample? W2 from its one-step samples to the teacher's
ODE samples at a range of scales γ'.

    python -m toy.guidance_scan out/toy/8gaussians              # one finished run
    python -m toy.guidance_scan RUN RUN ... --gammas 1,2,3,4,6  # several runs, other scales

Each RUN is a directory a guided toy run wrote (`python freeflow.py --toy 8gaussians --cfg 3 --out RUN`):
its metrics.json holds the run's settings and teacher, its ckpt.pt the EMA student. The student samples at
the run's own γ; the teacher's samples at each γ' are RK4 solves (the steps the evaluation's reference
takes at the run's γ, with its guidance interval) from independent noise; "data" is the distance to the
training points with the same labels (the toy's FID against real images). Every distance is a mean over 4
pairs, as in toy/evaluate.py. A student faithful to its guided teacher is closest at γ' = γ; the
corrector under guidance pulls it elsewhere (docs/corrector.md, "Under guidance").
"""

import dataclasses
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from freeflow import Config, FreeFlowError, load_checkpoint, make_student, sample_one_step, sample_prior, teacher_ode  # noqa: E402
from toy.evaluate import W2_PAIRS, eval_conditions, reference_ode, w2_all  # noqa: E402
from toy.run import script_flags, toy_teacher  # noqa: E402


def gamma_list(text):
    try:
        gammas = [float(g) for g in text.split(",")]
    except ValueError:
        gammas = []
    if not gammas or not all(np.isfinite(g) for g in gammas):
        raise FreeFlowError(f"--gammas must be numbers separated by commas, e.g. 1,2,3 (got {text!r}).")
    return gammas


def load_run(run):
    """(config, teacher, EMA student, number of classes, device, (training points, labels)) of a finished
    guided toy run in directory `run`. Nothing is written: the run's directory is read where it now is."""
    from toy.run import read_metrics
    path = os.path.join(run, "metrics.json")
    saved = read_metrics(run, f"{run} has no metrics.json: give the directory of a finished toy run.").get("config")
    if not isinstance(saved, dict):
        raise FreeFlowError(f"{path} holds no run settings (`config`): give the directory of a finished toy run.")
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})
    cfg.out = run
    if cfg.toy == "digits":
        raise FreeFlowError(f"{run} is a digits run; this scan reads 2D toy runs (the digits report both scales).")
    cfg.toy_teacher = cfg.toy_teacher or os.path.join(run, "teacher.pt")
    if not os.path.exists(cfg.toy_teacher):
        raise FreeFlowError(f"the teacher of {run}, {cfg.toy_teacher}, is gone; the scan needs the run's own teacher.")
    x, labels, num_classes, device, _, _, teacher, _ = toy_teacher(cfg, progress=False)
    if not num_classes:
        raise FreeFlowError(f"{run} is a run on unlabelled data: there is no guidance scale to scan.")
    student = make_student(teacher)
    student.load_state_dict(load_checkpoint(os.path.join(run, "ckpt.pt"))["ema"])
    return cfg, teacher, student.eval(), num_classes, device, (x, labels)


def spread(x, y):
    """Within-class spread: the root-mean-square distance of the points to their class's mean."""
    means = torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])
    return float((x - means[y]).square().sum(1).mean().sqrt())


def data_sets(data, y, sets, rng):
    """`sets` draws of training points with the labels y (one random point of class y_i for each i): what
    the one-step samples would be if they were the data's own class-conditional distribution."""
    x, labels = data
    members = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    return [torch.from_numpy(x[[rng.choice(members[c]) for c in y.tolist()]]) for _ in range(sets)]


@torch.no_grad()
def references(cfg, teacher, num_classes, device, data, gammas):
    """What a scan compares a student with, which depends on the teacher and the run's settings only: the
    noise and labels, the teacher's sets at each γ' and at the run's γ, the data sets, and the distances
    among them ({γ': W2(teacher at γ', data)}, the floor W2(teacher, teacher) at the run's γ)."""
    n = cfg.eval_samples
    gen = torch.Generator().manual_seed(cfg.seed + 300)  # not the evaluation's noise
    zs = [sample_prior(n, (2,), generator=gen).to(device) for _ in range(2 * W2_PAIRS)]
    y, gamma = eval_conditions(n, num_classes, cfg, device)
    steps = reference_ode(teacher, zs[0], y, gamma, cfg.guidance_interval, cfg.ode_tol)[2]

    def teacher_sets(g):
        gam = torch.full_like(gamma, g)
        return [teacher_ode(teacher, z, y, gam, cfg.guidance_interval, steps, "rk4")[0].cpu() for z in zs[W2_PAIRS:]]

    T = {g: teacher_sets(g) for g in sorted({*gammas, cfg.cfg})}
    D = data_sets(data, y.cpu(), W2_PAIRS, np.random.default_rng(cfg.seed + 300))
    own = T[cfg.cfg]
    pairs = [(T[g][k], D[(k + 1) % W2_PAIRS]) for g in gammas for k in range(W2_PAIRS)]  # teacher to the data
    pairs += [(own[k], own[(k + 1) % W2_PAIRS]) for k in range(W2_PAIRS)]  # teacher to teacher
    d = np.array(w2_all(pairs)).reshape(-1, W2_PAIRS).mean(1)  # one mean over the pairs per comparison
    return {"zs": zs[:W2_PAIRS], "y": y, "gamma": gamma, "T": T, "D": D,
            "teacher_to_data": dict(zip(gammas, d[:-1].tolist())), "floor": float(d[-1])}


@torch.no_grad()
def scan(run, gammas, cache=None):
    """(config, {γ': W2(student at the run's γ, teacher at γ')}, W2(student, the training data), the floor
    W2(teacher, teacher) at the run's γ, {γ': W2(teacher at γ', the training data)}, and the within-class
    spread of the student, of the teacher at the run's γ and of the data). With a dict as `cache`, runs
    that share a teacher and its settings share one `references` (it is most of the work)."""
    cfg, teacher, student, num_classes, device, data = load_run(run)
    key = (os.path.abspath(cfg.toy_teacher), cfg.toy, cfg.seed, cfg.cfg, cfg.guidance_interval, cfg.eval_samples,
           cfg.ode_tol, tuple(gammas))
    ref = None if cache is None else cache.get(key)
    if ref is None:
        ref = references(cfg, teacher, num_classes, device, data, gammas)
        if cache is not None:
            cache[key] = ref
    T, D, y = ref["T"], ref["D"], ref["y"]
    S = [sample_one_step(student, z, y, ref["gamma"]).cpu() for z in ref["zs"]]
    pairs = [(S[k], T[g][k]) for g in gammas for k in range(W2_PAIRS)]  # student to the teacher at each γ'
    pairs += [(S[k], D[k]) for k in range(W2_PAIRS)]  # student to the data
    d = np.array(w2_all(pairs)).reshape(-1, W2_PAIRS).mean(1)
    y = y.cpu()
    spreads = {"student": spread(S[0], y), "teacher": spread(T[cfg.cfg][0], y), "data": spread(D[0], y)}
    return (cfg, dict(zip(gammas, d[:-1].tolist())), float(d[-1]), ref["floor"], ref["teacher_to_data"], spreads)


def main(argv=None):
    own = {"runs": dict(nargs="*", help="directories of finished guided toy runs"),
           "--gammas": dict(default="1,1.5,2,3,4,5,6", help="the teacher's scales γ' to compare with")}
    args, rest = script_flags(__doc__, argv, own)
    if args.help or not args.runs:
        print(__doc__)
        return 0 if args.help else 2
    if rest:
        print(f"python -m toy.guidance_scan: error: unknown arguments {' '.join(rest)}; give run directories and --gammas.",
              file=sys.stderr)
        return 2
    try:
        gammas = gamma_list(args.gammas)
        cache = {}
        rows = [(run, *scan(run, gammas, cache)) for run in args.runs]
    except FreeFlowError as e:
        print(f"python -m toy.guidance_scan: error: {e}", file=sys.stderr)
        return 2
    head = " | ".join(f"γ' = {g:g}" for g in gammas)
    print(f"W2 from the one-step samples (at the run's γ) to the teacher's at γ' and to the training data (the same "
          f"labels); floor: teacher against teacher at the run's γ; spread: the within-class spread of the one-step samples "
          f"over the teacher's at γ\n\n| run | γ | {head} | closest γ' | data | floor | spread |"
          f"\n|---|---|" + "---|" * (len(gammas) + 4))
    teachers = {}
    for run, cfg, to, data, floor, teacher_to_data, spreads in rows:
        best = min(to, key=to.get)
        cells = " | ".join(f"**{to[g]:.3f}**" if g == best else f"{to[g]:.3f}" for g in gammas)
        print(f"| {run} | {cfg.cfg:g} | {cells} | {best:g} | {data:.3f} | {floor:.3f} | "
              f"{spreads['student'] / spreads['teacher']:.2f} |")
        teachers.setdefault(cfg.toy_teacher, (teacher_to_data, spreads))
    for path, (to_data, spreads) in teachers.items():
        print(f"\nthe teacher {path} at γ' to the training data: "
              + ", ".join(f"{g:g}: {v:.3f}" for g, v in to_data.items())
              + f"; within-class spread: teacher {spreads['teacher']:.3f}, data {spreads['data']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
