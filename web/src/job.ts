// A job's page: the job as the live watch has it, its executions, and its history (GetJobHistory) drawn as a
// timeline: one lane for the job and one per execution, then every change in order.
import type {
  ExecutionState,
  ExecutionStateType,
  JobHistoryEntry,
  JobState,
  JobStateType,
} from "../gen/jobstate/v1/job_state_pb";
import { describe, type JobStateClient, serverError } from "./api";
import {
  DESIRED_NAMES,
  JOB_CLASS,
  TERMINAL_JOB,
  ago,
  clock,
  dateTime,
  execClass,
  execName,
  fmtInt,
  h,
  jobName,
  millis,
  nodes,
  pill,
} from "./format";
import type { JobSync } from "./sync";

// A job's history is bounded by the server (executions per job, history per job); this only stops a page
// from looping on a misbehaving server.
const MAX_PAGES = 50;

interface Lane {
  label: string;
  sub: string;
  points: { t: number; cls: string; name: string }[];
}

function durationLabel(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)}s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)}m${Math.round((ms % 60_000) / 1000)}s`;
  return `${Math.floor(ms / 3_600_000)}h${Math.round((ms % 3_600_000) / 60_000)}m`;
}

// Output is bounded by the server (256 KiB each); the page shows the start of it and says so.
const SHOWN_OUTPUT = 16 * 1024;

function output(label: string, text: string, truncated: boolean): HTMLElement | null {
  if (!text) return null;
  const cut = text.length > SHOWN_OUTPUT;
  const note = cut ? ` (first ${fmtInt(SHOWN_OUTPUT)} of ${fmtInt(text.length)} characters)` : truncated ? " (truncated by the node)" : "";
  return h("div", { class: "out" }, h("div", { class: "out-label" }, label, h("span", { class: "muted" }, note)), h("pre", null, cut ? text.slice(0, SHOWN_OUTPUT) : text));
}

/** What a row of the executions table hides: full status, output, runner error, published results. */
function executionDetails(e: ExecutionState): HTMLElement | null {
  const parts: HTMLElement[] = [];
  const o = e.runOutput;
  if (o) {
    if (o.runnerError) parts.push(h("div", { class: "kv" }, h("b", null, "Runner error "), o.runnerError));
    for (const x of [output("stdout", o.stdout, o.stdoutTruncated), output("stderr", o.stderr, o.stderrTruncated)]) if (x) parts.push(x);
  }
  const r = e.publishedResults;
  if (r && (r.storageSource || r.name || r.cid || r.url || r.path || Object.keys(r.metadata).length)) {
    const fields: [string, string][] = [
      ["source", r.storageSource],
      ["name", r.name],
      ["cid", r.cid],
      ["url", r.url],
      ["path", r.path],
      ...Object.entries(r.metadata).map(([k, v]): [string, string] => [k, v]),
    ];
    parts.push(
      h(
        "div",
        { class: "kv" },
        h("b", null, "Published results "),
        ...fields.filter(([, v]) => v).flatMap(([k, v], i) => [i ? " · " : "", h("span", { class: "muted" }, `${k} `), h("span", { class: "mono" }, v)]),
      ),
    );
  }
  if (e.status.length > 60) parts.unshift(h("div", { class: "kv" }, h("b", null, "Status "), e.status));
  return parts.length ? h("div", { class: "details" }, ...parts) : null;
}

export class JobPage {
  readonly el = h("div", { class: "job-page" });
  private id = "";
  private job: JobState | null = null;
  private deletedAt = 0n;
  private entries: JobHistoryEntry[] = [];
  // Changes older than the first entry held, dropped by the server's --max-history-per-job.
  private dropped = 0n;
  private historyFor = -1n; // the job version the shown history was read at
  private historyError = "";
  private loading = false;
  private again = false;
  private readonly head = h("div", { class: "job-head" });
  private readonly facts = h("dl", { class: "facts" });
  private readonly execBody = h("tbody", { id: "exec-body" });
  private readonly execEmpty = h("div", { class: "empty" }, "No executions yet.");
  private readonly lanes = h("div", { class: "lanes", id: "lanes" });
  private readonly list = h("ol", { class: "timeline", id: "timeline" });
  private readonly histNote = h("span", { class: "stat", id: "history-note" });
  private readonly lanesBox = h("div", { class: "lanes-box" });
  private notFound = h("div", { class: "empty big", hidden: "" });
  private drawn: JobState | null = null;
  private drawnKey = "";
  private readonly expanded = new Set<string>();

  constructor(
    private readonly client: JobStateClient,
    private readonly sync: JobSync,
  ) {
    const execTable = h(
      "table",
      { class: "execs", id: "execs" },
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          ...["Execution", "Node", "State", "Desired", "Status", "Exit", "Created", "Updated", "Ver"].map((t, i) =>
            h("th", { class: i >= 5 ? "num" : undefined, scope: "col" }, t),
          ),
        ),
      ),
      this.execBody,
    );
    this.lanesBox.append(this.lanes);
    this.el.append(
      h("a", { class: "back", href: "#/" }, "← All jobs"),
      this.head,
      this.notFound,
      this.facts,
      h("section", { class: "panel" }, h("div", { class: "panel-head" }, h("h2", null, "Executions")), h("div", { class: "table-wrap" }, execTable), this.execEmpty),
      h(
        "section",
        { class: "panel" },
        h("div", { class: "panel-head" }, h("h2", null, "Timeline"), this.histNote),
        this.lanesBox,
        this.list,
      ),
    );
  }

  show(id: string): void {
    if (id !== this.id) {
      this.id = id;
      this.job = null;
      this.deletedAt = 0n;
      this.entries = [];
      this.dropped = 0n;
      this.historyFor = -1n;
      this.historyError = "";
      this.list.replaceChildren();
      this.lanes.replaceChildren();
      this.drawn = null;
      this.expanded.clear();
    }
  }

  hide(): void {
    this.id = "";
  }

  render(now: number, _changed: Set<string>): void {
    if (!this.id) return;
    const live = this.sync.jobs.get(this.id);
    if (live) {
      this.job = live;
      this.deletedAt = 0n;
    } else if (this.job && !this.deletedAt && this.sync.state.kind === "live") {
      this.deletedAt = this.sync.revision;
    }
    const synced = this.sync.currentAt > 0;
    this.notFound.hidden = !!this.job || !synced;
    if (!this.job) {
      this.head.replaceChildren(h("h1", null, this.id));
      this.notFound.textContent = `No job “${this.id}” at revision ${fmtInt(this.sync.revision)}.`;
      this.facts.replaceChildren();
      this.execBody.replaceChildren();
      this.drawn = null;
      return;
    }
    // Other jobs' changes wake this page too: redraw only when this job (or its deletion) changed.
    const key = `${this.job.version}/${this.deletedAt}`;
    if (this.drawn === this.job && this.drawnKey === key) return;
    this.drawn = this.job;
    this.drawnKey = key;
    const j = this.job;
    this.head.replaceChildren(
      ...nodes(
        h("h1", { id: "job-title" }, j.jobId),
        pill(jobName(j.state), JOB_CLASS[j.state] ?? "muted"),
        this.deletedAt
          ? h("span", { class: "pill s-error", id: "deleted" }, `deleted by revision ${fmtInt(this.deletedAt)}`)
          : null,
      ),
    );
    this.renderFacts(now);
    this.renderExecutions();
    if (!this.deletedAt && j.version !== this.historyFor) void this.loadHistory();
    this.renderLanes(now);
  }

  private renderFacts(now: number): void {
    const j = this.job;
    if (!j) return;
    const created = millis(j.createTime);
    const updated = millis(j.updateTime);
    const timeout = millis(j.timeoutAt);
    const fact = (k: string, v: string) => [h("dt", null, k), h("dd", null, v)];
    this.facts.replaceChildren(
      ...fact("Version", j.version.toString()),
      ...fact("Created", `${dateTime(created)} (${ago(now - created)} ago)`),
      ...fact("Last change", `${dateTime(updated)} (${ago(now - updated)} ago)`),
      ...fact(
        "Timeout",
        !Number.isFinite(timeout)
          ? "none"
          : TERMINAL_JOB.has(j.state)
            ? `was ${dateTime(timeout)}`
            : timeout > now
              ? `${dateTime(timeout)} (in ${ago(timeout - now)})`
              : `${dateTime(timeout)} (passed)`,
      ),
      ...fact("Executions", fmtInt(j.executions.length)),
    );
  }

  private renderExecutions(): void {
    const j = this.job;
    if (!j) return;
    this.execEmpty.hidden = j.executions.length > 0;
    const rows: HTMLTableRowElement[] = [];
    for (const e of j.executions) {
      const exit = e.runOutput ? String(e.runOutput.exitCode) : "—";
      const details = executionDetails(e);
      const open = details !== null && this.expanded.has(e.computeReference);
      const tr = h(
        "tr",
        {
          "data-exec": e.computeReference,
          "data-state": execName(e.state),
          class: details ? `has-details${open ? " open" : ""}` : undefined,
          title: details ? "show or hide the output and results" : undefined,
        },
        h("td", { class: "mono" }, details ? h("span", { class: "caret" }, open ? "▾ " : "▸ ") : null, e.computeReference),
        h("td", { class: "mono" }, e.nodeId),
        h("td", null, pill(execName(e.state), execClass(e.state))),
        h("td", null, DESIRED_NAMES[e.desiredState] ?? String(e.desiredState)),
        h("td", { class: "status", title: e.status }, e.status || "—"),
        h("td", { class: `num ${e.runOutput && e.runOutput.exitCode !== 0 ? "bad" : ""}` }, exit),
        h("td", { class: "num", title: dateTime(millis(e.createTime)) }, clock(millis(e.createTime))),
        h("td", { class: "num", title: dateTime(millis(e.updateTime)) }, clock(millis(e.updateTime))),
        h("td", { class: "num" }, e.version.toString()),
      );
      if (details) {
        tr.addEventListener("click", () => {
          if (this.expanded.has(e.computeReference)) this.expanded.delete(e.computeReference);
          else this.expanded.add(e.computeReference);
          this.renderExecutions();
        });
      }
      rows.push(tr);
      if (open && details) rows.push(h("tr", { class: "exec-detail", "data-detail": e.computeReference }, h("td", { colspan: "9" }, details)));
    }
    this.execBody.replaceChildren(...rows);
  }

  tick(now: number): void {
    if (!this.id || !this.job) return;
    this.renderFacts(now);
    if (!TERMINAL_JOB.has(this.job.state)) this.renderLanes(now);
  }

  private async loadHistory(): Promise<void> {
    if (this.loading) {
      this.again = true;
      return;
    }
    const id = this.id;
    const version = this.job?.version ?? 0n;
    this.loading = true;
    this.again = false;
    try {
      const entries: JobHistoryEntry[] = [];
      let token = "";
      let dropped = 0n;
      for (let page = 0; page < MAX_PAGES; page++) {
        const res = await this.client.getJobHistory({ jobId: id, pageSize: 1000, pageToken: token });
        if (page === 0) dropped = res.droppedEntries;
        entries.push(...res.entries);
        token = res.nextPageToken;
        if (!token) break;
      }
      if (id !== this.id) return;
      this.entries = entries;
      this.dropped = dropped;
      this.historyError = "";
      // The history may be newer than the watched job (read after another change): the page asks again only
      // when the watch shows a version the history does not have yet.
      const last = entries.length ? entries[entries.length - 1].version : 0n;
      this.historyFor = last > version ? last : version;
    } catch (err) {
      if (id !== this.id) return;
      this.historyError = describe(serverError(err));
      this.historyFor = version;
    } finally {
      this.loading = false;
    }
    this.renderList();
    this.renderLanes(Date.now());
    if (this.again && this.job && this.job.version !== this.historyFor) void this.loadHistory();
  }

  private renderList(): void {
    if (this.historyError) {
      this.histNote.textContent = "";
      this.list.replaceChildren(h("li", { class: "error" }, `History unavailable: ${this.historyError}`));
      return;
    }
    // Never pretend the list is complete: a capped history says how much came before it.
    const earlier = this.dropped > 0n ? ` · ${fmtInt(this.dropped)} earlier changes dropped` : "";
    this.histNote.textContent = `${fmtInt(this.entries.length)} changes, oldest first${earlier}`;
    const t0 = this.entries.length ? millis(this.entries[0].time) : 0;
    this.list.replaceChildren(
      ...this.entries.map((e) => {
        const t = millis(e.time);
        let what: (Node | string)[] = [];
        let cls = "muted";
        if (e.change.case === "jobState") {
          const c = e.change.value;
          cls = JOB_CLASS[c.newState] ?? "muted";
          what = c.previousState
            ? ["Job ", pill(jobName(c.previousState), JOB_CLASS[c.previousState] ?? "muted"), " → ", pill(jobName(c.newState), cls)]
            : ["Job created in ", pill(jobName(c.newState), cls)];
        } else if (e.change.case === "executionState") {
          const c = e.change.value;
          cls = execClass(c.newState);
          const who = [h("span", { class: "mono" }, c.computeReference), " on ", h("span", { class: "mono" }, c.nodeId)];
          what = c.previousState
            ? ["Execution ", ...who, ": ", pill(execName(c.previousState), execClass(c.previousState)), " → ", pill(execName(c.newState), cls)]
            : ["Execution ", ...who, " created in ", pill(execName(c.newState), cls)];
        }
        const cancelled = e.cancelledExecutions.length
          ? h(
              "div",
              { class: "cancelled" },
              "Cancelled with it: ",
              ...e.cancelledExecutions.flatMap((c, i) => [
                i ? ", " : "",
                h("span", { class: "mono" }, c.computeReference),
                ` on ${c.nodeId} (was ${execName(c.previousState)})`,
              ]),
            )
          : null;
        return h(
          "li",
          { class: `t-${cls}`, "data-revision": e.revision.toString() },
          h("span", { class: "node" }),
          h(
            "div",
            { class: "meta" },
            h("span", { class: "rev" }, `r${e.revision}`),
            h("span", null, `v${e.version}`),
            h("time", { title: dateTime(t) }, clock(t, true)),
            h("span", { class: "rel" }, `+${durationLabel(t - t0)}`),
          ),
          h("div", { class: "what" }, ...what),
          e.comment ? h("div", { class: "comment" }, `“${e.comment}”`) : null,
          cancelled,
        );
      }),
    );
  }

  // Lanes: where each state began and how long it lasted. Built from the history alone, so it agrees with the list.
  private renderLanes(now: number): void {
    if (!this.entries.length || !this.job) {
      this.lanes.replaceChildren();
      return;
    }
    const lanes: Lane[] = [{ label: "job", sub: this.job.jobId, points: [] }];
    const byRef = new Map<string, Lane>();
    const execPoint = (ref: string, node: string, t: number, state: ExecutionStateType) => {
      let lane = byRef.get(ref);
      if (!lane) {
        lane = { label: ref, sub: node, points: [] };
        byRef.set(ref, lane);
        lanes.push(lane);
      }
      lane.points.push({ t, cls: execClass(state), name: execName(state) });
    };
    for (const e of this.entries) {
      const t = millis(e.time);
      if (e.change.case === "jobState") {
        const s: JobStateType = e.change.value.newState;
        lanes[0].points.push({ t, cls: JOB_CLASS[s] ?? "muted", name: jobName(s) });
      } else if (e.change.case === "executionState") {
        const c = e.change.value;
        execPoint(c.computeReference, c.nodeId, t, c.newState);
      }
      for (const c of e.cancelledExecutions) execPoint(c.computeReference, c.nodeId, t, c.newState);
    }
    const t0 = millis(this.entries[0].time);
    const lastT = millis(this.entries[this.entries.length - 1].time);
    const terminal = TERMINAL_JOB.has(this.job.state);
    // A finished job's picture ends at its last change (plus a margin for the final state's marker).
    const span = Math.max(1, terminal ? lastT - t0 : Math.max(lastT, now) - t0);
    const end = t0 + span * (terminal ? 1.04 : 1);
    const rows = lanes.map((lane) => {
      const segs = lane.points.map((p, i) => {
        const from = p.t;
        const to = i + 1 < lane.points.length ? lane.points[i + 1].t : terminal || /^(COMPLETED|ERROR|CANCELLED|FAILED|BID_REJECTED|ASK_FOR_BID_REJECTED)$/.test(p.name) ? from : end;
        const left = ((from - t0) / (end - t0)) * 100;
        const width = Math.max(((to - from) / (end - t0)) * 100, 0);
        const seg = h("span", {
          class: `seg s-${p.cls}${width < 0.6 ? " tick" : ""}`,
          title: `${p.name} at ${clock(p.t, true)}${to > from ? ` for ${durationLabel(to - from)}` : ""}`,
        });
        // Through the CSSOM, not a style attribute: the server's CSP (style-src 'self') allows only this.
        seg.style.left = `${left.toFixed(3)}%`;
        if (width >= 0.6) seg.style.width = `${width.toFixed(3)}%`;
        return seg;
      });
      return h(
        "div",
        { class: "lane" },
        h("div", { class: "lane-label" }, h("span", { class: "mono" }, lane.label), lane.label !== "job" ? h("small", null, lane.sub) : null),
        h("div", { class: "lane-track" }, ...segs),
      );
    });
    const ticks = h("div", { class: "lane" }, h("div", { class: "lane-label" }), h("div", { class: "lane-axis" }));
    const axis = ticks.lastChild as HTMLElement;
    for (let i = 0; i <= 4; i++) {
      const frac = i / 4;
      const label = h("span", null, i === 0 ? clock(t0) : `+${durationLabel((end - t0) * frac)}`);
      label.style.left = `${frac * 100}%`;
      axis.append(label);
    }
    this.lanes.replaceChildren(...rows, ticks);
  }
}
