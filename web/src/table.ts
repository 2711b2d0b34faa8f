// The table of jobs: filters (state, node, job-id text) kept in the URL's hash, sortable columns, one row per
// job kept across renders so that a change flashes its own row instead of redrawing the page.
import type { JobState, JobStateType } from "../gen/jobstate/v1/job_state_pb";
import { JOB_CLASS, JOB_NAMES, JOB_ORDER, ago, execCounts, fmtInt, h, jobName, millis, pill } from "./format";
import type { JobSync } from "./sync";

// Past this many rows the table asks for a filter: a page that draws 100,000 rows is a page nobody can read.
const MAX_ROWS = 200;

type SortKey = "changed" | "created" | "id" | "state" | "version";
const COLUMNS: [SortKey | null, string, string][] = [
  ["id", "Job", "c-id"],
  ["state", "State", "c-state"],
  ["version", "Ver", "c-ver num"],
  ["created", "Age", "c-age num"],
  ["changed", "Changed", "c-changed num"],
  [null, "Executions", "c-exec"],
];

interface Row {
  tr: HTMLTableRowElement;
  version: bigint;
  age: HTMLTableCellElement;
  changed: HTMLTableCellElement;
  job: JobState;
}

export class JobTable {
  readonly el: HTMLElement;
  states = new Set<JobStateType>();
  node = "";
  text = "";
  sort: SortKey = "changed";
  private readonly tbody = h("tbody", { id: "jobs-body" });
  private readonly rows = new Map<string, Row>();
  private readonly search: HTMLInputElement;
  private readonly nodeSelect: HTMLSelectElement;
  private readonly footer = h("div", { class: "table-foot", id: "jobs-foot" });
  private readonly empty = h("div", { class: "empty", id: "jobs-empty", hidden: "" });
  private readonly heads = new Map<SortKey, HTMLElement>();
  private readonly chips = h("div", { class: "chips" });
  private nodes = new Set<string>();
  private nodeOptions = "";

  constructor(
    private readonly sync: JobSync,
    private readonly changed: () => void,
    open: (id: string) => void,
  ) {
    this.search = h("input", {
      type: "search",
      id: "filter-text",
      placeholder: "Filter by job id…  ( / )",
      "aria-label": "filter by job id",
      autocomplete: "off",
      spellcheck: "false",
    });
    this.nodeSelect = h("select", { id: "filter-node", "aria-label": "filter by node" }, h("option", { value: "" }, "All nodes"));
    this.search.addEventListener("input", () => {
      this.text = this.search.value.trim();
      this.toHash();
    });
    this.nodeSelect.addEventListener("change", () => {
      this.node = this.nodeSelect.value;
      this.toHash();
    });
    const headRow = h("tr");
    for (const [key, label, cls] of COLUMNS) {
      const th = h("th", { class: cls, scope: "col" }, label);
      if (key) {
        th.classList.add("sortable");
        th.tabIndex = 0;
        th.addEventListener("click", () => this.setSort(key));
        th.addEventListener("keydown", (e) => {
          if (e.key === "Enter") this.setSort(key);
        });
        this.heads.set(key, th);
      }
      headRow.append(th);
    }
    this.tbody.addEventListener("click", (e) => {
      const tr = (e.target as HTMLElement).closest("tr");
      if (tr?.dataset.job && !(e.target as HTMLElement).closest("a")) open(tr.dataset.job);
    });
    this.el = h(
      "section",
      { class: "panel jobs-panel" },
      h(
        "div",
        { class: "panel-head filters" },
        h("h2", null, "Jobs"),
        this.chips,
        h("div", { class: "spacer" }),
        this.search,
        this.nodeSelect,
      ),
      h("div", { class: "table-wrap" }, h("table", { class: "jobs", id: "jobs" }, h("thead", null, headRow), this.tbody)),
      this.empty,
      this.footer,
    );
  }

  toggleState(st: JobStateType): void {
    if (this.states.has(st)) this.states.delete(st);
    else this.states.add(st);
    this.toHash();
  }

  clearStates(): void {
    this.states.clear();
    this.toHash();
  }

  private setSort(key: SortKey): void {
    this.sort = key;
    this.toHash();
  }

  private toHash(): void {
    const q = new URLSearchParams();
    if (this.states.size) q.set("state", [...this.states].map((s) => JOB_NAMES[s]).join(","));
    if (this.node) q.set("node", this.node);
    if (this.text) q.set("q", this.text);
    if (this.sort !== "changed") q.set("sort", this.sort);
    const qs = q.toString();
    const hash = `#/${qs ? `?${qs}` : ""}`;
    if (window.location.hash !== hash) history.replaceState(null, "", hash);
    this.changed();
  }

  fromHash(hash: string): void {
    const i = hash.indexOf("?");
    const q = new URLSearchParams(i >= 0 ? hash.slice(i + 1) : "");
    this.states = new Set(
      (q.get("state") ?? "")
        .split(",")
        .map((n) => JOB_ORDER.find((s) => JOB_NAMES[s] === n.toUpperCase()))
        .filter((s): s is JobStateType => s !== undefined),
    );
    this.node = q.get("node") ?? "";
    this.text = q.get("q") ?? "";
    const sort = q.get("sort") as SortKey | null;
    this.sort = sort && ["changed", "created", "id", "state", "version"].includes(sort) ? sort : "changed";
    if (this.search.value.trim() !== this.text) this.search.value = this.text;
  }

  private matches(j: JobState): boolean {
    if (this.states.size && !this.states.has(j.state)) return false;
    if (this.text && !j.jobId.toLowerCase().includes(this.text.toLowerCase())) return false;
    if (this.node && !j.executions.some((e) => e.nodeId === this.node)) return false;
    return true;
  }

  /** The jobs in the table's order. Time sorts compare precomputed numbers: 10,000 jobs sort in a few ms. */
  private sorted(jobs: JobState[]): JobState[] {
    const byId = (a: JobState, b: JobState) => (a.jobId < b.jobId ? -1 : a.jobId > b.jobId ? 1 : 0);
    const newestFirst = (key: (j: JobState) => number) =>
      jobs
        .map((j) => ({ j, k: key(j) }))
        .sort((x, y) => y.k - x.k || byId(x.j, y.j))
        .map((x) => x.j);
    switch (this.sort) {
      case "id":
        return jobs.sort(byId);
      case "state":
        return jobs.sort((a, b) => JOB_ORDER.indexOf(a.state) - JOB_ORDER.indexOf(b.state) || byId(a, b));
      case "version":
        return newestFirst((j) => Number(j.version));
      case "created":
        return newestFirst((j) => millis(j.createTime));
      default:
        return newestFirst((j) => millis(j.updateTime));
    }
  }

  private renderNodes(changed: Set<string>, all: boolean): void {
    const before = this.nodes.size;
    const ids = all ? this.sync.jobs.keys() : changed.values();
    if (all) this.nodes = new Set();
    for (const id of ids) {
      const j = this.sync.jobs.get(id);
      if (j) for (const e of j.executions) this.nodes.add(e.nodeId);
    }
    if (this.node) this.nodes.add(this.node);
    if (!all && this.nodes.size === before) return;
    const sorted = [...this.nodes].sort();
    const key = sorted.join("\n");
    if (key === this.nodeOptions) return;
    this.nodeOptions = key;
    this.nodeSelect.replaceChildren(
      h("option", { value: "" }, `All nodes (${fmtInt(sorted.length)})`),
      ...sorted.map((n) => h("option", { value: n }, n)),
    );
    this.nodeSelect.value = this.node;
  }

  private renderChips(): void {
    const chips: HTMLElement[] = [];
    const chip = (label: string, clear: () => void) => {
      const b = h("button", { class: "chip", type: "button", title: "remove this filter" }, label, h("span", { class: "x" }, "×"));
      b.addEventListener("click", clear);
      chips.push(b);
    };
    for (const s of this.states) chip(`state: ${jobName(s)}`, () => this.toggleState(s));
    if (this.node) chip(`node: ${this.node}`, () => {
      this.node = "";
      this.nodeSelect.value = "";
      this.toHash();
    });
    if (this.text) chip(`id contains “${this.text}”`, () => {
      this.text = "";
      this.search.value = "";
      this.toHash();
    });
    this.chips.replaceChildren(...chips);
  }

  render(now: number, changed: Set<string>, all: boolean): void {
    this.renderNodes(changed, all);
    this.renderChips();
    for (const [key, th] of this.heads) th.classList.toggle("sorted", key === this.sort);
    const shown: JobState[] = [];
    for (const j of this.sync.jobs.values()) if (this.matches(j)) shown.push(j);
    const visible = this.sorted(shown).slice(0, MAX_ROWS);
    const keep = new Set<string>();
    const order: HTMLTableRowElement[] = [];
    // A few changed rows flash to catch the eye; a table that changes everywhere at once does not (it would be
    // noise, and animating hundreds of rows costs more than drawing them).
    const flash = changed.size <= 25;
    for (const j of visible) {
      keep.add(j.jobId);
      let row = this.rows.get(j.jobId);
      if (!row || row.job !== j) {
        const fresh = this.row(j, now);
        if (flash && ((row && row.version !== j.version) || (!row && changed.has(j.jobId) && !all))) {
          const tr = fresh.tr;
          tr.classList.add("flash");
          tr.addEventListener("animationend", () => tr.classList.remove("flash"), { once: true });
        }
        row = fresh;
        this.rows.set(j.jobId, row);
      }
      order.push(row.tr);
    }
    for (const [id, row] of [...this.rows]) {
      if (!keep.has(id)) {
        this.rows.delete(id);
        row.tr.remove();
      }
    }
    // Move only the rows that are out of place (on a busy stream: the few that just changed, to the top). Re-adding
    // every row would make the browser restyle and re-lay out the whole table on every change.
    const wanted = new Set<Element>(order);
    let cursor = this.tbody.firstElementChild;
    for (const tr of order) {
      // A replaced row (its job changed) is dropped where it stands, so that it never holds the cursor back.
      while (cursor && !wanted.has(cursor)) {
        const next = cursor.nextElementSibling;
        cursor.remove();
        cursor = next;
      }
      if (tr === cursor) {
        cursor = cursor.nextElementSibling;
      } else {
        this.tbody.insertBefore(tr, cursor);
      }
    }
    while (cursor) {
      const next = cursor.nextElementSibling;
      cursor.remove();
      cursor = next;
    }

    const total = this.sync.jobs.size;
    this.empty.hidden = shown.length > 0;
    if (!shown.length) {
      const s = this.sync.state.kind;
      this.empty.textContent =
        total > 0
          ? `No job matches the filters (${fmtInt(total)} jobs in all).`
          : s === "live"
            ? "No jobs yet. Create one: jobstate create job-1"
            : this.sync.currentAt === 0
              ? s === "error"
                ? "Nothing to show: the server refused the watch (above)."
                : "Loading the jobs…"
              : "No jobs (when last live).";
    }
    const filtered = shown.length !== total;
    this.footer.textContent = !this.sync.currentAt
      ? ""
      : shown.length > MAX_ROWS
        ? `Showing the ${fmtInt(MAX_ROWS)} most relevant of ${fmtInt(shown.length)} matching jobs — narrow with the filters.`
        : `${fmtInt(shown.length)} ${filtered ? `of ${fmtInt(total)} ` : ""}jobs`;
  }

  private row(j: JobState, now: number): Row {
    const link = h("a", { href: `#/job/${encodeURIComponent(j.jobId)}`, class: "job-link" }, j.jobId);
    const exec = h("td", { class: "c-exec" });
    const counts = execCounts(j);
    if (!counts.length) exec.append(h("span", { class: "muted" }, "—"));
    for (const [label, cls, n] of counts) exec.append(h("span", { class: `ec s-${cls}` }, h("b", null, String(n)), ` ${label}`));
    const age = h("td", { class: "c-age num" }, ago(now - millis(j.createTime)));
    const changedCell = h("td", { class: "c-changed num" }, `${ago(now - millis(j.updateTime))} ago`);
    const tr = h(
      "tr",
      { "data-job": j.jobId, "data-state": jobName(j.state), "data-version": j.version.toString() },
      h("td", { class: "c-id" }, link, h("span", { class: "only-narrow" }, pill(jobName(j.state), JOB_CLASS[j.state] ?? "muted"))),
      h("td", { class: "c-state" }, pill(jobName(j.state), JOB_CLASS[j.state] ?? "muted")),
      h("td", { class: "c-ver num" }, j.version.toString()),
      age,
      changedCell,
      exec,
    );
    return { tr, version: j.version, age, changed: changedCell, job: j };
  }

  tick(now: number): void {
    for (const row of this.rows.values()) {
      // Only a text that changed is written: an unchanged write still costs a layout.
      const age = ago(now - millis(row.job.createTime));
      const changed = `${ago(now - millis(row.job.updateTime))} ago`;
      if (row.age.textContent !== age) row.age.textContent = age;
      if (row.changed.textContent !== changed) row.changed.textContent = changed;
    }
  }
}
