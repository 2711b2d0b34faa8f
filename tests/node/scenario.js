#!/usr/bin/env node
// The cross-language check: a Node.js client, built from protos/ alone, drives one job through its life and
// watches every change arrive with the right version and revision.
//
//   node tests/node/scenario.js [HOST:PORT]        (default: $JOBSTATE_TARGET, else 127.0.0.1:50051)
//
// Prints one "ok" line per check and "node client: N checks passed"; on the first failed check prints
// "FAIL: ..." to stderr and exits 1. tests/integration/test_node_client.py runs it against a real server.
'use strict';

const { grpc, connect, call, errorInfo, collectEvents, firstResponse } = require('./jobstate');

const target = process.argv[2] || process.env.JOBSTATE_TARGET || '127.0.0.1:50051';
let checks = 0;

class CheckFailed extends Error {}

function check(ok, what) {
  if (!ok) throw new CheckFailed(what);
  checks += 1;
  console.log(`ok ${checks} - ${what}`);
}

function equal(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  check(a === e, a === e ? what : `${what}: got ${a}, want ${e}`);
}

// Expects `promise` to fail with `code` and an ErrorInfo of domain jobstate and `reason`; returns the info.
async function expectError(promise, code, reason, what) {
  let err = null;
  try {
    await promise;
  } catch (e) {
    err = e;
  }
  check(err !== null, `${what}: the call fails`);
  equal(grpc.status[err.code], grpc.status[code], `${what}: status ${grpc.status[code]}`);
  const info = errorInfo(err);
  check(info !== null, `${what}: grpc-status-details-bin carries a google.rpc.ErrorInfo`);
  equal([info.domain, info.reason], ['jobstate', reason], `${what}: ErrorInfo reason ${reason}`);
  equal(info.code, code, `${what}: google.rpc.Status code matches the call's`);
  return info;
}

async function main() {
  const client = connect(target);
  const jobId = `node-${process.pid}-${Date.now()}`;
  const writes = []; // [revision, version, state, event type] of each change, in order

  // A live watch of this job, registered before the job exists: its first response is the (empty) snapshot
  // and a bookmark, after which every change of the job must reach it.
  const live = client.Watch({ job_ids: [jobId], send_initial_state: true });
  const initial = await firstResponse(live);
  equal(
    initial.events.map((e) => e.type),
    ['WATCH_EVENT_TYPE_BOOKMARK'],
    'watch before create: empty snapshot, then a bookmark',
  );

  const created = await call(client, 'CreateJob', { job_id: jobId, comment: 'from node' });
  equal([created.job.job_id, created.job.state, created.job.version], [jobId, 'JOB_STATE_TYPE_NEW', 1], 'create: NEW v1');
  check(created.revision > initial.revision, 'create: revision after the bookmark');
  check(created.job.create_time && Number(created.job.create_time.seconds) > 0, 'create: create_time set');
  writes.push([created.revision, 1, 'JOB_STATE_TYPE_NEW', 'WATCH_EVENT_TYPE_CREATED']);

  // Each state move is compare-and-set on the version the client last saw.
  let version = 1;
  for (const state of ['JOB_STATE_TYPE_QUEUED', 'JOB_STATE_TYPE_IN_PROGRESS']) {
    const r = await call(client, 'UpdateJobState', {
      job_id: jobId,
      new_state: state,
      condition: { expected_version: version },
      comment: `to ${state}`,
    });
    version += 1;
    equal([r.job.state, r.job.version], [state, version], `set-state ${state} with expected_version ${version - 1}`);
    check(r.revision === writes[writes.length - 1][0] + 1, `set-state ${state}: revision one more (store is embedded)`);
    writes.push([r.revision, version, state, 'WATCH_EVENT_TYPE_UPDATED']);
  }

  // A stale version: ABORTED / VERSION_MISMATCH naming the current version, and nothing changes.
  const info = await expectError(
    call(client, 'UpdateJobState', {
      job_id: jobId,
      new_state: 'JOB_STATE_TYPE_COMPLETED',
      condition: { expected_version: 1 },
    }),
    grpc.status.ABORTED,
    'VERSION_MISMATCH',
    'stale expected_version',
  );
  equal(info.metadata.current_version, String(version), 'VERSION_MISMATCH metadata names current_version');
  await expectError(
    call(client, 'GetJob', { job_id: `${jobId}-missing` }),
    grpc.status.NOT_FOUND,
    'JOB_NOT_FOUND',
    'unknown job',
  );

  const ex = await call(client, 'CreateExecution', {
    job_id: jobId,
    execution: { node_id: 'node-a', desired_state: 'EXECUTION_DESIRED_STATE_PENDING' },
    comment: 'asked node-a',
  });
  version += 1;
  const ref = ex.execution.compute_reference;
  check(ref.length > 0, 'create execution: the server named it');
  equal(
    [ex.execution.state, ex.execution.version, ex.job.version, ex.job.executions.length],
    ['EXECUTION_STATE_TYPE_NEW', 1, version, 1],
    'create execution: NEW v1, job version raised',
  );
  writes.push([ex.revision, version, 'JOB_STATE_TYPE_IN_PROGRESS', 'WATCH_EVENT_TYPE_UPDATED']);

  const accepted = await call(client, 'UpdateExecution', {
    job_id: jobId,
    compute_reference: ref,
    execution: { state: 'EXECUTION_STATE_TYPE_BID_ACCEPTED', desired_state: 'EXECUTION_DESIRED_STATE_RUNNING' },
    update_mask: { paths: ['state', 'desired_state'] },
    condition: { expected_version: 1, expected_states: ['EXECUTION_STATE_TYPE_NEW'] },
  });
  version += 1;
  equal(
    [accepted.execution.state, accepted.execution.desired_state, accepted.execution.version, accepted.job.version],
    ['EXECUTION_STATE_TYPE_BID_ACCEPTED', 'EXECUTION_DESIRED_STATE_RUNNING', 2, version],
    'update execution (masked, CAS): BID_ACCEPTED v2',
  );
  writes.push([accepted.revision, version, 'JOB_STATE_TYPE_IN_PROGRESS', 'WATCH_EVENT_TYPE_UPDATED']);

  const finished = await call(client, 'UpdateExecution', {
    job_id: jobId,
    compute_reference: ref,
    execution: {
      state: 'EXECUTION_STATE_TYPE_COMPLETED',
      status: 'done',
      run_output: { stdout: 'hello from node\n', exit_code: 0 },
      published_results: { storage_source: 'url', url: 'https://example.invalid/out', metadata: { lang: 'js' } },
    },
    condition: { expected_version: 2 },
  });
  version += 1;
  equal(
    [finished.execution.state, finished.execution.version, finished.execution.run_output.stdout],
    ['EXECUTION_STATE_TYPE_COMPLETED', 3, 'hello from node\n'],
    'update execution (no mask: the fields set): COMPLETED v3 with its output',
  );
  equal(finished.execution.published_results.metadata, { lang: 'js' }, 'update execution: map field round-trips');
  writes.push([finished.revision, version, 'JOB_STATE_TYPE_IN_PROGRESS', 'WATCH_EVENT_TYPE_UPDATED']);

  const done = await call(client, 'UpdateJobState', {
    job_id: jobId,
    new_state: 'JOB_STATE_TYPE_COMPLETED',
    condition: { expected_version: version, expected_state: 'JOB_STATE_TYPE_IN_PROGRESS' },
  });
  version += 1;
  equal([done.job.state, done.job.version], ['JOB_STATE_TYPE_COMPLETED', version], 'set-state COMPLETED');
  writes.push([done.revision, version, 'JOB_STATE_TYPE_COMPLETED', 'WATCH_EVENT_TYPE_UPDATED']);

  const got = await call(client, 'GetJob', { job_id: jobId });
  equal([got.job.version, got.job.executions[0].state], [version, 'EXECUTION_STATE_TYPE_COMPLETED'], 'get: final job');
  check(got.revision >= done.revision, 'get: read at or after the last write');

  // Every change, in order, on the live watch and on a watch resumed from the create's revision.
  const resumed = client.Watch({ job_ids: [jobId], start_revision: created.revision });
  for (const [name, stream] of [
    ['live watch', live],
    ['watch from the create revision', resumed],
  ]) {
    const { events } = await collectEvents(stream, writes.length);
    equal(
      events.map((e) => [Number(e.revision), Number(e.job.version), e.job.state, e.type]),
      writes,
      `${name}: ${writes.length} events with the write revisions, versions 1..${version}, states and types`,
    );
    check(
      events.every((e) => e.job.job_id === jobId && e.time && Number(e.time.seconds) > 0),
      `${name}: every event has the job and its time`,
    );
  }
  // The remaining RPCs: list (with a state filter), history, delete.
  const listed = await call(client, 'ListJobs', { states: ['JOB_STATE_TYPE_COMPLETED'], page_size: 1000 });
  check(listed.jobs.some((j) => j.job_id === jobId && j.version === version), 'list: the completed job is listed');
  check(listed.jobs.every((j) => j.state === 'JOB_STATE_TYPE_COMPLETED'), 'list: only COMPLETED jobs');
  check(listed.revision >= done.revision, 'list: read at or after the last write');

  const history = await call(client, 'GetJobHistory', { job_id: jobId });
  equal(
    history.entries.map((e) => [Number(e.revision), Number(e.version)]),
    writes.map(([revision, v]) => [revision, v]),
    `history: ${writes.length} entries with the write revisions and versions`,
  );
  equal(history.entries[0].job_state.new_state, 'JOB_STATE_TYPE_NEW', 'history: the first entry created the job');

  // Delete, on a scratch job (the finished one stays for the Python side to read).
  const scratchId = `${jobId}-scratch`;
  const scratch = await call(client, 'CreateJob', { job_id: scratchId });
  await call(client, 'UpdateJobState', { job_id: scratchId, new_state: 'JOB_STATE_TYPE_QUEUED' });
  await expectError(
    call(client, 'DeleteJob', { job_id: scratchId, expected_version: 1 }),
    grpc.status.ABORTED,
    'VERSION_MISMATCH',
    'delete with a stale expected_version',
  );
  const deleted = await call(client, 'DeleteJob', { job_id: scratchId, expected_version: 2 });
  equal([deleted.job.job_id, deleted.job.version], [scratchId, 2], 'delete: the last state comes back');
  check(deleted.revision === scratch.revision + 2, 'delete: a change of its own, one revision after the last');
  await expectError(
    call(client, 'GetJob', { job_id: scratchId }),
    grpc.status.NOT_FOUND,
    'JOB_NOT_FOUND',
    'get after delete',
  );

  client.close();
  console.log(`node client: ${checks} checks passed against ${target}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    const what = err instanceof CheckFailed ? err.message : `${err.code !== undefined ? `gRPC ${grpc.status[err.code]}: ` : ''}${err.message}`;
    console.error(`FAIL: ${what}`);
    process.exit(1);
  },
);
