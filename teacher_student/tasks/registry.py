"""Task kinds by their ``run.tasks`` name."""
from __future__ import annotations

from .base import Task
from .classifier import ClassifierTask
from .detector import DetectorTask
from .grader import GraderTask
from .segmenter import SegmenterTask

TASK_KINDS: dict[str, type[Task]] = {ClassifierTask.name: ClassifierTask, DetectorTask.name: DetectorTask,
                                     SegmenterTask.name: SegmenterTask, GraderTask.name: GraderTask}
