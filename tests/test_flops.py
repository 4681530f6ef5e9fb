"""rela.flops: FLOPs per step phase, counted on the live networks without changing them."""

import json

import pytest
import torch

from rela.accelerator import ReLAAccelerator, build_switch
from rela.backbones import build_backbone
from rela.config import TrainConfig
from rela.data import Normalize
from rela.flops import count_flops, prior_flops_per_image, run_flops, step_flops_per_image
from rela.methods import build_method
from rela.train import count_step_flops


def test_count_flops_of_a_linear_layer_forward_and_backward():
    layer = torch.nn.Linear(10, 20, bias=False)
    x = torch.randn(4, 10, requires_grad=True)
    assert count_flops(lambda: layer(x)) == 2 * 4 * 10 * 20  # one multiply-add = 2 FLOPs
    # backward: the gradient of the input and of the weight, each a matmul of the same size
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 4 * 10 * 20


@pytest.mark.parametrize("method_name", ["byol", "dino", "simclr"])
def test_phase_flops_leave_the_run_untouched(method_name):
    torch.manual_seed(0)
    backbone, dim = build_backbone("convnet", 1, 28)
    method = build_method(method_name, backbone, dim, 10)
    rela = ReLAAccelerator(dim, torch.randn(16, 8), build_switch("never"))
    images, labels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), torch.arange(4)
    before = {k: v.clone() for k, v in {**method.state_dict(), **rela.state_dict()}.items()}
    rng = torch.get_rng_state()
    flops = step_flops_per_image(method, rela, Normalize((0.5,), (0.5,), 1), images, labels)
    after = {**method.state_dict(), **rela.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert all(p.grad is None for p in [*method.parameters(), *rela.parameters()])
    assert torch.equal(torch.get_rng_state(), rng)
    # the ReLA step is two learner passes + a linear head; the method's adds its heads (and momentum forwards)
    learner = count_flops(lambda: backbone(torch.zeros(1, 1, 28, 28)).sum().backward())
    assert 2 * learner <= flops["rela"] < 2.2 * learner
    assert flops["method"] > flops["rela"] if method_name != "simclr" else flops["method"] >= flops["rela"]


def test_prior_and_run_flops():
    backbone, _ = build_backbone("convnet", 1, 28)
    forward = prior_flops_per_image(backbone, (1, 28, 28))
    assert forward == count_flops(lambda: backbone.eval()(torch.zeros(1, 1, 28, 28)))
    budget = {"rela_phase_images": 100, "method_phase_images": 300}
    assert run_flops({"rela": 2.0, "method": 5.0}, budget) == 100 * 2.0 + 300 * 5.0
    assert run_flops({"method": 5.0}, {"method_phase_images": 10}) == 50.0


@pytest.mark.parametrize("run_fixture", ["random_run", "none_run"])
def test_flops_counted_without_training_match_what_training_recorded(run_fixture, request):
    """count_step_flops (what benchmarks use for a run recorded before FLOPs were) gives the figures
    ``train`` wrote for the same configuration: FLOPs do not depend on the trained weights."""
    run = request.getfixturevalue(run_fixture)
    recorded = json.loads((run / "metrics.json").read_text())["flops_per_image"]
    assert set(recorded) == ({"rela", "method"} if run_fixture == "random_run" else {"method"})
    assert count_step_flops(TrainConfig.from_yaml(run / "config.yaml")) == recorded
