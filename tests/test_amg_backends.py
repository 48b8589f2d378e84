"""What reaches the SSCD encoder under each input preparation (released AMG code vs ImageNet)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from demo.memorizing.descriptors import ThumbnailCopyDescriptor
from pipeline.amg import SSCDBackend
from pipeline.amg.backends import IMAGENET_MEAN, IMAGENET_STD

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit.script/load deprecation notices
    pytest.mark.usefixtures("one_torch_thread"),
]


class RecordingEncoder(torch.nn.Module):
    """Keeps its last input; the descriptor is the per-channel mean (enough to be a unit vector)."""

    def __init__(self):
        super().__init__()
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x.detach().clone()
        return x.mean(dim=(2, 3)) + 1.0


def _images(side: int) -> torch.Tensor:
    return torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("side", [64, 400], ids=["enlarge", "shrink"])
def test_released_preparation_feeds_unnormalised_signed_pixels_at_224(side):
    encoder = RecordingEncoder()
    backend = SSCDBackend(encoder)  # the default
    assert (backend.preprocessing, backend.image_size) == ("released", 224)
    images = _images(side)
    backend.embed(images)
    # The released code: bilinear resize of the decoded x̂0 to 224, no antialiasing, no normalisation.
    expected = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(encoder.seen, expected)
    assert encoder.seen.min() < -0.5  # still in [−1, 1]


@pytest.mark.parametrize("side", [64, 400], ids=["enlarge", "shrink"])
def test_imagenet_preparation_feeds_normalised_unit_pixels_at_320(side):
    encoder = RecordingEncoder()
    backend = SSCDBackend(encoder, preprocessing="imagenet")
    assert backend.image_size == 320
    images = _images(side)
    backend.embed(images)
    unit = (images + 1) / 2
    resized = F.interpolate(unit, size=(320, 320), mode="bilinear", align_corners=False, antialias=side > 320)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(encoder.seen, (resized - mean) / std)


def test_size_override_unknown_preparation_and_from_file(tmp_path):
    assert SSCDBackend(RecordingEncoder(), image_size=32).image_size == 32
    assert SSCDBackend(RecordingEncoder(), image_size=32, preprocessing="imagenet").image_size == 32
    with pytest.raises(ValueError, match="preprocessing"):
        SSCDBackend(RecordingEncoder(), preprocessing="clip")
    path = tmp_path / "stand_in.torchscript.pt"
    torch.jit.script(ThumbnailCopyDescriptor()).save(str(path))
    loaded = SSCDBackend.from_file(path)
    assert (loaded.preprocessing, loaded.image_size) == ("released", 224)
    loaded = SSCDBackend.from_file(path, image_size=320, preprocessing="imagenet")
    assert (loaded.preprocessing, loaded.image_size) == ("imagenet", 320)
    vectors = loaded.embed(_images(64))
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))


def test_pixel_l2_scores_minus_the_rms_distance_to_n0_in_unit_pixels():
    from pipeline.amg import PixelL2Backend

    backend = PixelL2Backend(image_size=8)
    gen = torch.Generator().manual_seed(3)
    queries, first, second = (torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1 for _ in range(3))
    neighbours = torch.stack([backend.embed(first), backend.embed(second)], dim=1)  # n0 first
    expected = -(((queries - first) / 2).pow(2).flatten(1).mean(1)).sqrt()
    torch.testing.assert_close(
        backend.score(backend.embed(queries), neighbours), expected, rtol=1e-5, atol=1e-6
    )
    assert backend.metric == "l2" and backend.neighbours_needed == 1 and backend.dim == 3 * 8 * 8
    assert backend.score(backend.embed(first), neighbours[:, :1]).abs().max() < 1e-5  # a copy scores 0
