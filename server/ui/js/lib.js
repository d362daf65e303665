// The UI's one import of the vendored libraries: Preact and its hooks (their
// UMD builds, loaded by index.html before any module: no import map, so no
// inline script under the server's Content-Security-Policy), and htm bound to
// Preact's h (tagged templates instead of a JSX build).
import htm from '../vendor/htm/htm.module.js';

const { preact, preactHooks } = globalThis;
if (!preact || !preactHooks) throw new Error('Preact did not load (ui/vendor/preact/*.umd.js)');

export const { h, render, Fragment } = preact;
export const {
  useState, useEffect, useLayoutEffect, useRef, useMemo, useCallback, useReducer,
} = preactHooks;
export const html = htm.bind(h);
