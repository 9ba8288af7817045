from spacy_llm_components.cli import app

app()
