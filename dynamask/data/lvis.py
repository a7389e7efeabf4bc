"""LVIS (v0.5 and v1) files: loading, and repeat-factor sampling for training.

LVIS files are COCO files with a few differences, which :class:`LvisDetection` handles on top of
:class:`~dynamask.data.coco.CocoDetection` (no ``lvis`` package needed; evaluation by LVIS's rules is in
:mod:`dynamask.engine.lvis_eval`):

- images may have no ``file_name``: they are named by ``coco_url``
  (``http://images.cocodataset.org/train2017/000000391895.jpg``), and found at ``IMAGES/train2017/...``
  (IMAGES being the COCO root, since LVIS v1's val uses train2017 images too) or else ``IMAGES/...``;
- each image lists ``neg_category_ids`` (verified absent) and ``not_exhaustive_category_ids``
  (annotated incompletely), which evaluation uses; training does not;
- each category has a ``frequency``: ``r`` (rare, 1-10 training images), ``c`` (common, 11-100) or
  ``f`` (frequent); LVIS v1 has 1,203 categories;
- annotations have no ``iscrowd`` (so none is crowd).

:func:`open_dataset` loads either kind and returns the right class, so ``dynamask train`` and ``eval`` take both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dynamask.data.coco import CocoDetection

FREQUENCIES = ("r", "c", "f")
# The repeat-factor threshold of the LVIS paper (Gupta et al. 2019, section 4.2) and its baselines.
DEFAULT_REPEAT_THRESHOLD = 0.001


def is_lvis(dataset: dict[str, Any]) -> bool:
    """Whether a loaded annotation dict is LVIS's: categories with a ``frequency``, or images with
    ``neg_category_ids`` / ``not_exhaustive_category_ids``."""
    if any("frequency" in c for c in dataset.get("categories", [])):
        return True
    return any("neg_category_ids" in i or "not_exhaustive_category_ids" in i for i in dataset.get("images", []))


class LvisDetection(CocoDetection):
    """An LVIS file as a :class:`~dynamask.data.coco.CocoDetection` (same items, same label mapping).

    Also holds, per image id, ``neg_category_ids`` and ``not_exhaustive_category_ids`` (sets, ``[]`` where a
    file lacks them), and ``frequencies`` (category id -> ``"r"``/``"c"``/``"f"``, for those that have one).
    Category ids these lists name must be categories of the file; a bad entry is a ``ValueError`` naming
    the file and the image.
    """

    def __init__(self, image_dir: str, ann_file: str, transforms=None, **kwargs: Any) -> None:
        super().__init__(image_dir, ann_file, transforms, **kwargs)
        self._init_lvis()

    @classmethod
    def from_coco(cls, dataset: CocoDetection) -> LvisDetection:
        """The same loaded file as an LvisDetection, without reading it again."""
        obj = cls.__new__(cls)
        obj.__dict__.update(dataset.__dict__)
        obj._init_lvis()
        return obj

    def _init_lvis(self) -> None:
        known = self._all_cat_ids
        self.frequencies: dict[int, str] = {}
        for cat in self.coco.dataset.get("categories", []):
            if "frequency" in cat:
                if cat["frequency"] not in FREQUENCIES:
                    raise ValueError(f"{self.ann_file}: category {cat['id']} has frequency {cat['frequency']!r}, "
                                     f"expected one of {FREQUENCIES}")
                self.frequencies[int(cat["id"])] = cat["frequency"]
        self.neg_category_ids: dict[int, set[int]] = {}
        self.not_exhaustive_category_ids: dict[int, set[int]] = {}
        for image_id, info in self.coco.imgs.items():
            if not info.get("file_name") and not info.get("coco_url"):
                raise ValueError(f"{self.ann_file}: image {image_id} has neither file_name nor coco_url")
            for key, table in (("neg_category_ids", self.neg_category_ids),
                               ("not_exhaustive_category_ids", self.not_exhaustive_category_ids)):
                ids = info.get(key, [])
                if not isinstance(ids, list) or not all(isinstance(c, int) and c in known for c in ids):
                    bad = (
                        ids
                        if not isinstance(ids, list)
                        else [c for c in ids if not (isinstance(c, int) and c in known)]
                    )
                    raise ValueError(f"{self.ann_file}: image {image_id}: {key} must list category ids of the file, "
                                     f"got {bad!r}")
                table[image_id] = set(ids)
        self._warn_negatives_annotated()

    def _warn_negatives_annotated(self) -> None:
        """Warn about images that annotate a category they also list as verified absent
        (``neg_category_ids``): LVIS's evaluation then scores that category's detections there against
        contradictory ground truth."""
        import warnings

        clashes = []
        for image_id, negatives in self.neg_category_ids.items():
            if negatives:
                annotated = {a.get("category_id") for a in self.coco.imgToAnns.get(image_id, [])}
                clashes += [(image_id, c) for c in sorted(annotated & negatives)]
        if clashes:
            shown = ", ".join(f"image {i}: category {c}" for i, c in clashes[:5])
            more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
            warnings.warn(f"{self.ann_file}: {len(clashes)} categories are both annotated on an image and listed in "
                          f"its neg_category_ids ({shown}{more}); the file contradicts itself there",
                          UserWarning, stacklevel=3)

    def image_path(self, index: int) -> str:
        info = self.coco.imgs[self.ids[index]]
        if info.get("file_name"):
            return os.path.join(self.image_dir, info["file_name"])
        return lvis_image_path(self.image_dir, info["coco_url"])


def lvis_image_path(image_dir: str, coco_url: str) -> str:
    """``IMAGES/<split>/<name>`` for ``.../<split>/<name>``, or ``IMAGES/<name>`` when only that file exists."""
    parts = coco_url.rstrip("/").split("/")
    with_split = os.path.join(image_dir, *parts[-2:])
    flat = os.path.join(image_dir, parts[-1])
    return flat if not os.path.isfile(with_split) and os.path.isfile(flat) else with_split


def open_dataset(image_dir: str, ann_file: str, transforms=None, **kwargs: Any) -> CocoDetection:
    """A :class:`CocoDetection`, or an :class:`LvisDetection` when the file is LVIS's (read once)."""
    dataset = CocoDetection(image_dir, ann_file, transforms, **kwargs)
    return LvisDetection.from_coco(dataset) if is_lvis(dataset.coco.dataset) else dataset


# --------------------------------------------------------------------------------------------- repeat factors
def repeat_factors(dataset: CocoDetection, threshold: float = DEFAULT_REPEAT_THRESHOLD) -> list[float]:
    """Per image (in ``dataset.ids`` order), LVIS's repeat factor ``r(I) = max over its categories c of
    max(1, sqrt(threshold / f(c)))``, where ``f(c)`` is the fraction of the dataset's images that contain
    ``c``. Images with no labelled annotation get 1. Counts come from the annotation index alone."""
    if not threshold > 0:
        raise ValueError(f"repeat-factor threshold must be positive, got {threshold}")
    cats_of = []
    for image_id in dataset.ids:
        anns = dataset.coco.imgToAnns.get(image_id, [])
        cats_of.append({a["category_id"] for a in anns if a.get("category_id") in dataset.cat_id_to_label})
    n = len(cats_of)
    images_with: dict[int, int] = {}
    for cats in cats_of:
        for c in cats:
            images_with[c] = images_with.get(c, 0) + 1
    cat_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in images_with.items()}
    return [max((cat_factor[c] for c in cats), default=1.0) for cats in cats_of]


class RepeatFactorSampler(torch.utils.data.Sampler[int]):
    """Repeat-factor sampling with a fixed epoch length, shuffled by (seed, epoch), split over processes.

    Each epoch holds ``L = ceil(sum(factors))`` samples, drawn by systematic sampling: the images are put in
    a random order, laid end to end with lengths ``r_i = factors[i] * L / sum(factors)`` (at most 1 + 1/sum
    times the factor), and picked at the points ``u, u + 1, ..., u + L - 1`` for one random ``u`` in
    ``[0, 1)``. So image ``i`` appears ``floor(r_i)`` or ``ceil(r_i)`` times, at least once, ``r_i`` times on
    average (LVIS's stochastic rounding), and every epoch has the same length, which keeps the
    learning-rate schedule and exact resume of :func:`dynamask.engine.train.train` as they are. The samples
    are then shuffled and dealt out like ``DistributedSampler`` (padded to a multiple of ``num_replicas``,
    every ``num_replicas``-th from ``rank``). It yields sample ids (see :meth:`epoch_indices`), which the
    trainer's dataset wrapper (:class:`~dynamask.data.samplers.SeededSamples`) maps back to images.
    ``set_epoch`` and ``start`` (samples of this process's share to skip, for resuming mid-epoch) work as in
    the trainer's own sampler (:class:`~dynamask.data.samplers.ResumableSampler`).
    """

    def __init__(self, factors: Sequence[float], *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not factors:
            raise ValueError("repeat-factor sampling needs at least one image")
        if any(not (f >= 1.0 and math.isfinite(f)) for f in factors):
            raise ValueError("repeat factors must be finite and at least 1")
        self.factors = torch.tensor(list(factors), dtype=torch.float64)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start = 0, 0
        total = float(self.factors.sum())
        self.epoch_size = int(math.ceil(total - 1e-6))
        self.factors *= self.epoch_size / total  # laid end to end they span [0, epoch_size)
        self.num_samples = math.ceil(self.epoch_size / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """All processes' sample ids of the current epoch, before padding and dealing out: the ``k``-th
        copy of image ``i`` is ``i + k * len(factors)`` (so ``id % len(factors)`` is the image's index), which
        lets the trainer draw each copy's random transform apart."""
        n = len(self.factors)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        ends = torch.cumsum(self.factors[order], 0)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        points = u + torch.arange(self.epoch_size, dtype=torch.float64)
        picked = order[torch.searchsorted(ends, points, right=True).clamp_(max=n - 1)].tolist()
        copies: dict[int, int] = {}
        ids = []
        for i in picked:
            k = copies.get(i, 0)
            copies[i] = k + 1
            ids.append(i + k * n)
        return [ids[j] for j in torch.randperm(self.epoch_size, generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        while len(indices) < self.total_size:  # pad as DistributedSampler does
            indices += indices[: self.total_size - len(indices)]
        return iter(indices[self.rank : self.total_size : self.num_replicas][self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
