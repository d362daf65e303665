// Shared components: status badges (an icon shape and text, never colour
// alone), dialogs (native <dialog>: focus on open, Escape closes), error and
// notice areas, pagers, JSON blocks, polling.
import { html, useEffect, useRef, useState } from './lib.js';
import { ApiError, NetworkError } from './api.js';
import { str, label, fmtTime, ago, json } from './format.js';
import { getActor, saveActor } from './store.js';

export const INSTANCE_STATUSES = [
  'running', 'compensating', 'paused', 'completed', 'compensated', 'compensation_failed', 'failed',
];
export const FINAL_STATUSES = ['completed', 'compensated', 'failed'];

// 16x16 icon shapes by status (and incident kind): each state has its own shape.
const ICONS = {
  running: ['M5 3.5v9l7.5-4.5z', true],
  compensating: ['M6.5 3 3 6.5 6.5 10M3.5 6.5H10a3 3 0 0 1 0 6H7', false],
  paused: ['M4.5 3.5h2.5v9H4.5zM9 3.5h2.5v9H9z', true],
  completed: ['M3 8.5l3.2 3.2L13 4.8', false],
  succeeded: ['M3 8.5l3.2 3.2L13 4.8', false],
  compensated: ['M3.5 8a4.5 4.5 0 1 0 1.4-3.3M3.5 2.2v3.3h3.3', false],
  compensation_failed: ['M8 2 14.5 13.5h-13zM8 6.3v3.4M8 11.7v.1', false],
  failed: ['M4 4l8 8M12 4l-8 8', false],
  exhausted: ['M4 4l8 8M12 4l-8 8', false],
  pending: ['M8 3.2a4.8 4.8 0 1 0 0 9.6 4.8 4.8 0 1 0 0-9.6z', false],
  retry_due: ['M8 2.5a5.5 5.5 0 1 0 0 11 5.5 5.5 0 1 0 0-11zM8 5v3.2l2.2 1.4', false],
  timed_out: ['M8 2.5a5.5 5.5 0 1 0 0 11 5.5 5.5 0 1 0 0-11zM8 5v3.2l2.2 1.4', false],
  skipped: ['M3 4l4 4-4 4M8.5 4l4 4-4 4', false],
  compensate: ['M6.5 3 3 6.5 6.5 10M3.5 6.5H10a3 3 0 0 1 0 6H7', false],
};
const DOT = ['M8 6a2 2 0 1 0 0 4 2 2 0 1 0 0-4z', true];

/** The icon's path, for badges and for the graph's nodes (inside an <svg>). */
export function iconPath(status, extra = {}) {
  const [d, fill] = ICONS[status] || DOT;
  return html`<path d=${d} fill=${fill ? 'currentColor' : 'none'} stroke=${fill ? 'none' : 'currentColor'}
    stroke-width="1.9" stroke-linecap="round" stroke-linejoin="round" ...${extra} />`;
}

export function Icon({ status }) {
  return html`<svg class="ico" viewBox="0 0 16 16" width="14" height="14" aria-hidden="true" focusable="false">${iconPath(status)}</svg>`;
}

const STEP_LABELS = { pending: 'not started', retry_due: 'retry due' };

/** A status as icon and text; `title` for the full name. */
export function Status({ status, kind = 'instance' }) {
  const s = str(status) || 'unknown';
  const text = kind === 'step' ? (STEP_LABELS[s] || label(s)) : label(s);
  return html`<span class=${'badge st-' + s} title=${text}><${Icon} status=${s} /><span>${text}</span></span>`;
}

/** A time: local, with the relative age and the exact instant as a tooltip. */
export function Time({ at }) {
  if (!at) return html`<span class="muted">—</span>`;
  return html`<time datetime=${str(at)} title=${`${str(at)} (${ago(at)})`}>${fmtTime(at)}</time>`;
}

/** The `#error` area: a problem's detail (and its field errors); nothing for network errors (the banner says it). */
export function ErrorBox({ error, onDismiss }) {
  if (!error || error instanceof NetworkError) return null;
  const detail = error instanceof ApiError ? error.detail : str(error.message || error);
  // A bad field's problem is also the detail ("field: message"): list only the others.
  const errors = (error instanceof ApiError ? error.errors : []).filter((e) => `${str(e.field)}: ${str(e.message)}` !== detail);
  return html`<div id="error" class="alert alert-error" role="alert">
    <${Icon} status="failed" />
    <div class="alert-body">
      <p>${detail}</p>
      ${errors.length > 0 && html`<ul>${errors.map((e) => html`<li><code>${str(e.field)}</code>: ${str(e.message)}</li>`)}</ul>`}
    </div>
    ${onDismiss && html`<button type="button" class="btn-ghost" aria-label="Dismiss the error" onClick=${onDismiss}>×</button>`}
  </div>`;
}

/** The `#notice` area: what the last action did. */
export function Notice({ text, onDismiss }) {
  if (!text) return null;
  return html`<div id="notice" class="alert alert-ok" role="status">
    <${Icon} status="succeeded" /><div class="alert-body"><p>${text}</p></div>
    ${onDismiss && html`<button type="button" class="btn-ghost" aria-label="Dismiss" onClick=${onDismiss}>×</button>`}
  </div>`;
}

/** Cursor pagination: first page and next page. */
export function Pager({ hasNext, atFirst, onNext, onFirst, children }) {
  return html`<nav class="pager" aria-label="Pages">
    <button type="button" id="first-page" onClick=${onFirst} disabled=${atFirst}>« First page</button>
    <button type="button" id="next-page" onClick=${onNext} disabled=${!hasNext}>Next page »</button>
    ${children}
  </nav>`;
}

/** Formatted JSON in a <pre>. */
export function JsonBlock({ value, id }) {
  return html`<pre id=${id} class="json" tabindex="0">${json(value === undefined ? null : value)}</pre>`;
}

/** JSON behind a disclosure: a one-line preview, the whole value when opened. */
export function JsonDetails({ value }) {
  const preview = str(JSON.stringify(value));
  return html`<details class="json-details">
    <summary><code>${preview.length > 80 ? preview.slice(0, 80) + '…' : preview}</code></summary>
    <pre class="json" tabindex="0">${json(value)}</pre>
  </details>`;
}

export function Loading({ what = 'Loading' }) {
  return html`<p class="muted loading" role="status">${what}…</p>`;
}

/** A table that scrolls horizontally on narrow screens. */
export function TableWrap({ children, label: name }) {
  return html`<div class="table-wrap" role="region" aria-label=${name} tabindex="0">${children}</div>`;
}

/**
 * Runs `fn(isCurrent)` now and every `ms` after each run ends, while
 * `enabled`; restarts when `deps` change. Skips runs while the tab is hidden.
 * `isCurrent()` turns false once the effect is replaced, so late answers of
 * an old filter are dropped.
 */
export function usePoll(fn, ms, deps, enabled = true) {
  const ref = useRef(fn);
  ref.current = fn;
  useEffect(() => {
    if (!enabled) return undefined;
    let stopped = false;
    let timer;
    const isCurrent = () => !stopped;
    const tick = async () => {
      if (stopped) return;
      if (!document.hidden || ms === 0) {
        try { await ref.current(isCurrent); } catch { /* the page shows its error */ }
      }
      if (!stopped && ms > 0) timer = setTimeout(tick, ms);
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }, [...deps, enabled]);
}

/** `value`, once it has not changed for `ms`. */
export function useDebounced(value, ms) {
  const [v, setV] = useState(value);
  useEffect(() => {
    const t = setTimeout(() => setV(value), ms);
    return () => clearTimeout(t);
  }, [value, ms]);
  return v;
}

/**
 * A modal dialog (native <dialog>): focus moves into it when it opens (the
 * element with `autofocus`, else the first field), Escape and Cancel close
 * it, focus returns to where it was.
 */
export function Dialog({ id, title, onClose, children, wide }) {
  const ref = useRef(null);
  const titleId = `${id}-title`;
  useEffect(() => {
    const d = ref.current;
    const before = document.activeElement;
    if (d && !d.open) {
      if (typeof d.showModal === 'function') d.showModal();
      else d.setAttribute('open', '');
    }
    const first = d && (d.querySelector('[autofocus]') || d.querySelector('textarea, input, select, button'));
    if (first) first.focus();
    return () => {
      if (d && d.open && typeof d.close === 'function') d.close();
      // Back to the button that opened it; if it is gone (the operation
      // changed what applies), to the page.
      const back = before && before !== document.body && document.contains(before) && !before.disabled
        ? before : document.getElementById('main');
      if (back && typeof back.focus === 'function') back.focus({ preventScroll: true });
    };
  }, []);
  const onCancel = (e) => { e.preventDefault(); onClose(); };
  const onKeyDown = (e) => { if (e.key === 'Escape') { e.preventDefault(); onClose(); } };
  return html`<dialog ref=${ref} id=${id} class=${'dialog' + (wide ? ' dialog-wide' : '')} aria-labelledby=${titleId}
      onCancel=${onCancel} onKeyDown=${onKeyDown}>
    <h2 id=${titleId}>${title}</h2>
    ${children}
  </dialog>`;
}

/** The actor field: the operator's name, remembered in localStorage. */
function ActorField({ id, value, onInput }) {
  return html`<label class="field">
    <span>Your name (actor)</span>
    <input id=${id} type="text" value=${value} maxlength="200" autocomplete="name"
      onInput=${(e) => onInput(e.currentTarget.value)} />
  </label>`;
}

/**
 * Asks for a reason (or a note) and the actor before an operation:
 * `#reason`, `#actor`, `#reason-ok`, `#reason-cancel`. `children` are extra
 * fields; `validate()` may refuse with a message.
 */
export function ReasonDialog({
  title, description, okLabel = 'Confirm', reasonLabel = 'Reason', onSubmit, onClose, busy, validate, children,
}) {
  const [reason, setReason] = useState('');
  const [actor, setActor] = useState(getActor());
  const [problem, setProblem] = useState('');
  const submit = (e) => {
    e.preventDefault();
    if (busy) return;
    if (!reason.trim()) { setProblem(`${reasonLabel} is required.`); return; }
    if (!actor.trim()) { setProblem('Your name is required.'); return; }
    const why = validate ? validate() : '';
    if (why) { setProblem(why); return; }
    setProblem('');
    saveActor(actor.trim());
    onSubmit(reason.trim(), actor.trim());
  };
  const onKeyDown = (e) => { if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) submit(e); };
  return html`<${Dialog} id="reason-dialog" title=${title} onClose=${onClose}>
    <form onSubmit=${submit} onKeyDown=${onKeyDown}>
      ${description && html`<p>${description}</p>`}
      ${children}
      <label class="field">
        <span>${reasonLabel}</span>
        <textarea id="reason" rows="3" maxlength="2000" required autofocus
          value=${reason} onInput=${(e) => setReason(e.currentTarget.value)}></textarea>
      </label>
      <${ActorField} id="actor" value=${actor} onInput=${setActor} />
      ${problem && html`<p id="reason-error" class="field-error" role="alert">${problem}</p>`}
      <div class="dialog-actions">
        <button type="button" id="reason-cancel" onClick=${onClose}>Cancel</button>
        <button type="submit" id="reason-ok" class="btn-primary" disabled=${busy}>${busy ? 'Working…' : okLabel}</button>
      </div>
    </form>
  <//>`;
}

/**
 * Asks to confirm: `#confirm-ok`, `#confirm-cancel`; with `count`, shows it
 * in `#confirm-count`; with `withReason`, asks for `#confirm-reason` and
 * `#confirm-actor`.
 */
export function ConfirmDialog({
  title, message, count, countLabel, withReason, okLabel = 'Confirm', danger, onConfirm, onClose, busy,
}) {
  const [reason, setReason] = useState('');
  const [actor, setActor] = useState(getActor());
  const [problem, setProblem] = useState('');
  const submit = (e) => {
    e.preventDefault();
    if (busy) return;
    if (withReason) {
      if (!reason.trim()) { setProblem('A reason is required.'); return; }
      if (!actor.trim()) { setProblem('Your name is required.'); return; }
      saveActor(actor.trim());
    }
    setProblem('');
    onConfirm(reason.trim(), actor.trim());
  };
  const nothing = count !== undefined && count === 0;
  return html`<${Dialog} id="confirm-dialog" title=${title} onClose=${onClose}>
    <form onSubmit=${submit}>
      ${count !== undefined && html`<p class="confirm-count"><strong id="confirm-count">${str(count)}</strong> ${countLabel}</p>`}
      ${message && html`<p>${message}</p>`}
      ${withReason && html`
        <label class="field">
          <span>Reason</span>
          <textarea id="confirm-reason" rows="3" maxlength="2000" autofocus value=${reason}
            onInput=${(e) => setReason(e.currentTarget.value)}></textarea>
        </label>
        <${ActorField} id="confirm-actor" value=${actor} onInput=${setActor} />`}
      ${problem && html`<p id="confirm-error" class="field-error" role="alert">${problem}</p>`}
      <div class="dialog-actions">
        <button type="button" id="confirm-cancel" onClick=${onClose} autofocus=${!withReason}>Cancel</button>
        <button type="submit" id="confirm-ok" class=${danger ? 'btn-danger' : 'btn-primary'} disabled=${busy || nothing}>
          ${busy ? 'Working…' : okLabel}
        </button>
      </div>
    </form>
  <//>`;
}

/** An empty table's one row. */
export function EmptyRow({ cols, text = 'Nothing here.' }) {
  return html`<tr class="empty"><td colspan=${cols}>${text}</td></tr>`;
}
