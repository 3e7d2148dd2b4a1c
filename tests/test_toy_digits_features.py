"""toy/digits_features.py: the digits' learned yardstick. The CNN is trained once per seed, the same on any
thread count, and cached; it reads held-out digits; its Fréchet distance is zero for the real digits
themselves, grows with how far a set is from them, and comes with ADM's precision and recall."""

import os
import shutil

import numpy as np
import pytest
import torch

from toy import digits_features
from toy.digits import load_digits


@pytest.fixture(scope="module")
def real():
    x, y, _ = load_digits()
    return x, y


@pytest.fixture(scope="module")
def features(real, tmp_path_factory):
    return digits_features.DigitsFeatures(str(tmp_path_factory.mktemp("cnn")), *real, seed=0)


def test_the_cnn_reads_held_out_digits_and_a_second_load_reads_its_cache(features, real, tmp_path, monkeypatch):
    assert features.held_out_accuracy > 0.95
    assert os.listdir(features.directory) == ["digits_cnn_s0.pt"]
    shutil.copy(os.path.join(features.directory, "digits_cnn_s0.pt"), tmp_path)
    monkeypatch.setattr(digits_features, "train_cnn", lambda *a: pytest.fail("the cached CNN was retrained"))
    again = digits_features.DigitsFeatures(str(tmp_path), *real, seed=0)
    assert np.array_equal(again.real, features.real) and again.held_out_accuracy == features.held_out_accuracy
    with pytest.raises(pytest.fail.Exception):  # another seed is another classifier, trained anew
        digits_features.DigitsFeatures(str(tmp_path), *real, seed=1)


def test_training_does_not_depend_on_the_thread_count(real):
    threads = torch.get_num_threads()
    x, y = real
    few = slice(0, 300)
    try:
        torch.set_num_threads(2)
        a = digits_features.train_cnn(x[few], y[few], seed=3)[0]
        torch.set_num_threads(1)
        b = digits_features.train_cnn(x[few], y[few], seed=3)[0]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_learned_distance_is_zero_for_the_real_digits_and_grows_with_corruption(features, real):
    x, y = real
    rng = np.random.default_rng(0)
    itself = features.score(x)
    assert itself["fd"] < 1e-6 and itself["precision"] == itself["recall"] == 1.0
    noisy = [features.score(np.clip(x + s * rng.standard_normal(x.shape), -1, 1).astype(np.float32))["fd"]
             for s in (0.1, 0.3, 1.0)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    threes = features.score(x[y == 3])  # every sample a 3: far from ten classes, and little of them recalled
    assert threes["fd"] > noisy[0] and threes["recall"] < 0.3 < threes["precision"]
