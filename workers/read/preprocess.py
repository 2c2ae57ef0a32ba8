"""Image inputs of READ and LISA: the CLIP view (336 px for READ, 224 px for LISA v1: the CLIP folder's
preprocessor_config.json says which) and the SAM view (1024 px frame). DESIGN.md 5.3.

Both are pure functions of a uint8 RGB array, written with PIL so that they give the same numbers whichever
image-processing backend transformers picks on a machine (the original used transformers' PIL-based
CLIPImageProcessor and segment-anything's ResizeLongestSide, which resizes a PIL image bilinearly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workers.read.config import json_object
from workers.read.errors import ClipFolderError, ReadError

# segment-anything's Sam.pixel_mean / pixel_std (RGB, 0-255 scale).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SAM_FRAME = 1024

# OpenAI CLIP normalisation; used when the CLIP folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocessing:
    """CLIPImageProcessor settings: shortest side → ``resize``, centre crop ``crop`` × ``crop``, mean/std."""

    resize: int = 336
    crop: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_folder(cls, clip_dir: Path, default_size: int | None = None) -> ClipPreprocessing:
        """Read ``preprocessor_config.json`` of a CLIP folder (CLIPImageProcessor format, either the dict or the
        older flat-int layout). Without the file (or its size fields): ``default_size`` (the vision config's
        image_size), else 336."""
        fallback = int(default_size) if default_size else 336
        path = Path(clip_dir) / "preprocessor_config.json"
        if not path.is_file():
            return cls(fallback, fallback)
        hint = "copy preprocessor_config.json again from the CLIP release (CLIPImageProcessor format)"
        raw = json_object(path, hint=hint, error=ClipFolderError)
        try:
            size = raw.get("size", fallback)
            crop = raw.get("crop_size", size)
            resize = size.get("shortest_edge", fallback) if isinstance(size, dict) else size
            crop_side = crop.get("height", resize) if isinstance(crop, dict) else crop
            mean = tuple(float(value) for value in raw.get("image_mean", CLIP_MEAN))
            std = tuple(float(value) for value in raw.get("image_std", CLIP_STD))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ClipFolderError(f"{path}: unusable image settings ({exc}); {hint}") from exc
        for name, side in (("size", resize), ("crop_size", crop_side)):
            if not isinstance(side, int) or isinstance(side, bool) or side <= 0:
                raise ClipFolderError(f"{path}: {name} gives {side!r}, not a positive number of pixels; {hint}")
        if crop_side > resize:
            raise ClipFolderError(f"{path}: crop_size {crop_side} is larger than size {resize}; {hint}")
        for name, values in (("image_mean", mean), ("image_std", std)):
            if len(values) != 3 or not all(math.isfinite(value) for value in values):
                raise ClipFolderError(f"{path}: {name} must be three finite numbers (R, G, B); {hint}")
        if min(std) <= 0:
            raise ClipFolderError(f"{path}: image_std must be positive; {hint}")
        return cls(resize=resize, crop=crop_side, mean=mean, std=std)  # type: ignore[arg-type]


def clip_pixels(image: np.ndarray, settings: ClipPreprocessing) -> torch.Tensor:
    """CLIP input of one image: float32 (3, crop, crop).

    As transformers' CLIPImageProcessor: the shortest side becomes ``resize`` and the other
    ``int(resize * long / short)`` (truncated), PIL bicubic on uint8; centre crop with the offset rounded down;
    scale to [0, 1]; normalise.
    """
    height, width = image.shape[:2]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(settings.resize * long / short)
    new_w, new_h = (settings.resize, new_long) if width <= height else (new_long, settings.resize)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - settings.crop) // 2, (new_w - settings.crop) // 2
    cropped = resized[top : top + settings.crop, left : left + settings.crop].astype(np.float32) / 255.0
    mean = np.asarray(settings.mean, dtype=np.float32)
    std = np.asarray(settings.std, dtype=np.float32)
    return torch.from_numpy(((cropped - mean) / std).transpose(2, 0, 1).copy())


def sam_input_size(original_size: tuple[int, int], frame: int = SAM_FRAME) -> tuple[int, int]:
    """(h_in, w_in): the longest side scaled to ``frame``, each side rounded half up (ResizeLongestSide)."""
    height, width = original_size
    scale = frame / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_resized(image: np.ndarray, frame: int = SAM_FRAME) -> tuple[np.ndarray, tuple[int, int]]:
    """The uint8 (h_in, w_in, 3) image SAM's frame is made of, and ``input_size`` (h_in, w_in).

    segment-anything's ResizeLongestSide.apply_image: bilinear PIL resize of the longest side to ``frame``. On
    its own because the ``device_frames`` lever ships this (a quarter of the float frame's bytes) to the device
    and finishes the frame there with :func:`sam_frames_on_device`.
    """
    in_h, in_w = sam_input_size((int(image.shape[0]), int(image.shape[1])), frame)
    resized = np.asarray(Image.fromarray(image).resize((in_w, in_h), resample=Image.Resampling.BILINEAR))
    return resized, (in_h, in_w)


def sam_pixels(image: np.ndarray, frame: int = SAM_FRAME) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM input of one image: float32 (3, frame, frame) and its ``input_size`` (h_in, w_in).

    segment-anything (ResizeLongestSide.apply_image + Sam.preprocess): bilinear PIL resize of the longest side
    to ``frame``, normalise with SAM's mean/std, zero-pad bottom and right.
    """
    resized, (in_h, in_w) = sam_resized(image, frame)
    normalised = (resized.astype(np.float32) - np.asarray(SAM_PIXEL_MEAN, np.float32)) / np.asarray(
        SAM_PIXEL_STD, np.float32
    )
    framed = np.zeros((3, frame, frame), dtype=np.float32)
    framed[:, :in_h, :in_w] = normalised.transpose(2, 0, 1)
    return torch.from_numpy(framed), (in_h, in_w)


def sam_frames_on_device(
    resized: Sequence[torch.Tensor | np.ndarray],
    device: torch.device | str,
    dtype: torch.dtype,
    *,
    frame: int = SAM_FRAME,
    pin_memory: bool = False,
) -> torch.Tensor:
    """(B, 3, frame, frame) SAM frames in ``dtype`` on ``device`` from uint8 (h_in, w_in, 3) resized images.

    The same float32 operations as :func:`sam_pixels` (convert, subtract SAM's mean, divide by its std, zero
    the padding at the bottom and right), run where the model is, so they give the same bits; only then the
    cast to ``dtype``. The images cross in one uint8 copy, from page-locked memory without blocking when
    ``pin_memory`` (the ``pinned`` lever; CUDA only).
    """
    device = torch.device(device)
    pin_memory = pin_memory and device.type == "cuda"
    # Bytes outside each image are never read: the mask below puts zeros there.
    packed = torch.empty((len(resized), frame, frame, 3), dtype=torch.uint8, pin_memory=pin_memory)
    for index, image in enumerate(resized):
        height, width = image.shape[:2]
        packed.numpy()[index, :height, :width] = np.asarray(image)
    sizes = torch.tensor([tuple(image.shape[:2]) for image in resized], dtype=torch.long)
    mean, std = host_to_device(
        torch.tensor([SAM_PIXEL_MEAN, SAM_PIXEL_STD], dtype=torch.float32), device, pin_memory
    )
    sizes = host_to_device(sizes, device, pin_memory)
    normalised = (host_to_device(packed, device, pin_memory).float() - mean) / std
    span = torch.arange(frame, device=device)
    inside = (span[None, :, None] < sizes[:, 0, None, None]) & (span[None, None, :] < sizes[:, 1, None, None])
    framed = torch.where(inside[..., None], normalised, 0.0)
    return framed.permute(0, 3, 1, 2).to(dtype=dtype, memory_format=torch.contiguous_format)


def stack_to_device(
    tensors: Sequence[torch.Tensor], device: torch.device | str, *, pinned: bool
) -> torch.Tensor:
    """Stack host tensors into one batch; with ``pinned`` (the lever) and a CUDA ``device``, stacked straight
    into page-locked memory and copied ``non_blocking``, so the host goes on queueing work during the copy.
    Otherwise the stack stays on the host and the model moves it, as the eager path always did."""
    if not (pinned and torch.device(device).type == "cuda"):
        return torch.stack(list(tensors))
    buffer = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    torch.stack(list(tensors), out=buffer)
    return host_to_device(buffer, device, True)


def host_to_device(tensor: torch.Tensor, device: torch.device | str, pinned: bool) -> torch.Tensor:
    """``tensor.to(device)``; with ``pinned`` on CUDA from page-locked memory and ``non_blocking``: a copy from
    pageable memory would make the host wait for everything already queued on the device."""
    if not (pinned and torch.device(device).type == "cuda"):
        return tensor.to(device)
    page_locked = tensor if tensor.is_pinned() else tensor.pin_memory()
    return page_locked.to(device, non_blocking=True)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Check and normalise an image array to contiguous uint8 (H, W, 3)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ReadError(f"expected an RGB image (H, W, 3); got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise ReadError(f"expected a uint8 image; got dtype {array.dtype}")
    return np.ascontiguousarray(array)
