"""Losses against numbers worked out by hand."""

import math

import pytest
import torch

from osv.losses import d_hinge_loss, distance_weight, g_loss, pseudo_huber


def test_d_hinge_loss_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    # ReLU(1 - real) = [0, 0.5, 2, 0] -> mean 0.625; ReLU(1 + fake) = [0, 1, 1.5, 0.5] -> mean 0.75
    assert d_hinge_loss(real, fake).item() == pytest.approx(0.625 + 0.75)


def test_g_loss_by_hand():
    fake = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    # hinge: ReLU(1 - D) = [0, 0.5, 2, 0] -> 0.625; neg: -(2 + 0.5 - 1 + 1)/4 = -0.625
    assert g_loss(fake, "hinge").item() == pytest.approx(0.625)
    assert g_loss(fake, "neg").item() == pytest.approx(-0.625)
    with pytest.raises(ValueError, match="generator_loss"):
        g_loss(fake, "wgan")


def test_pseudo_huber_elementwise_by_hand():
    x = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 4.0], [0.0, 1.0]])
    c = 1.0
    # sample 0: sqrt(9+1)-1, sqrt(16+1)-1 -> mean; sample 1: 0, sqrt(1+1)-1 -> mean
    s0 = (math.sqrt(10) - 1 + math.sqrt(17) - 1) / 2
    s1 = (0.0 + math.sqrt(2) - 1) / 2
    per = pseudo_huber(x, y, c=c, mode="elementwise", reduce=False)
    assert per.tolist() == pytest.approx([s0, s1])
    assert pseudo_huber(x, y, c=c).item() == pytest.approx((s0 + s1) / 2)


def test_pseudo_huber_norm_by_hand():
    x = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    # sample 0: ||(3, -4)|| = 5 -> sqrt(25 + 0.001^2) - 0.001; sample 1: sqrt(0 + c^2) - c = 0
    s0 = math.sqrt(25 + 1e-6) - 0.001
    assert pseudo_huber(x, y, c=0.001, mode="norm", reduce=False).tolist() == pytest.approx([s0, 0.0])
    assert pseudo_huber(x, y, c=0.001, mode="norm").item() == pytest.approx(s0 / 2)
    with pytest.raises(ValueError, match="huber_mode"):
        pseudo_huber(x, y, mode="l1")


def test_pseudo_huber_is_zero_at_equal_and_differentiable():
    x = torch.randn(2, 3, 4, requires_grad=True)
    assert pseudo_huber(x, x.detach()).item() == pytest.approx(0.0, abs=1e-9)
    pseudo_huber(x, torch.zeros_like(x)).backward()
    assert torch.isfinite(x.grad).all()


def test_distance_weight_by_hand():
    sigma_n = torch.tensor([1.0, 2.0])
    sigma_next = torch.tensor([1.5, 6.0])  # gaps 0.5 and 4
    assert distance_weight(sigma_n, sigma_next, "ict").tolist() == pytest.approx([2.0, 0.25])
    assert distance_weight(sigma_n, sigma_next, "animatelcm").tolist() == pytest.approx([2 ** 0.1, 0.25 ** 0.1])
    assert distance_weight(sigma_n, sigma_next, "uniform").tolist() == [1.0, 1.0]
    assert distance_weight(sigma_n, sigma_next).dtype == torch.float32
    assert distance_weight(0.002, 0.0021, "ict").item() == pytest.approx(1e4, rel=1e-4)
    with pytest.raises(ValueError, match="sigma_next must exceed"):
        distance_weight(sigma_next, sigma_n, "ict")
    with pytest.raises(ValueError, match="weighting"):
        distance_weight(sigma_n, sigma_next, "edm")
