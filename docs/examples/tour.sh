jobstate create job-1 --job-timeout 10m
jobstate set-state job-1 queued --expect-version 1
jobstate exec create job-1 node-a --ref exec-1
jobstate exec update job-1 exec-1 --state bid_accepted --status running
jobstate set-state job-1 in_progress --expect-state queued
jobstate exec update job-1 exec-1 --state completed --exit-code 0
jobstate set-state job-1 completed --expect-version 6
jobstate history job-1              # every change: revision, version, time, what changed
jobstate set-state job-1 queued || echo "exit status $?"  # a final state stays final
