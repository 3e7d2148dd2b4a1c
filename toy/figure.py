"""One figure per toy run: data, teacher samples, one-step student samples, the student's flow map
f_θ(z, s) drawn over the teacher's ODE paths from the same noise z, and the training curves."""

import matplotlib

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
