// A workflow's DAG laid out by dagre; each step coloured by its live state.
import dagre from '@dagrejs/dagre';
import { useMemo } from 'preact/hooks';

const W = 200;
const H = 54;

export function Dag({ steps, onOpen }) {
  const layout = useMemo(() => {
    const g = new dagre.graphlib.Graph();
    g.setGraph({ rankdir: 'LR', nodesep: 24, ranksep: 56, marginx: 12, marginy: 12 });
    g.setDefaultEdgeLabel(() => ({}));
    for (const s of steps) g.setNode(s.id, { width: W, height: H });
    for (const s of steps) for (const d of s.depends_on) g.setEdge(d, s.id);
    dagre.layout(g);
    const graph = g.graph();
    return {
      width: graph.width || W, height: graph.height || H,
      nodes: steps.map((s) => ({ step: s, ...g.node(s.id) })),
      edges: g.edges().map((e) => ({ key: `${e.v}->${e.w}`, points: g.edge(e).points })),
    };
  }, [steps.map((s) => `${s.id}:${s.depends_on.join(',')}`).join('|')]);
  const byId = Object.fromEntries(steps.map((s) => [s.id, s]));
  return (
    <svg class="dag" width={layout.width} height={layout.height}
      viewBox={`0 0 ${layout.width} ${layout.height}`} role="img" aria-label="workflow graph">
      <defs>
        <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7"
          markerHeight="7" orient="auto-start-reverse">
          <path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead" />
        </marker>
      </defs>
      {layout.edges.map((e) => (
        <polyline key={e.key} class="edge" marker-end="url(#arrow)"
          points={e.points.map((p) => `${p.x},${p.y}`).join(' ')} />
      ))}
      {layout.nodes.map((n) => {
        const s = byId[n.step.id];
        return (
          <g key={s.id} class={`node s-${s.state.toLowerCase()}`} data-step={s.id}
            data-state={s.state} transform={`translate(${n.x - W / 2},${n.y - H / 2})`}
            onClick={() => onOpen(s)} role="button" tabindex="0">
            <rect width={W} height={H} rx="8" />
            <text x="10" y="21" class="node-title">{s.id}</text>
            <text x="10" y="40" class="node-sub">{s.capability} · {s.state}</text>
          </g>
        );
      })}
    </svg>
  );
}
