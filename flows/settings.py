"""Settings and policies the Prefect flows share (no Prefect import here: settings must be in the
environment before Prefect is first imported)."""

import os
import sqlite3
import sys
from pathlib import Path
from typing import Dict, Optional

from spacy_llm_components.stages.shared.tracking import project_dir


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or project_dir() / ".prefect").resolve()


def prefect_settings() -> Dict[str, str]:
    """The Prefect settings the flows run with, explicit so a user profile cannot change them:
    the project-local home (database, results cache, logs), the temporary local server when no
    PREFECT_API_URL is set, no analytics."""
    return {
        "PREFECT_HOME": str(prefect_home()),
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": os.environ.get(
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),  # first start migrates its database
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",  # caching needs the results on disk
    }


def configure_prefect() -> None:
    """Put `prefect_settings()` into the environment; warn when Prefect was imported before (its
    settings are then already fixed) unless the flows run under a Prefect server's worker or runner
    (PREFECT_API_URL set), whose settings rule."""
    if os.environ.get("PREFECT_API_URL") and "prefect" in sys.modules:
        return
    if "prefect" in sys.modules and os.environ.get("PREFECT_HOME") != str(prefect_home()):
        import warnings

        warnings.warn("prefect was imported before spacy_llm_components.flows: the project-local Prefect "
                      "settings may not apply; import the flows first", stacklevel=3)
    os.environ.update(prefect_settings())


def is_transient(error: Optional[BaseException]) -> bool:
    """Worth a retry: network and timeout errors, a locked SQLite database, a tracking server that
    is briefly unavailable. Bad input (DataError, FinetuneError, RegistryError, other ValueErrors)
    fails the same way every time and is not retried."""
    if error is None:
        return False
    import requests

    if isinstance(error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)):
        return True
    text = str(error).lower()
    if isinstance(error, sqlite3.OperationalError) or type(error).__name__ == "OperationalError":
        return "locked" in text or "busy" in text
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED") or "locked" in text
    return False
