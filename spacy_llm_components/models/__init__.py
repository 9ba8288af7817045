"""Torch and transformers: where checkpoints are read and written (the one place that calls
`from_pretrained`), encoders of any family, the task heads that sit on them, devices and precision,
and what runs inference (PyTorch, int8, ONNX Runtime). Nothing here knows spaCy pipelines or tasks'
data; everything above reaches models through these modules."""
