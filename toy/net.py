"""The 2D toy's network: a small residual MLP velocity field with the interface freeflow.py expects.

    net(x, t, y, **inputs) -> velocity shaped like x

The input x enters with sinusoidal features of each coordinate (`x_freqs` frequencies, log-spaced
from 1 to x_freqs, in the standardised data's units). A plain MLP on raw coordinates is biased toward
smooth functions: on grid25 (25 tight clusters 0.7 apart) its teacher smeared the middle clusters of each
row into bands and the one-step student filled in the gaps (W2 ratio 1.6); with these features both
resolve the clusters (see the README's suite table for what they cost and give elsewhere).

The conditioning vector is the sum of an embedding of t, an embedding of the class y (row num_classes
is the null class ∅) and, for the student and g_ψ, embeddings of the extra inputs (s, gamma). Each
residual block adds the conditioning to its input, as a SiT adds it through adaLN.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScalarEmbed(nn.Module):
    """Embed a scalar per example: sinusoidal features at log-spaced frequencies, then a 2-layer MLP.
    With zero_init the last layer starts at zero, so a new input changes nothing until it is trained.

    The frequencies stop at 10 on purpose. The predictor's target contains (1 - s) ∂_s F, so every
    ripple of F in s enters it multiplied by its frequency: with frequencies up to 100, |Δ_G| stayed
    near 1 and the endpoint error stalled several times higher than with 10 (moons, 2000 steps)."""

    def __init__(self, width, freqs=32, max_freq=10.0, zero_init=False):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), freqs)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * freqs, width), nn.SiLU(), nn.Linear(width, width))
        if zero_init:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t):
        if len(t) > 1 and bool((t == t[0]).all()):  # one value for the whole batch (the student's t = 1,
            return self.forward(t[:1]).expand(len(t), -1)  # a fixed γ, an ODE step's t): embed it once
        angles = t.to(self.freqs.dtype)[:, None] @ self.freqs[None]  # t ω (as a product of (n, 1) by (1, F):
        # the same numbers as t[:, None] * ω, without the slow path a broadcast multiply by the tangent-free ω
        # takes under forward-mode AD)
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))


class Block(nn.Module):
    """h + W2 SiLU(W1 SiLU(h + cond)): a residual MLP block that sees the conditioning."""

    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h, cond):
        return h + self.fc2(F.silu(self.fc1(F.silu(h + cond))))


class MLPVelocity(nn.Module):
    def __init__(self, dim=2, width=128, depth=4, num_classes=0, inputs=(), x_freqs=0):
        super().__init__()
        self.dim, self.width, self.depth, self.num_classes, self.x_freqs = dim, width, depth, num_classes, x_freqs
        self.register_buffer("x_omega", torch.exp(torch.linspace(0, math.log(max(x_freqs, 1)), x_freqs)),
                             persistent=False)
        self.t_embed = ScalarEmbed(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # row num_classes: ∅
        self.extra = nn.ModuleDict({name: ScalarEmbed(width, zero_init=True) for name in inputs})
        self.inp = nn.Linear(dim * (1 + 2 * x_freqs), width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, dim))

    @property
    def inputs(self):
        return tuple(self.extra.keys())

    def config(self):
        """Everything needed to rebuild this network (saved beside its weights)."""
        return {"dim": self.dim, "width": self.width, "depth": self.depth,
                "num_classes": self.num_classes, "inputs": list(self.inputs), "x_freqs": self.x_freqs}

    def extended(self, names):
        """A copy of this network with new zero-initialised embeddings for `names`: same outputs."""
        new = copy.deepcopy(self)
        for name in names:
            if name not in new.extra:
                new.extra[name] = ScalarEmbed(self.width, zero_init=True).to(self.inp.weight)
        return new

    def forward(self, x, t, y, **inputs):
        if set(inputs) != set(self.extra):
            raise TypeError(f"this network takes extra inputs {sorted(self.extra)}, got {sorted(inputs)}")
        cond = self.t_embed(t) + self.y_embed(y)
        for name, embed in self.extra.items():
            cond = cond + embed(inputs[name])
        if self.x_freqs:  # [x, sin(ω x), cos(ω x)] per coordinate and frequency
            angles = (x[:, :, None] * self.x_omega).flatten(1)
            x = torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)
