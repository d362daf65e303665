// Hash routing: `#/instances?flow=order_saga&status=failed` names a page and
// its filters, so every view is shareable and the back button works.
import { useEffect, useReducer } from './lib.js';

const listeners = new Set();
const notify = () => { for (const f of [...listeners]) f(); };
window.addEventListener('hashchange', notify);
window.addEventListener('popstate', notify);

/** The current route: path ('/instances/abc'), its decoded parts and params. */
export function currentRoute() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const q = raw.indexOf('?');
  const pathPart = q < 0 ? raw : raw.slice(0, q);
  const query = q < 0 ? '' : raw.slice(q + 1);
  const parts = pathPart.split('/').filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch { return p; }
  });
  const params = new URLSearchParams(query);
  return { path: '/' + parts.join('/'), parts, params, get: (k) => params.get(k) || '' };
}

/** `#<path>?<params>`: empty, null and false params are left out. */
export function href(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v === undefined || v === null || v === '' || v === false) continue;
    q.set(k, v === true ? '1' : String(v));
  }
  const s = q.toString();
  return '#' + path + (s ? '?' + s : '');
}

/** Goes to a route; `replace` rewrites the current history entry (typing in a search box). */
export function navigate(path, params, { replace = false } = {}) {
  const target = href(path, params);
  if (target === location.hash || (target === '#/' && !location.hash)) return;
  if (replace) {
    history.replaceState(history.state, '', target);
    notify();
  } else {
    location.hash = target;
  }
}

/** The current route; the component re-renders when it changes. */
export function useRoute() {
  const [, bump] = useReducer((n) => n + 1, 0);
  useEffect(() => {
    listeners.add(bump);
    return () => listeners.delete(bump);
  }, []);
  return currentRoute();
}

/** A path segment, encoded. */
export const enc = (s) => encodeURIComponent(String(s));
