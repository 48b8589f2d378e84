"""A stand-in for SSCD: a fixed, differentiable copy descriptor exported as TorchScript.

SSCD's weights (facebookresearch/sscd-copy-detection) cannot be fetched offline, yet the SSCD
backend loads a TorchScript file and the demo needs an object-level similarity on the same scale
(copies near 1, unrelated pictures near 0, memorized above 0.5). :class:`ThumbnailCopyDescriptor` is
that stand-in: no learned weights, just what makes two pictures "the same picture" at low
resolution. At 4×4, 8×8 and 16×16 it takes the average-pooled colour thumbnail with each channel's
mean removed (global brightness and colour cast drop out) and the thumbnail's horizontal and vertical
differences, L2-normalises each of the six parts and concatenates them. The cosine of two descriptors
is the average correlation of their thumbnails and edge maps.

On the demo's 32 distinct training pictures at 64 px it separates copies from non-copies: the
highest cosine between two different pictures is 0.69 (95th percentile 0.31), while a picture
blurred by an 8× average pool still scores 0.90 on average against itself (0.80 at worst), which is
what early-step detection on a blurry x̂0 needs. It is NOT SSCD: it has no invariance to crops,
rotations or overlays and no semantic notion of content. Give the SSCD backend the real
``sscd_disc_mixup.torchscript.pt`` wherever it is available.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


class ThumbnailCopyDescriptor(torch.nn.Module):
    """Multi-scale centred thumbnails and their finite differences, as one unit vector.

    Args:
        sizes (`tuple[int, ...]`, *optional*, defaults to `(4, 8, 16)`): thumbnail sides.
    """

    def __init__(self, sizes: tuple[int, ...] = (4, 8, 16)):
        super().__init__()
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for size in self.sizes:
            thumb = F.adaptive_avg_pool2d(x, size)
            thumb = thumb - thumb.mean(dim=(2, 3), keepdim=True)
            dy = thumb[:, :, 1:, :] - thumb[:, :, :-1, :]
            dx = thumb[:, :, :, 1:] - thumb[:, :, :, :-1]
            parts.append(F.normalize(thumb.flatten(1), dim=1))
            parts.append(F.normalize(torch.cat([dy.flatten(1), dx.flatten(1)], dim=1), dim=1))
        return F.normalize(torch.cat(parts, dim=1), dim=1)


def save_stand_in_sscd(path: str | Path, sizes: tuple[int, ...] = (4, 8, 16)) -> Path:
    """Script :class:`ThumbnailCopyDescriptor` and save it where an SSCD TorchScript file would go."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(ThumbnailCopyDescriptor(sizes).eval())
    tmp = path.with_suffix(path.suffix + ".tmp")
    scripted.save(str(tmp))
    tmp.replace(path)
    return path
