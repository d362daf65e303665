// Overview (#/): instances by flow and status, throughput, incidents, lag of
// projections and relays, dead letters, the head. Polls every 2 s.
import { html, useState } from '../lib.js';
import { api } from '../api.js';
import { href } from '../router.js';
import { Chart } from '../charts.js';
import {
  ErrorBox, INSTANCE_STATUSES, Loading, Status, TableWrap, Time, usePoll,
} from '../ui.js';
import {
  fmtNumber, fmtSeconds, label, str,
} from '../format.js';

// Each status's line: the colour of its badge and a dash pattern of its own.
const STATUS_LINES = {
  running: ['#0a4f9c', [5, 3]],
  compensating: ['#8a4500', [10, 3]],
  paused: ['#474d55', [2, 3]],
  completed: ['#146c2e', []],
  compensated: ['#5b2d8e', [6, 2, 1, 2]],
  compensation_failed: ['#9b2c0b', [12, 3, 3, 3]],
  failed: ['#b3121b', [1, 3]],
};

/** Per-interval series from the cumulative samples. */
export function throughput(series) {
  const s = Array.isArray(series) ? series : [];
  const x = [];
  const finished = [];
  const appends = [];
  for (let i = 1; i < s.length; i++) {
    const t0 = Date.parse(s[i - 1].at) / 1000;
    const t1 = Date.parse(s[i].at) / 1000;
    const dt = t1 - t0;
    if (!(dt > 0)) continue;
    x.push(t1);
    finished.push(Math.max(0, (s[i].finished || 0) - (s[i - 1].finished || 0)));
    appends.push(Math.max(0, ((s[i].head || 0) - (s[i - 1].head || 0)) / dt));
  }
  const statuses = INSTANCE_STATUSES.filter((st) => s.some((p) => p.by_status && p.by_status[st] !== undefined));
  const levels = statuses.map((st) => ({
    label: label(st),
    values: s.slice(1).map((p) => (p.by_status && p.by_status[st]) || 0),
    stroke: STATUS_LINES[st][0],
    dash: STATUS_LINES[st][1],
  }));
  const interval = s.length > 1 ? Math.round((Date.parse(s[s.length - 1].at) - Date.parse(s[0].at)) / 1000 / (s.length - 1)) : 5;
  const minutes = s.length > 1 ? Math.round((Date.parse(s[s.length - 1].at) - Date.parse(s[0].at)) / 60000) : 0;
  return {
    x, finished, appends, levels, interval: interval || 5, minutes,
  };
}

export function Overview() {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  usePoll(async (isCurrent) => {
    try {
      const d = await api('overview');
      if (!isCurrent()) return;
      setData(d);
      setError(null);
    } catch (e) {
      if (isCurrent()) setError(e);
    }
  }, 2000, []);

  if (!data) {
    return html`<section><h1 tabindex="-1">Overview</h1><${ErrorBox} error=${error} />${!error && html`<${Loading} />`}</section>`;
  }
  const rows = Array.isArray(data.instances) ? data.instances : [];
  const flows = [...new Set(rows.map((r) => str(r.flow)))].sort();
  const count = (flow, status) => {
    const r = rows.find((x) => str(x.flow) === flow && str(x.status) === status);
    return r ? Number(r.count) || 0 : 0;
  };
  const tp = throughput(data.series);
  const consumers = Array.isArray(data.consumers) ? data.consumers : [];
  const totalFinished = tp.finished.reduce((a, b) => a + b, 0);
  const lastAppends = tp.appends.length ? tp.appends[tp.appends.length - 1] : 0;

  return html`<section class="overview">
    <h1 tabindex="-1">Overview</h1>
    <${ErrorBox} error=${error} />
    <div class="cards">
      <div class="card">
        <span class="card-label">Head position</span>
        <span class="card-value" id="head">${fmtNumber(data.head)}</span>
      </div>
      <div class="card">
        <span class="card-label">Appends per second</span>
        <span class="card-value" id="appends-per-second">${fmtNumber(data.appends_per_second, 1)}</span>
      </div>
      <a class=${'card card-link' + (data.open_incidents > 0 ? ' card-warn' : '')} href="#/incidents">
        <span class="card-label">Open incidents</span>
        <span class="card-value" id="open-incidents">${fmtNumber(data.open_incidents)}</span>
        ${data.open_incidents > 0 && html`<span class="card-note">needs attention</span>`}
      </a>
      <a class=${'card card-link' + (data.dead_letters > 0 ? ' card-warn' : '')} href="#/relays">
        <span class="card-label">Dead letters</span>
        <span class="card-value" id="dead-letters">${fmtNumber(data.dead_letters)}</span>
        ${data.dead_letters > 0 && html`<span class="card-note">to replay or discard</span>`}
      </a>
    </div>

    <h2>Instances by flow and status</h2>
    <${TableWrap} label="Instances by flow and status">
      <table class="counts" id="instance-counts">
        <thead><tr>
          <th scope="col">Flow</th>
          ${INSTANCE_STATUSES.map((s) => html`<th scope="col" class="num"><${Status} status=${s} /></th>`)}
          <th scope="col" class="num">All</th>
        </tr></thead>
        <tbody>
          ${flows.length === 0 && html`<tr class="empty"><td colspan=${INSTANCE_STATUSES.length + 2}>No instances yet.</td></tr>`}
          ${flows.map((f) => html`<tr data-flow-row=${f}>
            <th scope="row"><a href=${href('/instances', { flow: f })}>${f}</a></th>
            ${INSTANCE_STATUSES.map((s) => {
              const n = count(f, s);
              return html`<td class=${'num' + (n === 0 ? ' zero' : '')} data-testid=${`count-${f}-${s}`}>
                ${n > 0 ? html`<a href=${href('/instances', { flow: f, status: s })} aria-label=${`${n} ${label(s)} instances of ${f}`}>${fmtNumber(n)}</a>` : '0'}
              </td>`;
            })}
            <td class="num"><strong>${fmtNumber(INSTANCE_STATUSES.reduce((a, s) => a + count(f, s), 0))}</strong></td>
          </tr>`)}
        </tbody>
      </table>
    <//>

    <h2>Throughput${tp.minutes > 1 ? `, last ${tp.minutes} minutes` : ', last minute'}</h2>
    ${tp.x.length < 2
      ? html`<p class="muted">Collecting samples (one every ${tp.interval} s)…</p>`
      : html`<div class="charts">
        <${Chart} id="chart-finished" title=${`Instances finished per ${tp.interval} s`} x=${tp.x} bars integer
          series=${[{ label: 'finished', values: tp.finished }]}
          summary=${`${fmtNumber(totalFinished)} finished in this window; ${fmtNumber(tp.finished[tp.finished.length - 1])} in the last ${tp.interval} s.`} />
        <${Chart} id="chart-appends" title="Appends per second" x=${tp.x}
          series=${[{ label: 'appends/s', values: tp.appends }]}
          summary=${`${fmtNumber(lastAppends, 1)} appends per second in the last ${tp.interval} s.`} />
        ${tp.levels.length > 0 && html`<${Chart} id="chart-status" title="Instances by status" x=${tp.x} integer
          series=${tp.levels}
          summary=${tp.levels.map((l) => `${l.label}: ${fmtNumber(l.values[l.values.length - 1])}`).join(', ')} />`}
      </div>`}

    <h2>Projections and relays</h2>
    <${TableWrap} label="Lag of projections and relays">
      <table id="consumers">
        <thead><tr>
          <th scope="col">Name</th><th scope="col">Kind</th><th scope="col" class="num">Checkpoint</th>
          <th scope="col" class="num">Lag (events)</th><th scope="col" class="num">Lag (time)</th>
          <th scope="col" class="num">Dead letters</th><th scope="col">Moved</th>
        </tr></thead>
        <tbody>
          ${consumers.length === 0 && html`<tr class="empty"><td colspan="7">No projections or relays.</td></tr>`}
          ${consumers.map((c) => html`<tr data-testid=${`lag-${str(c.name)}`}>
            <th scope="row"><a href="#/relays">${str(c.name)}</a></th>
            <td>${str(c.kind)}</td>
            <td class="num">${fmtNumber(c.checkpoint)}</td>
            <td class=${'num' + (c.lag_events > 0 ? ' warn' : '')}>${c.lag_events === null || c.lag_events === undefined ? '—' : fmtNumber(c.lag_events)}</td>
            <td class="num">${c.lag_seconds === null || c.lag_seconds === undefined ? '—' : fmtSeconds(c.lag_seconds)}</td>
            <td class=${'num' + (c.dead_letters > 0 ? ' warn' : '')}>${fmtNumber(c.dead_letters)}</td>
            <td><${Time} at=${c.updated_at} /></td>
          </tr>`)}
        </tbody>
      </table>
    <//>
  </section>`;
}
