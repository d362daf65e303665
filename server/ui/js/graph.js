// A flow's dependency graph as SVG: dagre lays it out (left to right), this
// draws it. With an instance's steps each task shows its state (icon, text
// and colour), attempts, and its compensation: tasks whose compensate step
// ran get a second marker, and dashed reverse edges labelled "compensate"
// show the way compensation went back through the graph.
import dagre from '../vendor/dagre/dagre.esm.js';
import { html, useEffect, useMemo, useRef, useState } from './lib.js';
import { iconPath } from './ui.js';
import { str, label } from './format.js';

const CHAR_W = 7.4;    // average glyph width at the node font size
const LINE_H = 17;
const PAD_X = 12;
const PAD_Y = 10;
const MAX_NAME = 34;   // longer task names are cut with an ellipsis (full name in the tooltip)

// dagre keeps nodes in plain objects: prefix ids so no task name can be `__proto__`.
const nid = (task) => 't:' + task;

/** Aggregates several steps' statuses (TCC participants) into one. */
function aggregate(steps) {
  if (steps.length === 0) return null;
  const has = (s) => steps.some((x) => x.status === s);
  if (has('failed')) return 'failed';
  if (has('running')) return 'running';
  if (has('retry_due')) return 'retry_due';
  if (has('pending')) return 'pending';
  if (steps.every((x) => x.status === 'skipped')) return 'skipped';
  return 'succeeded';
}

/** Per task: its action state, its compensation state, attempts, participants. */
export function taskStates(steps) {
  const by = new Map();
  for (const s of steps || []) {
    const task = str(s.task);
    if (!by.has(task)) by.set(task, { action: [], compensate: [], parts: new Map() });
    const t = by.get(task);
    const key = str(s.key);
    let participant = '';
    if (key.startsWith(task + '.')) participant = key.slice(task.length + 1, key.lastIndexOf('/'));
    if (participant) {
      if (!t.parts.has(participant)) t.parts.set(participant, []);
      t.parts.get(participant).push(s);
    }
    if (s.phase === 'compensate' || s.phase === 'cancel') t.compensate.push(s);
    else t.action.push(s);
  }
  const out = new Map();
  for (const [task, t] of by) {
    const failing = [...t.action, ...t.compensate].find((s) => s.status === 'failed' || (s.status === 'retry_due' && s.error));
    out.set(task, {
      state: aggregate(t.action) || 'pending',
      compensate: aggregate(t.compensate),
      attempts: t.action.reduce((n, s) => n + (s.attempts || 0), 0),
      compensateAttempts: t.compensate.reduce((n, s) => n + (s.attempts || 0), 0),
      failing: !!failing,
      error: failing ? str(failing.error) : '',
      participants: [...t.parts].map(([name, ss]) => ({
        name,
        phases: ss.map((s) => ({ phase: s.phase, status: s.status })),
      })),
    });
  }
  return out;
}

const cut = (s, n) => (s.length > n ? s.slice(0, n - 1) + '…' : s);

/**
 * The layout: nodes with their lines of text and boxes, edges with their
 * points, the whole size. `steps` null: the definition alone.
 */
export function layoutGraph(graph, steps) {
  const nodes = (graph && graph.nodes) || [];
  const edges = (graph && graph.edges) || [];
  const states = steps ? taskStates(steps) : null;
  const g = new dagre.graphlib.Graph({ multigraph: true });
  g.setGraph({ rankdir: 'LR', nodesep: 28, ranksep: 56, edgesep: 14, marginx: 16, marginy: 16 });
  g.setDefaultEdgeLabel(() => ({}));
  const known = new Set(nodes.map((n) => str(n.id)));
  const info = new Map();
  for (const n of nodes) {
    const task = str(n.id);
    const lines = [{ text: cut(task, MAX_NAME), cls: 'node-name' }];
    let state = null;
    let st = null;
    if (states) {
      st = states.get(task) || {
        state: 'pending', compensate: null, attempts: 0, compensateAttempts: 0, failing: false, participants: [], error: '',
      };
      state = st.state;
      const attempts = st.attempts === 1 ? '1 attempt' : `${st.attempts} attempts`;
      lines.push({ text: `${state === 'pending' ? 'not started' : label(state)} · ${attempts}`, cls: 'node-state', icon: state });
      for (const p of st.participants) {
        lines.push({ text: cut(`${p.name}: ${p.phases.map((x) => `${x.phase} ${label(x.status)}`).join(', ')}`, 44), cls: 'node-sub' });
      }
      if (st.compensate) {
        const ca = st.compensateAttempts === 1 ? '1 attempt' : `${st.compensateAttempts} attempts`;
        lines.push({ text: `compensate: ${label(st.compensate)} · ${ca}`, cls: `node-comp comp-${st.compensate}`, icon: 'compensate' });
      }
    } else {
      const what = [str(n.executor)];
      if (n.compensable) what.push('compensable');
      lines.push({ text: what.join(' · '), cls: 'node-sub' });
      if (Array.isArray(n.participants) && n.participants.length) {
        lines.push({ text: cut('participants: ' + n.participants.map(str).join(', '), 44), cls: 'node-sub' });
      }
    }
    const longest = Math.max(...lines.map((l) => l.text.length + (l.icon ? 3 : 0)));
    info.set(task, {
      task, full: task, lines, state, st, executor: str(n.executor), want: Math.round(longest * CHAR_W + 2 * PAD_X),
    });
  }
  // One width for every node (columns line up), between 150 and 320.
  const width = Math.min(320, Math.max(150, ...[...info.values()].map((i) => i.want)));
  for (const i of info.values()) g.setNode(nid(i.task), { width, height: i.lines.length * LINE_H + 2 * PAD_Y });
  for (const e of edges) {
    const from = str(e.from);
    const to = str(e.to);
    if (known.has(from) && known.has(to)) g.setEdge(nid(from), nid(to), {}, 'dep');
  }
  if (states) {
    // Compensation goes back along the dependencies: from every started
    // task to each compensated task it depends on.
    for (const e of edges) {
      const from = str(e.from);
      const to = str(e.to);
      const f = states.get(from);
      const t = states.get(to);
      if (f && f.compensate && t && known.has(from) && known.has(to)) {
        g.setEdge(nid(to), nid(from), { label: 'compensate', width: 74, height: 14, labelpos: 'c' }, 'comp');
      }
    }
  }
  dagre.layout(g);
  const size = g.graph();
  return {
    width: Math.ceil(size.width || 0),
    height: Math.ceil(size.height || 0),
    nodes: g.nodes().map((v) => {
      const n = g.node(v);
      const i = info.get(v.slice(2));
      return { ...i, x: n.x, y: n.y, w: n.width, h: n.height };
    }),
    edges: g.edges().map((e) => {
      const d = g.edge(e);
      return {
        from: e.v.slice(2), to: e.w.slice(2), kind: e.name, points: d.points || [], lx: d.x, ly: d.y,
      };
    }),
  };
}

/** A smooth path through dagre's points. */
function pathOf(points) {
  if (points.length === 0) return '';
  let d = `M${points[0].x.toFixed(1)},${points[0].y.toFixed(1)}`;
  for (let i = 1; i < points.length - 1; i++) {
    const p = points[i];
    const q = points[i + 1];
    const mx = (p.x + q.x) / 2;
    const my = (p.y + q.y) / 2;
    d += ` Q${p.x.toFixed(1)},${p.y.toFixed(1)} ${mx.toFixed(1)},${my.toFixed(1)}`;
  }
  const last = points[points.length - 1];
  d += ` L${last.x.toFixed(1)},${last.y.toFixed(1)}`;
  return d;
}

function describe(layout, withState) {
  const parts = layout.nodes.map((n) => {
    if (!withState) return n.task;
    let s = `${n.task}: ${n.state === 'pending' ? 'not started' : label(n.state)}`;
    if (n.st && n.st.compensate) s += `, compensation ${label(n.st.compensate)}`;
    return s;
  });
  const deps = layout.edges.filter((e) => e.kind === 'dep').map((e) => `${e.from} before ${e.to}`);
  return `${parts.join('; ')}. ${deps.join('; ')}.`;
}

const ZOOMS = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1, 1.25, 1.5, 2];

/**
 * The graph: `svg#graph`, one `g[data-step][data-state]` per task. Wide
 * graphs keep their size (readable) and scroll; − / + / Fit zoom.
 */
export function FlowGraph({ graph, steps, caption }) {
  const layout = useMemo(() => layoutGraph(graph, steps || null), [graph, steps]);
  const frame = useRef(null);
  const [zoom, setZoom] = useState(null); // null: fit (never below 0.7, then scroll)
  const [frameW, setFrameW] = useState(0);
  useEffect(() => {
    const el = frame.current;
    if (!el) return undefined;
    const measure = () => setFrameW(el.clientWidth);
    measure();
    if (typeof ResizeObserver === 'undefined') return undefined;
    const ro = new ResizeObserver(measure);
    ro.observe(el);
    return () => ro.disconnect();
  }, []);
  const fit = frameW > 0 && layout.width > 0 ? Math.max(0.7, Math.min(1, (frameW - 4) / layout.width)) : 1;
  const scale = zoom ?? fit;
  const step = (dir) => {
    const i = ZOOMS.findIndex((z) => z >= scale - 1e-6);
    const cur = i < 0 ? ZOOMS.length - 1 : i;
    setZoom(ZOOMS[Math.min(ZOOMS.length - 1, Math.max(0, cur + dir))]);
  };
  const withState = !!steps;
  if (layout.nodes.length === 0) return html`<p class="muted">This flow has no tasks.</p>`;
  return html`<figure class="graph">
    <div class="graph-tools" role="group" aria-label="Zoom the graph">
      <button type="button" id="graph-zoom-out" onClick=${() => step(-1)} aria-label="Zoom out">−</button>
      <span class="muted" aria-live="polite">${Math.round(scale * 100)} %</span>
      <button type="button" id="graph-zoom-in" onClick=${() => step(1)} aria-label="Zoom in">+</button>
      <button type="button" id="graph-zoom-fit" onClick=${() => setZoom(null)}>Fit</button>
      ${withState && html`<span class="legend muted">
        <span class="legend-item"><svg width="26" height="8" aria-hidden="true"><line x1="0" y1="4" x2="26" y2="4" class="edge-dep" /></svg> runs before</span>
        <span class="legend-item"><svg width="26" height="8" aria-hidden="true"><line x1="0" y1="4" x2="26" y2="4" class="edge-comp" /></svg> compensate</span>
      </span>`}
    </div>
    <div class="graph-frame" ref=${frame} tabindex="0" role="region" aria-label="Flow graph (scrolls when wide)">
      <svg id="graph" xmlns="http://www.w3.org/2000/svg" viewBox=${`0 0 ${layout.width} ${layout.height}`}
          width=${Math.round(layout.width * scale)} height=${Math.round(layout.height * scale)}
          role="img" aria-labelledby="graph-title graph-desc">
        <title id="graph-title">${caption || 'Flow graph'}</title>
        <desc id="graph-desc">${describe(layout, withState)}</desc>
        <defs>
          <marker id="g-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
            <path d="M0 0L10 5L0 10z" class="arrow-dep" />
          </marker>
          <marker id="g-arrow-comp" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
            <path d="M0 0L10 5L0 10z" class="arrow-comp" />
          </marker>
        </defs>
        <g class="edges">
          ${layout.edges.map((e) => html`<g class=${'edge edge-' + e.kind} data-edge=${`${e.from}->${e.to}`} data-kind=${e.kind}>
            <path d=${pathOf(e.points)} class=${e.kind === 'comp' ? 'edge-comp' : 'edge-dep'}
              marker-end=${e.kind === 'comp' ? 'url(#g-arrow-comp)' : 'url(#g-arrow)'} />
            ${e.kind === 'comp' && e.lx !== undefined && html`<text x=${e.lx} y=${e.ly + 4} class="edge-label" text-anchor="middle">compensate</text>`}
          </g>`)}
        </g>
        <g class="nodes">
          ${layout.nodes.map((n) => html`<${Node} n=${n} withState=${withState} />`)}
        </g>
      </svg>
    </div>
  </figure>`;
}

function Node({ n, withState }) {
  const x = n.x - n.w / 2;
  const y = n.y - n.h / 2;
  const cls = ['node'];
  if (withState) cls.push('st-' + n.state);
  if (n.st && n.st.failing) cls.push('node-failing');
  if (n.st && n.st.compensate) cls.push('node-compensated');
  const attrs = { 'data-step': n.task, class: cls.join(' '), transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` };
  if (withState) {
    attrs['data-state'] = n.state;
    attrs['data-attempts'] = String(n.st ? n.st.attempts : 0);
    if (n.st && n.st.compensate) attrs['data-compensate'] = n.st.compensate;
  }
  const tip = withState && n.st
    ? `${n.full}: ${label(n.state)}, ${n.st.attempts} attempts${n.st.compensate ? `, compensation ${label(n.st.compensate)}` : ''}${n.st.error ? `\n${n.st.error}` : ''}`
    : `${n.full} (${n.executor})`;
  return html`<g ...${attrs}>
    <title>${tip}</title>
    <rect class="node-box" width=${n.w} height=${n.h} rx="7" ry="7" />
    ${n.st && n.st.compensate && html`<rect class=${'node-comp-band st-' + n.st.compensate} x="1.5" y=${n.h - LINE_H - PAD_Y + 2} width=${n.w - 3} height=${LINE_H + PAD_Y - 3.5} rx="5" />`}
    ${n.lines.map((l, i) => {
      const ly = PAD_Y + i * LINE_H + 12.5;
      if (l.icon) {
        return html`<g class=${l.cls}>
          <g transform=${`translate(${PAD_X},${ly - 11}) scale(0.8)`} class="node-icon">${iconPath(l.icon)}</g>
          <text x=${PAD_X + 17} y=${ly}>${l.text}</text>
        </g>`;
      }
      return html`<text x=${PAD_X} y=${ly} class=${l.cls}>${l.text}</text>`;
    })}
  </g>`;
}
