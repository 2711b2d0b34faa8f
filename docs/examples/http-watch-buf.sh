API=${JOBSTATE_HTTP_URL:-http://127.0.0.1:8080}/jobstate.v1.JobStateService
node_modules/.bin/buf curl --schema protos --protocol connect -d '{"sendInitialState": true}' $API/Watch \
  | jq --unbuffered -c '.events[] | {type, revision, job: .job.jobId, state: .job.state, version: .job.version}'
