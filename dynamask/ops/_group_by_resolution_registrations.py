"""Fake (meta) kernel of ``dynamask::group_by_resolution``. It has no autograd: its outputs are indices."""

from __future__ import annotations

import torch


@torch.library.register_fake("dynamask::group_by_resolution")
def _group_by_resolution_fake(choice, num_resolutions):
    return choice.new_empty(choice.shape), choice.new_empty((num_resolutions,))
