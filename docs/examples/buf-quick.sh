BUF=node_modules/.bin/buf     # installed by make node-deps (npm @bufbuild/buf)
S=http://${JOBSTATE_TARGET:-127.0.0.1:50051}/jobstate.v1.JobStateService
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"job_id": "job-1"}' "$S/CreateJob"
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"job_id": "job-1"}' "$S/GetJob"
