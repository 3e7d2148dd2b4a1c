"""Shared test fixtures: closed-form teachers whose flows are known exactly."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from toy.net import MLPVelocity  # noqa: E402


class GaussianTeacher(nn.Module):
    """Data x ~ N(mu, diag(sig²)), prior N(0, I). With x_t = (1 - t) x + t n the marginal at t is
    N((1 - t) mu, sig_t²), sig_t² = (1 - t)² sig² + t², and the velocity E[n - x | x_t] is linear:
        v(x, t) = -mu + (t - (1 - t) sig²) / sig_t² · (x - (1 - t) mu)
    Its flow from z at t = 1 is Phi(z, s) = (1 - s) mu + sig_s z. Student and g_ψ built from it are MLPs."""

    num_classes = 0

    def __init__(self, mu=(1.5, -0.5), sig=(0.5, 0.3), width=64, depth=2):
        super().__init__()
        self.register_buffer("mu", torch.tensor(mu))
        self.register_buffer("sig", torch.tensor(sig))
        self.width, self.depth = width, depth

    def forward(self, x, t, y):
        t = t.to(x.dtype)[:, None]
        sig_t2 = (1 - t) ** 2 * self.sig ** 2 + t ** 2
        return -self.mu + (t - (1 - t) * self.sig ** 2) / sig_t2 * (x - (1 - t) * self.mu)

    def flow(self, z, s):
        s = s.to(z.dtype)[:, None]
        return (1 - s) * self.mu + torch.sqrt((1 - s) ** 2 * self.sig ** 2 + s ** 2) * z

    def extended(self, names):
        return MLPVelocity(2, self.width, self.depth, 0, inputs=names).to(self.mu)


class ExactGaussianStudent(nn.Module):
    """F*(z, s) = (z - Phi(z, s)) / (1 - s) = z (1 - sig_s) / (1 - s) - mu, plus `eps · s · z` if asked."""

    num_classes = 0

    def __init__(self, teacher, eps=0.0):
        super().__init__()
        self.teacher, self.eps = teacher, eps

    def forward(self, x, t, y, s, gamma):
        s_ = s.to(x.dtype)[:, None]
        sig_s = torch.sqrt((1 - s_) ** 2 * self.teacher.sig ** 2 + s_ ** 2)
        return x * (1 - sig_s) / (1 - s_) - self.teacher.mu + self.eps * s_ * x


def assert_close_at_scale(actual, expected, rel, what="values"):
    """max |actual - expected| <= rel · max |expected|: a tolerance on the tensor's own scale. Floating-point
    rounding is relative to the magnitudes that flow through a computation, not to each element: an output
    element near 0 computed from values near 20 carries the rounding of 20, which an absolute tolerance chosen
    on one CPU (or a per-element relative one) does not allow for on another CPU."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    scale, diff = expected.abs().max().item(), (actual - expected).abs().max().item()
    assert diff <= rel * scale, f"{what}: max difference {diff:.3g} is more than {rel:g} of their scale {scale:.3g}"


class PixelInception(nn.Module):
    """A stand-in for fid.py's Inception in tests of code that scores images: the same features() contract (pool,
    spatial, logits) from the images' 4 x 4 average colours (48 numbers). A random Inception's features hardly
    depend on the image, and its 2048-d matrix root takes half a minute on a CPU; these depend on the image and
    their Fréchet distance is instant. fid.py's own tests check the real network."""

    def features(self, x):
        pool = torch.nn.functional.adaptive_avg_pool2d(x / 255, 4).flatten(1)
        return pool, pool[:, :40], torch.cat([pool, -pool], 1)

    def forward(self, x):
        return self.features(x)[0]


@pytest.fixture
def gaussian_teacher():
    return GaussianTeacher()


def tiny_mlp(num_classes=2, inputs=(), seed=0, width=16, depth=2, x_freqs=3):
    """A small MLP velocity field with every weight random (zero-initialised layers included), so a test
    on it can see a wrong formula."""
    torch.manual_seed(seed)
    net = MLPVelocity(2, width, depth, num_classes, inputs=inputs, x_freqs=x_freqs)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    return net


# A tiny digits run (toy/digits.py), watched (previews, snapshots, scores), shared by the tests of the digits
# run and of its scan: a SiT of width 16 and one block, a few steps, small evaluations.
DIGITS_TINY = ["--steps", "4", "--teacher-steps", "30", "--width", "16", "--depth", "1", "--batch-size", "16",
               "--teacher-batch", "32", "--eval-samples", "40", "--ckpt-every", "2", "--device", "cpu",
               "--scan-samples", "300"]
DIGITS_WATCH = ["--preview-every", "2", "--keep-every", "4", "--fid-every", "2", "--fid-samples", "300"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(output directory, stdout) of `python freeflow.py --toy digits` with DIGITS_TINY and DIGITS_WATCH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path_factory.mktemp("digits") / "run"
    result = subprocess.run([sys.executable, os.path.join(root, "freeflow.py"), "--toy", "digits", "--out", str(out),
                             *DIGITS_TINY, *DIGITS_WATCH], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out, result.stdout
