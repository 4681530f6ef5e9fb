"""Subset rules (issue 27): which ratio * N images an epoch trains on, and with what loss weights."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, TINY_STEPS, read_metrics, run_ok, train_module
from test_cli import expect_user_error
from test_reliability import CHECKPOINT_EVERY, SimulatedKill, assert_same_run, checkpoint_step

from rela.cli import main
from rela.data.subset import (ANNEAL, UNRECORDED, DynamicSubsetSampler, LossRecord, LossRule, PrototypeRule,
                              Prototypes, build_subset, cached_prototypes, kmeans)
from rela.errors import RelaError
from rela.registry import SUBSETS


def test_random_rule_is_the_uniform_draw_of_before():
    """The default draws exactly what the sampler drew before rules existed (committed results stay valid)."""
    sampler = DynamicSubsetSampler(1000, 0.3, seed=5)
    sampler.set_epoch(7)
    g = torch.Generator().manual_seed(5 * 1_000_003 + 7)
    assert torch.equal(sampler.indices(), torch.randperm(1000, generator=g)[:300])
    assert sampler.draw()[1] is None


def _record(values: list[float], phases: list[int]) -> LossRecord:
    record = LossRecord(len(values))
    record.value.copy_(torch.tensor(values))
    record.phase.copy_(torch.tensor(phases, dtype=torch.int8))
    return record


def test_loss_rule_keeps_the_unlearned_and_stays_unbiased():
    n, size = 1000, 300
    g = torch.Generator().manual_seed(0)
    values = torch.rand(n, generator=g)
    phases = torch.randint(0, 2, (n,), generator=g)
    values[phases == 1] -= 5  # the method's losses live on another scale: compared within their phase only
    phases[:50] = UNRECORDED
    rule = LossRule(keep=0.5)
    rule.losses = _record(values.tolist(), phases.tolist())
    high = rule.not_learned()
    for p in (0, 1):
        mine = phases == p
        assert torch.equal(high[mine], values[mine] > values[mine].mean())
    assert high[:50].all()  # never recorded: not yet learned
    subset, weights = rule.draw(n, size, torch.Generator().manual_seed(1), epoch=1, epochs=8)
    assert len(subset) == size and len(set(subset.tolist())) == size
    hard = high[subset]
    assert int(hard.sum()) == round(0.5 * size)  # KEEP of the budget for the not-yet-learned
    # unbiased: each group's weight x its draws = ratio x its size, so E[sum_S w v] / size = mean(v)
    ratio = size / n
    for group, drawn in ((high, hard), (~high, ~hard)):
        assert float(weights[drawn].sum()) == pytest.approx(ratio * int(group.sum()))
    # deterministic given the seed and the record
    again, _ = rule.draw(n, size, torch.Generator().manual_seed(1), epoch=1, epochs=8)
    assert torch.equal(subset, again)


def test_loss_rule_draws_uniformly_first_and_last():
    rule = LossRule()
    rule.losses = _record([0.0] * 100, [UNRECORDED] * 100)  # epoch 0: nothing recorded yet
    assert rule.draw(100, 30, torch.Generator().manual_seed(0), 0, 8)[1] is None
    rule.losses = _record(list(range(100)), [0] * 100)
    assert rule.draw(100, 30, torch.Generator().manual_seed(0), int(ANNEAL * 8), 8)[1] is None  # annealing
    assert rule.draw(100, 30, torch.Generator().manual_seed(0), 1, 8)[1] is not None


def test_prototype_cover_takes_an_equal_share_of_every_cluster():
    assign = torch.cat([torch.zeros(10), torch.ones(200), torch.full((300,), 2)]).long()
    rule = PrototypeRule(3, "cover")
    rule.prototypes = Prototypes(assign, torch.rand(len(assign)), 3)
    subset, weights = rule.draw(len(assign), 150, torch.Generator().manual_seed(0), 0, 1)
    counts = torch.bincount(assign[subset], minlength=3).tolist()
    assert weights is None and len(set(subset.tolist())) == 150
    assert counts == [10, 70, 70]  # the small cluster gives all it has, the others share the rest


def test_prototype_hard_favours_images_far_from_their_prototype():
    n = 2000
    distance = torch.cat([torch.full((n // 2,), 0.1), torch.full((n // 2,), 1.0)])
    rule = PrototypeRule(1, "hard")
    rule.prototypes = Prototypes(torch.zeros(n, dtype=torch.long), distance, 1)
    subset, _ = rule.draw(n, 200, torch.Generator().manual_seed(0), 0, 1)
    assert len(set(subset.tolist())) == 200
    assert (subset >= n // 2).float().mean() > 0.8


def test_kmeans_finds_separated_clusters_and_is_cached(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    x = torch.cat([c + 0.1 * torch.randn(50, 4, generator=g) for c in centres])
    p = kmeans(x, 4, seed=0)
    for block in range(4):  # each blob is one cluster
        assert len(set(p.assign[50 * block: 50 * (block + 1)].tolist())) == 1
    assert len(set(p.assign.tolist())) == 4 and float(p.distance.max()) < 1.0 and p.flops > 0
    first = cached_prototypes(x, 4, 0, tmp_path, "bank-key")
    files = list(tmp_path.glob("prototypes-*.pt"))
    assert len(files) == 1 and torch.equal(first.assign, p.assign)
    files[0].write_bytes(b"not a tensor file")  # corrupted: recomputed, not trusted
    assert torch.equal(cached_prototypes(x, 4, 0, tmp_path, "bank-key").assign, p.assign)
    assert len(list(tmp_path.glob("prototypes-*.pt"))) == 1


def test_every_rank_takes_a_disjoint_part_of_the_same_subset():
    rule = LossRule()
    rule.losses = _record(list(range(200)), [0] * 200)
    shards = [DynamicSubsetSampler(200, 0.5, seed=1, rank=r, world_size=2, rule=rule, epochs=8) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2)
    a, b = (set(s.indices().tolist()) for s in shards)
    assert not a & b and a | b == set(shards[0].draw()[0].tolist())


def test_bad_subset_names():
    with pytest.raises(RelaError, match="KEEP"):
        build_subset("loss:2")
    with pytest.raises(RelaError, match="K must"):
        build_subset("prototype-hard:0")
    assert "prototype-cover[:K]" in SUBSETS.usages()


def test_prototype_rule_without_a_prior_is_a_user_error(capsys, tmp_path):
    expect_user_error(capsys, ["train", *TINY, "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                               "--subset", "prototype-cover:4"], "needs --prior")


def _loss_args(out, cache, *extra):
    return ["train", *TINY, "--out", str(out), "--cache-dir", str(cache), "--prior", "random", "--probe-every", "1",
            "--seed", "0", "--subset", "loss", *extra]


def test_loss_rule_trains_records_losses_and_resumes_exactly(tmp_path, monkeypatch):
    """A real run: every trained image gets a loss on record, epoch 1 draws from it, and a crash mid-epoch 1
    resumes to the same weights as the uninterrupted run (the epoch's draw rides in the checkpoint)."""
    reference = tmp_path / "ref"
    run_ok(_loss_args(reference, tmp_path / "cache"))
    m = read_metrics(reference)
    assert m["subset"] == "loss" and m["steps"] == TINY_STEPS
    state = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    phase = state["state_dict"]["loss_record.phase"]
    # every image of both epochs' batches got a ReLA-phase loss, the rest none
    assert 0 < int((phase == 0).sum()) <= TINY_STEPS * 32 and set(phase.unique().tolist()) <= {UNRECORDED, 0}

    step_fn = train_module.ReLAModule.training_step

    def dying_step(self, index, batch_idx):
        if self.global_step == TINY_STEPS - 1:
            raise SimulatedKill
        return step_fn(self, index, batch_idx)

    out = tmp_path / "run"
    args = _loss_args(out, tmp_path / "cache", "--checkpoint-every", str(CHECKPOINT_EVERY))
    monkeypatch.setattr(train_module.ReLAModule, "training_step", dying_step)
    with pytest.raises(SimulatedKill):
        main(args)
    monkeypatch.undo()
    assert checkpoint_step(out) == 6
    run_ok([*args, "--resume"])
    assert_same_run(out, reference)
