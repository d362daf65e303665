// The REST API client: every call goes to /api/v1 with the bearer token.
// Problems (RFC 9457) become ApiError with the server's code and detail; a
// failed connection becomes NetworkError and raises the offline banner until
// a request gets through again.
import { state, set, saveToken } from './store.js';

// The app's root is the folder of index.html, two levels above this module
// (ui/js/api.js): the dashboard also works behind a reverse proxy's path prefix.
const ROOT = new URL('../../', import.meta.url);

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || `HTTP ${status}`);
    this.name = 'ApiError';
    this.status = status;
    this.code = typeof problem.code === 'string' ? problem.code : 'error';
    this.detail = typeof problem.detail === 'string' ? problem.detail : `HTTP ${status}`;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
  }
}

export class NetworkError extends Error {
  constructor() {
    super('server unreachable');
    this.name = 'NetworkError';
  }
}

/** The URL of an API path with query parameters (empty and false values left out, arrays repeated). */
export function apiUrl(path, query) {
  const url = new URL('api/v1/' + path.replace(/^\/+/, ''), ROOT);
  for (const [k, v] of Object.entries(query || {})) {
    if (v === undefined || v === null || v === '' || v === false) continue;
    if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, String(x)));
    else url.searchParams.set(k, String(v));
  }
  return url;
}

export function authHeaders(token = state.token) {
  return token ? { authorization: 'Bearer ' + token } : {};
}

export function markOnline(online) {
  set({ offline: !online });
}

/** A 401 on a stored token: it no longer works; ask for one again. */
function tokenRejected() {
  const had = !!state.token;
  saveToken('');
  set({
    authNeeded: true,
    authMessage: had ? 'The token is no longer valid: sign in again.' : '',
  });
}

/**
 * Calls the API. `body` is sent as JSON. Resolves to the parsed JSON answer;
 * rejects with ApiError (an HTTP problem), NetworkError or an AbortError.
 * With an explicit `token` (the login form) a 401 does not sign out.
 */
export async function api(path, { method = 'GET', query, body, signal, token } = {}) {
  const headers = { accept: 'application/json', ...authHeaders(token ?? state.token) };
  let payload;
  if (body !== undefined) {
    headers['content-type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  let res;
  let text;
  try {
    res = await fetch(apiUrl(path, query), { method, headers, body: payload, signal, cache: 'no-store' });
    text = await res.text();
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    markOnline(false);
    throw new NetworkError();
  }
  markOnline(true);
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = null; }
  }
  if (!res.ok) {
    const problem = data && typeof data === 'object' && !Array.isArray(data)
      ? data
      : { detail: (text || res.statusText || `HTTP ${res.status}`).slice(0, 500) };
    if (res.status === 401 && token === undefined) tokenRejected();
    throw new ApiError(res.status, problem);
  }
  return data;
}

/** Path segment encoding (incident ids contain `/`). */
export const seg = (s) => encodeURIComponent(String(s));
