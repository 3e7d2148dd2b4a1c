"""`python freeflow.py --toy NAME`: teacher (trained once, cached), FreeFlow distillation, evaluation
against the teacher's ODE, a figure, metrics.json and a short report."""

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np
import torch

from freeflow import FreeFlowError, distill, output_dir, pick_device, resolve_precision, watch, write_json
from toy.data import load_toy, toy_label
from toy.evaluate import evaluate
from toy.figure import plot_run
from toy.teacher import check_teacher_cache, load_or_train_teacher


def toy_teacher(cfg, progress=True):
    """The data, the device, the output directory and the (cached or newly trained) toy teacher of a
    run: (x, y, num_classes, device, out, teacher_path, teacher, teacher_info)."""
    for name in ("preview_every", "fid_every"):
        if getattr(cfg, name):
            raise FreeFlowError(f"--{name.replace('_', '-')} watches image runs (--toy digits, --teacher); a 2D toy "
                                f"draws its samples in figure.png at the end (drop --{name.replace('_', '-')}).")
    x, y, num_classes = load_toy(cfg.toy, cfg.seed)  # every input is checked before anything is written
    cfg.resolve(y is not None)
    device = pick_device(cfg.device)
    resolve_precision(cfg, device)
    if cfg.extra_blocks:
        raise FreeFlowError("--extra-blocks deepens a SiT student (--toy digits, --teacher); the 2D toy's MLP has no "
                            "such blocks (use --width or --depth, which size the teacher too).")
    if cfg.compile and cfg.dsdt in ("jvp", "jvp-fp32"):
        raise FreeFlowError("--compile cannot compile the 2D toy's forward-mode JVP (PyTorch has no forward derivative "
                            "for the compiled MLP's fused matrix products, addmm_out); add --dsdt fd, or drop --compile "
                            "(a 2D step takes milliseconds).")
    default = os.path.join("out", "toy", toy_label(cfg.toy))
    teacher_path = cfg.toy_teacher or os.path.join(cfg.out or default, "teacher.pt")
    out = output_dir(cfg, default, checks=[lambda: check_teacher_cache(teacher_path)])
    teacher, teacher_info = load_or_train_teacher(teacher_path, x, y, num_classes, cfg, device, progress)
    return x, y, num_classes, device, out, teacher_path, teacher, teacher_info


def run_toy(cfg, progress=True):
    start = time.perf_counter()
    x, y, num_classes, device, out, teacher_path, teacher, teacher_info = toy_teacher(cfg, progress)
    name = toy_label(cfg.toy)

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    student, history = distill(teacher, cfg, (2,), out, progress, watch(cfg, out, (2,), num_classes, device, None))
    train_seconds = time.perf_counter() - t0

    metrics, arrays = evaluate(student, teacher, cfg, num_classes, device)
    metrics |= {"toy": name, "steps": cfg.steps, "train_seconds": train_seconds,
                "teacher": {"path": teacher_path, **teacher_info}}
    figure = os.path.join(out, "figure.png")
    plot_run(figure, name, x, y, arrays, student, teacher, cfg, metrics, history,
             metrics["reference_solver"]["steps"])
    return finish_run(metrics, cfg, device, out, start, report)


def read_metrics(run, missing):
    """The metrics.json of a finished run (`run` its directory) as a dict; `missing` is the sentence for a run without
    one. A file cut off mid-write, or not a dict, is one sentence too."""
    path = os.path.join(run, "metrics.json")
    if not os.path.exists(path):
        raise FreeFlowError(missing)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FreeFlowError(f"{path} cannot be read as a run's metrics ({type(e).__name__}: the file is damaged or "
                            f"was cut off); run that run again.") from None
    if not isinstance(saved, dict):
        raise FreeFlowError(f"{path} holds no run's metrics (a JSON {type(saved).__name__}); run that run again.")
    return saved


def finish_run(metrics, cfg, device, out, start, report):
    """Complete a run's metrics (whole-run seconds, the config, the environment), write metrics.json and
    print the report: the last lines of every toy run, 2D or digits."""
    metrics["total_seconds"] = time.perf_counter() - start
    metrics["config"] = dataclasses.asdict(cfg)
    metrics["environment"] = {"torch": torch.__version__, "numpy": np.__version__, "device": str(device),
                              "threads": torch.get_num_threads(), "machine": platform.machine()}
    write_json(metrics, os.path.join(out, "metrics.json"))
    print(report(metrics, out))
    return metrics


def report(m, out):
    traj = ", ".join(f"s={s}: {e:.4f}" for s, e in m["trajectory_error"].items())
    return "\n".join([
        f"FreeFlow on '{m['toy']}' ({m['steps']} steps, {m['train_seconds']:.0f} s; "
        f"whole run {m['total_seconds']:.0f} s)",
        f"  W2 one-step vs teacher  {m['w2']:.4f}   floor (teacher vs teacher) {m['w2_floor']:.4f}   "
        f"ratio {m['w2_ratio']:.3f}   (means of {len(m['w2_pairs'])} pairs of independent sets)",
        f"  endpoint error          {m['endpoint_error']:.4f}   trajectory error {traj}",
        f"  teacher NFE {m['teacher_nfe']} -> student NFE 1: sampling {m['sampling_speedup']:.0f}x faster",
        f"  wrote {out}/metrics.json, {out}/figure.png, {out}/ckpt.pt, {out}/log.jsonl",
    ])


def script_flags(doc, argv, flags):
    """For the scripts built on a toy run (toy/w2_spread.py, bench/digits_*.py): their own flags, given as
    {"--name": argparse keywords}, and the rest of argv left for freeflow.py's parse_config. --help is a
    flag here, so the script can print its docstring. Returns (args, rest)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], add_help=False)
    for name, keywords in flags.items():
        parser.add_argument(name, **keywords)
    parser.add_argument("-h", "--help", action="store_true")
    return parser.parse_known_args(argv)
