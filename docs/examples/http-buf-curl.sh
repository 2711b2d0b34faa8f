BUF=node_modules/.bin/buf
API=${JOBSTATE_HTTP_URL:-http://127.0.0.1:8080}/jobstate.v1.JobStateService
$BUF curl --schema protos --protocol connect -d '{"jobId": "job-9"}' $API/CreateJob
$BUF curl --schema protos --protocol grpcweb -d '{"jobId": "job-9"}' $API/GetJob
$BUF curl --schema protos --protocol connect -d '{"jobIds": ["job-9"], "sendInitialState": true}' $API/Watch
