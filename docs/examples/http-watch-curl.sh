API=${JOBSTATE_HTTP_URL:-http://127.0.0.1:8080}/jobstate.v1.JobStateService
# One frame: flags 0, then the length as 4 bytes, big-endian (\031 in octal = 25 bytes), then the JSON itself.
printf '\0\0\0\0\031{"sendInitialState":true}' | curl -sN --data-binary @- \
  -H 'content-type: application/connect+json' $API/Watch
