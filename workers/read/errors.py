"""Typed errors of the READ detector; every message names the file or value to fix."""

from __future__ import annotations

from workers.detectors.base import DetectorError, SetupError


class ReadError(DetectorError):
    """Base class of READ-specific failures."""


class CheckpointError(ReadError, SetupError):
    """A READ checkpoint folder is incomplete or inconsistent (a setup error: no image is to blame)."""


class CorruptShardError(CheckpointError):
    """A weight shard cannot be read (truncated, corrupt, or not a weight file)."""


class MissingWeightsError(CheckpointError):
    """The shards lack tensors the model needs."""


class UnexpectedWeightsError(CheckpointError):
    """The shards hold tensors the model does not know."""


class WeightShapeError(CheckpointError):
    """A tensor in the shards has a different shape from the model's parameter."""


class ClipFolderError(ReadError, SetupError):
    """The CLIP folder is missing or does not hold the vision tower this checkpoint was trained with."""


class SimilarityError(ReadError):
    """A similarity vector cannot be turned into point prompts (wrong length or grid)."""


class WrongDetectorError(CheckpointError):
    """The checkpoint belongs to another family than the detector runs (e.g. a LISA folder given to ``read``);
    the message names the detector that fits."""
