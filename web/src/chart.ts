// The last minutes as a picture: changes per second (by commit time) and jobs by state (sampled each second
// while live). Plain SVG; the only text put into it is numbers this file formats. Colours come from classes:
// the server's Content-Security-Policy (style-src 'self') refuses style attributes in markup.
import { JOB_CLASS, JOB_ORDER, fmtInt } from "./format";
import type { RateWindow } from "./sync";

export interface StateSample {
  sec: number;
  counts: number[] | null; // by JOB_ORDER; null: not live at that second (a gap, never a guess)
}

export const WINDOW_SECONDS = 300;

function niceMax(v: number): number {
  if (v <= 5) return 5;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function axis(x0: number, w: number, y: number, seconds: number): string {
  let out = "";
  const step = seconds >= 240 ? 60 : 30;
  for (let s = 0; s <= seconds; s += step) {
    const x = x0 + w - (s / seconds) * w;
    const label = s === 0 ? "now" : `−${s >= 60 ? `${s / 60}m` : `${s}s`}`;
    const anchor = s === 0 ? "end" : s === seconds ? "start" : "middle";
    out += `<line x1="${x}" x2="${x}" y1="${y - 4}" y2="${y}" class="tick"/>`;
    out += `<text x="${x}" y="${y + 12}" text-anchor="${anchor}" class="axis">${label}</text>`;
  }
  return out;
}

export function renderChart(
  el: HTMLElement,
  rate: RateWindow,
  samples: StateSample[],
  nowMs: number,
  seconds = WINDOW_SECONDS,
): { lastRate: number; peak: number } {
  const width = Math.max(280, Math.floor(el.clientWidth || 600));
  const left = 44;
  const right = 8;
  const w = width - left - right;
  const nowSec = Math.floor(nowMs / 1000);
  const first = nowSec - seconds + 1;
  const barW = w / seconds;

  // Changes per second. The current second is still filling, so the rate shown in words is the last full one.
  const values: number[] = [];
  for (let s = first; s <= nowSec; s++) values.push(rate.buckets.get(s) ?? 0);
  const peak = Math.max(0, ...values);
  const max1 = niceMax(peak);
  const h1 = 52;
  const top1 = 22;
  let bars = "";
  values.forEach((v, i) => {
    if (!v) return;
    const bh = Math.max(1, (v / max1) * h1);
    bars += `<rect x="${(left + i * barW).toFixed(1)}" y="${(top1 + h1 - bh).toFixed(1)}" width="${Math.max(1, barW - 0.6).toFixed(1)}" height="${bh.toFixed(1)}" class="bar"/>`;
  });
  const grid1 =
    `<line x1="${left}" x2="${left + w}" y1="${top1 + h1}" y2="${top1 + h1}" class="base"/>` +
    `<line x1="${left}" x2="${left + w}" y1="${top1}" y2="${top1}" class="grid"/>` +
    `<line x1="${left}" x2="${left + w}" y1="${top1 + h1 / 2}" y2="${top1 + h1 / 2}" class="grid"/>` +
    `<text x="${left - 6}" y="${top1 + 4}" text-anchor="end" class="axis">${fmtInt(max1)}</text>` +
    `<text x="${left - 6}" y="${top1 + h1 + 3}" text-anchor="end" class="axis">0</text>`;

  // Jobs by state, stacked in lifecycle order; seconds without a live sample are left empty and hatched.
  const top2 = top1 + h1 + 30;
  const h2 = 78;
  const bySec = new Map<number, number[] | null>();
  for (const s of samples) bySec.set(s.sec, s.counts);
  let peakTotal = 0;
  for (let s = first; s <= nowSec; s++) {
    const c = bySec.get(s);
    if (c) peakTotal = Math.max(peakTotal, c.reduce((a, b) => a + b, 0));
  }
  const max2 = niceMax(peakTotal);
  let areas = "";
  let gaps = "";
  const xOf = (s: number) => left + (s - first) * barW;
  const yOf = (v: number) => top2 + h2 - (v / max2) * h2;
  // Runs of consecutive live seconds become one polygon per state.
  let run: number[] = [];
  const flush = () => {
    if (!run.length) return;
    const cum = run.map(() => 0);
    JOB_ORDER.forEach((_, k) => {
      const lower = cum.slice();
      run.forEach((s, i) => {
        cum[i] += (bySec.get(s) as number[])[k];
      });
      const pts: string[] = [];
      run.forEach((s, i) => {
        pts.push(`${xOf(s).toFixed(1)},${yOf(cum[i]).toFixed(1)}`, `${(xOf(s) + barW).toFixed(1)},${yOf(cum[i]).toFixed(1)}`);
      });
      for (let i = run.length - 1; i >= 0; i--) {
        const s = run[i];
        pts.push(`${(xOf(s) + barW).toFixed(1)},${yOf(lower[i]).toFixed(1)}`, `${xOf(s).toFixed(1)},${yOf(lower[i]).toFixed(1)}`);
      }
      areas += `<polygon points="${pts.join(" ")}" class="area s-${JOB_CLASS[JOB_ORDER[k]]}"/>`;
    });
    run = [];
  };
  let gapStart = -1;
  const oldest = samples.length ? samples[0].sec : nowSec + 1;
  for (let s = first; s <= nowSec; s++) {
    const c = bySec.get(s);
    if (c) {
      run.push(s);
      if (gapStart >= 0) {
        gaps += `<rect x="${xOf(gapStart)}" y="${top2}" width="${xOf(s) - xOf(gapStart)}" height="${h2}" class="gap"/>`;
        gapStart = -1;
      }
    } else {
      flush();
      // Before the page opened there is nothing to say; after it, a missing second means "not live".
      if (s >= oldest && gapStart < 0) gapStart = s;
    }
  }
  flush();
  if (gapStart >= 0) gaps += `<rect x="${xOf(gapStart)}" y="${top2}" width="${xOf(nowSec + 1) - xOf(gapStart)}" height="${h2}" class="gap"/>`;
  const grid2 =
    `<line x1="${left}" x2="${left + w}" y1="${top2 + h2}" y2="${top2 + h2}" class="base"/>` +
    `<line x1="${left}" x2="${left + w}" y1="${top2}" y2="${top2}" class="grid"/>` +
    `<line x1="${left}" x2="${left + w}" y1="${top2 + h2 / 2}" y2="${top2 + h2 / 2}" class="grid"/>` +
    `<text x="${left - 6}" y="${top2 + 4}" text-anchor="end" class="axis">${fmtInt(max2)}</text>` +
    `<text x="${left - 6}" y="${top2 + h2 + 3}" text-anchor="end" class="axis">0</text>`;

  const height = top2 + h2 + 18;
  el.innerHTML =
    `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="changes per second and jobs by state, last ${seconds / 60} minutes">` +
    `<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" class="hatch"/></pattern></defs>` +
    `<text x="${left}" y="${top1 - 8}" class="panel">changes per second</text>` +
    grid1 +
    bars +
    `<text x="${left}" y="${top2 - 8}" class="panel">jobs by state</text>` +
    grid2 +
    gaps +
    areas +
    axis(left, w, top2 + h2 + 4, seconds) +
    `</svg>`;
  return { lastRate: values[values.length - 2] ?? 0, peak };
}
