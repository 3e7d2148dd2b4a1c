"""One figure per toy run. 2D: data, teacher samples, one-step student samples, the student's flow map
f_θ(z, s) drawn over the teacher's ODE paths from the same noise z, and the training curves. Digits: real
digits, teacher and one-step student samples from the same noise per class, and the endpoint-error table."""

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from freeflow import atomic_write, flow_map, teacher_ode  # noqa: E402

PATH_TIMES = tuple(np.round(np.linspace(0, 1, 41)[1:-1], 6))


def _scatter(ax, pts, labels, title, lim):
    pts = np.asarray(pts)
    c = None if labels is None else np.asarray(labels)
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c=c, cmap="tab10" if c is not None else None,
               vmin=0, vmax=9, alpha=0.6, linewidths=0)
    ax.set(title=title, xlim=lim, ylim=lim, aspect="equal", xticks=[], yticks=[])


@torch.no_grad()
def plot_run(path, name, data, data_labels, arrays, student, teacher, cfg, metrics, history, steps, n_paths=40):
    """Write the figure to `path` (through a temporary file, then a rename)."""
    lim = (-3.2, 3.2)
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.8), layout="constrained")
    keep = np.random.default_rng(0).permutation(len(data))[:len(arrays["z"])]
    y = arrays["y"].cpu().numpy() if teacher.num_classes else None
    _scatter(axes[0], data[keep], None if data_labels is None else data_labels[keep], f"data: {name}", lim)
    _scatter(axes[1], arrays["teacher"].cpu(), y, f"teacher ODE ({metrics['teacher_nfe']} NFE)", lim)
    _scatter(axes[2], arrays["student"].cpu(), y,
             f"one-step student (1 NFE)\nW2 {metrics['w2']:.3f}, floor {metrics['w2_floor']:.3f}", lim)

    z, yy, g = arrays["z"][:n_paths], arrays["y"][:n_paths], arrays["gamma"][:n_paths]
    times = [1.0, *sorted(PATH_TIMES, reverse=True), 0.0]
    _, states, _ = teacher_ode(teacher, z, yy, g, cfg.guidance_interval, steps, "rk4", record=times[1:])
    teacher_path = np.stack([z.cpu().numpy()] + [states[t].cpu().numpy() for t in times[1:]], 0)
    student_path = np.stack([flow_map(student, z, torch.full((len(z),), t, device=z.device), yy, g).cpu()
                             for t in times], 0)
    ax = axes[3]
    for i in range(len(z)):
        ax.plot(teacher_path[:, i, 0], teacher_path[:, i, 1], color="0.75", lw=3, solid_capstyle="round")
        ax.plot(student_path[:, i, 0], student_path[:, i, 1], color="C3", lw=0.9)
    ax.scatter(teacher_path[-1, :, 0], teacher_path[-1, :, 1], s=12, color="0.3", zorder=3)
    ax.scatter(student_path[-1, :, 0], student_path[-1, :, 1], s=12, color="C3", marker="x", zorder=4)
    ax.set(title=f"f_θ(z, s), s: 1 → 0 (red) over the teacher's paths (grey)\n"
                 f"endpoint error {metrics['endpoint_error']:.3f}", xlim=lim, ylim=lim, aspect="equal",
           xticks=[], yticks=[])

    ax = axes[4]
    for key, label in (("delta_G", "mean |Δ_G|"), ("delta_N", "mean |Δ_N|"), ("loss_psi", "loss_ψ")):
        vals = [h[key] for h in history if key in h]
        if vals:
            ax.plot(np.arange(1, len(vals) + 1), vals, label=label, lw=0.8)
    ax.set(yscale="log", xlabel="step", title=f"training ({cfg.loss}, ∂_s F by {cfg.dsdt})")
    ax.legend(fontsize=8)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _mosaic(groups, per_row, gap=2):
    """Image groups side by side: groups[j][c] is class c's list of 8 x 8 images; NaN between groups."""
    rows = []
    for c in range(len(groups[0])):
        row = []
        for group in groups:
            cells = [np.pad(img, ((1, 1), (1, 1)), constant_values=-1) for img in group[c][:per_row]]
            row += cells + [np.full((10, 10 * gap // 2), np.nan)]
        rows.append(np.concatenate(row[:-1], axis=1))
    return np.concatenate(rows, axis=0)


def plot_digits(path, x_real, y_real, arrays, metrics, per_row=6):
    """The digits run: for each class a row of real digits, then at each scale the teacher's samples and
    the one-step student's from the same noise; beside it the endpoint-error table as a plot."""
    scales = list(metrics["scales"])
    pick = lambda key, g, c: arrays[key][(arrays["gamma"] == float(g)) & (arrays["labels"] == c)][:, 0]  # noqa: E731
    groups, titles = [[x_real[y_real == c][:, 0] for c in range(10)]], ["real digits"]
    for g in scales:
        groups += [[pick("teacher", g, c) for c in range(10)], [pick("student", g, c) for c in range(10)]]
        titles += [f"teacher ODE, γ = {g}", f"one-step student, γ = {g}"]
    fig = plt.figure(figsize=(4 + 2.4 * len(groups), 6.2), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[1.9 * len(groups), 4.5])
    ax = fig.add_subplot(grid[0])
    image = _mosaic(groups, per_row)
    cmap = plt.get_cmap("gray_r").with_extremes(bad="white")
    ax.imshow(np.clip(image, -1, 1), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    width = image.shape[1] / len(groups)
    for j, title in enumerate(titles):
        ax.text((j + 0.5) * width, -3, title, ha="center", va="bottom", fontsize=9)
    ax.set(xticks=[], yticks=[], frame_on=False)

    ax = fig.add_subplot(grid[1])
    for i, g in enumerate(scales):
        r = metrics["scales"][g]
        for solver, marker in (("euler", "o"), ("heun", "s")):
            rows = [v for k, v in r["teacher_solvers"].items() if k.startswith(solver)]
            ax.plot([v["evals"] for v in rows], [v["endpoint_rmse"] for v in rows], marker=marker, color=f"C{i}",
                    ls="-" if solver == "euler" else "--", label=f"teacher {solver.capitalize()}, γ = {g}")
        ax.scatter([1], [r["endpoint_rmse"]], marker="*", s=180, color=f"C{i}", edgecolor="k", zorder=5,
                   label=f"one-step student, γ = {g}")
        ax.axhline(r["endpoint_rmse"], color=f"C{i}", ls=":", lw=1)  # where the teacher's curves cross it
    ax.set(xscale="log", yscale="log", xlabel="teacher evaluations of v_γ (the student: 1 call)",
           ylabel="endpoint RMSE vs the teacher's ODE", title="how many teacher calls is one student call worth?")
    evals = sorted({v["evals"] for r in metrics["scales"].values() for k, v in r["teacher_solvers"].items()
                    if k.startswith("euler")})
    ax.set_xticks(evals, [str(e) for e in evals])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
