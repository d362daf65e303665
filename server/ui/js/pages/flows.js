// Flows (#/flows, #/flows/<name>): the registered definitions, a flow's
// versions with their instance counts, its source (YAML, JSON or TOML) and
// its graph.
import { html, useEffect, useState } from '../lib.js';
import { api, seg } from '../api.js';
import { canOperate, useStore } from '../store.js';
import { href, navigate } from '../router.js';
import { FlowGraph } from '../graph.js';
import {
  EmptyRow, ErrorBox, Loading, Notice, Pager, ReasonDialog, TableWrap, Time, usePoll,
} from '../ui.js';
import { fmtNumber, short, str } from '../format.js';

const PAGE = 100;

export function Flows({ route }) {
  const cursor = route.get('cursor');
  const [page, setPage] = useState(null);
  const [error, setError] = useState(null);
  usePoll(async (isCurrent) => {
    try {
      const p = await api('flows', { query: { cursor, limit: PAGE } });
      if (!isCurrent()) return;
      setPage(p);
      setError(null);
    } catch (e) {
      if (isCurrent()) setError(e);
    }
  }, 10000, [cursor]);
  const items = page ? page.items || [] : [];
  return html`<section>
    <h1 tabindex="-1">Flows</h1>
    <${ErrorBox} error=${error} />
    ${!page && !error ? html`<${Loading} />` : html`
      <${TableWrap} label="Flows">
        <table id="flows">
          <thead><tr>
            <th scope="col">Flow</th><th scope="col">Newest version</th><th scope="col" class="num">Versions</th>
            <th scope="col" class="num">Tasks</th><th scope="col">Registered</th><th scope="col">Instances</th>
          </tr></thead>
          <tbody>
            ${items.length === 0 && html`<${EmptyRow} cols="6" text="No flow is registered." />`}
            ${items.map((f) => html`<tr data-flow=${str(f.name)} key=${str(f.name)}>
              <th scope="row"><a href=${href('/flows/' + encodeURIComponent(str(f.name)))}>${str(f.name)}</a></th>
              <td><code title=${str(f.latest_version)}>${short(f.latest_version)}</code></td>
              <td class="num">${fmtNumber(f.versions)}</td>
              <td class="num">${fmtNumber(f.tasks)}</td>
              <td><${Time} at=${f.registered_at} /></td>
              <td><a href=${href('/instances', { flow: f.name })}>instances</a></td>
            </tr>`)}
          </tbody>
        </table>
      <//>
      <${Pager} hasNext=${!!(page && page.next_cursor)} atFirst=${!cursor}
        onFirst=${() => navigate('/flows', {})} onNext=${() => navigate('/flows', { cursor: page.next_cursor })} />`}
    <${Schedules} />
  </section>`;
}

/** The cron schedules: last and next tick; pause and resume (operators). */
function Schedules() {
  useStore();
  const operator = canOperate();
  const [list, setList] = useState(null);
  const [error, setError] = useState(null);
  const [dialog, setDialog] = useState(null);
  const [busy, setBusy] = useState(false);
  const [notice, setNotice] = useState('');
  const load = async (isCurrent = () => true) => {
    try {
      const l = await api('schedules');
      if (isCurrent()) { setList(l); setError(null); }
    } catch (e) {
      if (isCurrent()) setError(e);
    }
  };
  usePoll(load, 5000, []);
  const submit = async (reason, actor) => {
    const d = dialog;
    setBusy(true);
    try {
      await api(`schedules/${seg(d.name)}/${d.op}`, { method: 'POST', body: { actor, reason } });
      setNotice(d.op === 'pause' ? `Schedule ${d.name} paused.` : `Schedule ${d.name} resumed.`);
      setDialog(null);
      load();
    } catch (e) {
      setDialog(null);
      setError(e);
    } finally {
      setBusy(false);
    }
  };
  const items = list ? list.items || [] : [];
  return html`<h2>Schedules</h2>
    <${ErrorBox} error=${error} onDismiss=${() => setError(null)} />
    <${Notice} text=${notice} onDismiss=${() => setNotice('')} />
    ${!list && !error ? html`<${Loading} />` : html`
      <${TableWrap} label="Schedules">
        <table id="schedules">
          <thead><tr>
            <th scope="col">Schedule</th><th scope="col">Flow</th><th scope="col">Cron</th><th scope="col">Time zone</th>
            <th scope="col">Missed ticks</th><th scope="col">Last tick</th><th scope="col">Next tick</th><th scope="col">State</th>
          </tr></thead>
          <tbody>
            ${items.length === 0 && html`<${EmptyRow} cols="8" text="No schedule." />`}
            ${items.map((x) => html`<tr data-schedule=${str(x.name)} data-paused=${x.paused ? 'true' : 'false'} key=${str(x.name)}>
              <th scope="row">${str(x.name)}</th>
              <td><a href=${href('/instances', { flow: x.flow })}>${str(x.flow)}</a></td>
              <td><code>${str(x.cron)}</code></td>
              <td>${str(x.timezone)}</td>
              <td>${str(x.missed)}</td>
              <td>${x.last_tick ? html`<${Time} at=${x.last_tick} />` : html`<span class="muted">—</span>`}</td>
              <td>${x.next_tick ? html`<${Time} at=${x.next_tick} />` : html`<span class="muted">—</span>`}</td>
              <td>${x.paused ? 'paused' : 'active'}
                ${operator && html` <button type="button" data-schedule-op=${x.paused ? 'resume' : 'pause'} data-schedule-name=${str(x.name)}
                  onClick=${() => setDialog({ op: x.paused ? 'resume' : 'pause', name: str(x.name) })}>${x.paused ? 'Resume…' : 'Pause…'}</button>`}</td>
            </tr>`)}
          </tbody>
        </table>
      <//>`}
    ${dialog && html`<${ReasonDialog}
        title=${dialog.op === 'pause' ? `Pause schedule ${dialog.name}` : `Resume schedule ${dialog.name}`}
        description=${dialog.op === 'pause' ? 'No tick starts an instance until it is resumed; ticks meanwhile are missed ticks.' : 'Ticks start instances again.'}
        okLabel=${dialog.op === 'pause' ? 'Pause' : 'Resume'}
        busy=${busy} onSubmit=${submit} onClose=${() => { if (!busy) setDialog(null); }} />`}`;
}

export function FlowDetail({ name, route }) {
  const version = route.get('version');
  const format = route.get('format') || 'yaml';
  const [flow, setFlow] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    let live = true;
    setError(null);
    const path = version ? `flows/${seg(name)}/versions/${seg(version)}` : `flows/${seg(name)}`;
    api(path, { query: { format } })
      .then((f) => { if (live) setFlow(f); })
      .catch((e) => { if (live) setError(e); });
    return () => { live = false; };
  }, [name, version, format]);

  const go = (patch) => navigate('/flows/' + encodeURIComponent(name), { version, format, ...patch });
  const versions = flow && Array.isArray(flow.versions) ? flow.versions : [];
  const newest = versions.length ? str(versions[0].version) : '';

  return html`<section data-flow=${name} class="flow-detail">
    <p class="crumbs"><a href="#/flows">Flows</a> › ${name}</p>
    <h1 tabindex="-1">${name}</h1>
    <${ErrorBox} error=${error} />
    ${!flow && !error && html`<${Loading} />`}
    ${flow && html`
      <p>
        Showing version <code id="flow-version" title=${str(flow.version)}>${short(flow.version)}</code>
        ${str(flow.version) === newest ? ' (the newest)' : html` (not the newest: <a href=${href('/flows/' + encodeURIComponent(name), { format })}>show the newest</a>)`}
        ${' · '}<a href=${href('/instances', { flow: name })}>its instances</a>
      </p>

      <h2>Graph</h2>
      <${FlowGraph} graph=${flow.graph} caption=${`${name}: tasks and their dependencies`} />

      <h2>Versions</h2>
      <${TableWrap} label="Versions">
        <table id="versions">
          <thead><tr>
            <th scope="col">Version</th><th scope="col">Registered</th><th scope="col" class="num">Position</th>
            <th scope="col" class="num">Instances</th>
          </tr></thead>
          <tbody>
            ${versions.map((v) => {
              const current = str(v.version) === str(flow.version);
              return html`<tr data-version=${str(v.version)} key=${str(v.version)} class=${current ? 'current' : ''} aria-current=${current ? 'true' : undefined}>
                <td>${current
                  ? html`<code title=${str(v.version)}>${short(v.version)}</code> <span class="muted">(shown)</span>`
                  : html`<a href=${href('/flows/' + encodeURIComponent(name), { version: v.version, format })}><code title=${str(v.version)}>${short(v.version)}</code></a>`}</td>
                <td><${Time} at=${v.registered_at} /></td>
                <td class="num">${fmtNumber(v.position)}</td>
                <td class="num" data-testid=${`version-instances-${str(v.version)}`}>${fmtNumber(v.instances)}</td>
              </tr>`;
            })}
          </tbody>
        </table>
      <//>

      <h2>Source</h2>
      <div class="toolbar">
        <label class="field field-inline">
          <span>Format</span>
          <select id="format" value=${format} onChange=${(e) => go({ format: e.currentTarget.value })}>
            <option value="yaml">YAML</option>
            <option value="json">JSON</option>
            <option value="toml">TOML</option>
          </select>
        </label>
        <span class="muted">rendered from the stored definition (comments of the original are not kept)</span>
      </div>
      <pre id="source" class="source" tabindex="0" data-format=${str(flow.format)}>${str(flow.source)}</pre>`}
  </section>`;
}
