"""`python -m toy.plot_log out/DIR`: the curves of a run's log.jsonl as one PNG, for any run (toy, digits, ImageNet).

    python -m toy.plot_log out/toy/digits              # writes out/toy/digits/log.png
    python -m toy.plot_log out/repa256 --out curves.png
    python -m toy.plot_log out/toy/digits --previews 6 # and below the curves, 6 of its preview grids

One panel per kind of number, against the step: the losses (loss, loss_P, loss_C, loss_psi), mean |Δ_G| and
|Δ_N|, λ, images/s, and every score --fid-every logged (FID, Inception Score, the digits' Fréchet distance to the
real digits), the best so far marked. Entries the training loop writes every --log-every steps and the scores
written every --fid-every steps share the file; each curve takes the entries that have its number. With
--previews N, a row of N of the run's preview grids (preview/step_XXXXXXX.png, --preview-every), evenly spaced
over the run, the last included."""

import json
import os
import re
import sys

PANELS = [("losses", ("loss", "loss_P", "loss_C", "loss_psi")), ("mean |Δ|", ("delta_G", "delta_N")),
          ("λ", ("lambda",)), ("images/s", ("images_per_s",))]
NOT_CURVES = {"step", "n_predictor", "n_corrector", "memory_gib", "best_step", "fid_samples"}


class LogError(Exception):
    """A log that cannot be plotted, in one sentence."""


def read_log(path):
    """The entries of a log.jsonl (path to the file, or to the run's directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    try:
        with open(path) as f:
            entries = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise LogError(f"there is no {path}; give a run's output directory (it holds log.jsonl).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LogError(f"{path} is not a FreeFlow log.jsonl ({type(e).__name__}).") from None
    entries = [e for e in entries if isinstance(e, dict) and is_number(e.get("step"))]
    if not entries:
        raise LogError(f"{path} has no entries yet; the training loop writes one every --log-every steps.")
    if not panels(entries):
        raise LogError(f"{path} has entries but no numbers to plot (no losses, |Δ|, λ, images/s or scores).")
    return entries


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def panels(entries):
    """[(title, [(key, steps, values)], is_score)]: the fixed panels, then one panel per score the log holds."""
    keys = {k for e in entries for k, v in e.items() if is_number(v)}
    fixed = {k for _, ks in PANELS for k in ks}
    scores = sorted(k for k in keys - fixed - NOT_CURVES if not k.startswith("best_"))
    out = []
    for title, ks in PANELS + [(k, (k,)) for k in scores]:
        curves = [(k, [e["step"] for e in entries if is_number(e.get(k))], [e[k] for e in entries if is_number(e.get(k))])
                  for k in ks]
        curves = [c for c in curves if c[1]]
        if curves:
            out.append((title, curves, title in scores))
    return out


def previews(run, n):
    """Up to n preview grids of a run, evenly spaced over its steps, the last included: [(step, path)]."""
    folder = os.path.join(run, "preview")
    found = sorted(f for f in os.listdir(folder) if re.fullmatch(r"step_\d{7}\.png", f)) if os.path.isdir(folder) else []
    if not found:
        raise LogError(f"--previews: {run} has no preview grids (train with --preview-every N).")
    k, last = min(n, len(found)), len(found) - 1
    pick = sorted({round(i * last / (k - 1)) for i in range(k)}) if k > 1 else [last]
    return [(int(found[i][5:12]), os.path.join(folder, found[i])) for i in pick]


def plot(entries, path, title, grids=()):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    from freeflow import atomic_write
    found = panels(entries)
    width = max(4.2 * len(found), 2.6 * len(grids))
    fig = plt.figure(figsize=(width, 3.4 + (2.9 if grids else 0)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.4, 2.9]) if grids else (fig, None)
    axes = top.subplots(1, len(found), squeeze=False)
    for ax, (step, grid) in zip(bottom.subplots(1, len(grids), squeeze=False)[0] if grids else [], grids):
        ax.imshow(matplotlib.image.imread(grid))
        ax.set(title=f"step {step}", xticks=[], yticks=[])
    for ax, (name, curves, is_score) in zip(axes[0], found):
        for key, steps, values in curves:
            ax.plot(steps, values, label=key, lw=1.2, marker="o" if len(steps) < 30 else None, ms=3)
            if is_score:  # the best so far: the lowest, but the highest Inception Score
                pick = max if key == "inception_score" else min
                best = pick(range(len(values)), key=values.__getitem__)
                ax.annotate(f"best {values[best]:.4g}\nstep {steps[best]}", (steps[best], values[best]),
                            textcoords="offset points", xytext=(5, 8), fontsize=8)
        ax.set(title=name, xlabel="step")
        if len(curves) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def parse_args(argv=None):
    from freeflow import OneLineParser
    parser = OneLineParser(prog="python -m toy.plot_log", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run's output directory (or its log.jsonl)")
    parser.add_argument("--out", default=None, help="the PNG to write (default: log.png beside the log)")
    parser.add_argument("--previews", type=int, default=0, metavar="N",
                        help="also show N of the run's preview grids, evenly spaced over the run")
    args = parser.parse_args(argv)
    if args.previews < 0:
        parser.error(f"--previews must be an integer >= 0 (got {args.previews})")
    return args


def main(argv=None):
    args = parse_args(argv)
    run = args.run if os.path.isdir(args.run) else os.path.dirname(args.run) or "."
    out = args.out or os.path.join(run, "log.png")
    try:
        entries = read_log(args.run)
        plot(entries, out, args.run, previews(run, args.previews) if args.previews else ())
    except LogError as e:
        print(f"python -m toy.plot_log: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"python -m toy.plot_log: error: cannot write {out} ({e.strerror}).", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
