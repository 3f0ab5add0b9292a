"""DINO's self-distillation loss with a centred, sharpened teacher.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021,
https://arxiv.org/abs/2104.14294.
"""

from __future__ import annotations

from lightly.loss import DINOLoss as _LightlyDINOLoss
from torch import Tensor


def teacher_temperature(epoch: float, teacher_temp: float, warmup_temp: float, warmup_epochs: float) -> float:
    """DINO's teacher temperature: linear from ``warmup_temp`` to ``teacher_temp`` over
    ``warmup_epochs`` (fractional epochs allowed), then constant."""
    if epoch >= warmup_epochs:
        return teacher_temp
    return warmup_temp + (teacher_temp - warmup_temp) * epoch / warmup_epochs


class DINOLoss(_LightlyDINOLoss):
    """Cross-entropy between the teacher's centred, sharpened softmax over ``output_dim``
    prototypes and the student's softmax, for every pair of a teacher view (the global crops)
    and a different student view (global and local crops).

    lightly's implementation: each call also moves the centre towards the teacher outputs'
    mean, ``center = m * center + (1 - m) * mean``, and that mean is all-reduced over
    processes, so every process keeps the same centre as one process with the whole batch
    (``tests/test_methods_distributed.py`` checks it under two processes).

    Args:
        output_dim: the number of prototypes K of the DINO head (65536 in the paper).
        student_temp: the student's softmax temperature (0.1).
        center_momentum: the centre's EMA momentum (0.9).

    Shapes:
        teacher_out: list of T tensors (N, K), the teacher's outputs of the global views.
        student_out: list of S tensors (N, K), the student's outputs of all views, in the same
            order (views with the same index as a teacher view are not compared).
        teacher_temp: the teacher's temperature this step (see ``teacher_temperature``).
        returns: scalar, the mean over the T x S - T pairs and the N samples.

    Examples:
        >>> import torch
        >>> from sslkit.losses import DINOLoss
        >>> loss_fn = DINOLoss(output_dim=32)
        >>> teacher = [torch.randn(4, 32) for _ in range(2)]
        >>> student = [torch.randn(4, 32) for _ in range(4)]  # 2 global + 2 local views
        >>> loss_fn(teacher, student, teacher_temp=0.04).shape
        torch.Size([])
    """

    def __init__(self, output_dim: int = 65536, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(output_dim=output_dim, warmup_teacher_temp_epochs=1, student_temp=student_temp,
                         center_momentum=center_momentum)

    def forward(self, teacher_out: list[Tensor], student_out: list[Tensor], teacher_temp: float = 0.04) -> Tensor:
        return super().forward(teacher_out, student_out, teacher_temp=teacher_temp)
