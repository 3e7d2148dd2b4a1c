"""FLOPs by the dtype they run in: how much of a pass a precision setting really reaches.

    with FlopsByDtype() as flops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            freeflow.train_step(...)
    flops.share(torch.bfloat16)          # e.g. 0.99: the share of the step's FLOPs computed in bf16

The counting rules are torch.utils.flop_counter's (matrix products, convolutions and attention, forward,
backward and forward-mode tangents alike); each operator's FLOPs are booked under the dtype of its first
floating-point input, which autocast has already cast when the operator is dispatched. It runs on a CPU,
so the precision of every pass can be checked without a GPU (CPU autocast casts the same matrix products
to bf16 as CUDA autocast does)."""

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopsByDtype(TorchDispatchMode):
    """A dispatch mode that adds up each counted operator's FLOPs under its input dtype."""

    def __init__(self):
        super().__init__()
        self.flops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            self.flops[dtype] += count(*args, **kwargs, out_val=out)
        return out

    @property
    def total(self):
        return sum(self.flops.values())

    def share(self, dtype):
        """The fraction of all counted FLOPs that ran in `dtype` (0 when nothing was counted)."""
        return self.flops[dtype] / self.total if self.total else 0.0
