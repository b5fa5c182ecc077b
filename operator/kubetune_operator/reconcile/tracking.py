"""status.tracking of a FineTuneJob, pure: the experiment-tracking run the trainer reported.

The trainer talks to the tracking server, not the operator; it reports the run in its
termination summary (and while it runs, in status.tracking with its own token). What it says is
checked for shape only and bounded before it enters status: it is a link for people, never an
input to a decision. The run id that lineage relies on is the one in the verified manifest
(status.artifact.trackingRunId)."""

from __future__ import annotations

import re

STATES = ("Logged", "Degraded", "Failed")
RUN_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
URL = re.compile(r"https?://\S{1,2040}")
# Events for a state that says tracking lost something (once, on the change).
WARNINGS = {"Degraded": "TrackingDegraded", "Failed": "TrackingFailed"}


def from_summary(reported, attempt: int) -> dict | None:
    """The status form of a summary's `tracking` object: known fields of the right shape."""
    if not isinstance(reported, dict):
        return None
    out: dict = {"attempt": attempt}
    run_id, url = reported.get("runId"), reported.get("url")
    if isinstance(run_id, str) and RUN_ID.fullmatch(run_id):
        out["runId"] = run_id
    experiment = reported.get("experimentId")
    if isinstance(experiment, str) and RUN_ID.fullmatch(experiment):
        out["experimentId"] = experiment
    if isinstance(url, str) and URL.fullmatch(url):
        out["url"] = url
    if reported.get("state") in STATES:
        out["state"] = reported["state"]
    if isinstance(reported.get("message"), str) and reported["message"]:
        out["message"] = reported["message"][:1000]
    return out if len(out) > 1 else None


def status(attempts: dict, old: dict | None) -> dict | None:
    """status.tracking: the newest report (`attempts`: number → summary). What status already
    says wins when it is newer (a running attempt's trainer wrote it, before its summary) or
    when no pod has a report left (a report outlives its pod only there)."""
    old = old if isinstance(old, dict) and old else None
    for number in sorted(attempts, reverse=True):
        found = from_summary((attempts[number] or {}).get("tracking"), number)
        if found is not None:
            newer = old is not None and isinstance(old.get("attempt"), int) and \
                old["attempt"] > number
            return old if newer else found
    return old


def events(old: dict | None, new: dict | None) -> list[tuple[str, str, str]]:
    """A Warning when tracking newly degraded or failed (training goes on regardless)."""
    state = (new or {}).get("state")
    if state not in WARNINGS or ((old or {}).get("state") == state and
                                 (old or {}).get("attempt") == (new or {}).get("attempt")):
        return []
    text = (new or {}).get("message") or "the tracking server did not answer"
    return [("Warning", WARNINGS[state], f"Experiment tracking (attempt "
             f"{new.get('attempt')}): {text[:500]}; training is not affected")]
