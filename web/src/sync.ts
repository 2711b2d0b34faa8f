// Keeps a local copy of every job current through one Watch stream, and says at every moment how far to trust it.
//
// The algorithm is the Python Informer's: a snapshot (send_initial_state) up to its BOOKMARK, then changes; a
// dropped stream resumes at the last delivered revision + 1, sending the server's store id back so that a server
// whose store was reset refuses (REVISION_COMPACTED) instead of serving another history's revisions; a refused
// resume starts a fresh snapshot. The state it reports is never "live" unless the snapshot is complete, the
// stream is open, and a message (a change or a progress bookmark) has arrived within the last few seconds.
import { create } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import type { JobState } from "../gen/jobstate/v1/job_state_pb";
import { type WatchResponse, WatchEventType } from "../gen/jobstate/v1/job_state_service_pb";
import { describe, type JobStateClient, type ServerError, serverError } from "./api";
import { fmtInt, millis } from "./format";

export const STORE_ID_HEADER = "jobstate-store-id";
// The server sends a bookmark every second of silence; three missed ones mean the connection is gone, whatever
// TCP says (a suspended laptop, a proxy that holds the socket open).
const PROGRESS_SECONDS = 1n;
const SILENCE_MS = 4000;
// Before the first message the server may be building a large snapshot or replaying a long catch-up.
const FIRST_MESSAGE_MS = 15000;
const BACKOFF_MS = [250, 500, 1000, 2000, 4000];
const AUTH_RETRY_MS = 15000;

export type ConnState =
  | { kind: "connecting"; cause: string }
  | { kind: "syncing"; received: number; relist: boolean }
  | { kind: "live"; revision: bigint }
  | { kind: "reconnecting"; from: bigint | null; attempt: number; retryAt: number; cause: string }
  | { kind: "relisting"; cause: string }
  | { kind: "error"; error: ServerError; retryAt: number };

export interface LogEntry {
  time: number;
  kind: string;
  text: string;
}

/** Changes committed per second, by the change's own commit time, for the last `seconds`. */
export class RateWindow {
  readonly buckets = new Map<number, number>();
  constructor(readonly seconds: number) {}
  add(ms: number, now: number): void {
    const sec = Math.floor(Math.min(ms, now) / 1000);
    if (sec < Math.floor(now / 1000) - this.seconds) return;
    this.buckets.set(sec, (this.buckets.get(sec) ?? 0) + 1);
  }
  prune(now: number): void {
    const oldest = Math.floor(now / 1000) - this.seconds;
    for (const k of this.buckets.keys()) if (k < oldest) this.buckets.delete(k);
  }
}

class Silence extends Error {}
class Restart extends Error {}
class StoreChanged extends Error {}

export class JobSync {
  jobs = new Map<string, JobState>();
  /** Everything up to this revision has been applied to `jobs` (0: no snapshot yet). */
  revision = 0n;
  storeId = "";
  state: ConnState = { kind: "connecting", cause: "" };
  /** When the data in `jobs` was last known to be current (the last message of a synced stream). */
  currentAt = 0;
  readonly log: LogEntry[] = [];
  readonly rate = new RateWindow(600);
  /** Versions that did not follow on: would mean a missed change. Kept for the tests and the console. */
  gaps = 0;

  private synced = false;
  private controller: AbortController | null = null;
  private wake: (() => void) | null = null;
  private stopped = false;
  private relistCause = "";

  constructor(
    private readonly client: JobStateClient,
    private readonly onData: (changed: Set<string>, all: boolean) => void,
    private readonly onState: (s: ConnState) => void,
  ) {}

  start(): void {
    void this.loop();
  }

  /** Start again from a fresh snapshot (a new token may see other jobs, or none). */
  restart(why: string): void {
    this.synced = false;
    // Before any snapshot there is nothing to relist: it is still the first load.
    this.relistCause = this.currentAt > 0 ? why : "";
    this.controller?.abort(new Restart(why));
    this.wake?.();
  }

  /** Skip the wait of a backoff. */
  retryNow(): void {
    this.wake?.();
  }

  private setState(s: ConnState, logText?: string): void {
    this.state = s;
    if (logText) this.note(s.kind, logText);
    this.onState(s);
  }

  note(kind: string, text: string): void {
    this.log.push({ time: Date.now(), kind, text });
    if (this.log.length > 100) this.log.splice(0, this.log.length - 100);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done() {
        clearTimeout(t);
        resolve();
      }
      this.wake = done;
    });
  }

  private async loop(): Promise<void> {
    let attempt = 0;
    let first = true;
    while (!this.stopped) {
      const resuming = this.synced;
      const controller = new AbortController();
      this.controller = controller;
      let silenceTimer = 0;
      const kick = (ms: number) => {
        clearTimeout(silenceTimer);
        silenceTimer = window.setTimeout(
          () => controller.abort(new Silence(`no message from the server for ${ms / 1000} s`)),
          ms,
        );
      };
      let pending: Map<string, JobState> | null = null;
      if (!resuming) {
        pending = new Map();
        if (this.relistCause) this.setState({ kind: "relisting", cause: this.relistCause }, `relisting: ${this.relistCause}`);
        else if (first) this.setState({ kind: "connecting", cause: "" });
      }
      first = false;
      const headers: Record<string, string> = {};
      if (resuming && this.storeId) headers[STORE_ID_HEADER] = this.storeId;
      const progressInterval = create(DurationSchema, { seconds: PROGRESS_SECONDS });
      const request = resuming
        ? { startRevision: this.revision + 1n, progressInterval }
        : { sendInitialState: true, progressInterval };
      let cause = "the server ended the stream";
      let immediate = false;
      try {
        kick(FIRST_MESSAGE_MS);
        let seenStore = "";
        const stream = this.client.watch(request, {
          signal: controller.signal,
          headers,
          onHeader: (h) => {
            seenStore = h.get(STORE_ID_HEADER) ?? "";
          },
        });
        for await (const res of stream) {
          kick(SILENCE_MS);
          if (seenStore && this.storeId && seenStore !== this.storeId && resuming) {
            throw new StoreChanged(`the server's store changed (${this.storeId} → ${seenStore})`);
          }
          if (seenStore) this.storeId = seenStore;
          attempt = 0;
          pending = this.apply(res, pending);
        }
      } catch (err) {
        const reason = controller.signal.aborted ? controller.signal.reason : err;
        if (reason instanceof Restart) {
          clearTimeout(silenceTimer);
          continue;
        }
        if (reason instanceof Silence) {
          cause = reason.message;
        } else if (reason instanceof StoreChanged) {
          this.synced = false;
          this.relistCause = reason.message;
          clearTimeout(silenceTimer);
          continue;
        } else {
          const e = serverError(reason);
          if (e.reason === "REVISION_COMPACTED" || e.code === "OUT_OF_RANGE") {
            // The server no longer holds revision+1 (compacted, or a reset store refused our store id):
            // nothing can be resumed; only a new snapshot is the truth.
            this.synced = false;
            const oldest = e.metadata.oldest_revision;
            this.relistCause = oldest
              ? `revision ${this.revision + 1n} is no longer held (oldest ${oldest})`
              : `revision ${this.revision + 1n} is no longer held: ${e.message}`;
            this.note("compacted", describe(e));
            clearTimeout(silenceTimer);
            continue;
          }
          if (e.code === "UNAUTHENTICATED" || e.code === "PERMISSION_DENIED") {
            clearTimeout(silenceTimer);
            this.synced = false;
            const retryAt = Date.now() + AUTH_RETRY_MS;
            this.setState({ kind: "error", error: e, retryAt }, describe(e));
            await this.sleep(AUTH_RETRY_MS);
            continue;
          }
          if (e.reason === "WATCHER_LAGGED") {
            // Everything up to our revision was applied: resuming at revision+1 is exactly the hint.
            cause = `fell behind (${describe(e)})`;
            immediate = true;
          } else if (!e.connect) {
            cause = `connection lost: ${e.message}`;
          } else {
            cause = describe(e);
          }
          if (e.code === "INVALID_ARGUMENT" || e.code === "UNIMPLEMENTED" || e.code === "INTERNAL") {
            // Retrying will not help; say so plainly, and try again slowly in case the server is replaced.
            const retryAt = Date.now() + AUTH_RETRY_MS;
            this.setState({ kind: "error", error: e, retryAt }, describe(e));
            clearTimeout(silenceTimer);
            await this.sleep(AUTH_RETRY_MS);
            continue;
          }
        }
      } finally {
        clearTimeout(silenceTimer);
      }
      if (this.stopped) return;
      attempt += 1;
      let delay = 0;
      if (!immediate) {
        // Jitter, so that a restarted server is not met by every open page in the same millisecond.
        delay = BACKOFF_MS[Math.min(attempt - 1, BACKOFF_MS.length - 1)];
        delay = Math.round(delay * (0.8 + Math.random() * 0.4));
      }
      const from = this.synced ? this.revision + 1n : null;
      this.setState(
        { kind: "reconnecting", from, attempt, retryAt: Date.now() + delay, cause },
        from === null ? `reconnecting (a new snapshot): ${cause}` : `reconnecting from revision ${from}: ${cause}`,
      );
      if (delay > 0) await this.sleep(delay);
    }
  }

  private apply(res: WatchResponse, snapshot: Map<string, JobState> | null): Map<string, JobState> | null {
    const now = Date.now();
    const changed = new Set<string>();
    let pending = snapshot;
    for (const ev of res.events) {
      if (pending) {
        // A snapshot is arriving: it is built aside, so that a half-received snapshot is never shown as the truth.
        if (ev.type === WatchEventType.BOOKMARK) {
          const wasRelist = this.relistCause !== "";
          this.jobs = pending;
          this.revision = ev.revision;
          this.synced = true;
          this.relistCause = "";
          this.currentAt = now;
          this.onData(changed, true);
          this.setState(
            { kind: "live", revision: this.revision },
            `${wasRelist ? "relisted" : "live"}: ${fmtInt(pending.size)} jobs at revision ${this.revision}`,
          );
          pending = null;
        } else if (ev.job) {
          if (ev.type === WatchEventType.DELETED) pending.delete(ev.job.jobId);
          else pending.set(ev.job.jobId, ev.job);
        }
        continue;
      }
      if (ev.type === WatchEventType.BOOKMARK || !ev.job) continue;
      this.applyEvent(ev.type, ev.job, ev.time ? millis(ev.time) : now, now, changed);
    }
    if (pending) {
      this.setState({ kind: "syncing", received: pending.size, relist: this.relistCause !== "" });
      return pending;
    }
    if (res.revision > this.revision) this.revision = res.revision;
    this.currentAt = now;
    const wasLive = this.state.kind === "live";
    if (!wasLive) this.setState({ kind: "live", revision: this.revision }, `live again at revision ${this.revision}`);
    else this.state = { kind: "live", revision: this.revision };
    if (changed.size) this.onData(changed, false);
    if (wasLive) this.onState(this.state);
    return null;
  }

  private applyEvent(type: WatchEventType, job: JobState, at: number, now: number, changed: Set<string>): void {
    const before = this.jobs.get(job.jobId);
    if (type === WatchEventType.DELETED) {
      this.jobs.delete(job.jobId);
    } else {
      if (before && job.version !== before.version + 1n && type === WatchEventType.UPDATED) {
        this.gaps += 1;
        console.warn(`jobstate: ${job.jobId} went from version ${before.version} to ${job.version}`);
      }
      this.jobs.set(job.jobId, job);
    }
    changed.add(job.jobId);
    if (type !== WatchEventType.INITIAL) this.rate.add(at, now);
  }
}
