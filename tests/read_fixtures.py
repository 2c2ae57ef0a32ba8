"""Shared helpers of the READ tests (imported explicitly; not a conftest)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np

from workers.read.tiny import make_tiny_checkpoint


@functools.cache
def tiny_checkpoint(answer: str = "Sure, [SEG].") -> tuple[Path, Path]:
    """(read_dir, clip_dir) of a tiny random checkpoint, written once per test process."""
    folder = Path(tempfile.mkdtemp(prefix="read-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_tiny_checkpoint(folder, seed=0, answer=answer)


@functools.cache
def tiny_lisa_checkpoint(answer: str = "[SEG].") -> tuple[Path, Path]:
    """(lisa_dir, clip_dir) of a tiny random checkpoint in LISA-7B-v1's layout (224 px CLIP), once per process."""
    folder = Path(tempfile.mkdtemp(prefix="lisa-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_tiny_checkpoint(folder, seed=0, answer=answer, kind="lisa")


@functools.cache
def tiny_lisa_13b_checkpoint(answer: str = "[SEG].") -> tuple[Path, Path]:
    """(lisa_dir, clip_dir) of a tiny random checkpoint in LISA-13B-llama2-v1's layout ([SEG] first), once per
    process."""
    folder = Path(tempfile.mkdtemp(prefix="lisa-13b-tiny-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return make_tiny_checkpoint(folder, seed=0, answer=answer, kind="lisa", layout="13b")


def official_sam_modeling() -> ModuleType:
    """segment-anything's ``modeling`` subpackage, imported without the package's ``__init__``.

    ``import segment_anything`` runs its __init__, which imports utils/transforms.py and thus torchvision;
    PyPI's torchvision cannot be installed beside this torch build. The modeling classes themselves only need
    torch, so the subpackage is loaded from its files under a private name.
    """
    name = "_segment_anything_modeling"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed (pip install segment-anything==1.0)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "modeling"
    module_spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB uint8 image (blobs rather than noise, so resizes matter)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
