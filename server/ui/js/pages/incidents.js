// Incidents (#/incidents): open incidents grouped as the API groups them,
// expandable to the affected instances; retry or handle (acknowledge with a
// note) one incident or every incident of a group.
import { html, useState } from '../lib.js';
import { api, seg } from '../api.js';
import { href, navigate } from '../router.js';
import { canOperate, useStore } from '../store.js';
import { useFlowNames } from './instances.js';
import {
  EmptyRow, ErrorBox, Loading, Notice, Pager, ReasonDialog, Status, TableWrap, Time, usePoll,
} from '../ui.js';
import { fmtNumber, short, str } from '../format.js';

const PAGE = 50;

export function Incidents({ route }) {
  useStore();
  const operator = canOperate();
  const params = { flow: route.get('flow'), unacknowledged: route.get('unacknowledged') };
  const cursor = route.get('cursor');
  const flows = useFlowNames();
  const [page, setPage] = useState(null);
  const [error, setError] = useState(null);         // of an action
  const [loadError, setLoadError] = useState(null); // of the list
  const [notice, setNotice] = useState('');
  const [open, setOpen] = useState({});        // group id -> true
  const [details, setDetails] = useState({});  // group id -> GroupDetail | {error}
  const [dialog, setDialog] = useState(null);  // {action, group?, incident?, count}
  const [busy, setBusy] = useState(false);
  const [progress, setProgress] = useState('');

  const loadDetail = async (gid) => {
    try {
      const d = await api('incidents/' + seg(gid));
      setDetails((x) => ({ ...x, [gid]: d }));
      return d;
    } catch (e) {
      setDetails((x) => ({ ...x, [gid]: { error: e } }));
      throw e;
    }
  };

  const load = async (isCurrent = () => true) => {
    try {
      const p = await api('incidents', {
        query: {
          flow: params.flow, unacknowledged: params.unacknowledged ? 'true' : '', cursor, limit: PAGE,
        },
      });
      if (!isCurrent()) return;
      setPage(p);
      setLoadError(null);
      for (const gid of Object.keys(open)) if (open[gid]) loadDetail(gid).catch(() => {});
    } catch (e) {
      if (isCurrent()) setLoadError(e);
    }
  };
  usePoll(load, 5000, [params.flow, params.unacknowledged, cursor]);

  const toggle = (gid) => {
    const now = !open[gid];
    setOpen({ ...open, [gid]: now });
    if (now) loadDetail(gid).catch(() => {});
  };

  const go = (patch) => navigate('/incidents', { ...params, ...patch, cursor: '' });

  const act = (action, target) => setDialog({ action, ...target });

  const run = async (text, actor) => {
    const d = dialog;
    setBusy(true);
    setError(null);
    setNotice('');
    let ids;
    try {
      if (d.incident) ids = [d.incident];
      else {
        const detail = details[d.group] && details[d.group].incidents ? details[d.group] : await loadDetail(d.group);
        ids = (detail.incidents || []).map((i) => str(i.id));
      }
      const body = d.action === 'retry' ? { actor, reason: text } : { actor, note: text };
      const failed = [];
      let done = 0;
      for (const iid of ids) {
        setProgress(`${d.action === 'retry' ? 'Retrying' : 'Handling'} ${done + 1} of ${ids.length}…`);
        try {
          await api(`incidents/${seg(iid)}/${d.action}`, { method: 'POST', body });
          done += 1;
        } catch (e) {
          failed.push(`${iid}: ${e.detail || e.message}`);
        }
      }
      setDialog(null);
      const verb = d.action === 'retry' ? 'retried' : 'handled';
      if (done) setNotice(`${done} incident${done === 1 ? '' : 's'} ${verb}.`);
      if (failed.length) setError(new Error(`${failed.length} not ${verb}: ${failed.join('; ')}`));
      await load();
    } catch (e) {
      setDialog(null);
      setError(e);
    } finally {
      setBusy(false);
      setProgress('');
    }
  };

  const items = page ? page.items || [] : [];

  return html`<section>
    <h1 tabindex="-1">Incidents</h1>
    <form class="filters" role="search" aria-label="Filter incidents" onSubmit=${(e) => e.preventDefault()}>
      <label class="field">
        <span>Flow</span>
        <select id="i-flow" value=${params.flow} onChange=${(e) => go({ flow: e.currentTarget.value })}>
          <option value="">All flows</option>
          ${params.flow && !flows.includes(params.flow) && html`<option value=${params.flow}>${params.flow}</option>`}
          ${flows.map((f) => html`<option value=${f}>${f}</option>`)}
        </select>
      </label>
      <label class="check">
        <input id="i-unack" type="checkbox" checked=${!!params.unacknowledged}
          onChange=${(e) => go({ unacknowledged: e.currentTarget.checked })} />
        <span>Only unacknowledged</span>
      </label>
    </form>

    <${ErrorBox} error=${error || loadError} onDismiss=${() => { setError(null); setLoadError(null); }} />
    <${Notice} text=${notice} onDismiss=${() => setNotice('')} />

    ${!page && !loadError ? html`<${Loading} />` : html`
      <${TableWrap} label="Incident groups">
        <table id="incidents">
          <thead><tr>
            <th scope="col"><span class="sr-only">Expand</span></th>
            <th scope="col">Flow</th><th scope="col">Task</th><th scope="col">Kind</th><th scope="col">Error</th>
            <th scope="col">Seen</th>
            <th scope="col" class="num">Instances</th><th scope="col" class="num">Acknowledged</th>
            ${operator && html`<th scope="col">Actions</th>`}
          </tr></thead>
          <tbody>
            ${items.length === 0 && html`<${EmptyRow} cols=${operator ? 9 : 8} text="No open incidents." />`}
            ${items.map((g) => {
              const gid = str(g.id);
              const isOpen = !!open[gid];
              const d = details[gid];
              return html`
                <tr data-group=${gid} key=${gid} class=${g.acknowledged >= g.instance_count ? 'acked' : ''}>
                  <td>
                    <button type="button" class="btn-ghost expander" aria-expanded=${isOpen ? 'true' : 'false'}
                      aria-controls=${`group-${gid}`} data-expand-group=${gid} onClick=${() => toggle(gid)}
                      aria-label=${`${isOpen ? 'Hide' : 'Show'} the instances of this group`}>
                      ${isOpen ? '▾' : '▸'}
                    </button>
                  </td>
                  <td>${str(g.flow)}</td>
                  <td><code>${str(g.task)}</code></td>
                  <td><${Status} status=${g.kind} kind="incident" /></td>
                  <td class="error-cell">${str(g.error)}</td>
                  <td class="seen"><span class="muted">first</span> <${Time} at=${g.first_seen} /><br /><span class="muted">last</span> <${Time} at=${g.last_seen} /></td>
                  <td class="num">${fmtNumber(g.instance_count)}</td>
                  <td class="num">${fmtNumber(g.acknowledged)} of ${fmtNumber(g.instance_count)}</td>
                  ${operator && html`<td class="actions">
                    <button type="button" data-retry-group=${gid} onClick=${() => act('retry', { group: gid, count: g.instance_count, what: `${g.flow} / ${g.task}` })}>Retry all</button>
                    <button type="button" data-handle-group=${gid} onClick=${() => act('handle', { group: gid, count: g.instance_count, what: `${g.flow} / ${g.task}` })}>Handle all</button>
                  </td>`}
                </tr>
                ${isOpen && html`<tr class="group-detail" id=${`group-${gid}`} key=${gid + '-detail'}>
                  <td colspan=${operator ? 9 : 8}>
                    ${!d ? html`<${Loading} />` : d.error ? html`<p class="field-error">${str(d.error.detail || d.error.message)}</p>` : html`
                      <table class="nested" aria-label=${`Incidents of ${g.flow} / ${g.task}`}>
                        <thead><tr>
                          <th scope="col">Instance</th><th scope="col">Step</th><th scope="col">Error</th>
                          <th scope="col" class="num">Failed attempts</th><th scope="col">Seen</th>
                          <th scope="col">Acknowledged</th>${operator && html`<th scope="col">Actions</th>`}
                        </tr></thead>
                        <tbody>
                          ${(d.incidents || []).length === 0 && html`<${EmptyRow} cols=${operator ? 7 : 6} text="No open incidents left in this group." />`}
                          ${(d.incidents || []).map((i) => html`<tr data-incident=${str(i.id)} key=${str(i.id)}>
                            <td><a href=${href('/instances/' + encodeURIComponent(str(i.instance)))} title=${str(i.instance)}><code>${short(i.instance)}</code></a></td>
                            <td><code>${str(i.step)}</code></td>
                            <td class="error-cell">${str(i.error)}</td>
                            <td class="num">${fmtNumber(i.occurrences)}</td>
                            <td class="seen"><span class="muted">first</span> <${Time} at=${i.first_seen} /><br /><span class="muted">last</span> <${Time} at=${i.last_seen} /></td>
                            <td>${i.acknowledged_by
                              ? html`<span class="badge st-acknowledged"><span aria-hidden="true">✓</span> ${str(i.acknowledged_by)}</span> ${str(i.note)} <${Time} at=${i.acknowledged_at} />`
                              : html`<span class="muted">no</span>`}</td>
                            ${operator && html`<td class="actions">
                              <button type="button" data-retry-incident=${str(i.id)} onClick=${() => act('retry', { incident: str(i.id), count: 1, what: str(i.step) })}>Retry</button>
                              <button type="button" data-handle-incident=${str(i.id)} onClick=${() => act('handle', { incident: str(i.id), count: 1, what: str(i.step) })}>Handle</button>
                            </td>`}
                          </tr>`)}
                        </tbody>
                      </table>
                      ${g.instance_count > (d.incidents || []).length && html`<p class="muted">Showing ${(d.incidents || []).length} of ${fmtNumber(g.instance_count)}.</p>`}`}
                  </td>
                </tr>`}`;
            })}
          </tbody>
        </table>
      <//>
      <${Pager} hasNext=${!!(page && page.next_cursor)} atFirst=${!cursor}
        onFirst=${() => navigate('/incidents', params)}
        onNext=${() => navigate('/incidents', { ...params, cursor: page.next_cursor })} />`}

    ${dialog && html`<${ReasonDialog}
        title=${dialog.action === 'retry'
          ? (dialog.group ? `Retry ${dialog.count} incident${dialog.count === 1 ? '' : 's'}` : 'Retry this incident')
          : (dialog.group ? `Handle ${dialog.count} incident${dialog.count === 1 ? '' : 's'}` : 'Handle this incident')}
        description=${(dialog.action === 'retry'
          ? 'The failed step runs again now (a paused instance is resumed).'
          : 'Acknowledge that someone is handling it: the note is recorded as an event on the instance.') + ` (${dialog.what})`}
        reasonLabel=${dialog.action === 'retry' ? 'Reason' : 'Note'}
        okLabel=${dialog.action === 'retry' ? 'Retry' : 'Handle'}
        busy=${busy} onSubmit=${run} onClose=${() => { if (!busy) setDialog(null); }}>
      ${progress && html`<p role="status" class="muted">${progress}</p>`}
    <//>`}
  </section>`;
}

