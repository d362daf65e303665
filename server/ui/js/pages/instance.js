// Instance detail (#/instances/<id>): the graph with each task's state, the
// steps, the timeline of every event, input/outputs/errors, and the
// operations (retry, skip, abort, pause, resume) with a reason and the
// instance's `seen`. Polls every 2 s while the instance is not final.
import { html, useEffect, useState } from '../lib.js';
import { api, ApiError, seg } from '../api.js';
import { href } from '../router.js';
import { canOperate, useStore } from '../store.js';
import { FlowGraph } from '../graph.js';
import {
  EmptyRow, ErrorBox, FINAL_STATUSES, JsonBlock, JsonDetails, Loading, Notice, ReasonDialog, Status, TableWrap, Time,
  usePoll,
} from '../ui.js';
import {
  fmtDuration, label, short, str, stepKey,
} from '../format.js';

const TIMELINE_PAGE = 200;

const OPS = {
  retry: {
    title: 'Retry a step now', ok: 'Retry now', done: 'Retry requested.',
    desc: 'The step runs again now, with a fresh budget of attempts.',
  },
  skip: {
    title: 'Skip a task', ok: 'Skip the task', done: 'Task skipped.',
    desc: 'The task is marked done with the output you give, without running it.',
  },
  abort: {
    title: 'Abort the instance', ok: 'Abort', done: 'Aborted: completed tasks are being compensated.',
    desc: 'No new task starts; every completed task is compensated. This cannot be undone.',
  },
  pause: {
    title: 'Pause the instance', ok: 'Pause', done: 'Paused.',
    desc: 'No new step starts until it is resumed; running steps finish.',
  },
  resume: {
    title: 'Resume the instance', ok: 'Resume', done: 'Resumed.',
    desc: 'Steps start again where they stopped.',
  },
  signal: {
    title: 'Send a signal', ok: 'Send the signal', done: 'Signal sent.',
    desc: 'The task waiting for this signal completes with the payload as its output.',
  },
};

/** The signals waiting steps of an instance wait for (names, once each). */
export function awaitedSignals(steps) {
  return [...new Set((steps || []).filter((s) => s.status === 'waiting' && s.signal).map((s) => str(s.signal)))];
}

/** For each task, the step whose error cell carries `data-step-error="<task>"`. */
export function errorStepOf(steps) {
  const by = new Map();
  for (const s of steps) {
    const t = str(s.task);
    const cur = by.get(t);
    const rank = (x) => (x.error && x.status === 'failed' ? 3 : x.error ? 2 : x.phase === 'action' ? 1 : 0);
    if (!cur || rank(s) > rank(cur) || (rank(s) === rank(cur) && s.error && str(s.updated_at) > str(cur.updated_at))) by.set(t, s);
  }
  return new Map([...by].map(([t, s]) => [str(s.key), t]));
}

/** The timeline's rows: each event with its step, attempt, worker, duration, error, idempotency key, actor. */
export function timelineRows(events, instanceId) {
  const started = new Map();
  return events.map((e) => {
    const d = e.data && typeof e.data === 'object' && !Array.isArray(e.data) ? e.data : {};
    const key = stepKey(d.step);
    const attempt = d.attempt === undefined ? '' : str(d.attempt);
    let duration = null;
    const type = str(e.type);
    if (type === 'FlowStepStarted') {
      started.set(`${key}#${attempt}`, e.recorded_at);
    } else if (type === 'FlowStepSucceeded' || type === 'FlowStepFailed' || type === 'FlowStepTimedOut') {
      const s = started.get(`${key}#${attempt}`);
      if (s) duration = Date.parse(e.recorded_at) - Date.parse(s);
    }
    let idem = str(d.idempotency_key || d.message_id || '');
    if (!idem && key && type === 'FlowStepStarted') idem = `${instanceId}/${key}`;
    const by = [d.actor, d.reason || d.note].filter(Boolean).map(str).join(': ');
    return {
      e, type, key, attempt, worker: str(d.worker || ''), duration, error: str(d.error || ''), idem, by,
      due: d.due_at, exhausted: !!d.exhausted,
    };
  });
}

/** Which operations apply to an instance (as the library allows them). */
export function applicable(inst) {
  const st = str(inst.status);
  const steps = Array.isArray(inst.steps) ? inst.steps : [];
  return {
    // A finished instance's failed steps stay as they were: retrying one
    // would run an action again after its instance was settled.
    retry: !['completed', 'compensated'].includes(st) && steps.some((s) => s.status === 'failed' || s.status === 'retry_due'),
    skip: ['running', 'paused', 'failed'].includes(st),
    pause: ['running', 'compensating'].includes(st),
    resume: st === 'paused',
    abort: ['running', 'paused', 'failed'].includes(st),
    signal: ['running', 'paused'].includes(st) && awaitedSignals(steps).length > 0,
  };
}

/**
 * The instance the operations act on. The page shows the live instance (it
 * polls), but an operator decides on what they looked at: progress made by
 * the engine is taken in, while a change by another operator (an event with
 * an actor) is not, until they refresh; acting before that answers `moved`.
 */
export function nextBasis(basis, live, events) {
  if (!basis || live.seen === basis.seen) return live;
  const since = (events || []).filter((e) => Number(e.position) > Number(basis.seen));
  const byOperator = since.some((e) => e.data && typeof e.data === 'object' && e.data.actor);
  return byOperator ? basis : live;
}

export function InstanceDetail({ id }) {
  useStore();
  const operator = canOperate();
  const [inst, setInst] = useState(null);      // live: what the page shows
  const [basis, setBasis] = useState(null);    // what the operations act on (see nextBasis)
  const [events, setEvents] = useState(null);
  const [flow, setFlow] = useState(null);
  const [error, setError] = useState(null);
  const [moved, setMoved] = useState(false);
  const [notice, setNotice] = useState('');
  const [dialog, setDialog] = useState(null);
  const [busy, setBusy] = useState(false);
  const [tlPage, setTlPage] = useState(-1); // -1: the last page
  const [loadError, setLoadError] = useState(null);

  const load = async (isCurrent = () => true, adopt = false) => {
    try {
      const [i, t] = await Promise.all([
        api('instances/' + seg(id)),
        api(`instances/${seg(id)}/timeline`),
      ]);
      if (!isCurrent()) return;
      const evs = Array.isArray(t.events) ? t.events : [];
      setInst(i);
      setEvents(evs);
      setBasis((b) => (adopt ? i : nextBasis(b, i, evs)));
      setLoadError(null);
    } catch (e) {
      if (isCurrent()) setLoadError(e);
    }
  };
  // The instance and its timeline are two requests: stop polling only once the
  // timeline has caught up with the final instance (its last event at the
  // instance's last position), or a timeline read just before the end stays.
  const caughtUp = !!events
    && (events.length === 0 || Number(events[events.length - 1].position) >= Number(inst && inst.seen));
  const final = !!inst && FINAL_STATUSES.includes(inst.status) && caughtUp;
  usePoll(load, 2000, [id], !final);

  const flowKey = inst ? `${inst.flow}\u0000${inst.definition_version}` : '';
  useEffect(() => {
    if (!inst) return undefined;
    let live = true;
    api(`flows/${seg(inst.flow)}/versions/${seg(inst.definition_version)}`)
      .then((f) => { if (live) setFlow(f); })
      .catch((e) => { if (live) setFlow({ error: e }); });
    return () => { live = false; };
  }, [flowKey]);

  if (!inst || !basis) {
    return html`<section><h1 tabindex="-1">Instance <code>${short(id)}</code></h1>
      <${ErrorBox} error=${loadError} />${!loadError && html`<${Loading} />`}</section>`;
  }

  const steps = Array.isArray(inst.steps) ? inst.steps : [];
  const basisSteps = Array.isArray(basis.steps) ? basis.steps : [];
  const tasks = flow && flow.graph ? flow.graph.nodes.map((n) => str(n.id)) : [...new Set(steps.map((s) => str(s.task)))];
  const failing = basisSteps.filter((s) => s.status === 'failed' || (s.status === 'retry_due' && s.error));
  const retryable = basisSteps.filter((s) => s.status === 'failed' || s.status === 'retry_due');
  const can = applicable(basis);
  const errorCell = errorStepOf(steps);
  const errors = {};
  if (inst.reason) errors.reason = inst.reason;
  for (const s of steps) if (s.error) errors[str(s.key)] = s.error;
  const stale = basis.seen !== inst.seen;
  const changes = stale && events
    ? events.filter((e) => Number(e.position) > Number(basis.seen) && e.data && e.data.actor)
    : [];

  const open = (op) => {
    setNotice('');
    setError(null);
    // Retry: with one failed or waiting step the server picks it; with
    // several, propose the one the instance is stuck on.
    let step = '';
    if (retryable.length > 1) {
      const comp = basis.status === 'compensation_failed' && retryable.find((s) => s.phase === 'compensate' || s.phase === 'cancel');
      step = str((comp || retryable[0]).key);
    }
    setDialog({
      op,
      seen: basis.seen, // what the operator decided on: a change since answers 409 moved
      step,
      signal: awaitedSignals(basisSteps)[0] || '',
      payload: '{}',
      // One id per dialog: sending twice (a double click, a retried request)
      // sends one signal.
      signalId: crypto.randomUUID(),
      task: failing.length ? str(failing[0].task) : (tasks.find((t) => !basisSteps.some((s) => s.task === t && (s.status === 'succeeded' || s.status === 'skipped'))) || tasks[0] || ''),
      output: '{}',
    });
  };

  const submit = async (reason, actor) => {
    const d = dialog;
    const body = { seen: d.seen, actor, reason };
    if (d.op === 'retry' && d.step) body.step = d.step;
    if (d.op === 'skip') {
      body.task = d.task;
      body.output = JSON.parse(d.output || 'null');
    }
    setBusy(true);
    try {
      const now = d.op === 'signal'
        ? await api(`instances/${seg(id)}/signals`, {
          method: 'POST',
          body: { name: d.signal, id: d.signalId, payload: JSON.parse(d.payload || 'null'), actor, reason },
        })
        : await api(`instances/${seg(id)}/${d.op}`, { method: 'POST', body });
      setInst(now);
      setBasis(now);
      setMoved(false);
      setNotice(OPS[d.op].done);
      setDialog(null);
      load(() => true, true);
    } catch (e) {
      setDialog(null);
      if (e instanceof ApiError && e.status === 409 && e.code === 'moved') setMoved(true);
      else setError(e);
    } finally {
      setBusy(false);
    }
  };

  const refresh = async () => {
    setError(null);
    await load(() => true, true);
    setMoved(false);
  };

  const rows = events ? timelineRows(events, str(inst.id)) : [];
  const pages = Math.max(1, Math.ceil(rows.length / TIMELINE_PAGE));
  const pageNo = tlPage < 0 || tlPage >= pages ? pages - 1 : tlPage;
  const shown = rows.slice(pageNo * TIMELINE_PAGE, (pageNo + 1) * TIMELINE_PAGE);

  return html`<section class="instance" data-instance-id=${str(inst.id)}>
    <p class="crumbs"><a href="#/instances">Instances</a> › <a href=${href('/instances', { flow: inst.flow })}>${str(inst.flow)}</a></p>
    <h1 tabindex="-1">
      ${inst.business_key ? str(inst.business_key) : html`Instance <code>${short(inst.id)}</code>`}
      ${' '}<span id="instance-status" data-status=${str(inst.status)}><${Status} status=${inst.status} /></span>
    </h1>
    <dl class="facts">
      <div><dt>Instance</dt><dd><code>${str(inst.id)}</code></dd></div>
      <div><dt>Flow</dt><dd><a href=${href('/flows/' + encodeURIComponent(str(inst.flow)), { version: inst.definition_version })}>${str(inst.flow)}</a>
        ${' '}<code title=${str(inst.definition_version)}>${short(inst.definition_version)}</code></dd></div>
      ${inst.reason && html`<div><dt>Reason</dt><dd id="instance-reason">${str(inst.reason)}</dd></div>`}
      <div><dt>Started</dt><dd><${Time} at=${inst.started_at} /></dd></div>
      <div><dt>Updated</dt><dd><${Time} at=${inst.updated_at} /></dd></div>
      ${inst.deadline_at && html`<div><dt>Deadline</dt><dd><${Time} at=${inst.deadline_at} /></dd></div>`}
      ${inst.parent && html`<div><dt>Parent</dt><dd><a id="parent-link" href=${'#/instances/' + encodeURIComponent(str(inst.parent.id))}><code>${short(inst.parent.id)}</code></a> (task <code>${str(inst.parent.task)}</code>)</dd></div>`}
      ${Array.isArray(inst.children) && inst.children.length > 0 && html`<div><dt>Children</dt><dd>${inst.children.map((c, i) => html`${i > 0 ? ', ' : ''}<a data-child=${str(c.id)} href=${'#/instances/' + encodeURIComponent(str(c.id))}><code>${short(c.id)}</code></a> (<code>${str(c.task)}</code>)`)}</dd></div>`}
      <div><dt>Seen</dt><dd><code id="instance-seen">${str(inst.seen)}</code> (${str(inst.events)} events)</dd></div>
      <div><dt>Events</dt><dd><a href=${href('/events', { tags: `flow_instance:${inst.id}` })}>in the event log</a></dd></div>
    </dl>
    ${!final && html`<p class="muted live-note" role="status">Live: refreshes every 2 s until it is final.</p>`}

    ${operator && html`<div class="toolbar" role="group" aria-label="Operations">
      ${can.retry && html`<button type="button" id="act-retry" onClick=${() => open('retry')}>Retry…</button>`}
      ${can.skip && html`<button type="button" id="act-skip" onClick=${() => open('skip')}>Skip…</button>`}
      ${can.signal && html`<button type="button" id="act-signal" class="btn-primary" onClick=${() => open('signal')}>Send signal…</button>`}
      ${can.pause && html`<button type="button" id="act-pause" onClick=${() => open('pause')}>Pause…</button>`}
      ${can.resume && html`<button type="button" id="act-resume" onClick=${() => open('resume')}>Resume…</button>`}
      ${can.abort && html`<button type="button" id="act-abort" class="btn-danger-outline" onClick=${() => open('abort')}>Abort…</button>`}
      ${!Object.values(can).some(Boolean) && html`<span class="muted">No operation applies to a ${label(basis.status)} instance.</span>`}
    </div>`}
    ${operator && changes.length > 0 && !moved && html`<div id="changed" class="alert alert-warn" role="status">
      <div class="alert-body"><p>Someone else changed this instance since you opened it:
        ${changes.map((e) => `${str(e.type)} by ${str(e.data.actor)}${e.data.reason || e.data.note ? ` (${str(e.data.reason || e.data.note)})` : ''}`).join('; ')}.</p>
      <p class="muted">The operations above are still those of what you opened; look at it again before you act.</p></div>
      <button type="button" id="sync" onClick=${refresh}>Show its operations now</button>
    </div>`}

    ${moved && html`<div id="moved" class="alert alert-warn" role="alert">
      <div class="alert-body"><p>This instance changed since you opened it.</p>
      <p class="muted">Nothing was done. Look at it again, then decide.</p></div>
      <button type="button" id="refresh" class="btn-primary" onClick=${refresh}>Refresh</button>
    </div>`}
    <${ErrorBox} error=${error || loadError} onDismiss=${() => { setError(null); setLoadError(null); }} />
    <${Notice} text=${notice} onDismiss=${() => setNotice('')} />

    <h2>Graph</h2>
    ${!flow ? html`<${Loading} what="Loading the graph" />`
      : flow.error ? html`<p class="muted">The graph is not available: ${str(flow.error.message)}</p>`
        : html`<${FlowGraph} graph=${flow.graph} steps=${steps} caption=${`${inst.flow}: the state of each task`} />`}

    <h2>Steps</h2>
    <${TableWrap} label="Steps">
      <table id="steps">
        <thead><tr>
          <th scope="col">Step</th><th scope="col">Status</th><th scope="col" class="num">Attempts</th>
          <th scope="col">Worker</th><th scope="col">Started</th><th scope="col" class="num">Duration</th>
          <th scope="col">Next attempt</th><th scope="col">Error</th>
        </tr></thead>
        <tbody>
          ${steps.length === 0 && html`<${EmptyRow} cols="8" text="No step has started yet." />`}
          ${steps.map((s) => {
            const bad = s.status === 'failed' || (s.status === 'retry_due' && s.error);
            const k = str(s.key);
            return html`<tr data-step-key=${k} class=${bad ? 'failing' : ''} key=${k}>
              <th scope="row"><code>${k}</code>${bad && !final && html` <span class="tag-failing">failing</span>`}</th>
              <td data-status=${str(s.status)}><${Status} status=${s.status} kind="step" />${s.signal && html` <span class="muted" data-waits-for=${str(s.signal)}>for signal <code>${str(s.signal)}</code></span>`}${s.awaits && html` <span class="muted" data-awaits=${(s.awaits.tags || []).map(str).join(' ')}>for <code>${(s.awaits.types || []).map(str).join(' | ') || 'any event'}</code> tagged <code>${(s.awaits.tags || []).map(str).join(', ')}</code></span>`}</td>
              <td class="num">${str(s.attempts)}</td>
              <td>${s.worker ? html`<code>${str(s.worker)}</code>` : html`<span class="muted">—</span>`}</td>
              <td><${Time} at=${s.started_at} /></td>
              <td class="num">${fmtDuration(s.duration_ms)}</td>
              <td>${s.due_at ? html`<${Time} at=${s.due_at} />` : ''}</td>
              <td class="error-cell" data-step-error=${errorCell.get(k)} data-step-error-key=${k}>${str(s.error)}${s.skip_reason && html`<span class="muted" data-skip-reason>${str(s.skip_reason)}</span>`}</td>
            </tr>`;
          })}
        </tbody>
      </table>
    <//>

    <h2>Profile</h2>
    <p class="muted">Where each step's time went: waiting for a worker once due, running, backing off between attempts, waiting for a timer, a signal or an event.</p>
    <${TableWrap} label="Profile">
      <table id="profile">
        <thead><tr>
          <th scope="col">Step</th><th scope="col" class="num">Queued</th><th scope="col" class="num">Running</th>
          <th scope="col" class="num">Backoff</th><th scope="col" class="num">Waiting</th><th scope="col">Share</th>
        </tr></thead>
        <tbody>
          ${steps.length === 0 && html`<${EmptyRow} cols="6" text="No step has started yet." />`}
          ${(() => {
            const total = (t) => (t ? t.queued_ms + t.running_ms + t.backoff_ms + t.waiting_ms : 0);
            const most = Math.max(1, ...steps.map((x) => total(x.timings)));
            return steps.map((x) => {
              const t = x.timings || { queued_ms: 0, running_ms: 0, backoff_ms: 0, waiting_ms: 0 };
              const k = str(x.key);
              const seg = (cls, ms, what) => (ms > 0 ? html`<span class=${cls} style=${`width:${(100 * ms) / most}%`} title=${`${what}: ${fmtDuration(ms)}`}></span>` : '');
              return html`<tr data-profile-step=${k} data-queued-ms=${t.queued_ms} data-running-ms=${t.running_ms}
                  data-backoff-ms=${t.backoff_ms} data-waiting-ms=${t.waiting_ms} key=${k}>
                <th scope="row"><code>${k}</code></th>
                <td class="num">${fmtDuration(t.queued_ms)}</td>
                <td class="num">${fmtDuration(t.running_ms)}</td>
                <td class="num">${fmtDuration(t.backoff_ms)}</td>
                <td class="num">${fmtDuration(t.waiting_ms)}</td>
                <td><div class="profile-bar" role="img" aria-label=${`${k}: ${fmtDuration(total(t))} in all`}>
                  ${seg('seg-queued', t.queued_ms, 'queued')}${seg('seg-running', t.running_ms, 'running')}${seg('seg-backoff', t.backoff_ms, 'backoff')}${seg('seg-waiting', t.waiting_ms, 'waiting')}
                </div></td>
              </tr>`;
            });
          })()}
        </tbody>
      </table>
    <//>

    <div class="json-grid">
      <div><h2>Input</h2><${JsonBlock} id="input" value=${inst.input} /></div>
      <div><h2>Outputs</h2><${JsonBlock} id="outputs" value=${inst.outputs} /></div>
      <div><h2>Errors</h2><${JsonBlock} id="errors" value=${errors} /></div>
      ${Array.isArray(inst.signals) && inst.signals.length > 0 && html`<div><h2>Signals</h2><${JsonBlock} id="signals" value=${inst.signals} /></div>`}
    </div>

    <h2>Timeline</h2>
    ${!events ? html`<${Loading} />` : html`
      <${TableWrap} label="Timeline">
        <table id="timeline">
          <thead><tr>
            <th scope="col" class="num">Position</th><th scope="col">Time</th><th scope="col">Event</th>
            <th scope="col">Step</th><th scope="col" class="num">Attempt</th><th scope="col">Worker</th>
            <th scope="col" class="num">Duration</th><th scope="col">Error</th><th scope="col">Idempotency key</th>
            <th scope="col">By</th><th scope="col">Data</th>
          </tr></thead>
          <tbody>
            ${shown.length === 0 && html`<${EmptyRow} cols="11" />`}
            ${shown.map((r) => html`<tr data-event-type=${r.type} data-position=${str(r.e.position)} key=${str(r.e.position)}
                class=${r.error ? 'failing' : ''}>
              <td class="num">${str(r.e.position)}</td>
              <td><${Time} at=${r.e.recorded_at} /></td>
              <td><code>${r.type}</code>${r.exhausted && html` <span class="tag-failing">exhausted</span>`}</td>
              <td>${r.key && html`<code>${r.key}</code>`}</td>
              <td class="num">${r.attempt}</td>
              <td>${r.worker && html`<code>${r.worker}</code>`}</td>
              <td class="num">${fmtDuration(r.duration)}</td>
              <td class="error-cell">${r.error}</td>
              <td>${r.idem && html`<code class="idem">${r.idem}</code>`}</td>
              <td>${r.by}</td>
              <td><${JsonDetails} value=${r.e.data} /></td>
            </tr>`)}
          </tbody>
        </table>
      <//>
      ${pages > 1 && html`<nav class="pager" aria-label="Timeline pages">
        <button type="button" id="timeline-prev" disabled=${pageNo === 0} onClick=${() => setTlPage(pageNo - 1)}>« Earlier</button>
        <span class="muted">events ${pageNo * TIMELINE_PAGE + 1}–${Math.min(rows.length, (pageNo + 1) * TIMELINE_PAGE)} of ${rows.length}</span>
        <button type="button" id="timeline-next" disabled=${pageNo === pages - 1} onClick=${() => setTlPage(pageNo + 1 === pages - 1 ? -1 : pageNo + 1)}>Later »</button>
      </nav>`}`}

    ${dialog && html`<${ReasonDialog}
        title=${OPS[dialog.op].title} description=${OPS[dialog.op].desc} okLabel=${OPS[dialog.op].ok}
        reasonLabel=${dialog.op === 'signal' ? 'Note' : 'Reason'}
        busy=${busy} onSubmit=${submit} onClose=${() => { if (!busy) setDialog(null); }}
        validate=${() => {
          if (dialog.op === 'signal') {
            if (!dialog.signal) return 'Choose the signal.';
            try { JSON.parse(dialog.payload || 'null'); } catch (e) { return `The payload is not JSON: ${e.message}`; }
            return '';
          }
          if (dialog.op !== 'skip') return '';
          if (!dialog.task) return 'Choose the task to skip.';
          try { JSON.parse(dialog.output || 'null'); } catch (e) { return `The output is not JSON: ${e.message}`; }
          return '';
        }}>
      ${dialog.op === 'retry' && html`<label class="field">
        <span>Step</span>
        <select id="retry-step" value=${dialog.step} onChange=${(e) => setDialog({ ...dialog, step: e.currentTarget.value })}>
          ${retryable.length <= 1 && html`<option value="">${retryable.length === 1 ? `the failed step (${str(retryable[0].key)})` : 'the failed or waiting step'}</option>`}
          ${(retryable.length > 1 ? retryable : []).map((s) => html`<option value=${str(s.key)}>${str(s.key)} (${label(s.status)})</option>`)}
        </select>
      </label>`}
      ${dialog.op === 'skip' && html`
        <label class="field">
          <span>Task</span>
          <select id="skip-task" value=${dialog.task} onChange=${(e) => setDialog({ ...dialog, task: e.currentTarget.value })}>
            ${tasks.map((t) => html`<option value=${t}>${t}</option>`)}
          </select>
        </label>
        <label class="field">
          <span>Its output (JSON)</span>
          <textarea id="skip-output" rows="4" class="mono" value=${dialog.output}
            onInput=${(e) => setDialog({ ...dialog, output: e.currentTarget.value })}></textarea>
        </label>`}
      ${dialog.op === 'signal' && html`
        <label class="field">
          <span>Signal</span>
          <select id="signal-name" value=${dialog.signal} onChange=${(e) => setDialog({ ...dialog, signal: e.currentTarget.value })}>
            ${awaitedSignals(basisSteps).map((n) => html`<option value=${n}>${n}</option>`)}
          </select>
        </label>
        <label class="field">
          <span>Its payload (JSON): the task's output</span>
          <textarea id="signal-payload" rows="4" class="mono" value=${dialog.payload}
            onInput=${(e) => setDialog({ ...dialog, payload: e.currentTarget.value })}></textarea>
        </label>`}
      ${dialog.op !== 'signal' && html`<p class="muted">Sent with seen = <code>${str(dialog.seen)}</code>: if the instance changed since, nothing is done.</p>`}
    <//>`}
  </section>`;
}
