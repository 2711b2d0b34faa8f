// The dashboard: one Watch of every job (sync.ts), drawn as counts, a chart, a table, and a page per job.
import "./style.css";
import { describe, getToken, makeClient, setToken } from "./api";
import { renderChart, type StateSample, WINDOW_SECONDS } from "./chart";
import { JOB_CLASS, JOB_ORDER, ago, clock, fmtInt, h, jobName, nodes } from "./format";
import { JobPage } from "./job";
import { type ConnState, JobSync } from "./sync";
import { JobTable } from "./table";

const client = makeClient(window.location.origin);

// --- the frame: header with the connection indicator, the banner, the two views ----------------------------

const connDot = h("span", { class: "dot" });
const connText = h("span", { class: "conn-text", id: "conn-text" }, "Connecting…");
const retryBtn = h("button", { class: "link", id: "retry", type: "button", hidden: "" }, "Retry now");
const conn = h("div", { class: "conn", id: "conn", "data-state": "connecting", role: "status", "aria-live": "polite" }, connDot, connText, retryBtn);
const tokenBtn = h("button", { class: "btn ghost", id: "token-button", type: "button" }, "Token");
const header = h(
  "header",
  { class: "top" },
  h("a", { class: "brand", href: "#/" }, h("span", { class: "logo" }, "◆"), "jobstate"),
  h("span", { class: "server", title: "the server this page talks to" }, window.location.host),
  h("div", { class: "spacer" }),
  conn,
  tokenBtn,
);

const tokenInput = h("input", {
  id: "token-input",
  type: "password",
  autocomplete: "off",
  spellcheck: "false",
  placeholder: "bearer token",
  "aria-label": "token",
});
const tokenForm = h(
  "form",
  { class: "token-form", id: "token-form", hidden: "" },
  h("label", { for: "token-input" }, "Token for this tab"),
  tokenInput,
  h("button", { class: "btn primary", type: "submit", id: "token-save" }, "Use token"),
  h("button", { class: "btn ghost", type: "button", id: "token-clear" }, "Clear"),
  h("span", { class: "hint" }, "Kept in this tab's session storage only; never put in the URL."),
);
const bannerText = h("div", { class: "banner-text", id: "banner-text" });
const banner = h("div", { class: "banner", id: "banner", hidden: "" }, bannerText);

const listView = h("div", { class: "view", id: "list-view" });
const jobView = h("div", { class: "view", id: "job-view", hidden: "" });
const main = h("main", { id: "main" }, listView, jobView);

const logList = h("ol", { class: "log", id: "conn-log" });
const footer = h(
  "footer",
  null,
  h("details", null, h("summary", null, "Connection log"), logList),
  h("span", { class: "foot-note" }, "Watch over Connect · resumes by revision · never shows stale data as live"),
);

document.body.append(header, tokenForm, banner, main, footer);

// --- state ------------------------------------------------------------------------------------------------

const samples: StateSample[] = [];
let dirtyAll = true;
const changedSinceRender = new Set<string>();
let renderQueued = false;

const sync = new JobSync(
  client,
  (changed, all) => {
    if (all) dirtyAll = true;
    for (const id of changed) changedSinceRender.add(id);
    queueRender();
  },
  (s) => {
    showConn(s);
    queueRender();
  },
);

// --- counts and chart (list view) ---------------------------------------------------------------------------

const countCards = new Map<number, HTMLButtonElement>();
const totalCard = h("button", { class: "card total", type: "button", "data-state": "ALL" }, h("span", { class: "n" }, "0"), h("span", { class: "label" }, "jobs"));
const cards = h("section", { class: "cards", id: "counts" }, totalCard);
for (const st of JOB_ORDER) {
  const c = h(
    "button",
    { class: `card s-${JOB_CLASS[st]}`, type: "button", "data-state": jobName(st), title: `show only ${jobName(st)} jobs (click again to clear)` },
    h("span", { class: "n" }, "0"),
    h("span", { class: "label" }, jobName(st).replace("_", " ")),
  );
  c.addEventListener("click", () => table.toggleState(st));
  countCards.set(st, c);
  cards.append(c);
}
totalCard.addEventListener("click", () => table.clearStates());

const chartBox = h("div", { class: "chart", id: "chart" });
const chartTitle = h("h2", { id: "chart-title" }, "Last minute");
const openedAt = Date.now();
const rateNow = h("span", { class: "stat", id: "rate-now" }, "—");
const legend = h("div", { class: "legend" });
for (const st of JOB_ORDER) legend.append(h("span", { class: `key s-${JOB_CLASS[st]}` }, h("i"), jobName(st)));
legend.append(h("span", { class: "key gap-key", title: "seconds when the page was not live: no sample, no guess" }, h("i"), "not live"));
const chartPanel = h(
  "section",
  { class: "panel chart-panel" },
  h("div", { class: "panel-head" }, chartTitle, rateNow, h("div", { class: "spacer" }), legend),
  chartBox,
);

const table = new JobTable(sync, () => queueRender(), (id) => {
  window.location.hash = `#/job/${encodeURIComponent(id)}`;
});
listView.append(cards, chartPanel, table.el);

const jobPage = new JobPage(client, sync);
jobView.append(jobPage.el);

// --- connection indicator and the banner that says how far to trust what is shown ---------------------------

function showConn(s: ConnState): void {
  conn.dataset.state = s.kind;
  retryBtn.hidden = !(s.kind === "reconnecting" || s.kind === "error");
  let text = "";
  switch (s.kind) {
    case "connecting":
      text = "Connecting…";
      break;
    case "syncing":
      text = `${s.relist ? "Relisting" : "Loading"} · ${fmtInt(s.received)} jobs so far`;
      break;
    case "live":
      text = `Live · revision ${fmtInt(s.revision)}`;
      break;
    case "reconnecting": {
      const secs = Math.max(0, Math.ceil((s.retryAt - Date.now()) / 1000));
      const from = s.from === null ? "with a new snapshot" : `from revision ${fmtInt(s.from)}`;
      text = `Reconnecting ${from} · attempt ${s.attempt}${secs > 0 ? ` · next try in ${secs}s` : ""}`;
      break;
    }
    case "relisting":
      text = `Relisting · ${s.cause}`;
      break;
    case "error":
      text = `${s.error.code}${s.error.reason && s.error.reason !== s.error.code ? ` (${s.error.reason})` : ""}`;
      break;
  }
  connText.textContent = text;
  conn.title = s.kind === "error" ? describe(s.error) : s.kind === "reconnecting" || s.kind === "relisting" ? s.cause : text;
  renderBanner();
  renderLog();
}

function renderBanner(): void {
  const s = sync.state;
  const stale = s.kind !== "live";
  main.classList.toggle("stale", stale && sync.currentAt > 0);
  bannerText.replaceChildren();
  banner.className = "banner";
  if (!stale) {
    banner.hidden = true;
    return;
  }
  const asOf =
    sync.currentAt > 0
      ? `Not live: showing the jobs as of revision ${fmtInt(sync.revision)}, last confirmed at ${clock(sync.currentAt)} (${ago(Date.now() - sync.currentAt)} ago).`
      : "";
  if (s.kind === "error") {
    banner.classList.add("bad");
    const auth = s.error.code === "UNAUTHENTICATED" || s.error.code === "PERMISSION_DENIED";
    bannerText.append(
      ...nodes(
      h("strong", { id: "error-code" }, describe(s.error)),
      auth
        ? h("span", null, getToken() ? " — the token in this tab was refused; enter another." : " — this server needs a token.")
        : h("span", null, " — retrying every 15 s."),
      asOf ? h("span", { class: "asof" }, " ", asOf) : null,
      ),
    );
    if (auth) {
      tokenForm.hidden = false;
      if (document.activeElement !== tokenInput) tokenInput.focus();
    }
  } else if (s.kind === "reconnecting") {
    banner.classList.add("warn");
    bannerText.append(...nodes(h("strong", null, "Connection lost: "), s.cause + ". ", asOf ? h("span", { class: "asof" }, asOf) : null));
  } else if (s.kind === "relisting" || (s.kind === "syncing" && s.relist)) {
    banner.classList.add("info");
    const cause = s.kind === "relisting" ? s.cause : "loading a new snapshot";
    bannerText.append(...nodes(h("strong", null, "Relisting: "), cause + ". ", asOf ? h("span", { class: "asof" }, asOf) : null));
  } else {
    banner.classList.add("info");
    bannerText.append(s.kind === "syncing" ? `Loading the jobs… ${fmtInt(s.received)} so far.` : "Connecting to the server…");
  }
  banner.hidden = false;
}

function renderLog(): void {
  logList.replaceChildren(
    ...sync.log
      .slice()
      .reverse()
      .map((e) => h("li", { class: `k-${e.kind}` }, h("time", null, clock(e.time, true)), " ", e.text)),
  );
}

retryBtn.addEventListener("click", () => sync.retryNow());

// --- token ------------------------------------------------------------------------------------------------

tokenBtn.addEventListener("click", () => {
  tokenForm.hidden = !tokenForm.hidden;
  if (!tokenForm.hidden) tokenInput.focus();
});
tokenForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken(tokenInput.value.trim());
  tokenInput.value = "";
  tokenForm.hidden = true;
  updateTokenBtn();
  sync.restart("a new token");
});
document.getElementById("token-clear")?.addEventListener("click", () => {
  setToken("");
  tokenInput.value = "";
  updateTokenBtn();
  sync.restart("the token was cleared");
});
function updateTokenBtn(): void {
  tokenBtn.textContent = getToken() ? "Token ✓" : "Token";
  tokenBtn.title = getToken() ? "a token is set for this tab" : "set a bearer token for this tab";
}
updateTokenBtn();

// --- routing: #/ (filters in the query) and #/job/<id> ------------------------------------------------------

function route(): void {
  const hash = window.location.hash || "#/";
  const m = /^#\/job\/(.+)$/.exec(hash);
  if (m) {
    listView.hidden = true;
    jobView.hidden = false;
    jobPage.show(decodeURIComponent(m[1]));
    document.title = `${decodeURIComponent(m[1])} · jobstate`;
  } else {
    jobPage.hide();
    listView.hidden = false;
    jobView.hidden = true;
    table.fromHash(hash);
    document.title = "jobstate";
  }
  queueRender();
}
window.addEventListener("hashchange", route);

// Keys an operator reaches for: "/" to filter by job id, Escape to go back from a job to the list.
document.addEventListener("keydown", (e) => {
  const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement;
  if (e.key === "/" && !typing && !listView.hidden) {
    e.preventDefault();
    document.getElementById("filter-text")?.focus();
  } else if (e.key === "Escape" && !typing && !jobView.hidden) {
    window.location.hash = "#/";
  }
});

// --- rendering: coalesced, paced by its own cost, and a clock tick each second -------------------------------

const perf = { lastRender: 0, renderMs: 0 };

// A busy stream changes jobs hundreds of times a second; the page draws what is current at most every 50 ms,
// less often when a draw is expensive (a large table), and never later than half a second after a change.
function queueRender(): void {
  if (renderQueued) return;
  renderQueued = true;
  const gap = Math.min(500, Math.max(50, perf.renderMs * 4));
  const wait = Math.max(0, perf.lastRender + gap - performance.now());
  setTimeout(
    () =>
      requestAnimationFrame(() => {
        renderQueued = false;
        const t0 = performance.now();
        render();
        perf.lastRender = performance.now();
        perf.renderMs = perf.lastRender - t0;
      }),
    wait,
  );
}

function render(): void {
  const now = Date.now();
  const counts = new Map<number, number>();
  for (const j of sync.jobs.values()) counts.set(j.state, (counts.get(j.state) ?? 0) + 1);
  // Before the first complete snapshot the counts are unknown, not zero.
  const known = sync.currentAt > 0;
  (totalCard.firstChild as HTMLElement).textContent = known ? fmtInt(sync.jobs.size) : "—";
  for (const [st, card] of countCards) {
    (card.firstChild as HTMLElement).textContent = known ? fmtInt(counts.get(st) ?? 0) : "—";
    card.classList.toggle("on", table.states.has(st));
  }
  totalCard.classList.toggle("on", table.states.size === 0);
  if (!listView.hidden) table.render(now, changedSinceRender, dirtyAll);
  if (!jobView.hidden) jobPage.render(now, changedSinceRender);
  changedSinceRender.clear();
  dirtyAll = false;
}

function tick(): void {
  const now = Date.now();
  const sec = Math.floor(now / 1000);
  // A sample only while live: the chart leaves a gap rather than draw a guess.
  if (!samples.length || samples[samples.length - 1].sec !== sec) {
    let counts: number[] | null = null;
    if (sync.state.kind === "live") {
      counts = JOB_ORDER.map(() => 0);
      for (const j of sync.jobs.values()) {
        const k = JOB_ORDER.indexOf(j.state);
        if (k >= 0) counts[k] += 1;
      }
    }
    // A busy page can miss a tick: seconds skipped between two live samples were live too (the stream says so),
    // and are drawn with the earlier counts rather than as a gap that would read "not live".
    const last = samples[samples.length - 1];
    if (last?.counts && counts) for (let s = last.sec + 1; s < sec; s++) samples.push({ sec: s, counts: last.counts });
    samples.push({ sec, counts });
    while (samples.length && samples[0].sec < sec - WINDOW_SECONDS) samples.shift();
  }
  sync.rate.prune(now);
  if (!listView.hidden) {
    // The window grows with the page's age up to five minutes: a fresh page is not four-fifths empty chart.
    const span = Math.min(WINDOW_SECONDS, Math.max(60, Math.ceil((now - openedAt) / 60_000) * 60));
    chartTitle.textContent = span === 60 ? "Last minute" : `Last ${span / 60} minutes`;
    const { lastRate, peak } = renderChart(chartBox, sync.rate, samples, now, span);
    rateNow.textContent =
      sync.state.kind === "live"
        ? `${fmtInt(lastRate)} changes/s now · peak ${fmtInt(peak)}/s`
        : `not live · peak ${fmtInt(peak)}/s`;
  }
  // Times shown as "ago" and the reconnect countdown move on their own.
  if (sync.state.kind !== "live") showConn(sync.state);
  table.tick(now);
  jobPage.tick(now);
}

route();
sync.start();
tick();
setInterval(tick, 1000);
window.addEventListener("resize", () => tick());

// For the browser tests and a curious operator's console: the page's own view of its stream.
Object.assign(window, { jobstate: { sync, perf } });
