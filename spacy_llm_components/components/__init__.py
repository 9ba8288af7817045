"""spaCy components wrapping Hugging Face task heads."""
