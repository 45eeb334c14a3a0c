"""Links both ways between a run and its data: the web UI addresses of a commit and a workflow.

Both are off (None) unless the deployment names the UI's base address (`lakefs.ui_url`,
`conductor.ui_url`). A merge's log event then carries the lakeFS commit's page, and every
commit the worker publishes carries the Conductor workflow's page in its metadata
(`perago.workflow_url`). The task output never carries either: it is exactly the contract's.
"""

from __future__ import annotations

from urllib.parse import quote

from perago_worker.settings import Settings

META_WORKFLOW_URL = "perago.workflow_url"


def _base(url: str | None) -> str | None:
    return url.rstrip("/") if url else None


def commit_url(settings: Settings, repository: str, commit: str) -> str | None:
    """`{lakefs.ui_url}/repositories/{repo}/commits/{commit}`, or None when it is unset."""
    base = _base(settings.lakefs.ui_url)
    if base is None:
        return None
    return f"{base}/repositories/{quote(repository, safe='')}/commits/{quote(commit, safe='')}"


def workflow_url(settings: Settings, workflow_id: str) -> str | None:
    """`{conductor.ui_url}/execution/{workflow_id}`, or None when it is unset."""
    base = _base(settings.conductor.ui_url)
    if base is None:
        return None
    return f"{base}/execution/{quote(workflow_id, safe='')}"
