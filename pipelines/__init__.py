"""The shipped spaCy pipeline configs (ner.cfg, textcat.cfg, qa.cfg), installed as package data."""
