"""The encode stage: format, SVD-pipeline equivalence, determinism, resumability."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from osv import encode as enc
from osv.data import prepare as prepare_mod
from osv.fanout import part_range
from osv.latents import LatentDataset, read_index
from osv.models import build_small_pipeline
from osv.params import deep_merge, load_params, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enc")
    params = validate(deep_merge(load_params(ROOT / "params.yaml"), {
        "data": {"frames": 4, "resolution": {"width": 64, "height": 32}, "low_resolution": {"width": 32, "height": 16},
                 "embedded": {"max_train_clips": 5, "max_test_clips": 3, "stills": False}},
        "encode": {"batch_size": 2, "shard_size": 2}}))
    prepare_mod.prepare(params, str(tmp / "clips"))
    pipe = build_small_pipeline(0, num_frames=4)
    pipe.save_pretrained(str(tmp / "base"))
    enc.encode_all(params, str(tmp / "clips"), str(tmp / "base"), str(tmp / "base" / "vae"), str(tmp / "a"))
    return params, tmp, pipe


def test_layout_shapes_and_dtypes(setup):
    params, tmp, pipe = setup
    index = read_index(tmp / "a")
    assert set(index["groups"]) == {"train/64x32", "train/32x16", "test/64x32"}
    for split, w, h in (("train", 64, 32), ("train", 32, 16), ("test", 64, 32)):
        ds = LatentDataset(tmp / "a", split, w, h)
        item = ds[len(ds) - 1]
        assert item["latents"].shape == (4, 4, h // 8, w // 8) and item["latents"].dtype == torch.float32
        assert item["cond_latents"].shape == (4, h // 8, w // 8)
        assert item["image_embeds"].shape == (1, pipe.image_encoder.config.projection_dim)
        assert item["first_frame"].shape == (3, h, w) and item["first_frame"].dtype == torch.uint8
        assert item["clip_id"].startswith(split + "/")


def test_matches_the_svd_pipeline(setup):
    from PIL import Image

    params, tmp, pipe = setup
    item = LatentDataset(tmp / "a", "test", 64, 32)[0]
    image = Image.fromarray(item["first_frame"].permute(1, 2, 0).numpy())
    with torch.no_grad():
        want = pipe._encode_image(image, "cpu", 1, False)
        x = item["first_frame"][None].float() / 127.5 - 1
        eps = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(
            enc.clip_seed(params["seed"], item["clip_id"])))
        cond = pipe._encode_vae_image(x + params["conditioning"]["noise_aug_strength"] * eps, "cpu", 1, False)
    torch.testing.assert_close(item["image_embeds"], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(item["cond_latents"], cond[0], rtol=1e-4, atol=1e-5)


def test_deterministic_and_resumable(setup, monkeypatch):
    params, tmp, _ = setup
    args = (params, str(tmp / "clips"), str(tmp / "base"), str(tmp / "base" / "vae"))
    enc.encode_all(*args, str(tmp / "b"))
    shards = sorted(p.relative_to(tmp / "a") for p in (tmp / "a").rglob("shard-*.safetensors"))
    assert len(shards) >= 6
    for rel in shards:
        assert (tmp / "a" / rel).read_bytes() == (tmp / "b" / rel).read_bytes(), rel
    # Delete one shard and the index: a rerun encodes only that shard.
    out = tmp / "b"
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in shards}
    (out / shards[1]).unlink()
    (out / "index.json").unlink()
    result = enc.encode_all(*args, str(out))
    assert result["encoded"] == 1 and result["skipped"] == len(shards) - 1
    assert all((out / r).stat().st_mtime_ns == mtimes[r] for r in shards if r != shards[1])
    assert (out / shards[1]).read_bytes() == (tmp / "a" / shards[1]).read_bytes()
    # An interrupted run leaves no partial shard and no index.
    calls = {"n": 0}
    real = enc.encode_batch

    def dies_in_second_unit(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # unit 0 is train shard 0 at both resolutions: two batches
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(enc, "encode_batch", dies_in_second_unit)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_all(*args, str(tmp / "c"))
    assert not (tmp / "c" / "index.json").exists()
    assert len(list((tmp / "c").rglob("shard-*.safetensors"))) == 2  # train shard 0 at 64x32 and 32x16
    monkeypatch.setattr(enc, "encode_batch", real)
    result = enc.encode_all(*args, str(tmp / "c"))
    assert result["skipped"] == 2 and result["encoded"] == len(shards) - 2
    assert read_index(tmp / "c") == read_index(tmp / "a")


def test_parts_write_the_same_shards_and_index(setup, tmp_path):
    """Three jobs over contiguous unit ranges (as the encode_part rules run them): the same bytes and
    index as one job; the gather refuses while a part's receipt is missing, naming it."""
    params, tmp, _ = setup
    args = (params, str(tmp / "clips"), str(tmp / "base"), str(tmp / "base" / "vae"))
    out = tmp_path / "parts"
    for part in (2, 0):
        enc.encode_part(*args, str(out), part, 3)
    with pytest.raises(FileNotFoundError, match=r"part-001-of-003.json: encode part 1 of 3 has not finished"):
        enc.gather(params, str(tmp / "clips"), str(out), 3)
    enc.encode_part(*args, str(out), 1, 3)
    result = enc.gather(params, str(tmp / "clips"), str(out), 3)
    assert result["jobs"] == 3 and result["encoded"] == len(list((tmp / "a").rglob("shard-*.safetensors")))
    assert read_index(out) == read_index(tmp / "a")
    for shard in (tmp / "a").rglob("shard-*.safetensors"):
        assert (out / shard.relative_to(tmp / "a")).read_bytes() == shard.read_bytes(), shard
    assert sorted(len(part_range(7, k, 3)) for k in range(3)) == [2, 2, 3]
    assert [i for k in range(3) for i in part_range(7, k, 3)] == list(range(7))


def test_one_decode_serves_every_size(setup):
    """load_clip_sizes (one decode, the train split's two resolutions) equals load_clip at each size."""
    import numpy as np

    from osv.data import read_manifest
    from osv.video import load_clip, load_clip_sizes

    params, tmp, _ = setup
    row = read_manifest(tmp / "clips" / "manifest.csv", "train")[0]
    path, d = tmp / "clips" / row["video"], params["data"]
    both = load_clip_sizes(path, d["frames"], d["fps"], [(64, 32), (32, 16)])
    for got, (w, h) in zip(both, [(64, 32), (32, 16)]):
        np.testing.assert_array_equal(got, load_clip(path, d["frames"], d["fps"], w, h))


@pytest.fixture
def damaged(setup, tmp_path):
    """A copy of the encoded folder and its first train shard, to damage."""
    import shutil

    _, tmp, _ = setup
    root = tmp_path / "latents"
    shutil.copytree(tmp / "a", root)
    return root, root / "train/64x32/shard-00000.safetensors"


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _zero_latents(path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors["latents"] = torch.zeros_like(tensors["latents"])
    save_file(tensors, str(path), metadata=meta)  # a valid shard with the same fingerprint, wrong content


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte, _zero_latents], ids=["truncated", "flipped", "zeroed"])
def test_a_damaged_shard_is_named_when_first_read(damaged, damage):
    from osv.latents import ShardError

    root, shard = damaged
    expected = next(s["sha256"] for s in read_index(root)["groups"]["train/64x32"]["shards"]
                    if s["file"] == shard.name)
    damage(shard)
    ds = LatentDataset(root, "train", 64, 32)  # hashes lazily: construction does not read the shard
    with pytest.raises(ShardError, match=f"{shard}: shard changed or truncated .*index.json says {expected}"):
        ds[0]
    assert ds[len(ds) - 1]["latents"].shape[0] == 4  # other shards still read


def test_unreadable_shard_without_a_hash_is_named(damaged):
    import json

    from osv.latents import ShardError

    root, shard = damaged
    index = read_index(root)
    for s in index["groups"]["train/64x32"]["shards"]:
        del s["sha256"]  # an index written before shards carried hashes
    (root / "index.json").write_text(json.dumps(index))
    _truncate(shard)
    with pytest.raises(ShardError, match=f"{shard}: cannot read latent shard"):
        LatentDataset(root, "train", 64, 32)[0]


def test_rerun_encodes_damaged_shards_again(setup, damaged):
    params, tmp, _ = setup
    root, shard = damaged
    _zero_latents(shard)
    truncated = root / "test/64x32/shard-00001.safetensors"
    _truncate(truncated)
    with pytest.warns(UserWarning) as caught:
        result = enc.encode_all(params, str(tmp / "clips"), str(tmp / "base"), str(tmp / "base" / "vae"),
                                str(root))
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{shard}: changed since `osv encode` wrote it") for m in messages), messages
    assert any(m.startswith(f"{truncated}: unreadable") for m in messages), messages
    assert result["encoded"] == 2
    assert shard.read_bytes() == (tmp / "a" / shard.relative_to(root)).read_bytes()
    assert read_index(root) == read_index(tmp / "a")


def test_nan_latents_stop_encode_before_the_shard_and_index(setup, damaged, monkeypatch):
    """A NaN in batch 1 of train/64x32 (its shard 1, missing here): no shard 1, and the earlier
    complete run's index.json is set aside (the folder does not look complete); every shard
    already written stays for the rerun."""
    from osv.numerics import INJECT_ENV, NonFiniteError

    params, tmp, _ = setup
    root, _ = damaged
    missing = root / "train/64x32/shard-00001.safetensors"
    missing.unlink()
    monkeypatch.setenv(INJECT_ENV, "encode:1")
    with pytest.raises(NonFiniteError, match=r"^osv encode: non-finite latents at step 1 \(latents=nan\)"):
        enc.encode_all(params, str(tmp / "clips"), str(tmp / "base"), str(tmp / "base" / "vae"), str(root))
    assert not missing.exists() and not (root / "index.json").exists()
    assert (root / enc.PREVIOUS_INDEX).exists() and (root / "train/64x32/shard-00000.safetensors").exists()
