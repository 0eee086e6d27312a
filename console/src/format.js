// Times and numbers as an operator reads them.
export function ago(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function when(t) {
  if (!t) return '—';
  const d = new Date(t * 1000);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

export function since(t, now) {
  if (!t) return '—';
  return `${ago(Math.max(0, now - t))} ago`;
}

export function pct(x) {
  return `${(x * 100).toFixed(1)} %`;
}

// Autonomy of a mesh where `ended` tasks ended: "n/a" before any has (the
// server reports 1 then, which is no figure: 0 of 0).
export function autonomy(share, ended) {
  return ended ? pct(share) : 'n/a';
}

export function labels(map) {
  return Object.entries(map || {}).map(([k, v]) => `${k}=${v}`).join(', ');
}
