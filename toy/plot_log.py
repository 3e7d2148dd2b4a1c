"""`python -m toy.plot_log out/DIR`: the curves of a run's log.jsonl as one PNG, for any run (toy, digits, ImageNet).

    python -m toy.plot_log out/toy/digits              # writes out/toy/digits/log.png
    python -m toy.plot_log out/repa256 --out curves.png

One panel per kind of number, against the step: the losses (loss, loss_P, loss_C, loss_psi), mean |Δ_G| and
|Δ_N|, λ, images/s, and every score --fid-every logged (FID, Inception Score, the digits' Fréchet distance to the
real digits), the best so far marked. Entries the training loop writes every --log-every steps and the scores
written every --fid-every steps share the file; each curve takes the entries that have its number."""

import argparse
import json
import os
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
    entries = [e for e in entries if isinstance(e, dict) and "step" in e]
    if not entries:
        raise LogError(f"{path} has no entries yet; the training loop writes one every --log-every steps.")
    return entries


def panels(entries):
    """[(title, [(key, steps, values)], is_score)]: the fixed panels, then one panel per score the log holds."""
    keys = {k for e in entries for k, v in e.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    fixed = {k for _, ks in PANELS for k in ks}
    scores = sorted(k for k in keys - fixed - NOT_CURVES if not k.startswith("best_"))
    out = []
    for title, ks in PANELS + [(k, (k,)) for k in scores]:
        curves = [(k, [e["step"] for e in entries if k in e], [e[k] for e in entries if k in e]) for k in ks]
        curves = [c for c in curves if c[1]]
        if curves:
            out.append((title, curves, title in scores))
    return out


def plot(entries, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freeflow import atomic_write
    found = panels(entries)
    fig, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.4), layout="constrained", squeeze=False)
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m toy.plot_log", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run's output directory (or its log.jsonl)")
    parser.add_argument("--out", default=None, help="the PNG to write (default: log.png beside the log)")
    args = parser.parse_args(argv)
    try:
        entries = read_log(args.run)
        out = args.out or os.path.join(args.run if os.path.isdir(args.run) else os.path.dirname(args.run) or ".",
                                       "log.png")
        plot(entries, out, args.run)
    except LogError as e:
        print(f"toy.plot_log: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"toy.plot_log: error: cannot write {out} ({e.strerror}).", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(entries)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
