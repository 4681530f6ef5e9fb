"""Frozen-backbone evaluation: weighted k-NN and the linear probe, on hand-made features."""

from __future__ import annotations

import math

import pytest
import torch

from rela.evaluate import knn_accuracy, linear_probe


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_knn_votes_are_weighted_by_similarity():
    # neighbours of the query at 0 deg: class 0 at 25.8 deg (cos 0.9), two of class 1 at ~31.8 deg (cos 0.85)
    train = torch.tensor([_unit(math.degrees(math.acos(0.9))), _unit(math.degrees(math.acos(0.85))),
                          _unit(-math.degrees(math.acos(0.85))), _unit(180)])
    labels = torch.tensor([0, 1, 1, 0])
    query, truth = torch.tensor([_unit(0)]), torch.tensor([1])
    # k=1: the nearest neighbour alone says class 0
    assert knn_accuracy(train, labels, query, truth, 2, ks=(1,))[1] == 0.0
    # k=3, T=0.1: exp(9) for class 0 against 2 exp(8.5) = 1.21 exp(9) for class 1
    assert knn_accuracy(train, labels, query, truth, 2, ks=(3,), temperature=0.1)[3] == 1.0
    # k=3, T=0.01: exp(90) against 2 exp(85): the closest neighbour dominates
    assert knn_accuracy(train, labels, query, truth, 2, ks=(3,), temperature=0.01)[3] == 0.0


def test_knn_uses_cosine_similarity_and_clamps_k():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(5) * 10
    labels = torch.arange(5).repeat(4)
    train = centres[labels] * torch.rand(20, 1, generator=g) + 0.01 * torch.randn(20, 5, generator=g)
    test_labels = torch.arange(5)
    test = centres[test_labels] * 0.001  # tiny norm, same direction: only cosine gets these right
    result = knn_accuracy(train, labels, test, test_labels, 5, ks=(1, 200))
    assert result == {1: 1.0, 200: 1.0}  # k=200 means all 20 training points, reported under the k asked for
    assert knn_accuracy(train, labels, test, (test_labels + 1) % 5, 5, ks=(1,)) == {1: 0.0}


def test_linear_probe_separable_and_random():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    feats = torch.randn(300, 8, generator=g)
    feats[torch.arange(300), labels] += 6  # each class lifts its own coordinate
    acc = linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], 3, epochs=30, batch_size=64)
    assert acc == pytest.approx(1.0)
    noise = torch.randn(300, 8, generator=g)
    chance = linear_probe(noise[:200], labels[:200], noise[200:], labels[200:], 3, epochs=30, batch_size=64)
    assert chance < 0.6
    again = linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], 3, epochs=30, batch_size=64)
    assert again == acc  # seeded


def test_knn_with_fewer_training_points_than_k():
    train = torch.eye(3)
    labels = torch.arange(3)
    result = knn_accuracy(train, labels, train, labels, 3, ks=(20, 200))
    assert result == {20: 1.0, 200: 1.0}
