"""∇_{x_t}σ (G_sim's gradient) against central finite differences, for every backend, in float64.

The path is the one the pipelines use: x_t → x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ (ε̂ fixed) → VAE decoder (latent
models) or identity (pixel models) → backend embedding → score against the n0 found by detection.
"""

from __future__ import annotations

import open_clip
import pytest
import torch

from demo.memorizing.components import tiny_vae
from demo.memorizing.descriptors import ThumbnailCopyDescriptor
from pipeline.amg import (
    AMGConfig,
    AntiMemorizationGuidance,
    InMemoryNeighbourIndex,
    MemorizationDetector,
    NormalizedL2Backend,
    OpenClipBackend,
    PixelL2Backend,
    SSCDBackend,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit.script/load deprecation notices
    pytest.mark.usefixtures("one_torch_thread"),
]


def _tiny_open_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        text_cfg={"context_length": 8, "vocab_size": 100, "width": 16, "heads": 1, "layers": 1},
    ).eval()


def _backend(name: str, tmp_path):
    if name == "sscd":
        path = tmp_path / "stand_in.torchscript.pt"
        torch.jit.script(ThumbnailCopyDescriptor()).save(str(path))
        return SSCDBackend.from_file(path, image_size=32)
    if name == "clip":
        return OpenClipBackend(_tiny_open_clip(), image_size=32)
    if name == "l2":
        return PixelL2Backend(image_size=16)
    return NormalizedL2Backend(image_size=16, k=5)


@pytest.mark.parametrize("latent", [True, False], ids=["through_vae", "pixels"])
@pytest.mark.parametrize("name", ["sscd", "clip", "nl2", "l2"])
def test_sigma_gradient_matches_finite_differences(name, latent, tmp_path):
    backend = _backend(name, tmp_path).double()
    gen = torch.Generator().manual_seed(7)
    train = torch.rand(6, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    index = InMemoryNeighbourIndex.from_images(backend, train, [f"c{i}" for i in range(6)])
    amg = AntiMemorizationGuidance(MemorizationDetector(backend, index, AMGConfig.preset("paper", name)))

    if latent:
        vae = tiny_vae(channels=(16, 32), sample_size=32, seed=1).double().eval()
        shape = (2, 4, 16, 16)

        def to_pixels(z):
            return vae.decode(z, return_dict=False)[0]
    else:
        shape = (2, 3, 32, 32)

        def to_pixels(z):
            return z

    x_t = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    alpha_bar = torch.tensor(0.7, dtype=torch.float64)
    with torch.no_grad():
        detection = amg.detector.detect(to_pixels((x_t - (0.3**0.5) * eps) / 0.7**0.5))
    sigma, grad = amg.sigma_and_gradient(x_t, eps, alpha_bar, to_pixels, detection)
    assert torch.allclose(sigma, detection.sigma.to(sigma), atol=1e-5)  # same n0, same score

    def sigma_at(x):
        with torch.no_grad():
            x0 = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            return amg.detector.similarity(to_pixels(x0), detection)

    for seed in range(2):
        direction = torch.randn(
            shape, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64
        )
        direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        h = 1e-5
        fd = (sigma_at(x_t + h * direction) - sigma_at(x_t - h * direction)) / (2 * h)
        analytic = (grad * direction).flatten(1).sum(1)
        torch.testing.assert_close(analytic, fd, rtol=1e-4, atol=1e-7)
        assert analytic.abs().max() > 1e-6  # a non-trivial gradient
