"""Mask Switch Module (MSM): predicts one of K mask resolutions per RoI from its 14×14 RoI feature.

Layers (docs/method.md §3; ≈0.009 GMAC per RoI at the defaults, see :func:`dynamask.models.flops.msm_gmacs`):
SE block (global average pool → FC 256→16 → ReLU → FC 16→256 → sigmoid → channel scale) →
3×3 conv 256→64 stride 2 (14→7), ReLU → then, in each of ``num_heads`` heads (3 by default): 3×3 conv 64→16,
ReLU → flatten (16·7·7 = 784) → FC 784→256, ReLU → FC 256→K; the output is the mean of the heads' K outputs.

The paper's MSM is one head (``num_heads=1``). Three heads on the shared SE block and first conv, each fitted
to the same targets from its own initial weights (:func:`dynamask.engine.switch_fit.fit_switch`), average out
most of the variance between fits of one switch, which is what limited the fitted switch (issue 32,
docs/method.md §3, "Heads"); the first conv holds most of the MACs, so two more heads add 0.0013 GMAC per RoI
(16%) at the defaults.

The input is detached by the caller's contract (the RoI heads pass ``roi_features.detach()``), so the
routing losses train the MSM only and do not pull on the backbone.

A switch fitted after training (:mod:`dynamask.engine.switch_fit`) regresses each resolution's mask IoU
instead of learning logits through a Gumbel sample; its price per resolution, ``μ · C_k``, is the buffer
``cost_penalty`` that the forward subtracts (zeros for a Gumbel-trained switch, so its logits are unchanged).

At inference a fitted switch also weighs each detection's predicted IoUs by the detection's confidence
(:meth:`MaskSwitchModule.forward`, buffer ``confidence_weighted``): a detection's mask counts towards AP only as
far as the detection is a true one, and most of the RoIs a budget is spent on are low-score detections
(docs/method.md §3, "Switch fit"). A Gumbel-trained switch (no price) chooses as before: with no penalty,
scaling a row by a positive weight does not move its argmax.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynamask.models.mask_head import DynaMaskHead
from dynamask.models.switch_input import switch_channels


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x · sigmoid(FC(ReLU(FC(avgpool(x)))))``.

    Args:
        channels: C.
        reduction: hidden width is ``C // reduction``.
    """

    def __init__(self, *, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[R, C, H, W]`` → ``[R, C, H, W]``."""
        w = x.mean(dim=(2, 3))  # [R, C]
        w = self.fc2(F.relu(self.fc1(w))).sigmoid()
        return x * w[:, :, None, None]


# heads of the MSM by default (the paper's is 1): the one place the default is written (docs/method.md §3, "Heads")
DEFAULT_HEADS = 3


class SwitchHead(nn.Module):
    """One head of the MSM on the shared first conv's output: 3×3 conv → ReLU → FC → ReLU → FC.

    Args:
        in_channels: the first conv's width (64). channels: this conv's width (16).
        in_size: the first conv's output size (7). hidden: the first FC's width (256).
        num_resolutions: K.
    """

    def __init__(self, *, in_channels: int, channels: int, in_size: int, hidden: int, num_resolutions: int) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.fc1 = nn.Linear(channels * in_size * in_size, hidden)
        self.fc2 = nn.Linear(hidden, num_resolutions)
        self.init_weights()

    def reset_parameters(self) -> None:
        for m in (self.conv2, self.fc1, self.fc2):
            m.reset_parameters()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.kaiming_normal_(self.conv2.weight, mode="fan_out", nonlinearity="relu")
        if self.conv2.bias is not None:
            nn.init.zeros_(self.conv2.bias)
        nn.init.normal_(self.fc2.weight, std=0.01)  # start near a uniform choice
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x ``[R, C_1, S, S]`` (the first conv's output, after its ReLU) → ``[R, K]``."""
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MaskSwitchModule(nn.Module):
    """MSM: K resolution logits per RoI.

    Args:
        in_channels: channels of the RoI feature (256 for an FPN).
        in_size: its spatial size (14).
        conv_channels: widths of the two 3×3 convs (64, 16); the first has stride 2.
        hidden: width of the first FC (256).
        num_resolutions: K (4).
        se_reduction: SE reduction ratio (16).
        num_heads: heads after the first conv, their outputs averaged (3; the paper's MSM is 1).

    Buffers: ``cost_penalty`` ``[K]``, subtracted from the FC's output (zeros unless a fit set a price);
    ``confidence_weighted`` ``[]`` float, 1 when the forward weighs the outputs by the detections' confidence
    before the penalty, 0 when not (0 unless a fit set it; a float, so that every process group broadcasts it).
    """

    # version 2 added ``cost_penalty``, version 3 ``confidence_weighted``; an older state dict loads with zeros
    # (the choice it was trained or priced for). Version 4 put the layers after the first conv in ``heads``: a
    # one-head state dict (``conv2.*``, ``fc1.*``, ``fc2.*``) loads into every head, so its mean is that head's output
    _version = 4
    _HEAD_LAYERS = ("conv2", "fc1", "fc2")
    cost_penalty: Tensor
    confidence_weighted: Tensor

    def __init__(self, *, in_channels: int = 256, in_size: int = 14, conv_channels: tuple[int, int] = (64, 16),
                 hidden: int = 256, num_resolutions: int = 4, se_reduction: int = 16,
                 num_heads: int = DEFAULT_HEADS) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"MaskSwitchModule: num_heads must be >= 1, got {num_heads}")
        c1, c2 = conv_channels
        self.se = SqueezeExcite(channels=in_channels, reduction=se_reduction)
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=2, padding=1)
        out_size = (in_size + 2 - 3) // 2 + 1
        self.heads = nn.ModuleList(
            SwitchHead(in_channels=c1, channels=c2, in_size=out_size, hidden=hidden, num_resolutions=num_resolutions)
            for _ in range(num_heads))
        self.in_size = in_size
        self.num_heads = num_heads
        self.num_resolutions = num_resolutions
        self.register_buffer("cost_penalty", torch.zeros(num_resolutions))
        self.register_buffer("confidence_weighted", torch.zeros(()))
        self._init_weights()

    def reset_parameters(self) -> None:
        """Fresh weights (a switch fit starts from these; each head its own draw), no cost penalty, no confidence
        weighting."""
        for m in (self.se.fc1, self.se.fc2, self.conv1):
            m.reset_parameters()
        self._init_weights()
        for h in self.head_modules():
            h.reset_parameters()
        self.cost_penalty.zero_()
        self.confidence_weighted.zero_()

    def _init_weights(self) -> None:
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        if self.conv1.bias is not None:
            nn.init.zeros_(self.conv1.bias)

    def head_modules(self) -> list[SwitchHead]:
        """The heads, typed (an ``nn.ModuleList`` yields plain modules)."""
        return [cast(SwitchHead, h) for h in self.heads]

    def set_cost_penalty(self, penalty: Tensor) -> None:
        """``penalty`` ``[K]``: μ · C_k, subtracted from the outputs (so argmax picks argmax_k(ŝ_k − μ C_k))."""
        if penalty.shape != self.cost_penalty.shape:
            raise ValueError(f"cost_penalty must have shape {tuple(self.cost_penalty.shape)}, "
                             f"got {tuple(penalty.shape)}")
        self.cost_penalty.copy_(penalty)

    def set_confidence_weighted(self, weighted: bool) -> None:
        """Whether the forward weighs each RoI's outputs by its detection's confidence (a fitted switch)."""
        self.confidence_weighted.fill_(1.0 if weighted else 0.0)

    def choose(self, x: Tensor, confidence: Tensor | None = None) -> Tensor:
        """The resolution index per RoI ``[R]`` int64: the argmax of the forward,
        ``argmax_k(w_i · raw_ik − cost_penalty_k)``."""
        return self(x, confidence).argmax(dim=1)

    def raw_heads(self, x: Tensor) -> Tensor:
        """Each head's output ``[H, R, K]`` (a switch fit regresses each head on its own)."""
        x = F.relu(self.conv1(self.se(x)))
        return torch.stack([h(x) for h in self.head_modules()])

    def raw(self, x: Tensor) -> Tensor:
        """The mean of the heads' outputs ``[R, K]``, before the cost penalty."""
        return self.raw_heads(x).mean(dim=0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "cost_penalty"
        if (version is None or version < 2) and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.cost_penalty)
        key = prefix + "confidence_weighted"
        if (version is None or version < 3) and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.confidence_weighted)
        # by its keys, not its version: a state dict that lost its metadata still loads
        for name in [k for k in state_dict
                     if k.startswith(prefix) and k[len(prefix):].split(".")[0] in self._HEAD_LAYERS]:
            value = state_dict.pop(name)
            for h in range(self.num_heads):
                state_dict[f"{prefix}heads.{h}.{name[len(prefix):]}"] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor, confidence: Tensor | None = None) -> Tensor:
        """The priced outputs ``[R, K]``, ``w_i · raw_ik − cost_penalty_k``; the choice is their argmax.

        Args:
            x: ``[R, C, 14, 14]`` the switch's input, detached (the RoI feature by default).
            confidence: ``[R]`` each RoI's detection score in [0, 1], or None (every RoI a sure one, e.g.
                ground-truth boxes or training positives). ``w_i`` is the score when ``confidence_weighted``
                (a fitted switch), else 1; a Gumbel-trained switch's outputs are its logits.
        """
        raw = self.raw(x)
        if confidence is not None:
            if confidence.shape != raw.shape[:1]:
                raise ValueError(f"confidence must have shape [{raw.shape[0]}] (one per RoI), got "
                                 f"{tuple(confidence.shape)}")
            # w = 1 − flag + flag · confidence: no branch on the flag, so no host sync on an accelerator
            flag = self.confidence_weighted.to(raw.dtype)
            raw = raw * (1 - flag + flag * confidence.to(raw.dtype))[:, None]
        return raw - self.cost_penalty


def switch_for(head: DynaMaskHead, *, reads: str = "roi", num_heads: int = DEFAULT_HEADS) -> MaskSwitchModule:
    """A fresh switch of ``num_heads`` heads for ``head`` that reads ``reads`` ("roi", "trunk" or "mask"; see
    :mod:`dynamask.models.switch_input`): its input width and size follow from the head. The one place an
    MSM is built for a model (the builders, the detector's default, the study's switch variants)."""
    width = switch_channels(reads, fpn_channels=head.in_channels, trunk_channels=head.channels[0],
                            mask_classes=head.mask_classes)
    return MaskSwitchModule(in_channels=width, in_size=head.resolutions[0], num_heads=num_heads)
