import os

from jobstate.client import Aborted, Client, Reason, WatchEventType, describe

target = os.environ.get("JOBSTATE_TARGET", "127.0.0.1:50051")
with Client(target) as c:
    job = c.create_job(timeout=600).job  # no id: the server makes a UUID
    c.update_job_state(job.job_id, "queued", expected_version=job.version)
    c.create_execution(job.job_id, "node-a")
    try:
        c.update_job_state(job.job_id, "in_progress", expected_version=1)
    except Aborted as e:  # switch on e.reason, never on the message text
        if e.reason != Reason.VERSION_MISMATCH:
            raise
        print("lost the race; the job is at version", e.current_version)

    # A watch resumes by itself after a dropped connection or WATCHER_LAGGED, from the last revision + 1;
    # it raises OutOfRange (REVISION_COMPACTED) when the server no longer holds that revision: list again.
    for event in c.watch([job.job_id], send_initial_state=True):
        print(describe(event))  # INITIAL <job id> QUEUED version 3 at revision 3, executions: 1 NEW
        if event.type == WatchEventType.WATCH_EVENT_TYPE_BOOKMARK:  # the snapshot is complete; then live changes
            break
