"""Prefect flows: thin wrappers that call the library in order, adding what Prefect is for:
caching of finished steps, retries on transient errors, artifacts, schedules and task runners.

Installed as `spacy_llm_components.flows`. Importing it settles Prefect's settings before Prefect
is imported (settings are read once, at import): a project-local PREFECT_HOME, the temporary
local server enabled, analytics off. A PREFECT_HOME or PREFECT_API_URL set by the user is kept.
"""

from spacy_llm_components.orchestration import configure_prefect

configure_prefect()
