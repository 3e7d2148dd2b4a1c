"""FID, Inception Score, sFID, precision and recall, computed the way the ADM evaluator computes them.

Every paper in the FreeFlow line reports FID-50K from the ADM evaluator (openai/guided-diffusion,
`evaluations/evaluator.py`), which runs TensorFlow's "inception-2015-12-05" graph. This file is that
evaluation in PyTorch, with every layer visible. The facts it follows are in
docs/fid.md; the places where PyTorch's defaults differ are marked "ADM:".

    python fid.py SAMPLES.npz REF.npz [--weights PATH] [--batch-size N] [--device D] [--json OUT]

Public API
----------
load_inception(path, device="cpu") -> FIDInception
    The FID Inception network in eval mode, loaded strictly from pytorch-fid's
    `pt_inception-2015-12-05-6726825d.pth`. `model(x)` takes float N x 3 x H x W images in [0, 255]
    at any size and returns the pool_3 features (N x 2048); `model.features(x)` returns
    (pool_3, spatial, logits): the sFID features (N x 2023) and the 1008 logits (no bias; ADM's IS).
tf1_resize(x, size=299)
    TensorFlow 1's legacy bilinear resize (no half-pixel centres, no antialias).
read_images(path, chunk) / image_header(path)
    The `arr_0` member of an ADM `.npz`, validated from its header, read `chunk` images at a time.
activations(model, path, batch_size, device) -> (pool, spatial, probs)
statistics(acts) -> (mu, sigma)                     float64, covariance with N - 1
frechet_distance(mu1, sigma1, mu2, sigma2) -> float  ADM's handling of a non-finite or complex root
inception_score(probs, split_size=5000) -> float
precision_recall(ref_feats, sample_feats, k=3) -> (precision, recall)
evaluate(samples, ref, weights, batch_size, device) -> dict of the five metrics

No weights ship with this file and nothing downloads them: pass the file with --weights, or set
FID_INCEPTION_WEIGHTS, or put it in the torch hub cache (`default_weights_path()`).
"""

import argparse
import json
import os
import sys
import warnings
import zipfile

import numpy as np
import scipy.linalg
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE)
SIZE = 299           # the graph's input resolution
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of Mixed_6d.branch1x1, 17 x 17 -> 2023 values
IS_SPLIT = 5000       # Inception Score: sequential splits of 5000 samples
PR_K = 3              # precision / recall: the k-th nearest neighbour, the point itself at index 0


class FIDError(ValueError):
    """Bad input to the evaluation; the command line prints its message as one sentence."""


# ----------------------------------------------------------------------------------------------------
# 1. The network: TF's inception-2015-12-05 as pytorch-fid names it (not torchvision's Inception-v3)
# ----------------------------------------------------------------------------------------------------
# Differences from torchvision: a 1008-way fc and no aux head; the average pools inside the Mixed
# blocks do not count padding; Mixed_7c pools its last branch with a max pool.

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    # ADM: TF's average pool ignores the padded zeros (count_include_pad=False)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):            # Mixed_5b, 5c, 5d: 35 x 35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):            # Mixed_6a: 35 x 35 -> 17 x 17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):            # Mixed_6b .. 6e: 17 x 17, factorised 7 x 7
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_3x3(x))], 1)


class InceptionD(nn.Module):            # Mixed_7a: 17 x 17 -> 8 x 8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):            # Mixed_7b, 7c: 8 x 8, expanded 3 x 3
    def __init__(self, c_in, max_pool):
        super().__init__()
        self.max_pool = max_pool            # ADM: Mixed_7c's pool branch is a max pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(pool)], 1)


def tf1_resize_matrix(n_in, n_out):
    """The (n_out x n_in) matrix of TF1's legacy bilinear resize along one axis.

    ADM: source coordinate = dst * (n_in / n_out) (no half-pixel centres), lo = floor, hi = min(lo + 1,
    n_in - 1), weights 1 - frac and frac. F.interpolate(align_corners=False) uses (dst + 0.5) * scale
    - 0.5 instead and moves FID noticeably."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m


def tf1_resize(x, size=SIZE):
    """Resize N x C x H x W to N x C x size x size as TF1's resize_bilinear does (two 1-D blends)."""
    mh = tf1_resize_matrix(x.shape[-2], size).to(x)
    mw = tf1_resize_matrix(x.shape[-1], size).to(x)
    return mh @ x @ mw.T               # rows blended by mh, columns by mw


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def features(self, x):
        """x: float N x 3 x H x W in [0, 255], any H, W. Returns (pool_3 N x 2048, spatial N x 2023,
        logits N x 1008)."""
        x = tf1_resize(x.float(), SIZE)
        x = (x - 128) / 128                                   # ADM: the graph's Sub and Mul
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        # sFID: the first 7 channels of Mixed_6d.branch1x1 (17 x 17), flattened in ADM's H, W, C order
        # (C, H, W order gives nonsense). A 1 x 1 conv recomputed here: cheaper than a hook, and visible.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean((2, 3))                                 # pool_3: 8 x 8 average, 2048
        logits = pool @ self.fc.weight.T                      # ADM: the Inception Score skips the bias
        return pool, spatial, logits

    def forward(self, x):
        return self.features(x)[0]


def load_inception(path, device="cpu"):
    """The FID Inception from pytorch-fid's weights file, loaded strictly, in eval mode.
    Only `num_batches_tracked` (which BatchNorm in eval mode never reads) may be missing or extra."""
    if not os.path.isfile(path):
        raise FIDError(f"Inception weights file {path!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FIDError(f"{path!r} is not a PyTorch weights file ({type(e).__name__}).") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FIDError(f"{path!r} does not hold a state dict of tensors; expected {WEIGHTS_FILE}.")
    model = FIDInception()
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise FIDError(f"{path!r} is not the FID Inception ({len(missing)} missing keys, e.g. "
                       f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
                       f"expected {WEIGHTS_FILE}.")
    for k, v in given.items():
        if v.shape != own[k].shape:
            raise FIDError(f"{path!r}: {k} has shape {tuple(v.shape)}, the FID Inception needs "
                           f"{tuple(own[k].shape)}; expected {WEIGHTS_FILE}.")
    model.load_state_dict(given, strict=False)   # strict above, bar num_batches_tracked
    return model.eval().requires_grad_(False).to(device)


def default_weights_path():
    """Where torch.hub (and so pytorch-fid) caches the weights file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def find_weights(flag=None):
    """--weights, else $FID_INCEPTION_WEIGHTS, else the torch hub cache; a clear error otherwise."""
    for path, origin in ((flag, "--weights"), (os.environ.get("FID_INCEPTION_WEIGHTS"), "FID_INCEPTION_WEIGHTS")):
        if path:
            if not os.path.isfile(path):
                raise FIDError(f"{origin} names {path!r}, which does not exist.")
            return path
    if os.path.isfile(default_weights_path()):
        return default_weights_path()
    raise FIDError(f"the FID Inception weights are needed: download {WEIGHTS_FILE} ({WEIGHTS_URL}) and "
                   f"pass it with --weights, set FID_INCEPTION_WEIGHTS, or put it at "
                   f"{default_weights_path()}.")


# ----------------------------------------------------------------------------------------------------
# 2. Reading an ADM batch (.npz with arr_0: uint8 N x H x W x 3) in chunks
# ----------------------------------------------------------------------------------------------------
# A 50k x 512^2 batch is ~39 GB: the .npy member is read straight from the zip, a chunk at a time.

def _open_member(path, name="arr_0"):
    if not path.endswith(".npz"):
        raise FIDError(f"{path!r} is not an .npz file; an image batch is an .npz with arr_0 (N x H x W x 3, "
                       f"uint8).")
    if not os.path.isfile(path):
        raise FIDError(f"{path!r} does not exist.")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise FIDError(f"{path!r} is not an .npz file (not a zip archive).") from None
    if name + ".npy" not in z.namelist():
        z.close()
        raise FIDError(f"{path!r} has no {name}; an image batch is an .npz with arr_0 (N x H x W x 3, uint8).")
    f = z.open(name + ".npy")
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except ValueError:
        f.close(), z.close()
        raise FIDError(f"{path!r}: {name} is not a valid .npy member.") from None
    return z, f, shape, fortran, dtype


def image_header(path):
    """(N, H, W) of the batch in `path`, after checking dtype and layout from the header alone."""
    z, f, shape, fortran, dtype = _open_member(path)
    f.close(), z.close()
    if dtype != np.uint8:
        raise FIDError(f"{path!r}: arr_0 has dtype {dtype}, it must be uint8 (images in 0..255).")
    if len(shape) != 4 or shape[3] != 3:
        hint = " (this looks channels-first)" if len(shape) == 4 and shape[1] == 3 else ""
        raise FIDError(f"{path!r}: arr_0 has shape {shape}, it must be N x H x W x 3{hint}.")
    if fortran:
        raise FIDError(f"{path!r}: arr_0 is stored in Fortran order; save it C-contiguous.")
    if shape[0] < 2:
        raise FIDError(f"{path!r} holds {shape[0]} image(s); the statistics need at least 2.")
    return shape[:3]


def read_images(path, chunk):
    """Yield uint8 arrays of at most `chunk` images from arr_0, in order, never the whole array."""
    n, h, w = image_header(path)
    z, f, *_ = _open_member(path)
    with z, f:
        per_image = h * w * 3
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            buf = f.read(m * per_image)
            if len(buf) != m * per_image:
                raise FIDError(f"{path!r}: arr_0 ends after {start + len(buf) // per_image} of {n} images "
                               f"(truncated file).")
            yield np.frombuffer(bytearray(buf), np.uint8).reshape(m, h, w, 3)   # writable, for torch


def stored_statistics(path):
    """ADM reference batches store mu, sigma (pool_3) and mu_s, sigma_s (spatial): use them if present."""
    with np.load(path) as z:
        if all(k in z.files for k in ("mu", "sigma", "mu_s", "sigma_s")):
            return ((z["mu"].astype(np.float64), z["sigma"].astype(np.float64)),
                    (z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64)))
    return None


# ----------------------------------------------------------------------------------------------------
# 3. Activations
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def activations(model, path, batch_size=50, device="cpu", desc=None):
    """pool_3 (N x 2048), spatial (N x 2023) and softmax probabilities (N x 1008) of every image in
    `path`, as float32 NumPy arrays."""
    from tqdm import tqdm
    n = image_header(path)[0]
    pools, spatials, probs = [], [], []
    with tqdm(total=n, desc=desc or os.path.basename(path), unit="img", disable=None) as bar:
        for batch in read_images(path, batch_size):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
            pool, spatial, logits = model.features(x)
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
            probs.append(logits.softmax(-1).cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(pools), np.concatenate(spatials), np.concatenate(probs)


# ----------------------------------------------------------------------------------------------------
# 4. Statistics and metrics
# ----------------------------------------------------------------------------------------------------

def statistics(acts):
    """Mean and covariance (N - 1 normalisation) in float64."""
    acts = np.asarray(acts, dtype=np.float64)
    return acts.mean(0), np.cov(acts, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

    ADM: when the matrix root is not finite, retry with eps * I added to both covariances; take the
    real part of a complex root unless its diagonal has an imaginary part above 1e-3 (then refuse)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                       f"sigma {sigma1.shape} vs {sigma2.shape}.")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular product of covariances; adding {eps} to the diagonals.")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"FID: the matrix root has an imaginary component of "
                           f"{np.max(np.abs(covmean.imag)):.3g}; the statistics are degenerate.")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, split_size=IS_SPLIT):
    """mean over sequential splits of exp(E_x KL(p(y|x) || p(y))); ADM reports the mean only."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        py = part.mean(0, keepdims=True)
        kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, py)   # p log p - p log p(y), 0 log 0 = 0
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances between rows, as ADM's DistanceBlock computes them (clamped at 0)."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)).clamp_min(0)


def manifold_radii(feats, k=PR_K, block=10000):
    """Squared distance of each point to its k-th nearest neighbour, the point itself at index 0."""
    radii = []
    for start in range(0, len(feats), block):
        d = _sq_dists(feats[start:start + block], feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(ref_feats, sample_feats, k=PR_K, block=10000):
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM computes them.

    precision: fraction of samples inside the reference manifold (some reference ball holds them);
    recall: fraction of reference points inside the sample manifold. Distances in float32 (ADM tries
    float16 first and falls back to float32; a point exactly on a ball's edge may count differently)."""
    r_ref, r_smp = manifold_radii(ref_feats, k, block), manifold_radii(sample_feats, k, block)
    ref_in = torch.zeros(len(ref_feats), dtype=torch.bool)
    smp_in = torch.zeros(len(sample_feats), dtype=torch.bool)
    for i in range(0, len(ref_feats), block):
        for j in range(0, len(sample_feats), block):
            d = _sq_dists(ref_feats[i:i + block], sample_feats[j:j + block])
            ref_in[i:i + block] |= (d <= r_smp[j:j + block][None]).any(1)
            smp_in[j:j + block] |= (d <= r_ref[i:i + block][:, None]).any(0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


# ----------------------------------------------------------------------------------------------------
# 5. The evaluation and its command line
# ----------------------------------------------------------------------------------------------------

def check_order(samples, ref):
    """ADM reference batches carry stored statistics and sample batches do not: refuse swapped files."""
    def has_stats(path):
        with zipfile.ZipFile(path) as z:
            return "mu.npy" in z.namelist()
    if has_stats(samples) and not has_stats(ref):
        raise FIDError(f"the files look swapped: {samples!r} carries reference statistics (mu, sigma) and "
                       f"{ref!r} does not; the order is SAMPLES.npz REF.npz.")


def evaluate(samples, ref, weights=None, batch_size=50, device="cpu"):
    """The ADM metrics of a sample batch against a reference batch: a dict with inception_score, fid,
    sfid, precision, recall and num_samples. `weights`: a path, or None to look where find_weights does."""
    n_samples, n_ref = image_header(samples)[0], image_header(ref)[0]
    check_order(samples, ref)
    model = load_inception(find_weights(weights), device)
    ref_pool, ref_spatial, _ = activations(model, ref, batch_size, device, desc="reference batch")
    stored = stored_statistics(ref)
    stats = stored or (statistics(ref_pool), statistics(ref_spatial))
    pool, spatial, probs = activations(model, samples, batch_size, device, desc="sample batch")
    # k-th neighbour radii need more than k points on each side; tiny batches get FID but no P/R
    precision, recall = (precision_recall(ref_pool, pool) if min(n_samples, n_ref) > PR_K else (None, None))
    return {"inception_score": inception_score(probs),
            "fid": frechet_distance(*statistics(pool), *stats[0]),
            "sfid": frechet_distance(*statistics(spatial), *stats[1]),
            "precision": precision, "recall": recall,
            "num_samples": int(n_samples), "num_reference": int(n_ref),
            "reference_statistics": "stored" if stored else "computed"}


def report(metrics):
    """The metrics in the ADM evaluator's format, and the sample count beside FID."""
    n = metrics["num_samples"]
    name = "FID-50K" if n == 50000 else f"FID ({n} samples)"
    pr = {k: (metrics[k] if metrics[k] is not None else f"n/a (needs more than {PR_K} images in each batch)")
          for k in ("precision", "recall")}
    return "\n".join([f"Inception Score: {metrics['inception_score']}",
                      f"FID: {metrics['fid']}   [{name}]",
                      f"sFID: {metrics['sfid']}",
                      f"Precision: {pr['precision']}",
                      f"Recall: {pr['recall']}"])


def write_json(metrics, path):
    """Write the metrics as JSON through a temporary file renamed into place: never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise FIDError(f"cannot write --json {path} ({e.strerror}).") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="fid.py", description="FID, sFID, Inception Score, precision and recall of an image batch "
        "against an ADM reference batch, computed as the ADM evaluator (TensorFlow) computes them.",
        epilog=f"Weights: --weights, else $FID_INCEPTION_WEIGHTS, else {default_weights_path()}. "
               f"The file is pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_URL}).")
    p.add_argument("samples", help="sample batch: .npz with arr_0, uint8 N x H x W x 3")
    p.add_argument("ref", help="reference batch: .npz with arr_0 and (optionally) stored mu, sigma, mu_s, sigma_s,"
                               " e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--weights", default=None, help=f"path to {WEIGHTS_FILE}")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception forward (default 50)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.batch_size < 1:
            raise FIDError(f"--batch-size must be a positive integer, got {args.batch_size}.")
        if args.json:  # checked before the evaluation, which can take an hour
            folder = os.path.dirname(os.path.abspath(args.json))
            if not os.path.isdir(folder):
                raise FIDError(f"--json {args.json}: its folder does not exist; create it or give another path.")
            why = "it is a directory" if os.path.isdir(args.json) else \
                None if os.access(folder, os.W_OK | os.X_OK) else "its folder is read-only"
            if why:
                raise FIDError(f"--json {args.json} cannot be written ({why}); give another path.")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            torch.device(device)
        except RuntimeError:
            raise FIDError(f"--device {device} is not a device PyTorch knows; use cpu, cuda or cuda:N.") from None
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise FIDError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu.")
            torch.backends.cuda.matmul.allow_tf32 = False   # ADM: full float32 (cuDNN defaults to TF32)
            torch.backends.cudnn.allow_tf32 = False
        metrics = evaluate(args.samples, args.ref, args.weights, args.batch_size, device)
        print("Computing evaluations...")
        print(report(metrics))
        if args.json:
            write_json(metrics, args.json)
            print(f"wrote {args.json}")
    except FIDError as e:
        print(f"fid.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
