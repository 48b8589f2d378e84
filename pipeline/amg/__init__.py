"""Anti-Memorization Guidance (Chen, Liu, Xu, CVPR 2024) for diffusers pipelines, offline.

Public API:

* :class:`AMGConfig`: mode (``paper`` / ``reference``), backend and every constant.
* Backends: :class:`SSCDBackend`, :class:`OpenClipBackend`, :class:`NormalizedL2Backend`.
* :class:`InMemoryNeighbourIndex`: a :class:`~pipeline.core.neighbours.NeighbourIndex` in RAM
  (tests, small sets).
* :class:`MemorizationDetector`: backend + index + threshold schedule.
* :class:`AntiMemorizationGuidance`: the per-step logic, passed to a pipeline as ``amg=``.
* Pipelines: :class:`AMGStableDiffusionPipeline`, :class:`AMGDDPMPipeline`, :class:`AMGDDIMPipeline`.
* :mod:`pipeline.amg.terms`: the equations as pure functions.
"""

from pipeline.amg.backends import NormalizedL2Backend, OpenClipBackend, SimilarityBackend, SSCDBackend
from pipeline.amg.config import AMGConfig
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
    "SSCDBackend",
    "SimilarityBackend",
]
