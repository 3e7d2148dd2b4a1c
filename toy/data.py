"""The 2D data sets of the toy suite, and user files.

Every named data set comes from a pinned generator (NumPy's PCG64 seeded with `seed`) so a run is
reproducible, and every set, named or from a file, is standardised per coordinate to zero mean and
unit variance. Labels (0 .. K-1) where they are natural:

    moons         two interleaved half circles, noise 0.05            labels: the moon (2)
    8gaussians    8 Gaussians (std 0.1 of radius) on a circle          labels: the component (8)
    checkerboard  uniform on the dark squares of a 4 x 4 board         no labels
    spirals       two interleaved arms of an Archimedean spiral       labels: the arm (2)
    rings         4 concentric circles, radii 1..4, noise 0.08         labels: the ring (4)

A user file: `points.npy` holding an N x 2 array of finite numbers, or `points.npz` with the array
`points` (or a single unnamed array, `arr_0`) and optional integer `labels` of length N.
"""

import os
import zipfile

import numpy as np

from freeflow import TOY_NAMES, FreeFlowError

DATA_SIZE = 100_000  # points drawn from a named generator


def _moons(rng, n):
    y = rng.integers(0, 2, n)
    a = rng.uniform(0, np.pi, n)
    upper = np.stack([np.cos(a), np.sin(a)], 1)
    lower = np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1)
    x = np.where(y[:, None] == 0, upper, lower)
    return x + 0.05 * rng.standard_normal((n, 2)), y


def _eight_gaussians(rng, n):
    y = rng.integers(0, 8, n)
    angle = 2 * np.pi * y / 8
    centres = np.stack([np.cos(angle), np.sin(angle)], 1)
    return centres + 0.1 * rng.standard_normal((n, 2)), y


def _checkerboard(rng, n):
    # cells (i, j) of a 4 x 4 board with i + j even; uniform inside each
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    pick = cells[rng.integers(0, len(cells), n)]
    return pick + rng.uniform(0, 1, (n, 2)), None


def _spirals(rng, n):
    y = rng.integers(0, 2, n)
    r = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi  # uniform along the arm's area
    angle = r + np.pi * y
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1)
    return x + 0.3 * rng.standard_normal((n, 2)), y


def _rings(rng, n):
    y = rng.integers(0, 4, n)
    a = rng.uniform(0, 2 * np.pi, n)
    radius = (y + 1) + 0.08 * rng.standard_normal(n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1), y


GENERATORS = {"moons": _moons, "8gaussians": _eight_gaussians, "checkerboard": _checkerboard,
              "spirals": _spirals, "rings": _rings}
assert tuple(GENERATORS) == TOY_NAMES


def standardise(x):
    """Per coordinate: subtract the mean, divide by the standard deviation."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = x.mean(0), x.std(0)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise FreeFlowError("the points are too large to standardise (their mean or spread overflows a float64); "
                            "divide them by a constant first.")
    if np.any(std == 0):
        raise FreeFlowError("the points have no spread along one coordinate (all values equal); "
                            "they cannot be standardised.")
    return (x - mean) / std


def _read_user_file(path):
    """(points, labels or None) from a .npy or .npz file, or a FreeFlowError naming what is wrong."""
    if not os.path.isfile(path):
        raise FreeFlowError(f"no such file: {path}.")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise FreeFlowError(f"cannot read {path} as a NumPy .npy/.npz file ({e}).") from None
    names = [k for k in ("points", "arr_0") if k in arrays]
    if not names:
        raise FreeFlowError(f"{path} holds arrays {sorted(arrays)}; put the N x 2 points in an array named "
                            f"`points` (np.savez(path, points=..., labels=...)).")
    return arrays[names[0]], arrays.get("labels")


def _check_points(x, path):
    if x.dtype.kind not in "fiu":
        raise FreeFlowError(f"{path} holds {x.dtype} values; expected an N x 2 array of numbers.")
    if x.ndim != 2 or x.shape[1] != 2:
        raise FreeFlowError(f"{path} holds an array of shape {x.shape}; expected N x 2 points.")
    if len(x) < 10:
        raise FreeFlowError(f"{path} holds only {len(x)} points; give at least 10.")
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        rows = ", ".join(map(str, np.flatnonzero(bad)[:5]))
        raise FreeFlowError(f"{path} has {int(bad.sum())} rows with NaN or infinite values (rows {rows}"
                            f"{', ...' if bad.sum() > 5 else ''}); remove them.")


def _check_labels(labels, n, path):
    """Labels as integers 0 .. K-1 (any distinct integers are renumbered in sorted order)."""
    if labels.ndim != 1 or len(labels) != n:
        raise FreeFlowError(f"{path}: `labels` has shape {labels.shape}; expected one label per point ({n},).")
    if labels.dtype.kind not in "iub" and not (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
        raise FreeFlowError(f"{path}: `labels` must be integers (got {labels.dtype}).")
    classes, y = np.unique(labels, return_inverse=True)
    if len(classes) > 1000:
        raise FreeFlowError(f"{path}: `labels` has {len(classes)} distinct values; at most 1000 classes.")
    return y


def load_toy(name, seed=0):
    """(points float32 N x 2 standardised, labels int64 N or None, num_classes) for a name or a file."""
    if name in GENERATORS:
        x, y = GENERATORS[name](np.random.default_rng(seed), DATA_SIZE)
    elif name.endswith((".npy", ".npz")):
        x, y = _read_user_file(name)
        _check_points(x, name)
        y = None if y is None else _check_labels(y, len(x), name)
    else:
        raise FreeFlowError(f"unknown toy '{name}'; choose one of {', '.join(TOY_NAMES)}, digits, "
                            f"or give a path to an N x 2 .npy or .npz file.")
    x = standardise(x.astype(np.float64)).astype(np.float32)
    if y is None:
        return x, None, 0
    y = y.astype(np.int64)
    return x, y, int(y.max()) + 1


def toy_label(name):
    """A short name for a toy: the name itself, or a file's stem."""
    return os.path.splitext(os.path.basename(name))[0] if name.endswith((".npy", ".npz")) else name
