"""Losses of segmentation training: Dice + cross-entropy that ignores unlabelled pixels, over every head.

Labels carry an ignore value where nothing is known (no data, unlabelled
strips, padding); those pixels must add neither loss nor gradient.  Networks
trained with deep supervision (DynUNet) return several heads; each is scored
against the target at its own resolution and the main head weighs most.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1  # what every sample's ignore_index (and padding) becomes inside a batch


class MaskedDiceCELoss(nn.Module):
    """Dice + cross-entropy where pixels labelled ``ignore`` contribute nothing.

    ``DiceCELoss(to_onehot_y=True, softmax=True)`` has no ignore index in every
    MONAI version, and masking its logits would be wrong (softmax of a zeroed
    logit is uniform, not absent). So: cross-entropy averaged over valid
    pixels; softmax first, then probabilities and one-hot truth multiplied by
    the valid mask before MONAI's Dice (batch-wise, so rare classes count).
    """

    def __init__(self, num_classes: int, ignore: int = IGNORE) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.num_classes = num_classes
        self.ignore = ignore
        self.dice = DiceLoss(include_background=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        valid = target != self.ignore
        safe = torch.where(valid, target, torch.zeros_like(target))
        ce = F.cross_entropy(logits, safe, reduction="none")
        ce = (ce * valid).sum() / valid.sum().clamp(min=1)
        mask = valid.unsqueeze(1).to(logits.dtype)
        onehot = F.one_hot(safe, self.num_classes).movedim(-1, 1).to(logits.dtype)
        dice = self.dice(torch.softmax(logits, 1) * mask, onehot * mask)
        return ce + dice


def _heads(output: Any, spatial_dims: int) -> list[torch.Tensor]:
    """A network's outputs as a list of heads, the main one first.

    Deep supervision (DynUNet in train mode) stacks the heads on dim 1; other
    networks may return a list of heads at their own resolutions.
    """
    if isinstance(output, (list, tuple)):
        return list(output)
    if output.ndim == spatial_dims + 3:
        return list(output.unbind(1))
    return [output]


def supervised_loss(loss_fn: nn.Module, output: Any, target: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """The loss of every head, weighted 1, 0.5, 0.25 ... (normalised to sum to 1).

    A head smaller than the target is compared with the target downsampled by
    nearest neighbour, so ignored pixels stay ignored (never averaged into a
    class).
    """
    heads = _heads(output, spatial_dims)
    if len(heads) == 1:
        return loss_fn(heads[0], target)
    weights = [0.5 ** i for i in range(len(heads))]
    total = torch.zeros((), device=target.device)
    for weight, head in zip(weights, heads):
        t = target
        if tuple(head.shape[2:]) != tuple(target.shape[1:]):
            t = F.interpolate(target[:, None].float(), size=head.shape[2:], mode="nearest")[:, 0].long()
        total = total + weight * loss_fn(head, t)
    return total / sum(weights)
