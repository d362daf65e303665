// Small time-series charts drawn by uPlot. Series differ by dash pattern and
// legend label as well as colour; each chart also says its latest value in text.
import uPlot from '../vendor/uplot/uPlot.esm.js';
import { html, useEffect, useRef } from './lib.js';

// Colour, dash pattern: distinguishable without colour.
export const PALETTE = [
  ['#0b5cad', []],
  ['#b3121b', [6, 3]],
  ['#146c2e', [2, 3]],
  ['#8a4b00', [10, 3, 2, 3]],
  ['#5b2d8e', [1, 2]],
  ['#4a4f57', [12, 4]],
  ['#a0300d', [4, 2, 1, 2]],
];

/**
 * A chart of `x` (unix seconds) against `series` ([{label, values, stroke?, dash?}]).
 * `summary` is the text equivalent read by screen readers and shown below.
 */
export function Chart({
  id, title, x, series, summary, height = 140, bars = false, integer = false,
}) {
  const box = useRef(null);
  const plot = useRef(null);
  const shape = series.map((s) => s.label).join('\u0000') + (bars ? '|bars' : '');
  const data = [x, ...series.map((s) => s.values)];

  useEffect(() => {
    const el = box.current;
    if (!el) return undefined;
    const width = Math.max(200, el.clientWidth || 300);
    const ink = getComputedStyle(el).color || '#1b1f24';
    const opts = {
      width,
      height,
      cursor: { drag: { x: false, y: false } },
      legend: { show: true, live: true },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
      axes: [
        { stroke: ink, grid: { stroke: 'rgba(128,128,128,0.18)' }, ticks: { stroke: 'rgba(128,128,128,0.3)' } },
        {
          stroke: ink,
          size: 44,
          grid: { stroke: 'rgba(128,128,128,0.18)' },
          ticks: { stroke: 'rgba(128,128,128,0.3)' },
          ...(integer ? { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000] } : {}),
        },
      ],
      series: [
        { label: 'time' },
        ...series.map((s, i) => {
          const [pStroke, pDash] = PALETTE[i % PALETTE.length];
          const stroke = s.stroke || pStroke;
          const dash = s.dash || pDash;
          const out = { label: s.label, stroke, width: 2, dash, points: { show: false } };
          if (bars) {
            out.paths = uPlot.paths.bars({ size: [0.7, 30] });
            out.fill = stroke + '55';
          }
          return out;
        }),
      ],
    };
    plot.current = new uPlot(opts, data, el);
    let ro;
    if (typeof ResizeObserver !== 'undefined') {
      ro = new ResizeObserver(() => {
        const w = Math.max(200, el.clientWidth);
        if (plot.current && Math.abs(plot.current.width - w) > 2) plot.current.setSize({ width: w, height });
      });
      ro.observe(el);
    }
    return () => {
      if (ro) ro.disconnect();
      if (plot.current) plot.current.destroy();
      plot.current = null;
    };
  }, [shape, height, integer]);

  useEffect(() => {
    if (plot.current) plot.current.setData(data);
  });

  return html`<figure class="chart" id=${id} aria-label=${title}>
    <figcaption>${title}</figcaption>
    <div ref=${box} class="chart-box" aria-hidden="true"></div>
    <p class="chart-summary muted">${summary}</p>
  </figure>`;
}
