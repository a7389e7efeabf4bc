"""Images of every form a user hands the Predictor, as the ``[3, H, W]`` float32 tensors in [0, 1] that
torchvision's detection models take.

Accepted: a path (str / PathLike), a PIL image, a numpy array (``[H, W]`` grayscale, ``[H, W, 1|3|4]``;
uint8 in 0..255 or float in [0, 1]) or a tensor (``[3, H, W]``, uint8 or float in [0, 1]). Alpha is
composited over black, as :class:`~dynamask.data.CocoDetection` does for RGBA files, so a file and the
same pixels in memory give the same tensor. Files and PIL images are turned upright by their EXIF
orientation (``PIL.ImageOps.exif_transpose``), so results refer to the image as viewers show it.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import torch
from PIL import Image

from dynamask.data.coco import _to_rgb_array, read_rgb_array, upright

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

# What a folder given to `dynamask infer` is searched for (by ending, case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """``[3, H, W]`` float32 in [0, 1] from an image file; errors name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.islink(path):  # a link whose target is gone, or a loop of links
            raise FileNotFoundError(f"{path}: a symbolic link to nothing readable ({_link_problem(path)})")
        raise FileNotFoundError(f"image not found: {path}")
    return _uint8_to_tensor(read_rgb_array(path))


def _link_problem(path: str) -> str:
    try:
        os.path.realpath(path, strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "a loop of links"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of links"
    return f"its target {os.readlink(path)} does not exist"


def to_image_tensor(image: ImageInput) -> torch.Tensor:
    """One image of any accepted form as ``[3, H, W]`` float32 in [0, 1] (on the input tensor's device)."""
    if isinstance(image, (str, os.PathLike)):
        t = read_image(image)
    elif isinstance(image, Image.Image):  # upright by its EXIF orientation, as a file of it would be read
        t = _uint8_to_tensor(_to_rgb_array(upright(image)))
    elif isinstance(image, np.ndarray):
        t = _array_to_tensor(image)
    elif isinstance(image, torch.Tensor):
        t = _tensor_to_tensor(image)
    else:
        raise TypeError(
            f"an image must be a path, a PIL image, a numpy array or a tensor, got {type(image).__name__}"
        )
    if t.shape[1] == 0 or t.shape[2] == 0:  # the model would divide by its size
        where = f"{os.fspath(image)}: " if isinstance(image, (str, os.PathLike)) else ""
        raise ValueError(f"{where}the image is empty ({t.shape[2]}x{t.shape[1]} pixels)")
    return t


def _uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float32 / 255 (the same arithmetic as CocoDetection)."""
    return _from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # np.asarray(pil_image) is read-only, and torch.from_numpy warns about sharing such memory: copy it
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C")
    return torch.from_numpy(array)


def _array_to_tensor(a: np.ndarray) -> torch.Tensor:
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"a numpy image must be [H, W] (grayscale) or [H, W, C] with C in 1, 3, 4; got shape {a.shape}"
        )
    if a.dtype == np.uint8:
        if a.shape[2] == 4:  # through PIL, so the rounding is that of an RGBA file
            return _uint8_to_tensor(_to_rgb_array(Image.fromarray(a, "RGBA")))
        return _uint8_to_tensor(np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"a numpy image must be uint8 (0..255) or float (0..1), got dtype {a.dtype}")
    t = _from_numpy(a.astype(np.float32, copy=False)).permute(2, 0, 1)
    _check_unit_range(t, "numpy")
    if t.shape[0] == 1:
        return t.expand(3, -1, -1).contiguous()
    if t.shape[0] == 4:  # alpha over black
        return (t[:3] * t[3:]).contiguous()
    return t


def _tensor_to_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "meta":
        raise ValueError("an image tensor on the meta device holds no pixel values")
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"an image tensor must be [3, H, W], got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        raise ValueError(f"an image tensor must be uint8 (0..255) or float (0..1), got dtype {t.dtype}")
    t = t.float()
    _check_unit_range(t, "tensor")
    return t


def _check_unit_range(t: torch.Tensor, what: str) -> None:
    # NaN compares false with every bound, and a NaN pixel spreads through the convolutions until every
    # score is NaN and no detection survives: refuse it rather than return nothing.
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"a float {what} image must be finite, got {bad} NaN or infinite values")
    # A float image in 0..255 is the usual slip; the model would see it saturated, so say so.
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ValueError(
            f"a float {what} image must hold values in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}] "
            "(pass uint8 for 0..255 pixels)"
        )


def is_image_file(path: str) -> bool:
    """Whether a file's ending is one of :data:`IMAGE_EXTENSIONS`."""
    return path.lower().endswith(IMAGE_EXTENSIONS)

