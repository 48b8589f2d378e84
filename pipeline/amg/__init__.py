"""Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024) for diffusers pipelines, offline.

Public API:

* :class:`AMGConfig`: mode (``paper`` / ``reference`` / ``released_pixel``), backend and every constant;
  :func:`save_threshold` / :func:`load_threshold` for a calibrated λ_t table
  (:func:`pipeline.amg.terms.calibrate_threshold` makes one).
* Backends: :class:`SSCDBackend`, :class:`OpenClipBackend`, :class:`NormalizedL2Backend`,
  :class:`PixelL2Backend`.
* :class:`InMemoryNeighbourIndex`: a :class:`~pipeline.core.neighbours.NeighbourIndex` in RAM
  (tests, small sets).
* :class:`MemorizationDetector`: backend + index + threshold schedule.
* :class:`AntiMemorizationGuidance`: the per-step logic, passed to a pipeline as ``amg=``.
* Pipelines: :class:`AMGStableDiffusionPipeline`, :class:`AMGDDPMPipeline`, :class:`AMGDDIMPipeline`.
* :mod:`pipeline.amg.terms`: the equations as pure functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it. Imported on first use (PEP 562), as diffusers does: a
#: job that only reads :class:`AMGConfig` (the audit, with nothing to generate) loads no torch.
_EXPORTS = {
    "AMGConfig": "config",
    "load_threshold": "config",
    "save_threshold": "config",
    "NormalizedL2Backend": "backends",
    "PixelL2Backend": "backends",
    "OpenClipBackend": "backends",
    "SimilarityBackend": "backends",
    "SSCDBackend": "backends",
    "Detection": "detector",
    "MemorizationDetector": "detector",
    "AMGStep": "guidance",
    "AMGTrace": "guidance",
    "AntiMemorizationGuidance": "guidance",
    "InMemoryNeighbourIndex": "memory_index",
    "AMGDDIMPipeline": "pipelines",
    "AMGDDPMPipeline": "pipelines",
    "AMGImagePipelineOutput": "pipelines",
    "AMGStableDiffusionPipeline": "pipelines",
    "AMGStableDiffusionPipelineOutput": "pipelines",
}

if TYPE_CHECKING:
    from pipeline.amg.backends import (
        NormalizedL2Backend,
        OpenClipBackend,
        PixelL2Backend,
        SimilarityBackend,
        SSCDBackend,
    )
    from pipeline.amg.config import AMGConfig, load_threshold, save_threshold
    from pipeline.amg.detector import Detection, MemorizationDetector
    from pipeline.amg.guidance import AMGStep, AMGTrace, AntiMemorizationGuidance
    from pipeline.amg.memory_index import InMemoryNeighbourIndex
    from pipeline.amg.pipelines import (
        AMGDDIMPipeline,
        AMGDDPMPipeline,
        AMGImagePipelineOutput,
        AMGStableDiffusionPipeline,
        AMGStableDiffusionPipelineOutput,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "AMGConfig",
    "AMGDDIMPipeline",
    "AMGDDPMPipeline",
    "AMGImagePipelineOutput",
    "AMGStableDiffusionPipeline",
    "AMGStableDiffusionPipelineOutput",
    "AMGStep",
    "AMGTrace",
    "AntiMemorizationGuidance",
    "Detection",
    "InMemoryNeighbourIndex",
    "MemorizationDetector",
    "NormalizedL2Backend",
    "OpenClipBackend",
    "PixelL2Backend",
    "SSCDBackend",
    "SimilarityBackend",
    "load_threshold",
    "save_threshold",
]
