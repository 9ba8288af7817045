"""spaCy components that run fine-tuned Hugging Face Transformers heads.

`hf_textcat`, `hf_ner` and `hf_qa` are registered as spaCy factories through
entry points, so `nlp.add_pipe("hf_ner", ...)` works without importing this
package. Importing it gives `ask` and `export_hf`.
"""

from .data.extensions import register_extensions

register_extensions()

from . import tasks  # noqa: E402,F401  (registers the tasks and their scorers)
from .components.ner import HFEntityRecognizer  # noqa: E402
from .components.pipeline import export_hf  # noqa: E402
from .components.qa import HFQuestionAnswerer, ask  # noqa: E402
from .components.textcat import HFTextCategorizer  # noqa: E402
from .models.checkpoint import CheckpointError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ask", "export_hf", "CheckpointError", "HFEntityRecognizer", "HFQuestionAnswerer", "HFTextCategorizer"]
