"""Knowledge distillation for fine-tuning (Hinton et al. 2015): the student's loss mixes the
cross-entropy on labels with the KL divergence to a teacher's temperature-softened logits."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the logits softened by ``temperature``, per image, times
    ``temperature**2`` so that its gradients keep the scale of a cross-entropy's."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


@dataclass
class Distillation:
    """A frozen ``teacher`` (run in eval mode, without gradients) and how its logits weigh in:
    the loss is ``(1 - weight) * cross-entropy + weight * distillation_loss``."""

    teacher: nn.Module
    weight: float
    temperature: float

    @classmethod
    def of(cls, teacher: nn.Module, weight: float, temperature: float) -> Distillation:
        """A frozen eval-mode copy of ``teacher`` (which is left as it is)."""
        frozen = copy.deepcopy(teacher).eval()
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)
        return cls(frozen, weight, temperature)

    def to(self, device: torch.device) -> Distillation:
        """Move the teacher to ``device`` (channels_last, as the student trains)."""
        self.teacher.to(device).to(memory_format=torch.channels_last)
        return self

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of a preprocessed batch."""
        return self.teacher(x).float()

    def mix(self, hard: torch.Tensor, student: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The training loss from the label loss ``hard`` and the student's logits of ``x``."""
        soft = distillation_loss(student, self.logits(x), self.temperature)
        return (1.0 - self.weight) * hard + self.weight * soft
