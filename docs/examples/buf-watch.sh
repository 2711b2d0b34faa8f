BUF=node_modules/.bin/buf
URL=http://${JOBSTATE_TARGET:-127.0.0.1:50051}
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"send_initial_state": true}' \
  "$URL/jobstate.v1.JobStateService/Watch" \
  | jq --unbuffered -c '.events[] | {type, revision, job: .job.jobId, state: .job.state, version: .job.version}'
