"""sit.py: the SiT teacher (Scalable Interpolant Transformer) and its checkpoint loader.

Plain torch.nn, so every layer is on this page. Parameter names and shapes follow the public SiT and
REPA code exactly, so their released checkpoints load unchanged (what the checkpoints hold: docs/sit.md):

    model = load_teacher("last.pt", resolution=256)   # REPA's SiT-XL/2, or SiT-XL-2-256x256.pt
    model = load_teacher("ckpt.pt", resolution=None)  # any size read off the file (a FreeFlow student)
    v = model(x, t, y)                                  # velocity, t = 1 noise, t = 0 data

Conventions are the project's (REPA's): x_t = (1 - t) x + t n and v ≈ E[n - x | x_t]. An original SiT
checkpoint (t = 1 data, 8 output channels) is converted on load: its 4 velocity channels are kept and
the time is flipped, v(x, t) = -net(x, 1 - t).

FreeFlow's student and auxiliary network are SiTs with extra scalar inputs (the target time s, the
guidance scale γ): `SiT(..., inputs=("s", "gamma"))` or `teacher.extended(["s", "gamma"])`. Each is
embedded like t and added to the conditioning vector, through a last layer initialised to zero, so a
student built from a teacher computes exactly the teacher's output until it is trained.

Attention uses F.scaled_dot_product_attention. Forward-mode AD (the predictor's JVP) needs the plain
math path: run under `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)` (freeflow.jvp does),
or set `model.fused_attention = False`, which computes softmax(q kᵀ / √d) v by hand.
"""

import argparse
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (depth, hidden size, heads); every released model uses patch 2 and MLP ratio 4
CONFIGS = {"S/2": (12, 384, 6), "B/2": (12, 768, 12), "L/2": (24, 1024, 16), "XL/2": (28, 1152, 16),
           "T/2": (2, 64, 4)}  # T/2: not a released model; a tiny SiT for tests and CPU runs
HEADS_FOR_WIDTH = {hidden: heads for _, hidden, heads in CONFIGS.values()}  # heads are not in the shapes
NUM_CLASSES = 1000  # ImageNet; the null class ∅ is index 1000


class CheckpointError(ValueError):
    """A teacher file that cannot be used; the message is one sentence that says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------


def timestep_embedding(t, dim=256, max_period=10000.0):
    """[cos(t · f_k), sin(t · f_k)], f_k = exp(-ln(max_period) k / (dim / 2)): cos first, t the raw
    float in [0, 1] (not × 1000). float32, or float64 when t is float64."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimestepEmbedder(nn.Module):
    """A scalar per example -> hidden: the sinusoidal features, Linear, SiLU, Linear (keys mlp.0, mlp.2).
    zero_init: the last Linear starts at zero (FreeFlow's extra inputs s and γ)."""

    def __init__(self, hidden, freq_dim=256, zero_init=False):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if zero_init:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> hidden; row num_classes is the null class ∅. No label dropout here: whoever wants
    the unconditional velocity passes ∅ explicitly (REPA drops labels only in training mode)."""

    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, hidden): a conv with kernel = stride = patch, tokens in row-major order."""

    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed(hidden, grid):
    """MAE's fixed 2-D table (1, grid², hidden): the first half encodes the column, the second the row,
    each half [sin, cos] at frequencies 1 / 10000^(k / (hidden / 4)). Checkpoints store their own."""
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def one_d(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()[None]


# ---------------------------------------------------------------------------------------------------
# Transformer
# ---------------------------------------------------------------------------------------------------


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)  # rows [q, k, v], each head-major
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, fused=True):
        n, tokens, hidden = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        if fused:
            out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-1/2
        else:  # the plain math path, differentiable in every mode
            out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, tokens, hidden))


class Mlp(nn.Module):
    def __init__(self, hidden, ratio):
        super().__init__()
        self.fc1 = nn.Linear(hidden, int(hidden * ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden * ratio), hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """adaLN-Zero block: six chunks (shift, scale, gate) for attention, then for the MLP."""

    def __init__(self, hidden, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c, fused=True):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), fused)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """SiT velocity network. forward(x, t, y, **inputs) -> v(x, t, y) in the project's convention.

    x: (N, C, H, W) latents, t: (N,) times, y: (N,) labels (num_classes = ∅), inputs: one (N,) tensor
    per extra input named in `inputs`. time_flip: the network was trained with t = 1 as data (original
    SiT); the forward then returns -net(x, 1 - t)."""

    def __init__(self, input_size=32, patch=2, in_channels=4, hidden=1152, depth=28, heads=16, mlp_ratio=4.0,
                 num_classes=NUM_CLASSES, inputs=(), time_flip=False):
        super().__init__()
        if hidden % heads or hidden % 4:
            raise ValueError(f"hidden size {hidden} must be divisible by 4 and by the head count {heads}")
        self.input_size, self.patch, self.in_channels, self.hidden = input_size, patch, in_channels, hidden
        self.depth, self.heads, self.mlp_ratio, self.num_classes = depth, heads, mlp_ratio, num_classes
        self.time_flip = time_flip
        self.fused_attention = True
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, input_size // patch))
        self.extra = nn.ModuleDict({name: TimestepEmbedder(hidden, zero_init=True) for name in inputs})
        self.blocks = nn.ModuleList(SiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, in_channels)

    @property
    def inputs(self):
        return tuple(self.extra.keys())

    def config(self):
        """Everything needed to rebuild this network (besides its weights)."""
        return {"input_size": self.input_size, "patch": self.patch, "in_channels": self.in_channels,
                "hidden": self.hidden, "depth": self.depth, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "num_classes": self.num_classes, "inputs": list(self.inputs), "time_flip": self.time_flip}

    def extended(self, names, extra_blocks=0):
        """A copy with new zero-initialised embeddings for `names` (e.g. "s", "gamma"): same outputs. With
        extra_blocks, that many more blocks after the last, each the identity at first (its adaLN gates at zero):
        a deeper network that still computes exactly what this one does."""
        new = SiT(**{**self.config(), "inputs": [*self.inputs, *(n for n in names if n not in self.extra)],
                     "depth": self.depth + extra_blocks})
        new.load_state_dict(self.state_dict(), strict=False)  # the new embeddings keep their zero init
        for block in new.blocks[self.depth:]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)  # shift, scale and gate all 0: x passes through
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        new.fused_attention = self.fused_attention
        return new.to(self.pos_embed)

    def unpatchify(self, x):
        """(N, T, p·p·C) -> (N, C, H, W); each token's vector is laid out (p_row, p_col, channel)."""
        n, tokens, _ = x.shape
        g, p, c = int(math.isqrt(tokens)), self.patch, self.in_channels
        return x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)

    def forward(self, x, t, y, **inputs):
        if set(inputs) != set(self.extra):
            raise TypeError(f"this network takes extra inputs {sorted(self.extra)}, got {sorted(inputs)}")
        if self.time_flip:
            t = 1 - t
        c = self.t_embedder(t) + self.y_embedder(y)  # the conditioning vector
        for name, embed in self.extra.items():
            c = c + embed(inputs[name])
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = block(h, c, self.fused_attention)
        out = self.unpatchify(self.final_layer(h, c))
        return -out if self.time_flip else out


def build(name="XL/2", resolution=256, **kwargs):
    """A named config (S/2, B/2, L/2, XL/2) for 256 or 512 px images (latents at 1/8 the size)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown SiT config {name!r}; choose one of {', '.join(CONFIGS)}")
    depth, hidden, heads = CONFIGS[name]
    return SiT(input_size=resolution // 8, patch=2, hidden=hidden, depth=depth, heads=heads, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Loading the public checkpoints
# ---------------------------------------------------------------------------------------------------


def _read(path):
    """(state dict, container): the weights, and the dict they came in (empty for a plain state dict)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no such teacher file: {path}")
    def load(mmap):
        # training checkpoints hold an argparse.Namespace ("args"): allow that class and nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)  # read lazily: a FreeFlow checkpoint also holds optimiser states
        except Exception:  # noqa: BLE001 - files in the legacy (pre-zip) format cannot be mapped
            obj = load(mmap=False)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}).") from None
    container = {}
    if isinstance(obj, dict):  # a training checkpoint: sample from the EMA weights
        for key in ("ema", "model"):
            if isinstance(obj.get(key), dict):
                container, obj = obj, obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected tensors, or a dict with 'ema' or 'model').")
    state = {}
    for key, value in obj.items():
        while key.startswith(("module.", "_orig_mod.")):  # DDP and torch.compile prefixes
            key = key.split(".", 1)[1]
        state[key] = value
    return state, container


def _shape(state, key, path):
    if key not in state:
        raise CheckpointError(f"{path} is not a SiT checkpoint: it has no '{key}'.")
    return tuple(state[key].shape)


def _names(keys, limit=3):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_teacher(path, resolution=256, num_heads=None):
    """An eval-mode SiT from a REPA or SiT checkpoint (plain state dict, or a dict with 'ema' / 'model').

    Depth, width, patch, input size, label count, extra inputs and output layout are read off the
    shapes. `resolution` (image pixels; latents are 1/8 of it) is checked against the input size;
    resolution=None takes the input size from the file as it is (a model of any size, e.g. the 8 x 8
    digits SiT). The head count comes from `num_heads`, else from the container's "net" entry (the
    network's config, which FreeFlow's checkpoints carry), else from the width (S, B, L, XL). REPA's
    projector head (`projectors.*`, used only in its training loss) is dropped; everything else loads
    strictly."""
    state, container = _read(path)
    state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    config = container.get("net") if isinstance(container.get("net"), dict) else {}
    hidden, in_channels, patch, _ = _shape(state, "x_embedder.proj.weight", path)
    tokens = _shape(state, "pos_embed", path)[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: pos_embed has {tokens} tokens, not a square grid; this fits no SiT.")
    if resolution is not None and grid != resolution // 8 // patch:
        raise CheckpointError(f"{path} is a {grid * patch * 8} px model ({tokens} position embeddings) but the "
                              f"resolution asked for is {resolution}; pass --res {grid * patch * 8}.")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
    num_classes = _shape(state, "y_embedder.embedding_table.weight", path)[0] - 1
    mlp_ratio = _shape(state, "blocks.0.mlp.fc1.weight", path)[0] / hidden if depth else 4.0
    inputs = list(dict.fromkeys(m.group(1) for k in state if (m := re.match(r"extra\.([^.]+)\.", k))))  # file order
    heads = num_heads or config.get("heads") or HEADS_FOR_WIDTH.get(hidden)
    if heads is None:
        raise CheckpointError(f"{path}: width {hidden} is not one of the released SiTs "
                              f"({', '.join(map(str, HEADS_FOR_WIDTH))}), so its head count is unknown; "
                              f"pass num_heads.")

    rows = _shape(state, "final_layer.linear.weight", path)[0]
    per_patch = patch * patch * in_channels
    if rows == 2 * per_patch:
        # original SiT ("learn_sigma"): 2C outputs per pixel, channel index fastest; keep channels < C
        keep = torch.arange(rows).remainder(2 * in_channels) < in_channels
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            state[key] = state[key][keep]
        time_flip = True
    elif rows == per_patch:
        # a FreeFlow checkpoint distilled from an original SiT says so in its "net" entry
        time_flip = bool(config.get("time_flip", False))
    else:
        raise CheckpointError(f"{path}: the final layer has {rows} outputs, which fits no SiT with patch {patch} and "
                              f"{in_channels} channels ({per_patch} or {2 * per_patch}).")

    try:
        model = SiT(input_size=grid * patch, patch=patch, in_channels=in_channels, hidden=hidden, depth=depth,
                    heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes, inputs=inputs, time_flip=time_flip)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}.") from None
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path} does not match a SiT of depth {depth}, width {hidden}: {'; '.join(parts)}.")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"{path}: '{k}' has shape {tuple(state[k].shape)} where a SiT of width {hidden} "
                              f"needs {tuple(own[k].shape)}; this fits no SiT.")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
