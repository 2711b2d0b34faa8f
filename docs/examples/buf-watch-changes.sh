BUF=node_modules/.bin/buf
S=http://${JOBSTATE_TARGET:-127.0.0.1:50051}/jobstate.v1.JobStateService
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"job_id": "job-2"}' "$S/CreateJob" >/dev/null
$BUF curl --protocol grpc --http2-prior-knowledge \
  -d '{"job_id": "job-2", "new_state": "JOB_STATE_TYPE_CANCELLED", "comment": "not needed"}' "$S/UpdateJobState" >/dev/null
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"job_id": "job-2", "expected_version": 2}' "$S/DeleteJob"
