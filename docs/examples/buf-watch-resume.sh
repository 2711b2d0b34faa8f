BUF=node_modules/.bin/buf
URL=http://${JOBSTATE_TARGET:-127.0.0.1:50051}
$BUF curl --protocol grpc --http2-prior-knowledge -d '{"start_revision": 6, "progress_interval": "2s"}' \
  "$URL/jobstate.v1.JobStateService/Watch"
