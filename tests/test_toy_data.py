"""toy/data.py: the named 2D data sets and user files, and every way a user file can be wrong."""

import numpy as np
import pytest
from conftest import assert_close_at_scale

from freeflow import TOY_NAMES, FreeFlowError
from toy.data import load_toy, toy_label

CLASSES = {"moons": 2, "8gaussians": 8, "checkerboard": 0, "spirals": 2, "rings": 4}


@pytest.mark.parametrize("name", TOY_NAMES)
def test_named_toys_are_standardised_pinned_and_labelled(name):
    x, y, k = load_toy(name)
    assert x.shape == (100_000, 2) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
    assert k == CLASSES[name]
    assert (y is None) == (k == 0)
    if k:
        assert set(np.unique(y)) == set(range(k))
    np.testing.assert_array_equal(load_toy(name)[0], x)  # same seed, same points
    assert not np.array_equal(load_toy(name, seed=1)[0], x)


def test_npy_file_is_read_and_standardised(tmp_path):
    pts = np.random.default_rng(0).normal([3, -2], [2, 0.5], (500, 2))
    path = str(tmp_path / "pts.npy")
    np.save(path, pts)
    x, y, k = load_toy(path)
    assert (y, k) == (None, 0)
    # stored as float32: half a unit in the last place of the values (up to about 4), 6e-8 of their scale
    assert_close_at_scale(x, (pts - pts.mean(0)) / pts.std(0), 1e-6, "standardised points")
    assert toy_label(path) == "pts"


def test_npz_labels_are_renumbered_from_zero(tmp_path):
    pts = np.random.default_rng(0).normal(size=(300, 2))
    labels = np.repeat([7, 3, 11], 100)
    path = str(tmp_path / "pts.npz")
    np.savez(path, points=pts, labels=labels)
    _, y, k = load_toy(path)
    assert k == 3
    np.testing.assert_array_equal(y, np.repeat([1, 0, 2], 100))


def test_npz_with_one_unnamed_array_is_accepted(tmp_path):
    path = str(tmp_path / "pts.npz")
    np.savez(path, np.random.default_rng(0).normal(size=(50, 2)))
    assert load_toy(path)[0].shape == (50, 2)


def _write(tmp_path, name, writer):
    path = str(tmp_path / name)
    writer(path)
    return path


BAD = {
    "unknown name": (lambda p: "swirl", "unknown toy 'swirl'; choose one of moons, 8gaussians"),
    "missing file": (lambda p: str(p / "nope.npy"), "no such file"),
    "not numpy": (lambda p: _write(p, "junk.npy", lambda f: open(f, "w").write("hello")), "cannot read"),
    "pickled objects": (lambda p: _write(p, "obj.npy", lambda f: np.save(f, np.array([{}, {}]), allow_pickle=True)),
                        "cannot read"),
    "three columns": (lambda p: _write(p, "c3.npy", lambda f: np.save(f, np.zeros((20, 3)))),
                      r"shape \(20, 3\); expected N x 2"),
    "strings": (lambda p: _write(p, "s.npy", lambda f: np.save(f, np.array([["a", "b"]] * 20))), "holds <U1 values"),
    "nan": (lambda p: _write(p, "nan.npy", lambda f: np.save(f, np.where(np.arange(40).reshape(20, 2) == 7, np.nan, 1.0)
                                                              + np.arange(40).reshape(20, 2))),
            r"1 rows with NaN or infinite values \(rows 3\)"),
    "inf": (lambda p: _write(p, "inf.npy", lambda f: np.save(f, np.vstack([np.ones((19, 2)), [[np.inf, 0]]]))),
            "NaN or infinite"),
    "too few": (lambda p: _write(p, "few.npy", lambda f: np.save(f, np.random.rand(5, 2))), "only 5 points"),
    "no spread": (lambda p: _write(p, "flat.npy", lambda f: np.save(f, np.c_[np.random.rand(20), np.ones(20)])),
                  "no spread"),
    "npz without points": (lambda p: _write(p, "np.npz", lambda f: np.savez(f, xy=np.zeros((20, 2)))),
                           r"holds arrays \['xy'\]; put the N x 2 points in an array named `points`"),
    "labels wrong length": (lambda p: _write(p, "l.npz", lambda f: np.savez(f, points=np.random.rand(20, 2),
                                                                             labels=np.zeros(19, int))),
                            r"`labels` has shape \(19,\)"),
    "labels not integers": (lambda p: _write(p, "lf.npz", lambda f: np.savez(f, points=np.random.rand(20, 2),
                                                                              labels=np.full(20, 0.5))),
                            "`labels` must be integers"),
    "wrong extension": (lambda p: _write(p, "pts.csv", lambda f: open(f, "w").write("1,2\n")), "unknown toy"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_user_data_is_refused_with_one_sentence(tmp_path, case):
    make, message = BAD[case]
    with pytest.raises(FreeFlowError, match=message) as err:
        load_toy(make(tmp_path))
    assert "\n" not in str(err.value)
