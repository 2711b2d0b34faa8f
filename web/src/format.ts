// Names, colours and time formats shared by every view. The words are the CLI's (client/jobstate/client/view.py),
// so that the terminal view and the page read the same.
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { ExecutionDesiredState, ExecutionStateType, type JobState, JobStateType } from "../gen/jobstate/v1/job_state_pb";

export const JOB_ORDER: JobStateType[] = [
  JobStateType.NEW,
  JobStateType.QUEUED,
  JobStateType.IN_PROGRESS,
  JobStateType.COMPLETED,
  JobStateType.ERROR,
  JobStateType.CANCELLED,
];

export const JOB_NAMES: Record<number, string> = {
  [JobStateType.UNSPECIFIED]: "UNSPECIFIED",
  [JobStateType.NEW]: "NEW",
  [JobStateType.QUEUED]: "QUEUED",
  [JobStateType.IN_PROGRESS]: "IN_PROGRESS",
  [JobStateType.COMPLETED]: "COMPLETED",
  [JobStateType.ERROR]: "ERROR",
  [JobStateType.CANCELLED]: "CANCELLED",
};

// CSS class suffixes; the colours themselves live in style.css (one place to change the palette).
export const JOB_CLASS: Record<number, string> = {
  [JobStateType.NEW]: "new",
  [JobStateType.QUEUED]: "queued",
  [JobStateType.IN_PROGRESS]: "progress",
  [JobStateType.COMPLETED]: "completed",
  [JobStateType.ERROR]: "error",
  [JobStateType.CANCELLED]: "cancelled",
};

export const TERMINAL_JOB = new Set([JobStateType.COMPLETED, JobStateType.ERROR, JobStateType.CANCELLED]);

// Execution states in lifecycle order, under the names the CLI and the terminal live view use (one vocabulary:
// what the table shows is what `jobstate exec update --state` takes), with the colour class of each.
export const EXEC_LABELS: [ExecutionStateType, string, string][] = [
  [ExecutionStateType.NEW, "NEW", "new"],
  [ExecutionStateType.ASK_FOR_BID, "ASK_FOR_BID", "queued"],
  [ExecutionStateType.ASK_FOR_BID_ACCEPTED, "ASK_FOR_BID_ACCEPTED", "queued"],
  [ExecutionStateType.BID_ACCEPTED, "BID_ACCEPTED", "progress"],
  [ExecutionStateType.COMPLETED, "COMPLETED", "completed"],
  [ExecutionStateType.FAILED, "FAILED", "error"],
  [ExecutionStateType.ASK_FOR_BID_REJECTED, "ASK_FOR_BID_REJECTED", "muted"],
  [ExecutionStateType.BID_REJECTED, "BID_REJECTED", "muted"],
  [ExecutionStateType.CANCELLED, "CANCELLED", "cancelled"],
];

export const EXEC_NAMES: Record<number, string> = {
  [ExecutionStateType.UNSPECIFIED]: "UNSPECIFIED",
  [ExecutionStateType.NEW]: "NEW",
  [ExecutionStateType.ASK_FOR_BID]: "ASK_FOR_BID",
  [ExecutionStateType.ASK_FOR_BID_ACCEPTED]: "ASK_FOR_BID_ACCEPTED",
  [ExecutionStateType.ASK_FOR_BID_REJECTED]: "ASK_FOR_BID_REJECTED",
  [ExecutionStateType.BID_ACCEPTED]: "BID_ACCEPTED",
  [ExecutionStateType.BID_REJECTED]: "BID_REJECTED",
  [ExecutionStateType.COMPLETED]: "COMPLETED",
  [ExecutionStateType.FAILED]: "FAILED",
  [ExecutionStateType.CANCELLED]: "CANCELLED",
};

export const DESIRED_NAMES: Record<number, string> = {
  [ExecutionDesiredState.UNSPECIFIED]: "—",
  [ExecutionDesiredState.PENDING]: "PENDING",
  [ExecutionDesiredState.RUNNING]: "RUNNING",
  [ExecutionDesiredState.STOPPED]: "STOPPED",
};

export function execClass(state: ExecutionStateType): string {
  for (const [s, , cls] of EXEC_LABELS) if (s === state) return cls;
  return "muted";
}

export function jobName(state: JobStateType): string {
  return JOB_NAMES[state] ?? `STATE_${state}`;
}

export function execName(state: ExecutionStateType): string {
  return EXEC_NAMES[state] ?? `STATE_${state}`;
}

/** Milliseconds since the epoch, or NaN when unset. */
export function millis(ts: Timestamp | undefined): number {
  if (!ts) return Number.NaN;
  return Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6);
}

/** A duration in the CLI's short form: 4s, 12m, 3h, 2d. */
export function ago(ms: number): string {
  if (!Number.isFinite(ms)) return "—";
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

function pad(n: number, w = 2): string {
  return String(n).padStart(w, "0");
}

/** Local wall-clock time with milliseconds: the history of a busy job changes several times a second. */
export function clock(ms: number, withMillis = false): string {
  if (!Number.isFinite(ms)) return "—";
  const d = new Date(ms);
  const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMillis ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
}

export function dateTime(ms: number): string {
  if (!Number.isFinite(ms)) return "—";
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ms, true)}`;
}

export function fmtInt(n: number | bigint): string {
  return n.toLocaleString("en-US");
}

/** Executions of a job counted by state, in lifecycle order: [label, css class, count]. */
export function execCounts(job: JobState): [string, string, number][] {
  const counts = new Map<number, number>();
  for (const e of job.executions) counts.set(e.state, (counts.get(e.state) ?? 0) + 1);
  const out: [string, string, number][] = [];
  for (const [state, label, cls] of EXEC_LABELS) {
    const n = counts.get(state);
    if (n) out.push([label, cls, n]);
  }
  return out;
}

/** A tiny element builder: the page has no framework, and innerHTML is never given server text. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | undefined> | null = null,
  ...children: (Node | string | null | undefined | false)[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined) continue;
      if (k === "class") el.className = v;
      else el.setAttribute(k, v);
    }
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return el;
}

/** Children without the holes left by conditionals. */
export function nodes(...xs: (Node | string | null | undefined | false)[]): (Node | string)[] {
  return xs.filter((x): x is Node | string => x !== null && x !== undefined && x !== false);
}

export function pill(text: string, cls: string): HTMLSpanElement {
  return h("span", { class: `pill s-${cls}` }, text);
}
