"""Best-of-N noise search on the digits: does screening noise with the one-step student beat spending the
same network calls on the teacher alone?

    python bench/digits_best_of.py [--run out/toy/digits] [--steps 8] [--samples 1000] [--markdown FILE]

Takes the teacher and the student of `python freeflow.py --toy digits` (<run>/teacher.pt, <run>/ckpt.pt) and,
for --samples wanted labels (spread evenly over the classes) at γ = 1 and γ = the run's --cfg, compares at
(about) equal total network calls per sample (NFE; a guided evaluation is two calls):

- best-of-N, N in 1, 4, 16: N noises previewed by the one-step student (1 call each), scored by the digits
  verifier (the log-probability of the wanted class under the run's logistic regression), the best noise
  given to the teacher's Euler sampler with --steps steps (freeflow.best_of_n);
- the same with the previews made by the teacher's own 1-step Euler sample (1 call each, as the student's);
- random noise + the teacher's Euler with --steps steps (no search);
- the teacher alone with more Euler steps: the fewest whose NFE reaches best-of-N's.

Each row is judged by a classifier the search never saw (5-nearest neighbours on all 1797 real digits), by
the verifier itself (which the search optimises: not a fair judge, shown to see how far it moves), and by
the Fréchet distance of the pixels to the real digits.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
import sit  # noqa: E402
from freeflow import FreeFlowError, best_of_n, sample_ode, sample_one_step  # noqa: E402
from toy.digits import SHAPE, accuracy, classifier_verifier, fit_classifier, frechet_to, load_digits  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=os.path.join("out", "toy", "digits"), help="a digits run's output directory")
    p.add_argument("--steps", type=int, default=8, help="the teacher's Euler steps after the search")
    p.add_argument("--best-of", type=int, nargs="+", default=[1, 4, 16], help="the N to compare")
    p.add_argument("--samples", type=int, default=1000, help="wanted samples (labels spread over the classes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args(argv)
    try:
        if min(args.steps, args.samples, *args.best_of) < 1:
            raise FreeFlowError("--steps, --samples and every --best-of must be positive integers.")
        paths = [os.path.join(args.run, name) for name in ("teacher.pt", "ckpt.pt", "metrics.json")]
        for path in paths:
            if not os.path.isfile(path):
                raise FreeFlowError(f"{path} does not exist: run `python freeflow.py --toy digits --out {args.run}` "
                                    f"first, or give --run DIR.")
        teacher, student = (sit.load_teacher(path, resolution=None) for path in paths[:2])
        with open(paths[2]) as f:
            config = json.load(f)["config"]
    except (FreeFlowError, sit.CheckpointError) as e:
        print(f"digits_best_of: error: {e}", file=sys.stderr)
        return 2
    interval = tuple(config["guidance_interval"])
    x_real, y_real, _ = load_digits()
    flat = x_real.reshape(len(x_real), -1)
    clf, _ = fit_classifier(x_real, y_real, config["seed"])  # the run's classifier: the verifier
    verify = classifier_verifier(clf)
    from sklearn.neighbors import KNeighborsClassifier
    judge = KNeighborsClassifier(5).fit(flat, y_real)  # a classifier the search never saw
    real_stats = fid.statistics(flat)
    y = torch.arange(args.samples) % 10

    lines = [f"Best-of-N on digits: {args.samples} samples, teacher Euler {args.steps} steps after the search; "
             f"{args.run}; {time.strftime('%Y-%m-%d')}", ""]
    for g in sorted({1.0, float(config["cfg"])}):
        def euler(steps):
            return lambda z, y_: sample_ode(teacher, z, y_, steps, g, interval)

        def preview(z, y_):
            return sample_one_step(student, z, y_, torch.full((len(z),), g)), 1

        def nfe_of(steps):
            return sample_ode(teacher, torch.zeros(1, *SHAPE), y[:1], steps, g, interval)[1]

        z = torch.randn((args.samples, *SHAPE), generator=torch.Generator().manual_seed(args.seed))
        x, nfe = euler(args.steps)(z, y)
        rows = [("random noise + teacher", "", nfe, x)]
        for n in args.best_of:
            gen = lambda: torch.Generator().manual_seed(args.seed + 1)  # noqa: E731 - the same candidates for both screens
            x, _, nfe = best_of_n(preview, verify, euler(args.steps), y, n, SHAPE, gen())
            rows.append((f"best of {n}, screened by the one-step student", n, nfe, x))
            x, _, nfe = best_of_n(euler(1), verify, euler(args.steps), y, n, SHAPE, gen())
            rows.append((f"best of {n}, screened by the teacher's 1-step Euler", n, nfe, x))
            steps = args.steps
            while nfe_of(steps) < nfe:
                steps += 1
            x, nfe_t = euler(steps)(z, y)
            rows.append((f"teacher alone, Euler {steps} steps", "", nfe_t, x))
        lines += [f"γ = {g:g}", "", "| sampling | N | NFE | accuracy, 5-NN judge | accuracy, the verifier | "
                  "mean log p(class), verifier | Fréchet to real digits |", "|---|---|---|---|---|---|---|"]
        seen = set()
        for name, n, nfe, x in rows:
            if name in seen:  # "teacher alone" at a given step count appears once
                continue
            seen.add(name)
            images = x.reshape(len(x), -1).numpy()
            lines.append(f"| {name} | {n} | {nfe} | {100 * float((judge.predict(images) == y.numpy()).mean()):.1f} % | "
                         f"{100 * accuracy(clf, images, y.numpy()):.1f} % | {verify(x, y).mean().item():.3f} | "
                         f"{frechet_to(images, real_stats):.3f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
