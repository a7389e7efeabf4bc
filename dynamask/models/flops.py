"""Analytic multiply-accumulate counts of the DynaMask mask branch, from the layer shapes.

Counting rule (docs/method.md §3): MACs of convolutions (a deformable conv counts as the dense conv of the
same shape; its sampling is not counted), linear layers and the mask predictor used at inference; not
counted: activations, upsampling, the training-only edge predictors. The MSM is counted separately, and
so is the per-image work (the 1×1 projections of P4/P3/P2 to the stage widths).

All numbers are in GMAC (10⁹ multiply-accumulates); the budget loss uses :func:`mask_head_gmacs`, so C_t
is in the same unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, cast

from torch import nn

if TYPE_CHECKING:  # the models import this module (the budget loss)
    from dynamask.models.fam import DeformConv2d, FeatureAggregation
    from dynamask.models.mask_head import DynaMaskHead
    from dynamask.models.msm import MaskSwitchModule

    Conv: TypeAlias = nn.Conv2d | DeformConv2d


def _find(model: nn.Module, name: str) -> nn.Module:
    """The mask head (``name="mask_head"``) or MSM (``"msm"``) of a detector, RoI heads, or itself."""
    for owner in (model, getattr(model, "roi_heads", None)):
        if owner is not None and hasattr(owner, name) and isinstance(getattr(owner, name), nn.Module):
            return getattr(owner, name)
    return model


def _mask_head(model: nn.Module) -> DynaMaskHead:
    return cast("DynaMaskHead", _find(model, "mask_head"))


def _msm(model: nn.Module) -> MaskSwitchModule:
    return cast("MaskSwitchModule", _find(model, "msm"))


def _conv_at(layers: nn.Module, i: int) -> Conv:
    """``layers[i]`` of one of the head's ModuleLists, which hold convolutions only."""
    return cast("Conv", cast(nn.ModuleList, layers)[i])


def conv_macs(conv: Conv, out_hw: tuple[int, int]) -> int:
    """MACs of a (deformable) conv producing ``out_hw``: C_out · C_in/groups · k_h · k_w · H · W."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * out_hw[0] * out_hw[1]


def _conv_out(conv: Conv, size: int) -> int:
    if isinstance(conv.padding, str):  # nn.Conv2d's "same" / "valid", which no counted layer uses
        raise ValueError(f"cannot count a conv with padding={conv.padding!r}")
    return (size + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1


def mask_head_macs(model: nn.Module) -> list[int]:
    """Per-RoI cumulative MACs at each resolution (trunk + stages ≤ k + the mask predictor at k)."""
    head = _mask_head(model)
    res = head.resolutions
    trunk = sum(conv_macs(m, (res[0], res[0])) for m in head.trunk if isinstance(m, nn.Conv2d))
    out, cum = [], trunk
    for k, s in enumerate(res):
        if k > 0:
            fam = cast("FeatureAggregation", head.fam[k - 1])
            cum += conv_macs(_conv_at(head.reduce, k - 1), (res[k - 1], res[k - 1]))
            cum += sum(conv_macs(m, (s, s)) for m in (fam.offset1, fam.deform1, fam.offset2, fam.deform2))
        out.append(cum + conv_macs(_conv_at(head.mask_predictors, k), (s, s)))
    return out


def mask_head_gmacs(model: nn.Module) -> dict[int, float]:
    """``{14: g, 28: g, 56: g, 112: g}``: per-RoI cumulative mask-head GMAC at inference."""
    head = _mask_head(model)
    return {s: m / 1e9 for s, m in zip(head.resolutions, mask_head_macs(head))}


def switch_input_macs(kind: str, head: DynaMaskHead) -> int:
    """Per-RoI MACs of preparing the switch's input beyond what inference computes anyway: for ``"mask"``
    the 14² mask and edge predictors (:mod:`dynamask.models.switch_input`), 0 otherwise."""
    if kind != "mask":
        return 0
    s = head.resolutions[0]
    return conv_macs(_conv_at(head.mask_predictors, 0), (s, s)) + conv_macs(_conv_at(head.edge_predictors, 0), (s, s))


def msm_macs(model: nn.Module) -> int:
    """Per-RoI MACs of the Mask Switch Module (SE FCs, the first conv, then each head's conv and two FCs); given
    a detector whose switch reads ``"mask"``, its input's predictors too (:func:`switch_input_macs`)."""
    msm = _msm(model)
    heads = getattr(model, "roi_heads", model)
    kind = getattr(heads, "switch_input", "roi")
    size = _conv_out(msm.conv1, msm.in_size)
    total = msm.se.fc1.in_features * msm.se.fc1.out_features + msm.se.fc2.in_features * msm.se.fc2.out_features
    total += conv_macs(msm.conv1, (size, size))
    for head in msm.head_modules():
        out = _conv_out(head.conv2, size)
        total += conv_macs(head.conv2, (out, out))
        total += head.fc1.in_features * head.fc1.out_features + head.fc2.in_features * head.fc2.out_features
    if kind != "roi":
        total += switch_input_macs(kind, _mask_head(model))
    return total


def msm_gmacs(model: nn.Module) -> float:
    """Per-RoI GMAC of the Mask Switch Module."""
    return msm_macs(model) / 1e9


def level_strides(model: nn.Module) -> list[int]:
    """Stride of the i-FPN level each stage crops (16, 8, 4 for P4, P3, P2)."""
    head = _mask_head(model)
    return [4 * 2**level for level in head.stage_levels]


def per_image_macs(model: nn.Module, image_size: Sequence[int], stages: Sequence[int] | None = None) -> int:
    """Per-image MACs of the mask head: the 1×1 projections of P4/P3/P2 to the stage widths.

    Args:
        image_size: (H, W) of the padded network input (a level of stride t is ceil(H/t) × ceil(W/t)).
        stages: which stages (1, 2, 3) ran; all by default. A stage no RoI reaches is skipped at inference.
    """
    head = _mask_head(model)
    h, w = int(image_size[0]), int(image_size[1])
    stages = range(1, len(head.resolutions)) if stages is None else stages
    total = 0
    for s in stages:
        t = level_strides(head)[s - 1]
        total += conv_macs(_conv_at(head.project, s - 1), (math.ceil(h / t), math.ceil(w / t)))
    return total


def per_image_gmacs(model: nn.Module, image_size: Sequence[int], stages: Sequence[int] | None = None) -> float:
    """:func:`per_image_macs` in GMAC (≈0.87 for an 800×1216 input at the default widths)."""
    return per_image_macs(model, image_size, stages) / 1e9


@dataclass(frozen=True)
class HeadCosts:
    """What the mask branch of one model costs at inference, in GMAC, for the evaluation reports.

    Attributes:
        per_roi: resolution → cumulative head cost of one RoI segmented at it (:func:`mask_head_gmacs`).
        msm: the switch's cost per RoI (0 when a fixed policy routes and the MSM does not run).
        projections: per r-FPN stage, ``(resolution, GMAC per position of its level, level stride)``: the
            per-image 1×1 projection that runs when any RoI of the image reaches that resolution.
    """

    per_roi: dict[int, float]
    msm: float = 0.0
    projections: tuple[tuple[int, float, int], ...] = ()

    @classmethod
    def of(cls, model: nn.Module, *, msm: bool = True) -> HeadCosts:
        """The costs of a DynaMask model (``msm``: whether its switch runs, i.e. ``mask_policy == "msm"``)."""
        head = _mask_head(model)
        proj = tuple((int(head.resolutions[s]), conv_macs(_conv_at(head.project, s - 1), (1, 1)) / 1e9,
                      level_strides(head)[s - 1]) for s in range(1, len(head.resolutions)))
        return cls(per_roi=mask_head_gmacs(head), msm=msm_gmacs(model) if msm else 0.0, projections=proj)

    def image(self, input_size: Sequence[int], resolutions: Sequence[int]) -> tuple[float, float]:
        """``(per-image part, whole head)`` GMAC of one image whose detections were segmented at
        ``resolutions`` (one per detection), on a padded network input of ``input_size`` (H, W).

        The per-image part is the projections of the stages some RoI reaches plus the MSM on every RoI;
        the whole head adds each RoI's cumulative cost. (Images batched together share the projections
        of the stages any of them reaches, so batched inference can cost more than this.)
        """
        h, w = int(input_size[0]), int(input_size[1])
        top = max(resolutions, default=0)
        part = self.msm * len(resolutions)
        part += sum(g * math.ceil(h / t) * math.ceil(w / t) for r, g, t in self.projections if r <= top)
        return part, part + sum(self.per_roi[int(r)] for r in resolutions)


def maskrcnn_mask_head_gmacs(model: nn.Module, roi_size: int = 14) -> float:
    """Per-RoI GMAC of torchvision's Mask R-CNN mask branch (the peer), by the same counting rule: its
    3×3 convs at ``roi_size``², the 2×2 stride-2 transposed conv to 2·``roi_size``² (C_in · C_out · 4 MACs
    per input pixel) and the class-specific 1×1 predictor at 2·``roi_size``² (every class is computed)."""
    heads = getattr(model, "roi_heads", model)
    mask_head, pred = cast(nn.Module, heads.mask_head), cast(nn.Module, heads.mask_predictor)
    total, size = 0, roi_size
    for m in mask_head.modules():
        if isinstance(m, nn.Conv2d):
            size = _conv_out(m, size)
            total += conv_macs(m, (size, size))
    for m in pred.modules():
        if isinstance(m, nn.ConvTranspose2d):
            assert not isinstance(m.padding, str)  # only nn.Conv2d takes "same" / "valid"
            kh, kw = m.kernel_size
            total += m.in_channels * (m.out_channels // m.groups) * kh * kw * size * size
            size = (size - 1) * m.stride[0] - 2 * m.padding[0] + kh + m.output_padding[0]
        elif isinstance(m, nn.Conv2d):
            size = _conv_out(m, size)
            total += conv_macs(m, (size, size))
    return total / 1e9
