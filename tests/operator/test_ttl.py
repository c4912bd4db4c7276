"""ttlSecondsAfterFinished: when a finished job is due for deletion."""

from datetime import datetime, timezone

from simpo_operator.handlers.expiry import expiry_delay

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def job(ttl, phase="Succeeded", completion="2030-01-01T11:59:00Z"):
    return {"spec": {"ttlSecondsAfterFinished": ttl}, "status": {"phase": phase, "completionTime": completion}}


def test_delay_counts_from_completion():
    assert expiry_delay(job(300), NOW) == 240.0
    assert expiry_delay(job(30), NOW) == 0.0
    assert expiry_delay(job(0, phase="Failed"), NOW) == 0.0


def test_never_for_running_jobs_or_without_ttl():
    assert expiry_delay(job(None), NOW) is None
    assert expiry_delay(job(10, phase="Running", completion=None), NOW) is None
    assert expiry_delay({"spec": {}}, NOW) is None
