// TypeScript on Node with @connectrpc/connect and the protoc-gen-es code in web/gen/ (`make proto` makes it).
// In a browser, the same with createConnectTransport from @connectrpc/connect-web.
// Run from the repository root: bash docs/examples/connect-client.sh
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { JobStateService, WatchEventType } from "../../web/gen/jobstate/v1/job_state_service_pb";
import { JobStateType } from "../../web/gen/jobstate/v1/job_state_pb";

const baseUrl = process.env.JOBSTATE_HTTP_URL ?? "http://127.0.0.1:8080";
const client = createClient(JobStateService, createConnectTransport({ baseUrl, httpVersion: "1.1" }));

// Fields are camelCase, int64s are bigints, enums are TypeScript enums (JobStateType[n] names one).
const created = await client.createJob({ jobId: "ts-1" });
const job = created.job!;
console.log(`created ${job.jobId} ${JobStateType[job.state]} version ${job.version}`);

const moved = await client.updateJobState({
  jobId: "ts-1",
  newState: JobStateType.QUEUED,
  condition: { expectedVersion: job.version }, // compare-and-set
});
console.log(`moved to ${JobStateType[moved.job!.state]} version ${moved.job!.version}`);

try {
  await client.updateJobState({ jobId: "ts-1", newState: JobStateType.IN_PROGRESS, condition: { expectedVersion: 1n } });
} catch (e) {
  // Switch on the ErrorInfo's reason. A unary error also has it decoded, in `debug`; a stream's error has only
  // the protobuf bytes in `value` (tests/node/connect_scenario.ts decodes them).
  const err = ConnectError.from(e);
  const info = err.details.find((d) => "type" in d && d.type === "google.rpc.ErrorInfo");
  const debug = (info && "debug" in info ? info.debug : {}) as { reason?: string; metadata?: Record<string, string> };
  console.log(`refused: ${Code[err.code]} ${debug.reason}, current version ${debug.metadata?.current_version}`);
}

// Watch from the create's revision: every change since, none missed; leaving the loop ends the stream.
let seen = 0;
for await (const r of client.watch({ jobIds: ["ts-1"], startRevision: created.revision })) {
  for (const e of r.events) {
    console.log(`${WatchEventType[e.type]} revision ${e.revision} ${e.job?.jobId} ${JobStateType[e.job!.state]}`);
    seen++;
  }
  if (seen === 2) break;
}
