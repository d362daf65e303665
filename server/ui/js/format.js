// Formatting of times, durations, ids and JSON. Every value from the API is
// turned into a string before it is rendered.

const pad = (n, w = 2) => String(n).padStart(w, '0');

/** A value as text (null and undefined: empty). */
export function str(v) {
  if (v === null || v === undefined) return '';
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

/** `2026-12-01 14:03:07` in local time. */
export function fmtTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return str(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** `5 s ago`, `3 min ago`, `in 2 s`. */
export function ago(iso, now = Date.now()) {
  if (!iso) return '';
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return '';
  const s = Math.round((now - t) / 1000);
  const a = Math.abs(s);
  const txt = a < 60 ? `${a} s` : a < 3600 ? `${Math.round(a / 60)} min`
    : a < 86400 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
  return s >= 0 ? `${txt} ago` : `in ${txt}`;
}

/** `850 ms`, `2.4 s`, `3 min 5 s`, `2 h 3 min`. */
export function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** `1.2 s` for lag seconds. */
export function fmtSeconds(s) {
  if (s === null || s === undefined) return '';
  return fmtDuration(s * 1000);
}

export function fmtNumber(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return '';
  return Number(n).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

/** The first 8 characters of an id or version hash. */
export const short = (id) => str(id).slice(0, 8);

export function json(v) {
  return JSON.stringify(v, null, 2);
}

/** A status name for people: `compensation_failed` → `compensation failed`. */
export const label = (s) => str(s).replace(/_/g, ' ');

/** An RFC 3339 instant → the value of a datetime-local input (local time). */
export function isoToLocalInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** A datetime-local value (local time) → RFC 3339 (UTC). */
export function localInputToIso(v) {
  if (!v) return '';
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? '' : d.toISOString();
}

/** A step key from a step object of an event: `<task>[.<participant>]/<phase>`. */
export function stepKey(step) {
  if (!step || typeof step !== 'object') return '';
  const name = step.participant ? `${step.task}.${step.participant}` : step.task;
  return `${name}/${step.phase}`;
}

/** Comma-separated text → a list of trimmed non-empty items. */
export function splitList(s) {
  return str(s).split(',').map((x) => x.trim()).filter(Boolean);
}
