// Application-wide state: who is signed in, what they may do, whether the
// server answers. Components read it with useStore() and re-render on change.
import { useEffect, useReducer } from './lib.js';

const TOKEN_KEY = 'dcbflow.token';
const ACTOR_KEY = 'dcbflow.actor';

function storedToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch { return ''; }
}

export const state = {
  booting: true,      // whoami not answered yet
  token: storedToken(),
  role: null,         // 'operator' | 'reader'
  tokens: null,       // whether the server runs with tokens
  authNeeded: false,  // show the login form
  authMessage: '',    // why (a token that stopped working)
  offline: false,     // the last request failed with a network error
};

const listeners = new Set();

/** Merges `patch` into the state and re-renders its readers if anything changed. */
export function set(patch) {
  let changed = false;
  for (const [k, v] of Object.entries(patch)) {
    if (state[k] !== v) { state[k] = v; changed = true; }
  }
  if (changed) for (const f of [...listeners]) f();
}

/** The state; the component re-renders when it changes. */
export function useStore() {
  const [, bump] = useReducer((n) => n + 1, 0);
  useEffect(() => {
    listeners.add(bump);
    return () => listeners.delete(bump);
  }, []);
  return state;
}

export function canOperate() {
  return state.role === 'operator';
}

export function saveToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lives in memory only */ }
  set({ token });
}

/** The operator name sent as `actor`, remembered in localStorage. */
export function getActor() {
  try { return localStorage.getItem(ACTOR_KEY) || 'dashboard'; } catch { return 'dashboard'; }
}

export function saveActor(actor) {
  try { localStorage.setItem(ACTOR_KEY, actor); } catch { /* not remembered */ }
}
