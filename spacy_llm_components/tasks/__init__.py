"""One spec per task, the only place that knows what differs between text classification, NER and QA.

A spec (tasks.base.TaskSpec) says how a task's files are read and summarised, which head its component
puts on the encoder, how its labels are found, how its predictions are scored, how a teacher's outputs
are distilled, and what cards, serving and the demo show of it. Each task lives in its own module and
registers itself; adding one means a spec, a head kind (or an existing one) and a component, nothing else.
"""

from .base import (
    TASKS,
    Scores,
    TaskSpec,
    factories_in_words,
    input_example,
    load_docs,
    register_task,
    task_spec,
    task_specs,
    unregister_task,
)

# each registers its task and scorer; this order is the order users see them in
# isort: off
from .textcat import TEXTCAT  # noqa: F401
from .ner import NER  # noqa: F401
from .qa import QA  # noqa: F401
# isort: on

__all__ = ["TASKS", "Scores", "TaskSpec", "factories_in_words", "input_example", "load_docs", "register_task",
           "task_spec", "task_specs", "unregister_task"]
