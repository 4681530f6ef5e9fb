"""What a run costs in floating-point operations: a figure that background load cannot distort.

Wall-clock seconds on a shared 2-core machine depend on what else runs; FLOPs do not. The FLOPs
of one training step per image are counted with :class:`torch.utils.flop_counter.FlopCounterMode`
(matrix multiplications and convolutions, forward and backward) on copies of the networks, once
per phase: the ReLA phase (two views through the learner + transfer head), the method's phase
(its views, heads and momentum/teacher forwards). The run's cost is then

    train_flops = rela_phase_images x ReLA FLOPs/image + method_phase_images x method FLOPs/image
    bank_flops  = N x the prior's forward FLOPs per image (the bank is extracted once per prior and dataset)

A soft hand-over's steps run both phases and count in both. Element-wise work (augmentation,
normalisation, optimiser) is not counted: it is small next to the convolutions and does not
depend on the method.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rela.accelerator import ReLAAccelerator
from rela.methods import Method


def count_flops(fn) -> int:
    """FLOPs of everything ``fn()`` runs (forward and, when it calls backward, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@contextmanager
def untouched(*modules: nn.Module | None):
    """Run code on live modules and leave no trace: weights, buffers (batch-norm statistics), gradients
    and the random state are restored afterwards. (Deep copies would be simpler, but weight-normed
    heads such as DINO's cannot be deep-copied.)"""
    modules = [m for m in modules if m is not None]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in modules]
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m, state, grad in zip(modules, states, grads):
            m.load_state_dict(state)
            for n, p in m.named_parameters():
                p.grad = grad[n]


def step_flops_per_image(method: Method, rela: ReLAAccelerator | None, normalize: nn.Module,
                         images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Forward + backward FLOPs per image of a ReLA-phase step and of a method-phase step (the run is left untouched)."""
    index = torch.arange(len(images), device=images.device)
    flops = {}
    with untouched(method, rela):
        if rela is not None:
            flops["rela"] = count_flops(lambda: rela.step_loss(
                method.backbone, lambda k: rela.view(images), index, normalize)[0].backward()) / len(images)
        flops["method"] = count_flops(lambda: method.step_loss(
            [view(images) for view in method.views], labels, normalize).loss.backward()) / len(images)
    return flops


def prior_flops_per_image(prior_model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Forward FLOPs of the prior on one image of ``input_shape`` (C, H, W), in eval mode, no gradient."""
    param = next(prior_model.parameters(), None)
    x = torch.zeros(2, *input_shape, device=param.device if param is not None else "cpu")
    was_training = prior_model.training
    prior_model.eval()
    try:
        with torch.no_grad():
            return count_flops(lambda: prior_model(x)) / 2
    finally:
        prior_model.train(was_training)


def run_flops(per_image: dict[str, float], budget: dict) -> float:
    """Training FLOPs of a run from the images each phase trained on (see the module docstring)."""
    return (budget.get("rela_phase_images", 0) * per_image.get("rela", 0.0)
            + budget.get("method_phase_images", 0) * per_image.get("method", 0.0))
