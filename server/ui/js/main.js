// The dashboard shell: asks the server who we are (GET /api/v1/whoami), shows
// the token form when it must, the navigation, the offline banner, and the
// page of the current route.
import { html, render, useEffect, useRef, useState } from './lib.js';
import { api, ApiError, NetworkError } from './api.js';
import { useRoute } from './router.js';
import { saveToken, set, state, useStore } from './store.js';
import { ErrorBox } from './ui.js';
import { Overview } from './pages/overview.js';
import { Instances } from './pages/instances.js';
import { InstanceDetail } from './pages/instance.js';
import { Incidents } from './pages/incidents.js';
import { Flows, FlowDetail } from './pages/flows.js';
import { Events } from './pages/events.js';
import { Relays } from './pages/relays.js';

const NAV = [
  ['overview', '#/', 'Overview', (p) => p === '/'],
  ['instances', '#/instances', 'Instances', (p) => p.startsWith('/instances')],
  ['incidents', '#/incidents', 'Incidents', (p) => p.startsWith('/incidents')],
  ['flows', '#/flows', 'Flows', (p) => p.startsWith('/flows')],
  ['events', '#/events', 'Events', (p) => p.startsWith('/events')],
  ['relays', '#/relays', 'Relays', (p) => p.startsWith('/relays')],
];

/** Asks the server for our role; retries while it is unreachable. */
async function whoami() {
  for (;;) {
    try {
      const w = await api('whoami');
      set({
        role: w.role === 'reader' ? 'reader' : 'operator', tokens: !!w.tokens, authNeeded: false, booting: false,
      });
      return;
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) {
        set({ authNeeded: true, booting: false, tokens: true });
        return;
      }
      if (e instanceof ApiError && e.status === 404) {
        // A server without /whoami: assume it lets us operate; its answers decide.
        set({ role: 'operator', tokens: !!state.token, authNeeded: false, booting: false });
        return;
      }
      if (!(e instanceof NetworkError)) {
        set({ booting: false, bootError: e });
        return;
      }
      await new Promise((r) => { setTimeout(r, 2000); });
    }
  }
}

function Login() {
  const s = useStore();
  const [token, setToken] = useState('');
  const [problem, setProblem] = useState(s.authMessage || '');
  const [busy, setBusy] = useState(false);
  const input = useRef(null);
  useEffect(() => { if (input.current) input.current.focus(); }, []);
  const submit = async (e) => {
    e.preventDefault();
    const t = token.trim();
    if (!t) { setProblem('Enter a token.'); return; }
    setBusy(true);
    try {
      const w = await api('whoami', { token: t });
      saveToken(t);
      set({
        role: w.role === 'reader' ? 'reader' : 'operator', tokens: !!w.tokens, authNeeded: false, authMessage: '',
      });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) setProblem('That token is not valid.');
      else if (err instanceof NetworkError) setProblem('The server is unreachable; try again.');
      else setProblem(err.detail || err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<main id="main" class="login">
    <form class="login-box" onSubmit=${submit} aria-labelledby="login-title">
      <h1 id="login-title">dcbflow</h1>
      <p>This server needs a token: the operator token, or the read-only token to look without acting.</p>
      <input type="text" name="username" autocomplete="username" value="dcbflow" hidden />
      <label class="field">
        <span>Token</span>
        <input id="token" ref=${input} type="password" autocomplete="current-password" spellcheck="false"
          value=${token} onInput=${(e) => setToken(e.currentTarget.value)} />
      </label>
      ${problem && html`<p id="login-error" class="field-error" role="alert">${problem}</p>`}
      <button type="submit" id="login" class="btn-primary" disabled=${busy}>${busy ? 'Checking…' : 'Sign in'}</button>
      <p class="muted small">The token stays in this browser tab (session storage) until you sign out or close it.</p>
    </form>
  </main>`;
}

function signOut(e) {
  e.preventDefault();
  saveToken('');
  set({ authNeeded: true, role: null, authMessage: '' });
  location.hash = '#/';
}

function Header({ path }) {
  const s = useStore();
  return html`<header class="top">
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); const m = document.getElementById('main'); if (m) m.focus(); }}>Skip to the content</a>
    <span class="brand">dcbflow</span>
    <nav aria-label="Main">
      <ul>
        ${NAV.map(([key, to, text, active]) => html`<li>
          <a href=${to} data-nav=${key} aria-current=${active(path) ? 'page' : undefined}>${text}</a>
        </li>`)}
      </ul>
    </nav>
    <span class="who">
      ${s.role === 'reader' && html`<span class="badge st-paused" id="role" title="The read-only token: you can look, not act">read-only</span>`}
      ${s.role === 'operator' && s.tokens && html`<span class="badge" id="role">operator</span>`}
      ${s.tokens && html`<a href="#/" id="sign-out" onClick=${signOut}>sign out</a>`}
    </span>
  </header>`;
}

function Offline() {
  const s = useStore();
  if (!s.offline) return null;
  return html`<div id="offline" class="banner-offline" role="alert">
    <strong>server unreachable — retrying</strong>
    <span>What you see may be out of date.</span>
  </div>`;
}

function NotFound({ path }) {
  return html`<section><h1 tabindex="-1">Not found</h1><p>There is no page <code>${path}</code>. <a href="#/">Go to the overview.</a></p></section>`;
}

function Page({ route }) {
  const [a, b] = route.parts;
  if (!a) return html`<${Overview} />`;
  if (a === 'instances' && !b) return html`<${Instances} route=${route} />`;
  if (a === 'instances' && b && route.parts.length === 2) return html`<${InstanceDetail} id=${b} key=${b} />`;
  if (a === 'incidents' && !b) return html`<${Incidents} route=${route} />`;
  if (a === 'flows' && !b) return html`<${Flows} route=${route} />`;
  if (a === 'flows' && b && route.parts.length === 2) return html`<${FlowDetail} name=${b} route=${route} key=${b} />`;
  if (a === 'events' && !b) return html`<${Events} route=${route} />`;
  if (a === 'relays' && !b) return html`<${Relays} route=${route} />`;
  return html`<${NotFound} path=${route.path} />`;
}

const TITLES = {
  '': 'Overview', instances: 'Instances', incidents: 'Incidents', flows: 'Flows', events: 'Events', relays: 'Relays',
};

function App() {
  const s = useStore();
  const route = useRoute();
  const main = useRef(null);
  const lastPath = useRef(route.path);
  useEffect(() => { whoami(); }, []);
  useEffect(() => {
    const [a = '', b] = route.parts;
    document.title = `${b ? `${b} · ` : ''}${TITLES[a] || 'dcbflow'} · dcbflow`;
    // A new page (not new filters): move focus to its heading, for keyboard and screen reader users.
    if (lastPath.current !== route.path) {
      lastPath.current = route.path;
      requestAnimationFrame(() => {
        const h1 = main.current && main.current.querySelector('h1');
        if (h1) h1.focus({ preventScroll: true });
        window.scrollTo(0, 0);
      });
    }
  }, [route.path]);

  if (s.booting) {
    return html`<${Offline} /><main id="main" class="boot"><p class="muted" role="status">Connecting to the server…</p></main>`;
  }
  if (s.bootError) {
    return html`<main id="main" class="boot"><${ErrorBox} error=${s.bootError} /></main>`;
  }
  if (s.authNeeded) return html`<${Offline} /><${Login} />`;
  return html`
    <${Header} path=${route.path} />
    <${Offline} />
    <main id="main" ref=${main} tabindex="-1">
      <${Page} route=${route} />
    </main>`;
}

const root = document.getElementById('app');
root.textContent = '';
render(html`<${App} />`, root);
