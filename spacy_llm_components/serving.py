"""Where MLflow finds the served model of versions registered by spacy-llm-components 0.1.0.

MLflow pickled their `python_model` by reference to this module; the model itself lives in
`stages.shared.pyfunc`. Nothing in the package imports this module."""

from .stages.shared.pyfunc import SpacyPipelineModel  # noqa: F401
