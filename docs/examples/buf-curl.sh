# Run from the repository root against a fresh `make run`; the lines starting with `# =>` are what each command
# prints (a test runs this file and compares them).
BUF=node_modules/.bin/buf
URL=http://${JOBSTATE_TARGET:-127.0.0.1:50051}
S=$URL/jobstate.v1.JobStateService

$BUF curl --protocol grpc --http2-prior-knowledge --list-methods "$URL" | grep JobStateService/Watch
# => jobstate.v1.JobStateService/Watch
$BUF curl --protocol grpc --http2-prior-knowledge "$URL/grpc.health.v1.Health/Check" | jq -c .
# => {"status":"SERVING"}

# Create a job, then move it with compare-and-set on its version.
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"job_id": "job-1", "timeout": "3600s"}' "$S/CreateJob" \
  | jq -c '{revision, id: .job.jobId, state: .job.state, version: .job.version, timeout: (.job.timeoutAt != null)}'
# => {"revision":"1","id":"job-1","state":"JOB_STATE_TYPE_NEW","version":"1","timeout":true}
$BUF curl --protocol grpc --http2-prior-knowledge \
  -d '{"job_id": "job-1", "new_state": "JOB_STATE_TYPE_QUEUED", "condition": {"expected_version": 1}}' \
  "$S/UpdateJobState" | jq -c '{revision, version: .job.version}'
# => {"revision":"2","version":"2"}

# Executions.
$BUF curl --protocol grpc --http2-prior-knowledge \
  -d '{"job_id": "job-1", "execution": {"node_id": "node-a", "compute_reference": "exec-1"}}' \
  "$S/CreateExecution" | jq -c '{revision, version: .job.version, execution: .execution.state}'
# => {"revision":"3","version":"3","execution":"EXECUTION_STATE_TYPE_NEW"}
$BUF curl --protocol grpc --http2-prior-knowledge \
  -d '{"job_id": "job-1", "compute_reference": "exec-1",
       "execution": {"state": "EXECUTION_STATE_TYPE_BID_ACCEPTED", "desired_state": "EXECUTION_DESIRED_STATE_RUNNING"},
       "update_mask": "state,desiredState", "condition": {"expected_version": 1}}' \
  "$S/UpdateExecution" | jq -c '.execution | {state, desiredState, version}'
# => {"state":"EXECUTION_STATE_TYPE_BID_ACCEPTED","desiredState":"EXECUTION_DESIRED_STATE_RUNNING","version":"2"}

# A stale expected_version: ABORTED. buf prints the status on stderr and exits with the code times 8 (80); the
# ErrorInfo is base64 (buf has no schema for it): reason VERSION_MISMATCH, metadata current_version.
$BUF curl --protocol grpc --http2-prior-knowledge \
  -d '{"job_id": "job-1", "new_state": "JOB_STATE_TYPE_IN_PROGRESS", "condition": {"expected_version": 1}}' \
  "$S/UpdateJobState" 2>&1 | jq -c '{code, message, details: [.details[].type]}'; echo "exit status ${PIPESTATUS[0]}"
# => {"code":"aborted","message":"job job-1 is at version 4, not 1","details":["google.rpc.ErrorInfo"]}
# => exit status 80

# Finish, list, and read the history.
$BUF curl --protocol grpc --http2-prior-knowledge \
  -d '{"job_id": "job-1", "new_state": "JOB_STATE_TYPE_COMPLETED", "condition": {"expected_version": 4}}' \
  "$S/UpdateJobState" | jq -c '{state: .job.state, version: .job.version, revision}'
# => {"state":"JOB_STATE_TYPE_COMPLETED","version":"5","revision":"5"}
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"states": ["JOB_STATE_TYPE_COMPLETED"], "page_size": 10}' \
  "$S/ListJobs" | jq -c '{ids: [.jobs[].jobId], revision}'
# => {"ids":["job-1"],"revision":"5"}
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"job_id": "job-1"}' "$S/GetJobHistory" \
  | jq -c '.entries[1] | {revision, version, jobState}'
# => {"revision":"2","version":"2","jobState":{"previousState":"JOB_STATE_TYPE_NEW","newState":"JOB_STATE_TYPE_QUEUED"}}
