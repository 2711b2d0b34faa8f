// The Connect client, the token, and errors in the server's own words (code, ErrorInfo reason, metadata).
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import { JobStateService } from "../gen/jobstate/v1/job_state_service_pb";

const TOKEN_KEY = "jobstate.token";

// The token lives in this tab's session storage: never in the URL (it would end up in logs and history),
// never in local storage (it would outlive the tab and leak to every other tab of the origin).
export function getToken(): string {
  try {
    return sessionStorage.getItem(TOKEN_KEY) ?? "";
  } catch {
    return "";
  }
}

export function setToken(token: string): void {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage can be disabled; the token then lasts until the page is reloaded (kept by the caller).
  }
}

const auth: Interceptor = (next) => async (req) => {
  const token = getToken();
  if (token) req.header.set("Authorization", `Bearer ${token}`);
  return next(req);
};

export type JobStateClient = Client<typeof JobStateService>;

export function makeClient(baseUrl: string): JobStateClient {
  const transport = createConnectTransport({
    baseUrl,
    // Binary: a busy watch of every job parses several times faster than JSON.
    useBinaryFormat: true,
    // GET for the read-only methods (NO_SIDE_EFFECTS in the .proto): cacheable, and plain in the server's logs.
    useHttpGet: true,
    interceptors: [auth],
  });
  return createClient(JobStateService, transport);
}

/** An error as the server gave it: the status code name (gRPC spelling), the ErrorInfo reason and metadata. */
export interface ServerError {
  code: string;
  reason: string;
  message: string;
  metadata: Record<string, string>;
  connect: boolean; // false: not a Connect error (a bug or a network failure before any answer)
}

function codeName(code: Code): string {
  // Connect's enum names are CamelCase; people (and the CLI) know the gRPC names.
  const name = Code[code] ?? `CODE_${code}`;
  const snake = name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
  return snake === "CANCELED" ? "CANCELLED" : snake;
}

// google.rpc.ErrorInfo is three fields; decoding it by hand spares generating googleapis for one message.
function decodeErrorInfo(bytes: Uint8Array): { reason: string; domain: string; metadata: Record<string, string> } {
  const r = new BinaryReader(bytes);
  let reason = "";
  let domain = "";
  const metadata: Record<string, string> = {};
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    if (no === 1 && wt === WireType.LengthDelimited) reason = r.string();
    else if (no === 2 && wt === WireType.LengthDelimited) domain = r.string();
    else if (no === 3 && wt === WireType.LengthDelimited) {
      const m = new BinaryReader(r.bytes());
      let k = "";
      let v = "";
      while (m.pos < m.len) {
        const [n2, w2] = m.tag();
        if (n2 === 1 && w2 === WireType.LengthDelimited) k = m.string();
        else if (n2 === 2 && w2 === WireType.LengthDelimited) v = m.string();
        else m.skip(w2);
      }
      metadata[k] = v;
    } else r.skip(wt);
  }
  return { reason, domain, metadata };
}

export function serverError(err: unknown): ServerError {
  if (err instanceof ConnectError) {
    let reason = "";
    let metadata: Record<string, string> = {};
    for (const d of err.details) {
      if ("value" in d && "type" in d && d.type === "google.rpc.ErrorInfo" && d.value instanceof Uint8Array) {
        try {
          const info = decodeErrorInfo(d.value);
          reason = info.reason;
          metadata = info.metadata;
        } catch {
          // A detail we cannot read leaves the code and message, which still say what happened.
        }
      }
    }
    return { code: codeName(err.code), reason, message: err.rawMessage, metadata, connect: true };
  }
  const message = err instanceof Error ? err.message : String(err);
  return { code: "UNKNOWN", reason: "", message, metadata: {}, connect: false };
}

/** "PERMISSION_DENIED (PERMISSION_DENIED): token may not ..." — the CLI's form of an error. */
export function describe(e: ServerError): string {
  const reason = e.reason && e.reason !== e.code ? ` (${e.reason})` : "";
  return `${e.code}${reason}${e.message ? `: ${e.message}` : ""}`;
}
