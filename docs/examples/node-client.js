// Run from the repository root (it loads protos/ from there and @grpc/* from node_modules/, installed by
// `make node-deps`): node docs/examples/node-client.js
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const def = protoLoader.loadSync('jobstate/v1/job_state_service.proto', {
  includeDirs: ['protos'], // google/protobuf/* come with proto-loader
  // keepCase: without it, proto-loader renames fields to camelCase and silently drops `job_id` and the rest.
  keepCase: true, longs: Number, enums: String, defaults: true,
});
const { JobStateService } = grpc.loadPackageDefinition(def).jobstate.v1;
const target = process.env.JOBSTATE_TARGET || '127.0.0.1:50051';
const client = new JobStateService(target, grpc.credentials.createInsecure());

client.CreateJob({ job_id: 'node-1' }, (err, created) => {
  if (err) throw err;
  console.log('created', created.job.job_id, created.job.state, created.job.version);
  // Watch from the create's revision: every change of the job, none missed.
  const watch = client.Watch({ job_ids: ['node-1'], start_revision: created.revision });
  let waiting = 3; // the watch's CREATED and UPDATED events, and the update's answer
  const done = () => { if (--waiting === 0) { watch.cancel(); client.close(); } };
  watch.on('data', (r) => r.events.forEach((e) => {
    console.log(e.type, e.revision, e.job.job_id, e.job.state, e.job.version);
    done();
  }));
  watch.on('error', (e) => { if (e.code !== grpc.status.CANCELLED) console.error(e.message); });

  client.UpdateJobState(
    { job_id: 'node-1', new_state: 'JOB_STATE_TYPE_QUEUED', condition: { expected_version: created.job.version } },
    (err2, moved) => {
      if (err2) throw err2;
      console.log('moved', moved.job.state, moved.job.version); // JOB_STATE_TYPE_QUEUED 2
      done();
    },
  );
});
