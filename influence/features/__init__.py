"""Stage 1 of the data flow: per-example gradient features (Task → gradients → projection)."""

from influence.features.grads import per_example_grads
from influence.features.params import select_parameters
from influence.features.projectors import Projector, ProjectorKind, ProjectorSpec, make_projector
from influence.features.specs import BuildSpec, TrakSpec
from influence.features.task import ClassificationTask, Task

__all__ = [
    "BuildSpec", "ClassificationTask", "Projector", "ProjectorKind", "ProjectorSpec", "Task", "TrakSpec",
    "make_projector", "per_example_grads", "select_parameters",
]
