"""The toy teacher: a velocity field trained by flow matching on the toy's data (an MLP on the 2D sets, a
small SiT on the digits), in the project's convention (t = 1 noise), with labels dropped to the null
class ∅ so that classifier-free guidance works. It is trained once and cached; a later run with the same
data and settings reuses it. The cache holds the EMA weights under "ema" and the network's config under
"net", so a SiT teacher's file also loads with sit.load_teacher."""

import copy
import hashlib
import math
import os
import time

import torch
from tqdm import tqdm

from freeflow import FreeFlowError, atomic_save, check_cache_file, ema_update, flow_matching_loss
from toy.net import MLPVelocity

TEACHER_SETTINGS = ("width", "depth", "x_freqs", "teacher_steps", "teacher_batch", "teacher_lr", "label_dropout")


def teacher_seed(cfg):
    """The seed the toy teacher is trained with: --teacher-seed, or --seed when it is not given."""
    return cfg.seed if cfg.teacher_seed is None else cfg.teacher_seed


def cache_key(x, y, cfg):
    """What the cached teacher depends on: the data (a hash) and the teacher's settings (its seed under "seed")."""
    digest = hashlib.sha256(x.tobytes() + (b"" if y is None else y.tobytes())).hexdigest()[:16]
    return {"data": digest, **{name: getattr(cfg, name) for name in TEACHER_SETTINGS}, "seed": teacher_seed(cfg)}


def mlp_teacher(x, num_classes, cfg):
    """The 2D toy's teacher network, untrained."""
    return MLPVelocity(x.shape[1], cfg.width, cfg.depth, num_classes, x_freqs=cfg.x_freqs)


def train_teacher(x, y, num_classes, cfg, device, progress=True, build=mlp_teacher):
    """Flow matching: x_t = (1 - t) x + t n with t ~ U[0, 1], regress v(x_t, t, c) onto n - x.
    Adam with a cosine learning-rate decay; returns the EMA (decay 0.999, with warm-up) of the weights
    of the network build(x, num_classes, cfg)."""
    torch.manual_seed(teacher_seed(cfg))
    net = build(x, num_classes, cfg).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.teacher_lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / cfg.teacher_steps)))
    data = torch.from_numpy(x).to(device)
    labels = torch.from_numpy(y).to(device) if y is not None else torch.zeros(len(x), dtype=torch.long, device=device)
    bar = tqdm(range(cfg.teacher_steps), desc="teacher", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(data), (cfg.teacher_batch,), device=device)
        xb, yb = data[idx], labels[idx]
        drop = torch.rand(len(yb), device=device) < cfg.label_dropout
        yb = torch.where(drop, torch.full_like(yb, num_classes), yb)  # c → ∅ with p = label_dropout
        t = torch.rand(len(xb), device=device)
        loss, _ = flow_matching_loss(net, xb, yb, t, torch.randn_like(xb))
        loss = loss.mean()
        if not math.isfinite(loss.item()):
            raise FreeFlowError(f"the toy teacher's loss became non-finite at step {step}; "
                                f"try a lower --teacher-lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, net, 0.999, step)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return ema.eval()


CACHE_KEYS = ("key", "ema", "net", "train_seconds")  # what a cached teacher holds (load_or_train_teacher)


def check_teacher_cache(path):
    """Refuse a --toy-teacher path the cache may not write: a directory, a file that is not a cached toy teacher (a
    user's checkpoint is never overwritten), or a folder this user cannot write."""
    check_cache_file(path, "--toy-teacher", CACHE_KEYS, "a toy teacher cached by freeflow.py")


def load_or_train_teacher(path, x, y, num_classes, cfg, device, progress=True, build=mlp_teacher):
    """The cached teacher at `path` if it was trained on this data with these settings; otherwise
    train one (the network build(x, num_classes, cfg)) and cache it there (atomically).
    Returns (teacher, info dict)."""
    key = cache_key(x, y, cfg)
    check_teacher_cache(path)
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable cache is retrained, never trusted
            saved = {}
        if saved.get("key") == key and "ema" in saved:  # same data and settings: the same architecture
            net = build(x, num_classes, cfg)
            net.load_state_dict(saved["ema"])
            return net.to(device).eval(), {"cached": True, "train_seconds": saved["train_seconds"]}
        print(f"[teacher] {path} was trained on other data or settings; training a new one.")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # checked above: it can be made and written
    start = time.perf_counter()
    net = train_teacher(x, y, num_classes, cfg, device, progress, build)
    seconds = time.perf_counter() - start
    atomic_save({"key": key, "ema": net.state_dict(), "net": net.config(), "train_seconds": seconds}, path)
    return net, {"cached": False, "train_seconds": seconds}
