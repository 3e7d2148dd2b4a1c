"""A learned feature space for the digits, in Inception's part: a small CNN classifier of the real digits whose
penultimate features (128 numbers) give the digits' FID, and precision and recall, beside the pixel distance.

FID papers judge samples in the features of a network trained to recognise real images, not in pixels: two
sets of digits can be close in pixel statistics and far apart in what makes them digits (strokes, shapes).
This CNN plays that part for scikit-learn's 1797 8 x 8 digits:

    conv 3x3 (1 -> 32), ReLU, conv 3x3 (32 -> 64), ReLU, max-pool 2 (8 x 8 -> 4 x 4), conv 3x3 (64 -> 64), ReLU,
    flatten (1024), linear (1024 -> 128), ReLU  = the features,  linear (128 -> 10) = the class logits

trained by Adam (lr 3e-3, 15 epochs, batch 128) on the same seeded 75 % of the digits as the logistic-regression
classifier of toy/digits.py, its accuracy on the other 25 % reported. It is trained once per seed and cached
beside the digits teacher (`digits_cnn_s<seed>.pt`); the evaluations use seed 0 whatever the run's seed, so runs
of different seeds are measured with the same yardstick (seed 1 is the check of how much the yardstick itself
moves: docs/corrector.md)."""

import hashlib
import os

import numpy as np
import torch
import torch.nn as nn

import fid
from freeflow import FreeFlowError, atomic_save, check_cache_file

RECIPE = "cnn-v1: 32-64-pool-64-128, Adam 3e-3, 15 epochs, batch 128"
EPOCHS, BATCH, LR = 15, 128, 3e-3


class DigitsCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def split(n, seed):
    """The seeded 75 / 25 split of toy/digits.py's classifier: (train rows, held-out rows)."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * 0.75))
    return order[:cut], order[cut:]


def train_cnn(x, y, seed=0):
    """A DigitsCNN trained on the seeded 75 % of (x, y); returns (network, accuracy on the held-out 25 %).
    On one thread: the sums of a matrix product are ordered by the thread count, and a yardstick must not move
    with the number of cores of the run that first trained it (about 5 s on one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_cnn(x, y, seed)
    finally:
        torch.set_num_threads(threads)


def _train_cnn(x, y, seed):
    torch.manual_seed(seed)
    net = DigitsCNN(int(y.max()) + 1)
    train, held = split(len(x), seed)
    xt, yt = torch.from_numpy(x[train]), torch.from_numpy(y[train])
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        for rows in torch.randperm(len(xt), generator=g).split(BATCH):
            loss = nn.functional.cross_entropy(net(xt[rows]), yt[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (net(torch.from_numpy(x[held])).argmax(1).numpy() == y[held]).mean()
    return net, float(accuracy)


CACHE_KEYS = ("key", "state", "held_out_accuracy")


def cnn_path(directory, seed=0):
    return os.path.join(directory, f"digits_cnn_s{seed}.pt")


def check_cnn_cache(directory, seed=0):
    """Refuse, before any work, a classifier cache path this program may not write (a directory, a foreign file)."""
    check_cache_file(cnn_path(directory, seed), "the digits classifier's cache", CACHE_KEYS,
                     "a digits classifier cached by freeflow.py")


def load_or_train_cnn(directory, x, y, seed=0):
    """The cached classifier of this seed in `directory` if it was trained on these digits by this recipe;
    otherwise train it and cache it there (atomically). Returns (network, held-out accuracy)."""
    key = {"data": hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16], "seed": seed, "recipe": RECIPE}
    path = cnn_path(directory, seed)
    check_cnn_cache(directory, seed)
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache is retrained, never trusted
            saved = {}
        if saved.get("key") == key:
            net = DigitsCNN(int(y.max()) + 1)
            net.load_state_dict(saved["state"])
            return net.eval().requires_grad_(False), saved["held_out_accuracy"]
    net, accuracy = train_cnn(x, y, seed)
    try:
        os.makedirs(directory, exist_ok=True)
        atomic_save({"key": key, "state": net.state_dict(), "held_out_accuracy": accuracy}, path)
    except OSError as e:
        raise FreeFlowError(f"cannot cache the digits classifier at {path} ({e.strerror}).") from None
    return net, accuracy


class DigitsFeatures:
    """The digits' learned yardstick against the real digits: features(images) and, for a set of images, the
    Fréchet distance of their features to the real digits' and ADM's precision and recall."""

    def __init__(self, directory, x_real, y_real, seed=0):
        self.net, self.held_out_accuracy = load_or_train_cnn(directory, x_real, y_real, seed)
        self.directory, self.seed = directory, seed
        self.real = self.features(x_real)
        self.real_stats = fid.statistics(self.real)

    @torch.no_grad()
    def features(self, images):
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8)
        return np.concatenate([self.net.features(b).double().numpy() for b in x.split(1024)])

    def score(self, images):
        """{"fd": Fréchet distance in the features, "precision", "recall"} of the images against the real digits."""
        feats = self.features(images)
        precision, recall = fid.precision_recall(self.real, feats)
        return {"fd": fid.frechet_distance(*fid.statistics(feats), *self.real_stats),
                "precision": float(precision), "recall": float(recall)}
