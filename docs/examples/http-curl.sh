# Against a fresh `make run`. Each `# =>` line is what the command above it prints (`…`: a time; a line starting
# `#    ` goes on with the one above). A test runs this file and compares.
API=${JOBSTATE_HTTP_URL:-http://127.0.0.1:8080}/jobstate.v1.JobStateService

# A write: POST the request as JSON (-w '\n' only ends the line).
curl -s -w '\n' -H 'content-type: application/json' -d '{"jobId": "job-1"}' $API/CreateJob
# => {"job":{"jobId":"job-1","state":"JOB_STATE_TYPE_NEW","version":"1","createTime":"…","updateTime":"…"},"revision":"1"}
curl -s -w '\n' -H 'content-type: application/json' $API/UpdateJobState \
  -d '{"jobId": "job-1", "newState": "JOB_STATE_TYPE_QUEUED", "condition": {"expectedVersion": "1"}}'
# => {"job":{"jobId":"job-1","state":"JOB_STATE_TYPE_QUEUED","version":"2","createTime":"…","updateTime":"…"},"revision":"2"}

# A read: GET, a plain URL (the request's JSON in `message`).
curl -s -w '\n' -G $API/GetJob --data-urlencode encoding=json --data-urlencode 'message={"jobId": "job-1"}'
# => {"job":{"jobId":"job-1","state":"JOB_STATE_TYPE_QUEUED","version":"2","createTime":"…","updateTime":"…"},"revision":"2"}
curl -s -w '\n' "$API/ListJobs?encoding=json&message=%7B%7D"
# => {"jobs":[{"jobId":"job-1","state":"JOB_STATE_TYPE_QUEUED","version":"2","createTime":"…","updateTime":"…"}],"revision":"2"}

# An error: the HTTP status comes from the code (the table below); the body has the code, the message and the
# ErrorInfo (base64 protobuf in "value", the same decoded in "debug"): switch on its reason.
curl -s -w '\nHTTP status %{http_code}\n' -H 'content-type: application/json' $API/UpdateJobState \
  -d '{"jobId": "job-1", "newState": "JOB_STATE_TYPE_IN_PROGRESS", "condition": {"expectedVersion": "1"}}'
# => {"code": "aborted", "message": "job job-1 is at version 2, not 1", "details": [{"type": "google.rpc.ErrorInfo",
#    "value": "ChBWRVJTSU9OX01JU01BVENIEghqb2JzdGF0ZRoUCg9jdXJyZW50X3ZlcnNpb24SATI",
#    "debug": {"reason": "VERSION_MISMATCH", "domain": "jobstate", "metadata": {"current_version": "2"}}}]}
# => HTTP status 409

# A misspelt field is refused, never ignored (jq picks the message out).
curl -s -H 'content-type: application/json' $API/UpdateJobState \
  -d '{"jobId": "job-1", "newState": "JOB_STATE_TYPE_IN_PROGRESS", "condition": {"expectedVersoin": "2"}}' \
  | jq -r .message
# => UpdateJobStateRequest has no field 'condition.expectedVersoin' (refused rather than ignored, so a misspelt
#    condition is never dropped)
