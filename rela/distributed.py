"""What makes a DDP step equal one process's step on the global batch: gathers and synchronised batch norm.

Lightning's ``Trainer(sync_batchnorm=True)`` converts batch norm to torch's SyncBatchNorm,
which runs on CUDA only (DDP refuses it for CPU modules). :class:`SyncBatchNorm` is the same
Lightning plugin; on CPU process groups (gloo: the CPU tests, CPU clusters) it swaps in
:class:`GlobalBatchNorm1d`/``2d``/``3d``, batch norm whose training statistics are all-reduced
with gradients, so the same code path is checked without a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightly.utils.dist import gather
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.distributed.nn.functional import all_reduce


def distributed() -> bool:
    """True inside a process group of more than one process (DDP), when batch-wide losses must gather."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_batch(z: torch.Tensor) -> torch.Tensor:
    """Every rank's ``z`` concatenated in rank order; the gradient flows back to each rank's share.

    lightly's ``gather`` sums the gradients of all ranks in its backward pass, so with DDP's
    gradient averaging a loss computed identically on every rank from the global batch trains
    exactly as one process on that batch would.
    """
    return torch.cat(gather(z), 0) if distributed() else z


class _GlobalStatistics:
    """Mixin for torch's batch norm: in training under DDP, normalise with the global batch's statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        xd = x.double()  # sums of squares over the global batch: float64 keeps E[x^2] - E[x]^2 exact enough
        local = torch.cat([xd.sum(dims), xd.pow(2).sum(dims), xd.new_tensor([x.numel() // x.shape[1]])])
        total = all_reduce(local)  # differentiable: the backward pass all-reduces the gradients
        c, n = x.shape[1], total[-1]
        mean = total[:c] / n
        var = total[c:2 * c] / n - mean.pow(2)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        self.running_var.mul_(1 - m).add_(unbiased_var.to(self.running_var.dtype), alpha=m)


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(_GlobalStatistics, nn.BatchNorm3d):
    pass


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def _swap_classes(model: nn.Module, mapping: dict) -> nn.Module:
    """Change the class of the batch-norm layers in place: parameters, buffers and state-dict keys stay."""
    for layer in model.modules():
        if type(layer) in mapping:
            layer.__class__ = mapping[type(layer)]
    return model


class SyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's SyncBatchNorm plugin, which also works on CPU process groups (see the module notes)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def apply(self, model: nn.Module) -> nn.Module:
        return super().apply(model) if self.cuda else _swap_classes(model, _GLOBAL)

    def revert(self, model: nn.Module) -> nn.Module:
        return super().revert(model) if self.cuda else _swap_classes(model, {v: k for k, v in _GLOBAL.items()})
