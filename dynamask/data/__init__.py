"""COCO-format data: the dataset, its transforms, and the synthetic "shapes" generator.

Nothing here imports the model: data loading stands on its own (docs/method.md §1).
"""

from dynamask.data.coco import CocoDetection, collate_fn
from dynamask.data.transforms import Compose, RandomHorizontalFlip, Resize

__all__ = ["CocoDetection", "collate_fn", "Compose", "RandomHorizontalFlip", "Resize"]
