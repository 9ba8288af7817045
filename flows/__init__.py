"""Prefect flows: thin wrappers that call the library in order, adding what Prefect is for:
caching of finished steps, retries on transient errors, artifacts, schedules and task runners.

Installed as `spacy_llm_components.flows`. Importing it settles Prefect's settings before Prefect
is imported (settings are read once, at import): a project-local PREFECT_HOME, the temporary
local server enabled, analytics off. A PREFECT_HOME or PREFECT_API_URL set by the user is kept.
"""

from spacy_llm_components.flows.settings import configure_prefect

configure_prefect()


def _skip_drain_in_forked_children() -> None:
    """Prefect 3.8's after-fork hook resets its log/event services (`_done_event = None`) but leaves
    their `threading._register_atexit` drain in place, which fails an assert when a forked child exits:
    spaCy's `nlp.pipe(n_process=N)` workers in a process that ran a flow then exit with code 1 and
    spaCy warns W127, though their work was done. There is nothing to drain in such a child.
    (Patches a private Prefect class: drop it once Prefect's reset_for_fork unregisters the hook.)"""
    from prefect._internal.concurrency import services

    drain_at_exit = services._QueueServiceBase._at_exit
    if getattr(drain_at_exit, "_sllm_patched", False):
        return

    def _at_exit(self) -> None:
        if self._done_event is not None:  # None: reset by the fork, or never started
            drain_at_exit(self)

    _at_exit._sllm_patched = True
    services._QueueServiceBase._at_exit = _at_exit


_skip_drain_in_forked_children()

