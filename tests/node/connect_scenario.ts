// The Connect Node client (@connectrpc/connect-node, messages from protoc-gen-es in web/gen/) against a real
// server's HTTP listener: unary calls in JSON and binary, GET reads, Watch over Connect streaming (store id header,
// resume by revision, bookmarks, a resume from another store refused), gRPC-Web, the ErrorInfo of errors, and
// tokens and roles. tests/httpapi/test_node_connect.py bundles it with esbuild and runs it:
//   node bundle.mjs BASE_URL plain|auth [READER_TOKEN WRITER_TOKEN]
// Prints one "ok ..." line a check and, last, "node connect client: N checks passed"; exits 1 on the first failure.

import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-node";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { JobStateService, WatchEventType } from "../../web/gen/jobstate/v1/job_state_service_pb";
import { JobStateType } from "../../web/gen/jobstate/v1/job_state_pb";

type Service = Client<typeof JobStateService>;

let passed = 0;
function check(cond: unknown, what: string): void {
  if (!cond) {
    throw new Error(`check failed: ${what}`);
  }
  passed++;
  console.log(`ok ${what}`);
}

// google.rpc.ErrorInfo by hand (reason = 1, domain = 2, metadata = 3 map<string, string>): the generated code here
// is jobstate's only; a client that knows the reason needs no more.
function errorInfo(err: ConnectError): { reason: string; domain: string; metadata: Record<string, string> } {
  const detail = err.details.find((d) => "value" in d && d.type === "google.rpc.ErrorInfo");
  if (!detail || !("value" in detail)) {
    throw new Error(`no ErrorInfo in ${err.message}`);
  }
  const out = { reason: "", domain: "", metadata: {} as Record<string, string> };
  const r = new BinaryReader(detail.value);
  while (r.pos < r.len) {
    const [field] = r.tag();
    if (field === 1) out.reason = r.string();
    else if (field === 2) out.domain = r.string();
    else if (field === 3) {
      const entry = new BinaryReader(r.bytes());
      let k = "";
      let v = "";
      while (entry.pos < entry.len) {
        const [f] = entry.tag();
        if (f === 1) k = entry.string();
        else v = entry.string();
      }
      out.metadata[k] = v;
    } else r.skip(2);
  }
  return out;
}

async function expectError(call: () => Promise<unknown>, code: Code, reason: string, what: string): Promise<ConnectError> {
  try {
    await call();
  } catch (e) {
    const err = ConnectError.from(e);
    check(err.code === code && errorInfo(err).reason === reason, `${what}: ${Code[code]} ${reason}`);
    check(errorInfo(err).domain === "jobstate", `${what}: ErrorInfo domain jobstate`);
    return err;
  }
  throw new Error(`${what}: no error`);
}

async function plain(baseUrl: string): Promise<void> {
  const json: Service = createClient(JobStateService, createConnectTransport({ baseUrl, httpVersion: "1.1" }));
  const binary: Service = createClient(
    JobStateService,
    createConnectTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true, useHttpGet: true }),
  );
  const web: Service = createClient(
    JobStateService,
    createGrpcWebTransport({ baseUrl, httpVersion: "1.1", useBinaryFormat: true }),
  );

  // Watch from the start, to see every change below arrive.
  const ac = new AbortController();
  let storeId = "";
  const live = json.watch(
    { sendInitialState: true },
    { signal: ac.signal, onHeader: (h) => (storeId = h.get("jobstate-store-id") ?? "") },
  )[Symbol.asyncIterator]();
  const first = await live.next();
  check(!first.done && first.value.events.at(-1)?.type === WatchEventType.BOOKMARK, "watch: initial state ends with a bookmark");
  check(storeId.length > 0, "watch: jobstate-store-id header");

  const created = await json.createJob({ jobId: "node-1", comment: "from node" });
  check(created.job?.version === 1n && created.job?.state === JobStateType.NEW, "json: createJob version 1 NEW");
  const moved = await binary.updateJobState({
    jobId: "node-1",
    newState: JobStateType.QUEUED,
    condition: { expectedVersion: 1n },
  });
  check(moved.job?.version === 2n, "binary: updateJobState with compare-and-set");
  const got = await binary.getJob({ jobId: "node-1" }); // GET: useHttpGet, a NO_SIDE_EFFECTS method
  check(got.job?.state === JobStateType.QUEUED, "binary GET: getJob sees the write");
  const listed = await json.listJobs({ states: [JobStateType.QUEUED] });
  check(listed.jobs.map((j) => j.jobId).join() === "node-1", "json: listJobs by state");
  const history = await binary.getJobHistory({ jobId: "node-1" });
  check(history.entries.map((e) => e.version).join() === "1,2", "binary GET: getJobHistory");

  const seen: Array<[WatchEventType, string, bigint]> = [];
  while (seen.length < 2) {
    const r = await live.next();
    if (r.done) throw new Error("watch ended");
    for (const e of r.value.events) {
      if (e.type !== WatchEventType.BOOKMARK) seen.push([e.type, e.job?.jobId ?? "", e.revision]);
    }
  }
  check(
    seen[0][0] === WatchEventType.CREATED && seen[1][0] === WatchEventType.UPDATED && seen[1][2] === seen[0][2] + 1n,
    "watch: created then updated, consecutive revisions",
  );
  ac.abort();

  const err = await expectError(
    () => json.updateJobState({ jobId: "node-1", newState: JobStateType.IN_PROGRESS, condition: { expectedVersion: 1n } }),
    Code.Aborted,
    "VERSION_MISMATCH",
    "json: stale version",
  );
  check(errorInfo(err).metadata["current_version"] === "2", "json: VERSION_MISMATCH says current_version 2");
  await expectError(() => binary.getJob({ jobId: "nope" }), Code.NotFound, "JOB_NOT_FOUND", "binary GET: missing job");
  await expectError(() => json.createJob({ jobId: "a b" }), Code.InvalidArgument, "INVALID_ARGUMENT", "json: bad id");

  // Resume by revision, presenting the store id: exactly the changes after the last one seen.
  const resumed = json.watch({ startRevision: seen[1][2] }, { headers: { "jobstate-store-id": storeId } });
  await json.deleteJob({ jobId: "node-1" });
  const replayed: Array<[WatchEventType, bigint]> = [];
  for await (const r of resumed) {
    replayed.push(...r.events.filter((e) => e.type !== WatchEventType.BOOKMARK).map((e): [WatchEventType, bigint] => [e.type, e.revision]));
    if (replayed.at(-1)?.[0] === WatchEventType.DELETED) break;
  }
  check(
    replayed.map(([t, r]) => `${WatchEventType[t]}@${r}`).join() === `UPDATED@${seen[1][2]},DELETED@${seen[1][2] + 1n}`,
    "watch: resume by revision",
  );
  await expectError(
    async () => {
      for await (const _ of json.watch({ startRevision: 1n }, { headers: { "jobstate-store-id": "mem-another" } })) {
        // the resume is refused before any event
      }
    },
    Code.OutOfRange,
    "REVISION_COMPACTED",
    "watch: resume from another store refused",
  );

  // Bookmarks with no writes, after the last revision.
  for await (const r of json.watch({ startRevision: seen[1][2] + 2n, progressInterval: { nanos: 50_000_000 } })) {
    check(r.events.length === 1 && r.events[0].type === WatchEventType.BOOKMARK, "watch: progress bookmark");
    break;
  }

  // gRPC-Web: unary and Watch.
  const w = await web.createJob({ jobId: "web-1" });
  check(w.job?.jobId === "web-1", "grpc-web: createJob");
  for await (const r of web.watch({ jobIds: ["web-1"], sendInitialState: true })) {
    check(r.events[0]?.job?.jobId === "web-1", "grpc-web: watch initial state");
    break;
  }
  await expectError(() => web.createJob({ jobId: "web-1" }), Code.AlreadyExists, "JOB_ALREADY_EXISTS", "grpc-web: taken id");
}

async function auth(baseUrl: string, reader: string, writer: string): Promise<void> {
  const as = (token?: string): Service =>
    createClient(
      JobStateService,
      createConnectTransport({
        baseUrl,
        httpVersion: "1.1",
        interceptors: token ? [(next) => (req) => (req.header.set("authorization", `Bearer ${token}`), next(req))] : [],
      }),
    );
  await expectError(() => as().listJobs({}), Code.Unauthenticated, "UNAUTHENTICATED", "no token");
  await expectError(
    async () => {
      for await (const _ of as().watch({})) {
        // refused before any event
      }
    },
    Code.Unauthenticated,
    "UNAUTHENTICATED",
    "watch without a token",
  );
  await expectError(() => as("x".repeat(20)).listJobs({}), Code.Unauthenticated, "UNAUTHENTICATED", "unknown token");
  check((await as(reader).listJobs({})).jobs.length === 0, "reader: listJobs");
  const denied = await expectError(
    () => as(reader).createJob({ jobId: "r" }),
    Code.PermissionDenied,
    "PERMISSION_DENIED",
    "reader: createJob",
  );
  check(errorInfo(denied).metadata["required_role"] === "writer", "reader: told the role it needs");
  check((await as(writer).createJob({ jobId: "w" })).job?.jobId === "w", "writer: createJob");
}

const [baseUrl, mode, reader, writer] = process.argv.slice(2);
(mode === "auth" ? auth(baseUrl, reader, writer) : plain(baseUrl)).then(
  () => console.log(`node connect client: ${passed} checks passed`),
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
