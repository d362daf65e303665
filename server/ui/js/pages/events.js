// Events (#/events): read the log by types and tags, forwards or backwards,
// a page at a time; follow it live (new rows at the top when reading
// backwards, at the bottom when forwards); click a tag to filter by it.
import {
  html, useEffect, useRef, useState,
} from '../lib.js';
import { api } from '../api.js';
import { href, navigate } from '../router.js';
import { followEvents } from '../live.js';
import {
  EmptyRow, ErrorBox, JsonDetails, Loading, Pager, TableWrap, Time, usePoll,
} from '../ui.js';
import { short, splitList, str } from '../format.js';

const LIMITS = [25, 50, 100, 200];
const LIVE_MAX = 500;
const LIVE_WORDS = {
  connecting: 'connecting…', live: 'connected', reconnecting: 'reconnecting…', stopped: 'stopped',
};

export function Events({ route }) {
  const types = route.get('types');
  const tags = route.get('tags');
  const backwards = route.get('backwards') === '1';
  const follow = route.get('follow') === '1';
  const after = route.get('after');
  const limit = LIMITS.includes(Number(route.get('limit'))) ? Number(route.get('limit')) : 50;
  const params = {
    types, tags, backwards, follow, limit: limit === 50 ? '' : limit,
  };

  const [typesText, setTypesText] = useState(types);
  const [tagsText, setTagsText] = useState(tags);
  useEffect(() => { setTypesText(types); }, [types]);
  useEffect(() => { setTagsText(tags); }, [tags]);

  const [page, setPage] = useState(null);
  const [error, setError] = useState(null);
  const [live, setLive] = useState([]);
  const [liveState, setLiveState] = useState('');

  // The log's head when the page was read: following starts after it, so an
  // event appended between reading the page and ticking "Follow live" is not missed.
  const headAtLoad = useRef(null);
  const [loaded, setLoaded] = useState(false);
  usePoll(async (isCurrent) => {
    try {
      const [p, h] = await Promise.all([
        api('events', {
          query: {
            types: splitList(types).join(','), tags: splitList(tags).join(','), after, limit, backwards: backwards ? 'true' : '',
          },
        }),
        api('events', { query: { backwards: 'true', limit: 1 } }),
      ]);
      if (!isCurrent()) return;
      headAtLoad.current = h.events && h.events.length ? Number(h.events[0].position) : 0;
      setPage(p);
      setLoaded(true);
      setError(null);
    } catch (e) {
      if (isCurrent()) setError(e);
    }
  }, 0, [types, tags, backwards, after, limit]);

  useEffect(() => {
    setLive([]);
    if (!follow) { setLiveState(''); return undefined; }
    if (!loaded) { setLiveState('connecting'); return undefined; }
    const stop = followEvents({
      types: splitList(types),
      tags: splitList(tags),
      after: headAtLoad.current || 0,
      onEvent: (e) => setLive((l) => (backwards ? [e, ...l].slice(0, LIVE_MAX) : [...l, e].slice(-LIVE_MAX))),
      onState: (st, detail) => setLiveState((LIVE_WORDS[st] || st) + (detail ? ` (${detail})` : '')),
    });
    return stop;
  }, [follow, types, tags, backwards, loaded]);

  const submit = (e) => {
    e.preventDefault();
    navigate('/events', {
      ...params, types: splitList(typesText).join(','), tags: splitList(tagsText).join(','),
    });
  };

  const paged = page ? page.events || [] : [];
  const seen = new Set(paged.map((x) => x.position));
  const fresh = live.filter((x) => !seen.has(x.position));
  const rows = backwards ? [...fresh, ...paged] : [...paged, ...fresh];
  const freshSet = new Set(fresh.map((x) => x.position));

  return html`<section>
    <h1 tabindex="-1">Events</h1>
    <form class="filters" role="search" aria-label="Query events" onSubmit=${submit}>
      <label class="field">
        <span>Types (any of, comma-separated)</span>
        <input id="q-types" type="text" value=${typesText} placeholder="FlowStarted, FlowFailed"
          onInput=${(e) => setTypesText(e.currentTarget.value)} />
      </label>
      <label class="field">
        <span>Tags (all of, comma-separated)</span>
        <input id="q-tags" type="text" value=${tagsText} placeholder="flow:order_saga"
          onInput=${(e) => setTagsText(e.currentTarget.value)} />
      </label>
      <label class="field">
        <span>Per page</span>
        <select id="q-limit" value=${String(limit)} onChange=${(e) => navigate('/events', { ...params, limit: e.currentTarget.value, after: '' })}>
          ${LIMITS.map((n) => html`<option value=${String(n)}>${n}</option>`)}
        </select>
      </label>
      <button type="submit" id="q-run" class="btn-primary">Query</button>
      <label class="check">
        <input id="q-backwards" type="checkbox" checked=${backwards}
          onChange=${(e) => navigate('/events', { ...params, backwards: e.currentTarget.checked, after: '' })} />
        <span>Newest first</span>
      </label>
      <label class="check">
        <input id="follow" type="checkbox" checked=${follow}
          onChange=${(e) => navigate('/events', { ...params, after, follow: e.currentTarget.checked })} />
        <span>Follow live</span>
      </label>
      ${(types || tags) && html`<a class="btn" id="q-clear" href=${href('/events', { backwards, follow })}>Clear</a>`}
    </form>
    ${follow && html`<p id="live-state" class="muted" role="status">Live: ${liveState || 'starting'}${fresh.length ? ` · ${fresh.length} new` : ''} (new events appear at the ${backwards ? 'top' : 'bottom'})</p>`}

    <${ErrorBox} error=${error} onDismiss=${() => setError(null)} />

    ${!page && !error ? html`<${Loading} />` : html`
      <${TableWrap} label="Events">
        <table id="events">
          <thead><tr>
            <th scope="col" class="num">Position</th><th scope="col">Type</th><th scope="col">Tags</th>
            <th scope="col">Recorded</th><th scope="col">Transaction</th><th scope="col">Payload</th>
          </tr></thead>
          <tbody>
            ${rows.length === 0 && html`<${EmptyRow} cols="6" text="No event matches." />`}
            ${rows.map((e) => html`<tr data-position=${str(e.position)} key=${str(e.position)} class=${freshSet.has(e.position) ? 'fresh' : ''}>
              <td class="num">${str(e.position)}${freshSet.has(e.position) && html` <span class="tag-new">new</span>`}</td>
              <td><code>${str(e.type)}</code></td>
              <td class="tags">${(Array.isArray(e.tags) ? e.tags : []).map((t) => html`<a class="tag" data-tag=${str(t)}
                  href=${href('/events', { tags: str(t), backwards, follow })} title=${`Only events tagged ${str(t)}`}>${str(t)}</a> `)}</td>
              <td><${Time} at=${e.recorded_at} /></td>
              <td><code>${str(e.transaction_id)}</code>${e.id && html`<br /><span class="muted" title=${`idempotency id ${str(e.id)}`}>id ${short(e.id)}</span>`}</td>
              <td><${JsonDetails} value=${e.metadata === undefined ? e.data : { data: e.data, metadata: e.metadata }} /></td>
            </tr>`)}
          </tbody>
        </table>
      <//>
      <${Pager} hasNext=${!!(page && page.next)} atFirst=${!after}
        onFirst=${() => navigate('/events', params)}
        onNext=${() => navigate('/events', { ...params, after: page.next })} />`}
  </section>`;
}
