"""What the stages share, so that no stage imports another: the Hugging Face Trainer wrapper and the
training of a pipeline's component (fine-tuning and distillation), MLflow tracking, model references,
scoring a pipeline on gold docs, and the MLflow pyfunc model that serves any pipeline."""
