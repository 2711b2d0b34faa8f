jobstate watch --initial | jq --unbuffered -c '{type, revision, job: .job.jobId, state: .job.state, version: .job.version}'
