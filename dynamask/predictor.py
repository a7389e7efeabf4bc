"""``Predictor``: a checkpoint (or a built model) applied to images of any form, results at each image's size.

    from dynamask import Predictor

    predictor = Predictor("runs/r18/last.pth", score_thresh=0.5)
    result = predictor("street.jpg")               # one image -> one Instances
    results = predictor([path, pil_image, array])  # a list -> a list, run batch_size at a time
    result.masks              # [N, H, W] bool
    result.mask_resolution    # [N] the resolution each instance was segmented at
    result.to_coco(image_id=1)  # COCO result dicts (RLE masks)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dynamask.checks import check_device, check_number, fixed_mask_resolution, model_num_classes
from dynamask.data.images import ImageInput, to_image_tensor
from dynamask.engine.checkpoint import model_from_checkpoint
from dynamask.engine.coco_eval import output_to_results
from dynamask.models import mask_handoff
from dynamask.models.detector import DynaMaskRCNN

LabelMap = dict[int, tuple[int, str]]  # contiguous label -> (dataset category id, name), as checkpoints store


@dataclass
class Instances:
    """The detections of one image, in that image's pixel frame, on the CPU.

    Attributes:
        image_size: ``(H, W)``.
        boxes: ``[N, 4]`` float32, xyxy pixels.
        scores: ``[N]`` float32, descending.
        labels: ``[N]`` int64, the model's contiguous classes (from 1).
        category_ids: ``[N]`` int64, dataset category ids (the checkpoint's label map).
        masks: ``[N, H, W]`` bool.
        mask_resolution: ``[N]`` int64, side of the mask each instance was segmented at (14/28/56/112), or
            None for a model that does not say.
        cat_ids: ``cat_ids[label - 1]`` is the category id of ``label`` (what :meth:`to_coco` maps with).
    """

    image_size: tuple[int, int]
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    category_ids: Tensor
    masks: Tensor
    mask_resolution: Tensor | None
    cat_ids: tuple[int, ...] = field(repr=False)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __repr__(self) -> str:  # the masks alone would fill a screen
        res = None if self.mask_resolution is None else self.mask_resolution.tolist()
        return (f"Instances(image_size={self.image_size}, n={len(self)}, category_ids={self.category_ids.tolist()}, "
                f"scores={[round(float(s), 3) for s in self.scores]}, mask_resolution={res})")

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO result dicts (``image_id, category_id, bbox`` xywh, ``score``, ``segmentation`` RLE,
        ``mask_resolution``) for :meth:`pycocotools.coco.COCO.loadRes` or a ``results.json``."""
        output = {"boxes": self.boxes, "labels": self.labels, "scores": self.scores,
                  "masks": self.masks.to(torch.uint8)}
        if self.mask_resolution is not None:
            output["mask_resolution"] = self.mask_resolution
        return output_to_results(image_id, output, self.cat_ids)


class Predictor:
    """Runs a detection model on images and returns one :class:`Instances` per image.

    Args:
        checkpoint: a dynamask checkpoint file (rebuilt from the file alone, loaded with
            ``weights_only=True``), or an already-built model with torchvision's detection contract.
        device: where the model runs (default: CUDA when present, else CPU).
        batch_size: images per forward pass; images are read lazily, one batch at a time.
        amp: autocast (float16) on CUDA; ignored on the CPU, where it would be slower, not faster.
        score_thresh: detections scoring below this (in [0, 1]) are dropped.
        mask_thresh: mask probabilities at or above this (in [0, 1]) are inside the mask.
        cat_ids, category_names: the dataset's category ids / names of labels 1, 2, ... when ``checkpoint``
            is a model (a checkpoint carries its own label map). Default: category id = label.

    A model that is passed in is put in eval mode and moved to ``device``.
    """

    def __init__(self, checkpoint: str | os.PathLike | nn.Module, *, device: str | torch.device | None = None,
                 batch_size: int = 2, amp: bool = False, score_thresh: float = 0.5, mask_thresh: float = 0.5,
                 cat_ids: Sequence[int] | None = None, category_names: Sequence[str] | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        check_number(score_thresh, "score_thresh", low=0, high=1)
        check_number(mask_thresh, "mask_thresh", low=0, high=1)
        device = check_device(device, name="device")
        if isinstance(checkpoint, nn.Module):
            model, self.label_map = checkpoint, _label_map(cat_ids, category_names)
            classes = model_num_classes(model)
            if self.label_map is not None and classes is not None and len(self.label_map) < classes - 1:
                given = "cat_ids" if cat_ids is not None else "category_names"
                raise ValueError(f"{given} has {len(self.label_map)} entries, but the model predicts labels "
                                 f"1..{classes - 1} (num_classes {classes}); give one per label")
        elif not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a checkpoint file's path or a model (an nn.Module), got "
                            f"{type(checkpoint).__name__}")
        elif cat_ids is not None or category_names is not None:
            raise ValueError("cat_ids / category_names go with a model; a checkpoint carries its own label map")
        else:
            model, self.label_map = _load(os.fspath(checkpoint))
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.batch_size = int(batch_size)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.score_thresh = float(score_thresh)
        self.mask_thresh = float(mask_thresh)
        # Mask R-CNN-like models report no mask_resolution: their masks all have the side their layers give
        self.default_resolution: int | None = fixed_mask_resolution(model)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Instances | list[Instances]:
        """One image -> one :class:`Instances`; a list (or a ``[B, ...]`` batch array/tensor) -> a list."""
        if _is_single(images):
            return next(self.stream([cast(ImageInput, images)]))[1]
        return [inst for _, inst in self.stream(cast("Sequence[ImageInput]", images))]

    def stream(self, images: Iterable[ImageInput]) -> Iterator[tuple[Tensor, Instances]]:
        """``(image [3, H, W] float in [0, 1] on the CPU, Instances)`` per image, in order, reading and
        running ``batch_size`` images at a time (so a long list of paths is never all in memory)."""
        batch: list[Tensor] = []
        for image in images:
            batch.append(to_image_tensor(image).cpu())
            if len(batch) == self.batch_size:
                yield from zip(batch, self._run(batch))
                batch = []
        if batch:
            yield from zip(batch, self._run(batch))

    @torch.no_grad()
    def _run(self, images: list[Tensor]) -> list[Instances]:
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        # a DynaMask model hands its masks over unpasted: _instances pastes only the detections it keeps,
        # straight to bool (the same pixels, without a float canvas per detection); any other model pastes
        # every detection itself
        unpasted = {"paste_masks": False} if isinstance(self.model, DynaMaskRCNN) else {}
        with autocast:
            outputs = self.model([im.to(self.device, non_blocking=True) for im in images], **unpasted)
        return [self._instances(out, (int(im.shape[1]), int(im.shape[2]))) for out, im in zip(outputs, images)]

    def _instances(self, out: dict[str, Any], size: tuple[int, int]) -> Instances:
        """One image's :class:`Instances` from the model's output for it (``size``: the image's (H, W))."""
        keep = out["scores"] >= self.score_thresh
        labels = out["labels"][keep].to("cpu", torch.int64)
        n = int(labels.shape[0])
        handoff = out.get(mask_handoff.HANDOFF_KEY)
        if handoff is not None:  # threshold by score before pasting: only the kept detections are pasted
            masks = mask_handoff.paste_binary(handoff, out["boxes"], size, self.mask_thresh, keep)
        else:
            masks = out["masks"][keep]  # [n, 1, H, W] probabilities
            masks = (masks[:, 0] if masks.dim() == 4 else masks) >= self.mask_thresh
        res = out.get("mask_resolution")
        if res is not None:
            res = res[keep].to("cpu", torch.int64)
        elif self.default_resolution is not None:
            res = torch.full((n,), int(self.default_resolution), dtype=torch.int64)
        num_labels = int(labels.max()) if n else 0
        if self.label_map is None:  # no dataset ids known: a label is its own category id
            cat_ids = tuple(range(1, num_labels + 1))
        else:
            cat_ids = tuple(self.label_map[k][0] for k in sorted(self.label_map))
            if num_labels > len(cat_ids):
                raise ValueError(f"the model predicted label {num_labels}, but its label map has labels "
                                 f"1..{len(cat_ids)}")
        return Instances(
            image_size=size,
            boxes=out["boxes"][keep].to("cpu", torch.float32),
            scores=out["scores"][keep].to("cpu", torch.float32),
            labels=labels,
            category_ids=torch.tensor(cat_ids, dtype=torch.int64)[labels - 1] if n else labels.clone(),
            masks=masks.cpu(),
            mask_resolution=res,
            cat_ids=cat_ids,
        )


def _load(path: str) -> tuple[nn.Module, LabelMap]:
    """The model and label map of a checkpoint; every error names the file and what it found."""
    try:
        model, ckpt = model_from_checkpoint(path)
    except KeyError as exc:  # an architecture no builder of this install knows
        raise ValueError(f"{path}: {exc.args[0] if exc.args else exc}") from exc
    label_map = {int(k): (int(v[0]), str(v[1])) for k, v in ckpt["label_map"].items()}
    if sorted(label_map) != list(range(1, len(label_map) + 1)):
        raise ValueError(f"{path}: label_map must have the labels 1..N, got {sorted(label_map)}")
    return model, label_map


def _label_map(cat_ids: Sequence[int] | None, names: Sequence[str] | None) -> LabelMap | None:
    if cat_ids is None and names is None:
        return None
    ids = [int(c) for c in cat_ids] if cat_ids is not None else list(range(1, len(names or []) + 1))
    names = [str(n) for n in names] if names is not None else [str(c) for c in ids]
    if len(ids) != len(names):
        raise ValueError(f"cat_ids has {len(ids)} entries but category_names has {len(names)}")
    return {i + 1: (c, n) for i, (c, n) in enumerate(zip(ids, names))}


def _is_single(images: Any) -> bool:
    """One image, as opposed to a list or a batch (a 4-d array or tensor)."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return True
    if isinstance(images, (np.ndarray, Tensor)):
        return images.ndim < 4
    return False
