// Instances (#/instances): filtered by flow, status, business key (search as
// you type) and start time, cursor pages, every filter in the URL; bulk retry
// and abort of the filtered set after a dry run and a confirmation.
import { html, useEffect, useRef, useState } from '../lib.js';
import { api } from '../api.js';
import { href, navigate } from '../router.js';
import { canOperate, getActor, useStore } from '../store.js';
import {
  ConfirmDialog, EmptyRow, ErrorBox, INSTANCE_STATUSES, Loading, Notice, Pager, Status, TableWrap, Time,
  useDebounced, usePoll,
} from '../ui.js';
import {
  isoToLocalInput, label, localInputToIso, short, str,
} from '../format.js';

const PAGE = 50;

/** The filter of the URL's params, as the API's list parameters. */
export function filterOf(route) {
  const f = {
    flow: route.get('flow'),
    status: route.get('status'),
    q: route.get('q'),
    started_after: route.get('after'),
    started_before: route.get('before'),
  };
  // The bulk endpoint takes the filter as JSON: leave out what is not set.
  return Object.fromEntries(Object.entries(f).filter(([, v]) => v));
}

/** Loads the flows for the flow filter (the first page of up to 500, by name). */
export function useFlowNames() {
  const [names, setNames] = useState([]);
  useEffect(() => {
    let live = true;
    api('flows', { query: { limit: 500 } })
      .then((p) => { if (live) setNames((p.items || []).map((f) => str(f.name))); })
      .catch(() => {});
    return () => { live = false; };
  }, []);
  return names;
}

export function Instances({ route }) {
  useStore();
  const operator = canOperate();
  const params = {
    flow: route.get('flow'),
    status: route.get('status'),
    q: route.get('q'),
    after: route.get('after'),
    before: route.get('before'),
  };
  const cursor = route.get('cursor');
  const flows = useFlowNames();
  const [page, setPage] = useState(null);
  const [error, setError] = useState(null);         // of an action
  const [loadError, setLoadError] = useState(null); // of the list
  const [notice, setNotice] = useState('');
  const [bulk, setBulk] = useState(null); // {operation, matched}
  const [busy, setBusy] = useState(false);

  // The key box: typed text goes to the URL (q) once it rests for 250 ms.
  const [keyText, setKeyText] = useState(params.q);
  const typed = useRef(false);
  const debounced = useDebounced(keyText, 250);
  useEffect(() => {
    if (!typed.current) return;
    if (debounced !== params.q) {
      navigate('/instances', { ...params, q: debounced, cursor: '' }, { replace: true });
    }
  }, [debounced]);
  useEffect(() => {
    // The URL changed from outside (back button, a link): show its q.
    if (params.q !== debounced) { typed.current = false; setKeyText(params.q); }
  }, [params.q]);

  const go = (patch) => navigate('/instances', { ...params, ...patch, cursor: '' });
  const key = JSON.stringify([params, cursor]);

  usePoll(async (isCurrent) => {
    try {
      const p = await api('instances', {
        query: { ...filterOf(route), cursor, limit: PAGE },
      });
      if (!isCurrent()) return;
      setPage(p);
      setLoadError(null);
    } catch (e) {
      if (isCurrent()) setLoadError(e);
    }
  }, 5000, [key]);

  const startBulk = async (operation) => {
    if (busy) return;
    setError(null);
    setNotice('');
    setBusy(true);
    try {
      const r = await api('instances/bulk', {
        method: 'POST',
        body: {
          operation, filter: filterOf(route), dry_run: true, actor: getActor(), reason: 'dry run: count the instances',
        },
      });
      setBulk({ operation, matched: r.matched });
    } catch (e) {
      setError(e);
    } finally {
      setBusy(false);
    }
  };

  const runBulk = async (reason, actor) => {
    setBusy(true);
    try {
      const r = await api('instances/bulk', {
        method: 'POST',
        body: {
          operation: bulk.operation, filter: filterOf(route), dry_run: false, actor, reason,
        },
      });
      const refused = Array.isArray(r.refused) ? r.refused : [];
      setNotice(`${label(bulk.operation)}: acted on ${r.acted} of ${r.matched} instances`
        + (refused.length ? `; ${refused.length} left alone (${[...new Set(refused.map((x) => str(x.code)))].join(', ')}).` : '.'));
      setBulk(null);
      const p = await api('instances', { query: { ...filterOf(route), cursor, limit: PAGE } });
      setPage(p);
    } catch (e) {
      setBulk(null);
      setError(e);
    } finally {
      setBusy(false);
    }
  };

  const items = page ? page.items || [] : [];
  const filtered = !!(params.flow || params.status || params.q || params.after || params.before);

  return html`<section>
    <h1 tabindex="-1">Instances</h1>
    <form class="filters" role="search" aria-label="Filter instances" onSubmit=${(e) => e.preventDefault()}>
      <label class="field">
        <span>Flow</span>
        <select id="f-flow" value=${params.flow} onChange=${(e) => go({ flow: e.currentTarget.value })}>
          <option value="">All flows</option>
          ${params.flow && !flows.includes(params.flow) && html`<option value=${params.flow}>${params.flow}</option>`}
          ${flows.map((f) => html`<option value=${f}>${f}</option>`)}
        </select>
      </label>
      <label class="field">
        <span>Status</span>
        <select id="f-status" value=${params.status} onChange=${(e) => go({ status: e.currentTarget.value })}>
          <option value="">Any status</option>
          ${INSTANCE_STATUSES.map((s) => html`<option value=${s}>${label(s)}</option>`)}
        </select>
      </label>
      <label class="field">
        <span>Business key contains</span>
        <input id="f-key" type="search" value=${keyText} placeholder="e.g. o-1" autocomplete="off"
          onInput=${(e) => { typed.current = true; setKeyText(e.currentTarget.value); }} />
      </label>
      <label class="field">
        <span>Started after</span>
        <input id="f-after" type="datetime-local" value=${isoToLocalInput(params.after)}
          onChange=${(e) => go({ after: localInputToIso(e.currentTarget.value) })} />
      </label>
      <label class="field">
        <span>Started before</span>
        <input id="f-before" type="datetime-local" value=${isoToLocalInput(params.before)}
          onChange=${(e) => go({ before: localInputToIso(e.currentTarget.value) })} />
      </label>
      ${filtered && html`<a class="btn" id="f-clear" href="#/instances">Clear filters</a>`}
    </form>

    ${operator && html`<div class="toolbar" role="group" aria-label="Act on every instance matching the filter">
      <button type="button" id="bulk-retry" onClick=${() => startBulk('retry')} aria-busy=${busy ? 'true' : undefined}>Retry all matching…</button>
      <button type="button" id="bulk-abort" class="btn-danger-outline" onClick=${() => startBulk('abort')} aria-busy=${busy ? 'true' : undefined}>Abort all matching…</button>
      <span class="muted">acts on every instance the filter matches, not only this page</span>
    </div>`}

    <${ErrorBox} error=${error || loadError} onDismiss=${() => { setError(null); setLoadError(null); }} />
    <${Notice} text=${notice} onDismiss=${() => setNotice('')} />

    ${!page && !loadError ? html`<${Loading} />` : html`
      <${TableWrap} label="Instances">
        <table id="instances">
          <thead><tr>
            <th scope="col">Business key</th><th scope="col">Status</th><th scope="col">Flow</th>
            <th scope="col">Version</th><th scope="col">Started</th><th scope="col">Updated</th><th scope="col">Instance</th>
          </tr></thead>
          <tbody>
            ${items.length === 0 && html`<${EmptyRow} cols="7" text=${filtered ? 'No instance matches the filter.' : 'No instances yet.'} />`}
            ${items.map((r) => {
              const link = href('/instances/' + encodeURIComponent(str(r.id)));
              return html`<tr data-instance=${str(r.id)} data-status=${str(r.status)} key=${str(r.id)}>
                <td>${r.business_key ? html`<a href=${link}>${str(r.business_key)}</a>` : html`<span class="muted">—</span>`}</td>
                <td data-status=${str(r.status)}><${Status} status=${r.status} /></td>
                <td>${str(r.flow)}</td>
                <td><code title=${str(r.definition_version)}>${short(r.definition_version)}</code></td>
                <td><${Time} at=${r.started_at} /></td>
                <td><${Time} at=${r.updated_at} /></td>
                <td><a href=${link} title=${str(r.id)}><code>${short(r.id)}</code></a></td>
              </tr>`;
            })}
          </tbody>
        </table>
      <//>
      <${Pager} hasNext=${!!(page && page.next_cursor)} atFirst=${!cursor}
        onFirst=${() => navigate('/instances', params)}
        onNext=${() => navigate('/instances', { ...params, cursor: page.next_cursor })}>
        <span class="muted">${items.length} on this page${cursor ? ' (not the first)' : ''}</span>
      <//>`}

    ${bulk && html`<${ConfirmDialog}
      title=${bulk.operation === 'retry' ? 'Retry every matching instance' : 'Abort every matching instance'}
      count=${bulk.matched}
      countLabel=${`instance${bulk.matched === 1 ? '' : 's'} match the filter${filtered ? '' : ' (no filter: all instances)'}.`}
      message=${bulk.operation === 'retry'
        ? 'Each one\'s failed or waiting step is retried now; instances where that does not apply are left alone and listed.'
        : 'Each one stops starting tasks and compensates what completed. This cannot be undone.'}
      withReason danger=${bulk.operation === 'abort'} busy=${busy}
      okLabel=${bulk.operation === 'retry' ? `Retry ${bulk.matched}` : `Abort ${bulk.matched}`}
      onConfirm=${runBulk} onClose=${() => { if (!busy) setBulk(null); }} />`}
  </section>`;
}
