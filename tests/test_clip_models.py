"""Model factory: offline tiny preset, checkpoints, loud failures, preprocessing split, batch invariance."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from fixtures.shard_factory import random_photo
from pipeline.core.config import EmbedConfig
from pipeline.embed.clip_models import (
    ModelLoadError,
    clip_spec,
    fetch_weights,
    load_clip,
    load_sscd,
    normalize_pixels,
)
from pipeline.embed.embed import embed_fingerprint
from pipeline.embed.identity import model_identity, resolve_precision
from pipeline.embed.prepare import fit_to_model

TINY = EmbedConfig(shards="unused", out="unused")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class TinySSCD(torch.nn.Module):
    """Stands in for an SSCD TorchScript file: a conv, global pooling and a projection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=5, stride=4)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def write_tiny_sscd(path: Path) -> Path:
    """Script :class:`TinySSCD` (fixed seed) into ``path``, like released SSCD ``.torchscript.pt`` files."""
    torch.manual_seed(0)
    torch.jit.script(TinySSCD()).save(str(path))
    return path


def photos(n: int) -> list[Image.Image]:
    sizes = [(48, 40), (40, 48), (64, 64), (1, 1), (300, 20), (23, 97)]
    return [random_photo(i, sizes[i % len(sizes)]) for i in range(n)]


def model_inputs(clip, images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fit_to_model(im, clip.spec.preprocess)) for im in images])


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY, "cpu")


def test_tiny_preset_is_offline_labelled_and_deterministic(tiny):
    assert (tiny.name, tiny.semantic, tiny.dim) == ("tiny-random-seed0", False, 64)
    assert tiny.spec.preprocess["size"] == (64, 64)
    again = load_clip(TINY, "cpu")
    for a, b in zip(tiny.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_tokenizer_works_offline(tiny):
    tokens = tiny.tokenizer(["a photo of a cat", ""])
    assert tokens.shape == (2, 32)
    assert (tokens[0] > 0).sum() > (tokens[1] > 0).sum() >= 2  # start and end tokens even when empty


def test_split_preprocessing_equals_open_clips_transform(tiny):
    images = photos(6)
    ours = normalize_pixels(torch.from_numpy(model_inputs(tiny, images)), **_norm(tiny), dtype=torch.float32)
    theirs = torch.stack([tiny.preprocess(im) for im in images])
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_squash_preprocessing_equals_open_clips_transform(tiny):
    squash = dataclasses.replace(tiny.spec, preprocess={**tiny.spec.preprocess, "resize_mode": "squash"})
    reference = image_transform_v2(PreprocessCfg(**squash.preprocess), is_train=False)
    images = photos(6)
    pixels = np.stack([np.asarray(fit_to_model(im, squash.preprocess)) for im in images])
    ours = normalize_pixels(torch.from_numpy(pixels), **_norm(tiny), dtype=torch.float32)
    assert torch.allclose(ours, torch.stack([reference(im) for im in images]), atol=1e-6)


def _norm(clip) -> dict:
    return {"mean": clip.spec.preprocess["mean"], "std": clip.spec.preprocess["std"]}


def test_embeddings_are_unit_norm_float16_and_batch_invariant(tiny):
    pixels = model_inputs(tiny, photos(11))
    together = tiny.encode_images(pixels, batch_size=4)
    assert together.shape == (11, 64) and together.dtype == np.float16
    assert np.allclose(np.linalg.norm(together.astype(np.float32), axis=1), 1, atol=1e-3)
    alone = np.concatenate([tiny.encode_images(pixels[i : i + 1], batch_size=4) for i in range(11)])
    assert np.array_equal(together, alone)  # padding to a fixed batch: neighbours do not matter
    assert tiny.encode_images(pixels[:0], batch_size=4).shape == (0, 64)


def test_caption_embeddings_dedupe_and_accept_empty_captions(tiny):
    captions = ["a red square", "", "a red square", "a blue circle"]
    text = tiny.encode_texts(captions, batch_size=4)
    assert text.shape == (4, 64) and text.dtype == np.float16
    assert np.array_equal(text[0], text[2]) and not np.array_equal(text[0], text[3])
    assert np.allclose(np.linalg.norm(text.astype(np.float32), axis=1), 1, atol=1e-3)
    assert tiny.encode_texts([], batch_size=4).shape == (0, 64)


def test_real_architecture_spec_matches_the_built_model():
    cfg = dataclasses.replace(TINY, model="ViT-B-32")
    spec = clip_spec(cfg)
    assert (spec.name, spec.semantic, spec.dim, spec.preprocess["size"]) == (
        "ViT-B-32-random-seed0",
        False,
        512,
        (224, 224),
    )
    clip = load_clip(cfg, "cpu")  # load_clip checks the derived preprocessing against the model's own
    assert clip.encode_images(np.zeros((1, 224, 224, 3), np.uint8), batch_size=1).shape == (1, 512)
    tagged = clip_spec(dataclasses.replace(cfg, pretrained="openai"))
    assert tagged.name == "ViT-B-32/openai" and tagged.semantic and tagged.quick_gelu


def test_unfetchable_pretrained_weights_fail_loudly():
    cfg = dataclasses.replace(TINY, model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ModelLoadError, match="refusing to fall back to random weights"):
        fetch_weights(clip_spec(cfg))
    with pytest.raises(ModelLoadError, match="ViT-B-32/laion2b_s34b_b79k"):
        load_clip(cfg, "cpu")


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"model": "no-such-model"}, ValueError, "unknown open_clip model"),
        ({"model": "ViT-B-32", "pretrained": "no_such_tag"}, ValueError, "unknown pretrained tag"),
        ({"pretrained": "openai"}, ValueError, "tiny preset has no pretrained weights"),
        ({"model": "ViT-B-32", "pretrained": "openai", "checkpoint": "x.pt"}, ValueError, "not both"),
        ({"checkpoint": "/no/such/file.pt"}, FileNotFoundError, "does not exist"),
        ({"model": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"}, ValueError, "only built-in"),
    ],
)
def test_bad_model_options_are_clear_errors(changes: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        clip_spec(dataclasses.replace(TINY, **changes))


def test_checkpoint_files_load_and_broken_ones_fail(tiny, tmp_path: Path):
    torch.manual_seed(1)
    trained = open_clip.create_model("tiny")
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "tiny-trained.pt")
    clip = load_clip(dataclasses.replace(TINY, checkpoint=str(tmp_path / "tiny-trained.pt")), "cpu")
    assert (clip.name, clip.semantic) == ("tiny@tiny-trained.pt", True)
    pixels = model_inputs(tiny, photos(2))
    assert not np.array_equal(clip.encode_images(pixels, 2), tiny.encode_images(pixels, 2))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="refusing to fall back"):
        load_clip(dataclasses.replace(TINY, checkpoint=str(tmp_path / "broken.pt")), "cpu")


def test_precision_is_fp32_on_cpu_and_half_on_gpu():
    assert [resolve_precision(p, "cpu") for p in ("auto", "fp16", "bf16", "fp32")] == ["fp32"] * 4
    assert [resolve_precision(p, "cuda") for p in ("auto", "fp16", "bf16", "fp32")] == [
        "fp16",
        "fp16",
        "bf16",
        "fp32",
    ]
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", "cpu")


def test_sscd_torchscript_descriptors(tmp_path: Path):
    sscd = load_sscd(write_tiny_sscd(tmp_path / "sscd.pt"), image_size=64, device="cpu")
    assert sscd.dim == 16
    pixels = np.stack([np.asarray(im.resize((64, 64))) for im in photos(3)])
    descriptors = sscd.encode(pixels, batch_size=2)
    assert descriptors.shape == (3, 16) and descriptors.dtype == np.float16
    assert np.allclose(np.linalg.norm(descriptors.astype(np.float32), axis=1), 1, atol=1e-3)
    (tmp_path / "plain.pt").write_bytes(b"pickle, not TorchScript")
    with pytest.raises(ModelLoadError, match="SSCD"):
        load_sscd(tmp_path / "plain.pt", image_size=64, device="cpu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_half_precision_matches_cpu_fp32(tiny, precision: str):
    gpu = load_clip(TINY, "cuda", precision)
    assert gpu.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert next(gpu.model.parameters()).device.type == "cuda"
    pixels = model_inputs(tiny, photos(8))
    on_gpu = gpu.encode_images(pixels, 8).astype(np.float32)
    on_cpu = tiny.encode_images(pixels, 8).astype(np.float32)
    assert np.allclose(np.linalg.norm(on_gpu, axis=1), 1, atol=1e-2)
    assert (on_gpu * on_cpu).sum(axis=1).min() > 0.99
    text_gpu = gpu.encode_texts(["a photo", ""], 8).astype(np.float32)
    assert (text_gpu * tiny.encode_texts(["a photo", ""], 8).astype(np.float32)).sum(axis=1).min() > 0.99


def test_model_files_count_by_content_not_by_path_or_mtime(tmp_path: Path):
    """Weights replaced in place (same path, same size, same mtime) are a new model: re-embed."""
    checkpoint, sscd = tmp_path / "clip.pt", tmp_path / "sscd.pt"
    checkpoint.write_bytes(b"A" * 64)
    sscd.write_bytes(b"S" * 64)
    cfg = EmbedConfig(shards="s", out="o", checkpoint=str(checkpoint), sscd_checkpoint=str(sscd))
    before, identity = embed_fingerprint(cfg), model_identity(cfg)
    for path, data in ((checkpoint, b"B" * 64), (sscd, b"T" * 64)):
        stat = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert embed_fingerprint(cfg) != before  # each file alone changes the fingerprint
        before = embed_fingerprint(cfg)
        if path == checkpoint:
            assert model_identity(cfg)["checkpoint_sha256"] != identity["checkpoint_sha256"]
    with pytest.raises(FileNotFoundError, match=r"gone\.pt does not exist"):
        model_identity(dataclasses.replace(cfg, checkpoint=str(tmp_path / "gone.pt")))
