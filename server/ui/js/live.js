// The live event tail (GET /api/v1/events/live, Server-Sent Events), read
// with fetch: the server names each message by its event type, and
// EventSource delivers named messages only to listeners registered for that
// name in advance; fetch also sends the token as an Authorization header
// instead of in the URL. Reconnects after the last position received, so no
// event is missed or repeated.
import { apiUrl, authHeaders, markOnline } from './api.js';

/** Splits an SSE text stream into messages ({id, event, data}). */
export function sseParser(onMessage) {
  let buf = '';
  return (chunk) => {
    buf = (buf + chunk).replace(/\r\n/g, '\n');
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const msg = { id: '', event: 'message', data: [] };
      for (const line of block.split('\n')) {
        if (!line || line.startsWith(':')) continue;
        const c = line.indexOf(':');
        const field = c < 0 ? line : line.slice(0, c);
        let value = c < 0 ? '' : line.slice(c + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'data') msg.data.push(value);
        else if (field === 'id') msg.id = value;
        else if (field === 'event') msg.event = value;
      }
      if (msg.data.length) onMessage({ ...msg, data: msg.data.join('\n') });
    }
  };
}

const sleep = (ms) => new Promise((r) => { setTimeout(r, ms); });

/**
 * Follows the events matching `types`/`tags` after position `after`:
 * `onEvent(EventView)` for each, `onState('connecting' | 'live' |
 * 'reconnecting' | 'stopped', detail?)`. Returns a function that stops it.
 */
export function followEvents({
  types = [], tags = [], after = 0, onEvent, onState = () => {},
}) {
  const ctl = new AbortController();
  let stopped = false;
  let last = after;
  let delay = 1000;
  (async () => {
    while (!stopped) {
      onState('connecting');
      try {
        const url = apiUrl('events/live', { after: last, types: types.join(','), tags: tags.join(',') });
        const res = await fetch(url, {
          headers: { accept: 'text/event-stream', ...authHeaders() }, signal: ctl.signal, cache: 'no-store',
        });
        markOnline(true);
        if (!res.ok) {
          let detail = `HTTP ${res.status}`;
          try { detail = (await res.json()).detail || detail; } catch { /* not a problem document */ }
          if (res.status >= 400 && res.status < 500) {
            onState('stopped', detail);
            return;
          }
          onState('reconnecting', detail);
        } else {
          onState('live');
          delay = 1000;
          const reader = res.body.getReader();
          const decoder = new TextDecoder();
          const feed = sseParser((m) => {
            const pos = Number(m.id);
            if (Number.isFinite(pos) && pos > 0) last = pos;
            let e;
            try { e = JSON.parse(m.data); } catch { return; }
            onEvent(e);
          });
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            feed(decoder.decode(value, { stream: true }));
          }
          onState('reconnecting', 'the server ended the stream');
        }
      } catch (e) {
        if (stopped || (e && e.name === 'AbortError')) return;
        markOnline(false);
        onState('reconnecting', 'server unreachable');
      }
      if (stopped) return;
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => {
    stopped = true;
    ctl.abort();
  };
}
