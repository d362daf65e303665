// Relays (#/relays): projections and relays with checkpoint and lag; dead
// letters, a page at a time, to replay or discard (after a confirmation).
import { html, useState } from '../lib.js';
import { api, seg } from '../api.js';
import { href, navigate } from '../router.js';
import { canOperate, useStore } from '../store.js';
import {
  ConfirmDialog, EmptyRow, ErrorBox, Loading, Notice, Pager, TableWrap, Time, usePoll,
} from '../ui.js';
import { fmtNumber, fmtSeconds, str } from '../format.js';

const PAGE = 50;

export function Relays({ route }) {
  useStore();
  const operator = canOperate();
  const relay = route.get('relay');
  const cursor = route.get('cursor');
  const [consumers, setConsumers] = useState(null);
  const [letters, setLetters] = useState(null);
  const [error, setError] = useState(null);         // of an action
  const [loadError, setLoadError] = useState(null); // of the lists
  const [notice, setNotice] = useState('');
  const [dialog, setDialog] = useState(null); // {action, id}
  const [busy, setBusy] = useState(false);

  const loadLetters = async (isCurrent = () => true) => {
    const p = await api('dead-letters', { query: { relay, cursor, limit: PAGE } });
    if (isCurrent()) setLetters(p);
  };
  usePoll(async (isCurrent) => {
    try {
      const [c] = await Promise.all([api('relays'), loadLetters(isCurrent)]);
      if (!isCurrent()) return;
      setConsumers(c);
      setLoadError(null);
    } catch (e) {
      if (isCurrent()) setLoadError(e);
    }
  }, 5000, [relay, cursor]);

  const run = async () => {
    const d = dialog;
    setBusy(true);
    try {
      await api(`dead-letters/${seg(d.id)}/${d.action}`, { method: 'POST' });
      setNotice(`Dead letter ${d.id} ${d.action === 'replay' ? 'replayed' : 'discarded'}.`);
      setDialog(null);
      await loadLetters();
    } catch (e) {
      setDialog(null);
      setError(e);
    } finally {
      setBusy(false);
    }
  };

  const items = consumers ? consumers.items || [] : [];
  const dead = letters ? letters.items || [] : [];
  const relays = items.filter((c) => c.kind === 'relay' || c.dead_letters > 0).map((c) => str(c.name));

  return html`<section>
    <h1 tabindex="-1">Projections and relays</h1>
    <${ErrorBox} error=${error || loadError} onDismiss=${() => { setError(null); setLoadError(null); }} />
    <${Notice} text=${notice} onDismiss=${() => setNotice('')} />
    ${!consumers && !loadError ? html`<${Loading} />` : consumers && html`
      <p>Head of the log: <strong id="relays-head">${fmtNumber(consumers.head)}</strong></p>
      <${TableWrap} label="Projections and relays">
        <table id="consumers">
          <thead><tr>
            <th scope="col">Name</th><th scope="col">Kind</th><th scope="col">Target</th>
            <th scope="col" class="num">Checkpoint</th><th scope="col" class="num">Lag (events)</th>
            <th scope="col" class="num">Lag (time)</th><th scope="col" class="num">Dead letters</th><th scope="col">Moved</th>
          </tr></thead>
          <tbody>
            ${items.length === 0 && html`<${EmptyRow} cols="8" text="No projection or relay is configured, and no checkpoint is stored." />`}
            ${items.map((c) => html`<tr data-consumer=${str(c.name)} key=${str(c.name)}>
              <th scope="row">${str(c.name)}</th>
              <td>${str(c.kind)}</td>
              <td>${c.target ? html`<code>${str(c.target)}</code>` : html`<span class="muted">—</span>`}</td>
              <td class="num">${fmtNumber(c.checkpoint)}</td>
              <td class=${'num' + (c.lag_events > 0 ? ' warn' : '')}>${c.lag_events === null || c.lag_events === undefined ? '—' : fmtNumber(c.lag_events)}</td>
              <td class="num">${c.lag_seconds === null || c.lag_seconds === undefined ? '—' : fmtSeconds(c.lag_seconds)}</td>
              <td class=${'num' + (c.dead_letters > 0 ? ' warn' : '')}>
                ${c.dead_letters > 0 ? html`<a href=${href('/relays', { relay: c.name })}>${fmtNumber(c.dead_letters)}</a>` : '0'}
              </td>
              <td><${Time} at=${c.updated_at} /></td>
            </tr>`)}
          </tbody>
        </table>
      <//>`}

    <h2>Dead letters ${letters && html`<span class="muted">(${fmtNumber(letters.total)} in all)</span>`}</h2>
    <form class="filters" onSubmit=${(e) => e.preventDefault()} aria-label="Filter dead letters">
      <label class="field">
        <span>Relay</span>
        <select id="dl-relay" value=${relay} onChange=${(e) => navigate('/relays', { relay: e.currentTarget.value })}>
          <option value="">All relays</option>
          ${relay && !relays.includes(relay) && html`<option value=${relay}>${relay}</option>`}
          ${relays.map((r) => html`<option value=${r}>${r}</option>`)}
        </select>
      </label>
    </form>
    ${!letters ? html`<${Loading} />` : html`
      <${TableWrap} label="Dead letters">
        <table id="dead-letter-list">
          <thead><tr>
            <th scope="col" class="num">Id</th><th scope="col">Relay</th><th scope="col" class="num">Position</th>
            <th scope="col">Message id</th><th scope="col">Error</th><th scope="col" class="num">Attempts</th>
            <th scope="col">Given up</th>${operator && html`<th scope="col">Actions</th>`}
          </tr></thead>
          <tbody>
            ${dead.length === 0 && html`<${EmptyRow} cols=${operator ? 8 : 7} text="No dead letters." />`}
            ${dead.map((d) => html`<tr data-dead-letter=${str(d.id)} key=${str(d.id)}>
              <td class="num">${str(d.id)}</td>
              <td>${str(d.relay)}</td>
              <td class="num"><a href=${href('/events', { after: Math.max(0, Number(d.position) - 1), limit: 25 })}>${str(d.position)}</a></td>
              <td><code>${str(d.message_id)}</code></td>
              <td class="error-cell">${str(d.error)}</td>
              <td class="num">${str(d.attempts)}</td>
              <td><${Time} at=${d.created_at} /></td>
              ${operator && html`<td class="actions">
                <button type="button" data-replay=${str(d.id)} onClick=${() => setDialog({ action: 'replay', id: str(d.id), relay: str(d.relay) })}>Replay</button>
                <button type="button" data-discard=${str(d.id)} class="btn-danger-outline" onClick=${() => setDialog({ action: 'discard', id: str(d.id), relay: str(d.relay) })}>Discard</button>
              </td>`}
            </tr>`)}
          </tbody>
        </table>
      <//>
      <${Pager} hasNext=${!!letters.next_cursor} atFirst=${!cursor}
        onFirst=${() => navigate('/relays', { relay })}
        onNext=${() => navigate('/relays', { relay, cursor: letters.next_cursor })} />`}

    ${dialog && html`<${ConfirmDialog}
      title=${dialog.action === 'replay' ? `Replay dead letter ${dialog.id}` : `Discard dead letter ${dialog.id}`}
      message=${dialog.action === 'replay'
        ? `It is published again through relay ${dialog.relay}; if the destination refuses it again, it stays.`
        : 'It is dropped for good: the event stays in the log, but this relay will not deliver it.'}
      okLabel=${dialog.action === 'replay' ? 'Replay' : 'Discard'} danger=${dialog.action === 'discard'} busy=${busy}
      onConfirm=${run} onClose=${() => { if (!busy) setDialog(null); }} />`}
  </section>`;
}
