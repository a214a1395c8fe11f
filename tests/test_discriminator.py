"""Discriminator on the real (small) DINOv2 and SVD VAE classes: gradient paths, shapes, params."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from osv.bench import disc as bench_disc
from osv.discriminator import Discriminator, LatentUpsampler
from osv.models import build_small_dinov2, build_small_vae
from osv.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")


def make_disc(front_end, layers=None):
    params = {"disc": {**PARAMS["disc"], "front_end": front_end}}
    if layers is not None:
        params["disc"]["layers"] = layers
    return Discriminator.from_params(params, build_small_dinov2(seed=1), build_small_vae(seed=2))


@pytest.fixture(scope="module")
def discs():
    return {fe: make_disc(fe) for fe in ("latent", "vae")}


def test_latent_upsampler_shape():
    up = LatentUpsampler(4, 4)
    assert up(torch.randn(3, 4, 5, 7)).shape == (3, 3, 20, 28)


@pytest.mark.parametrize("front_end", ["latent", "vae"])
def test_gradients_reach_exactly_upsampler_and_heads(discs, front_end):
    disc = discs[front_end]
    disc.zero_grad(set_to_none=True)
    latents = torch.randn(2, 3, 4, 4, 6, requires_grad=True)
    disc(latents).mean().backward()
    # the generator is trained through D: the input latents get a gradient
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    with_grad = {n for n, p in disc.named_parameters() if p.grad is not None}
    expected = {n for n, p in disc.named_parameters() if n.startswith(("heads.", "upsampler."))}
    assert with_grad == expected
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert front_end == "latent" or not any(p.requires_grad for p in disc.vae.parameters())
    assert {id(p) for p in disc.trainable_parameters()} == {id(p) for n, p in disc.named_parameters()
                                                            if n in expected}
    assert (disc.upsampler is not None) == (front_end == "latent")


@pytest.mark.parametrize("front_end", ["latent", "vae"])
@pytest.mark.parametrize("t,h,w", [(1, 4, 4), (3, 4, 6), (8, 2, 3)])
def test_output_shapes(discs, front_end, t, h, w):
    disc = discs[front_end]
    g = disc.grid  # backbone_input 56 / patch 7 = 8
    with torch.no_grad():
        out = disc(torch.randn(2, t, 4, h, w))
    assert out.shape == (2, len(PARAMS["disc"]["layers"]) * 2 * t * g * g)
    assert torch.isfinite(out).all()


def test_features_are_hidden_states_after_each_block(discs):
    disc = discs["latent"]
    pixels = torch.rand(2, 3, 20, 30) * 2 - 1
    with torch.no_grad():
        grids = disc.features(pixels)
        x = torch.nn.functional.interpolate(pixels, size=(56, 56), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - disc.mean) / disc.std
        hidden = disc.backbone(pixel_values=x, output_hidden_states=True).hidden_states
    for layer, grid in zip(PARAMS["disc"]["layers"], grids):
        tokens = hidden[layer + 1][:, 1:]  # block `layer`'s output without CLS
        assert torch.equal(grid, tokens.transpose(1, 2).reshape(2, -1, 8, 8))


def test_frozen_parts_stay_in_eval_mode(discs):
    disc = discs["vae"].train()
    assert disc.training and disc.heads.training
    assert not disc.backbone.training and not disc.vae.training


def test_spatial_heads_are_per_frame_temporal_heads_see_order():
    disc = make_disc("latent")
    t, gg = 4, disc.grid ** 2
    latents = torch.randn(1, t, 4, 4, 4)
    with torch.no_grad():
        a, b = disc(latents), disc(latents.flip(1))
    for i in range(len(PARAMS["disc"]["layers"])):
        spatial = slice(2 * i * t * gg, (2 * i + 1) * t * gg)  # laid out [t, g*g]
        temporal = slice((2 * i + 1) * t * gg, (2 * i + 2) * t * gg)  # laid out [g*g, t]
        torch.testing.assert_close(b[0, spatial].view(t, gg), a[0, spatial].view(t, gg).flip(0))
        assert not torch.allclose(b[0, temporal].view(gg, t), a[0, temporal].view(gg, t).flip(1), atol=1e-6)


def test_trainable_state_dict_round_trip():
    a, b = make_disc("latent"), make_disc("latent")
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.01)
    state = a.trainable_state_dict()
    assert state and all(k.startswith(("heads.", "upsampler.")) for k in state)
    b.load_trainable_state_dict(state)
    x = torch.randn(1, 2, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    with pytest.raises(KeyError, match="mismatch"):
        make_disc("vae").load_trainable_state_dict(state)


def test_bad_disc_params_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        make_disc("latent", layers=[0, 4])
    bad = {"disc": {**PARAMS["disc"], "backbone_input": 50}}
    with pytest.raises(ValueError, match="backbone_input = 50"):
        Discriminator.from_params(bad, build_small_dinov2())
    with pytest.raises(ValueError, match="needs the VAE"):
        Discriminator.from_params({"disc": {**PARAMS["disc"], "front_end": "vae"}}, build_small_dinov2())
    with pytest.raises(FileNotFoundError, match="not a DINOv2 folder"):
        Discriminator.from_params(PARAMS, ROOT / "no-such-dinov2")


@pytest.mark.parametrize("front_end", ["latent", "vae"])
def test_features_then_logits_is_forward(discs, front_end):
    """train_step reuses the vae front end's features of the fake for the D and G updates."""
    disc, x = discs[front_end], torch.randn(2, 3, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(disc.logits(disc.features_of(x), 2), disc(x))
    assert disc.frozen_front_end == (front_end == "vae")


def test_vae_temporal_convs_run_as_conv2d_with_the_same_output(discs):
    from osv.models import TemporalConv

    reference, vae = build_small_vae(seed=2).eval(), discs["vae"].vae
    for m in reference.modules():  # the stock diffusers layers
        if isinstance(m, TemporalConv):
            m.__class__ = torch.nn.Conv3d
    assert not any(type(m) is torch.nn.Conv3d for m in vae.modules())
    assert any(isinstance(m, TemporalConv) for m in vae.modules())
    z = torch.randn(6, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z, num_frames=3).sample, reference.decode(z, num_frames=3).sample,
                                   rtol=1e-5, atol=1e-5)


def test_from_params_loads_a_dinov2_folder(tmp_path):
    build_small_dinov2(seed=4).save_pretrained(tmp_path / "dinov2")
    disc = Discriminator.from_params(PARAMS, tmp_path / "dinov2")
    assert disc(torch.randn(1, 2, 4, 4, 4)).shape[0] == 1


def test_bench_disc_runs_and_reports(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench_disc.add_args(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--params", str(ROOT / "params.yaml"), "--width", "32", "--height", "32",
                              "--frames", "2", "--iters", "1", "--warmup", "0", "--no-isolate",
                              "--device", "cpu", "--out", str(out)])
    assert bench_disc.run(args) == 0
    table = capsys.readouterr().out
    assert "ratio vae/latent" in table and "latent" in table and "getrusage" in table
    result = json.loads(out.read_text())
    assert [r["front_end"] for r in result["results"]] == ["latent", "vae"]
    assert all(r["sec_per_iter"] > 0 for r in result["results"])
    assert result["ratio_vae_over_latent"]["time"] > 0


def test_vae_decoder_checkpointing_same_gradients_less_memory():
    from osv.memory import saved_tensor_bytes

    disc = make_disc("vae").train()
    latents = torch.randn(1, 3, 4, 4, 6)

    def step():
        disc.zero_grad(set_to_none=True)
        z = latents.clone().requires_grad_(True)
        loss = disc(z).mean()
        loss.backward()
        return loss.detach(), z.grad, {n: p.grad for n, p in disc.named_parameters() if p.grad is not None}

    def saved():
        return saved_tensor_bytes(lambda: disc(latents.clone().requires_grad_(True)).mean(), exclude=[disc])

    plain, plain_bytes = step(), saved().bytes
    regions = disc.enable_gradient_checkpointing()
    assert regions and all(r.startswith("decoder.") for r in regions)
    assert any("upsamplers" in r for r in regions) and any("mid_block.attentions" in r for r in regions)
    ckpt, ckpt_saved = step(), saved()
    torch.testing.assert_close(ckpt[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(ckpt[1], plain[1], rtol=1e-5, atol=1e-8)
    assert set(ckpt[2]) == set(plain[2])
    for name, grad in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert ckpt_saved.bytes < 0.7 * plain_bytes, (ckpt_saved.bytes, plain_bytes)
    assert make_disc("latent").enable_gradient_checkpointing() == []  # nothing frozen and deep to recompute


def test_vae_downscale_decodes_area_averaged_latents():
    params = {"disc": {**PARAMS["disc"], "front_end": "vae", "vae_downscale": 2}}
    disc = Discriminator.from_params(params, build_small_dinov2(seed=1), build_small_vae(seed=2))
    full = make_disc("vae")
    assert disc.vae_downscale == 2 and full.vae_downscale == PARAMS["disc"]["vae_downscale"] == 1
    latents = torch.randn(2, 3, 4, 4, 6)
    with torch.no_grad():
        assert disc.to_pixels(latents).shape == (6, 3, 16, 24)  # (4/2)·8 x (6/2)·8
        assert full.to_pixels(latents).shape == (6, 3, 32, 48)
        pooled = torch.nn.functional.avg_pool2d(latents.flatten(0, 1), 2).unflatten(0, (2, 3))
        torch.testing.assert_close(disc.to_pixels(latents), full.to_pixels(pooled))
        assert disc(latents).shape == full(latents).shape  # DINOv2 sees backbone_input² either way
    with pytest.raises(ValueError, match="vae_downscale"):
        Discriminator.from_params({"disc": {**params["disc"], "vae_downscale": 0}}, build_small_dinov2(seed=1),
                                  build_small_vae(seed=2))
