// A minimal Node.js client of jobstate.v1.JobStateService, built from protos/ alone.
//
// It proves that the public contract is enough for another language: the service is loaded from the .proto
// files at run time with @grpc/proto-loader (the google.protobuf well-known types come with proto-loader), and
// the rich error details (google.rpc.Status carrying a google.rpc.ErrorInfo) are decoded with protobufjs,
// which proto-loader itself depends on.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

// proto3 JSON-ish objects: field names as in the .proto, enums by name, int64 as Number (revisions and
// versions stay far below 2^53), unset scalars at their defaults.
const LOAD_OPTIONS = {
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS],
};

function loadService() {
  const definition = protoLoader.loadSync('jobstate/v1/job_state_service.proto', LOAD_OPTIONS);
  return grpc.loadPackageDefinition(definition).jobstate.v1.JobStateService;
}

function connect(target) {
  const Service = loadService();
  return new Service(target, grpc.credentials.createInsecure());
}

// A unary call as a Promise, with a deadline.
function call(client, method, request, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// google.rpc.Status and google.rpc.ErrorInfo: public, stable schemas (googleapis), spelled here so that
// nothing but protos/ has to be on disk. Any is spelled plainly so that decode gives type_url and value bytes.
const rpcRoot = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'RawAny', id: 3 },
              },
            },
            RawAny: {
              fields: {
                type_url: { type: 'string', id: 1 },
                value: { type: 'bytes', id: 2 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const Status = rpcRoot.lookupType('google.rpc.Status');
const ErrorInfo = rpcRoot.lookupType('google.rpc.ErrorInfo');
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

// The ErrorInfo of a failed call ({reason, domain, metadata}), from its grpc-status-details-bin trailer;
// null when the error carries none.
function errorInfo(err) {
  const raw = err && err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!raw.length) return null;
  const status = Status.decode(raw[0]);
  for (const detail of status.details) {
    if (detail.type_url === ERROR_INFO_URL) {
      const info = ErrorInfo.toObject(ErrorInfo.decode(detail.value), { defaults: true });
      return { code: status.code, ...info };
    }
  }
  return null;
}

// Reads a Watch stream until `count` events that are not bookmarks have arrived (or `timeoutMs` passes),
// then cancels it. Resolves with { events, bookmarks }.
function collectEvents(stream, count, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const events = [];
    const bookmarks = [];
    let done = false;
    const finish = (fn, value) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      stream.cancel();
      fn(value);
    };
    const timer = setTimeout(
      () => finish(reject, new Error(`watch: ${events.length} of ${count} events after ${timeoutMs}ms`)),
      timeoutMs,
    );
    stream.on('data', (response) => {
      for (const e of response.events) {
        if (e.type === 'WATCH_EVENT_TYPE_BOOKMARK') bookmarks.push(e);
        else events.push(e);
      }
      if (events.length >= count) finish(resolve, { events, bookmarks });
    });
    stream.on('error', (err) => {
      if (err.code !== grpc.status.CANCELLED) finish(reject, err);
    });
    stream.on('end', () => finish(reject, new Error(`watch ended after ${events.length} of ${count} events`)));
    stream.resume(); // a stream paused by firstResponse does not restart by itself when a listener is added
  });
}

// Resolves with the first response of a stream (for a send_initial_state watch: its snapshot and bookmark,
// after which the watcher is registered and sees every later change).
function firstResponse(stream, timeoutMs = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no watch response after ${timeoutMs}ms`)), timeoutMs);
    stream.once('data', (response) => {
      clearTimeout(timer);
      stream.pause(); // later responses wait in the stream until collectEvents resumes it
      resolve(response);
    });
    stream.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

module.exports = { grpc, loadService, connect, call, errorInfo, collectEvents, firstResponse, PROTOS };
