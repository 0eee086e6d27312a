// The console API: JSON over fetch, errors that name the field, and the live stream.
import { useEffect, useRef, useState, useCallback } from 'preact/hooks';

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || 'UNKNOWN';
    this.reason = err.reason || '';
    this.field = err.field || '';
  }
}

function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== '') q.set(k, v);
  }
  const s = q.toString();
  return s ? `?${s}` : '';
}

async function parse(res) {
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

export async function get(path, params) {
  return parse(await fetch(`/api${path}${query(params)}`, { credentials: 'same-origin' }));
}

export async function post(path, body) {
  return parse(await fetch(`/api${path}`, {
    method: 'POST', credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json', 'X-AgentMesh-Console': '1' },
    body: JSON.stringify(body || {}),
  }));
}

// -- live updates: one EventSource per namespace, shared by every view -------------

const streams = new Map();

function stream(ns) {
  let s = streams.get(ns);
  if (s) return s;
  s = { listeners: new Set(), status: new Set(), connected: false, source: null };
  const source = new EventSource(`/api/events${query({ namespace: ns })}`);
  s.source = source;
  const setStatus = (up) => { s.connected = up; s.status.forEach((f) => f(up)); };
  source.addEventListener('hello', () => setStatus(true));
  source.addEventListener('change', (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    s.listeners.forEach((f) => f(msg));
  });
  source.onerror = () => setStatus(false);
  streams.set(ns, s);
  return s;
}

export function useConnected(ns) {
  const [up, setUp] = useState(false);
  useEffect(() => {
    const s = stream(ns);
    setUp(s.connected);
    s.status.add(setUp);
    return () => s.status.delete(setUp);
  }, [ns]);
  return up;
}

function matches(msg, want) {
  if (msg.many || msg.topics.includes('all')) return true;
  return msg.topics.some((t) => want.some((w) => (w.endsWith(':') ? t.startsWith(w) : t === w)));
}

// Load with `fetcher`, and load again when the server says one of `topics` changed
// (at most one request in flight; a change during it triggers one more).
export function useLive(ns, fetcher, deps, topics) {
  const [state, setState] = useState({ data: null, error: null, loading: true });
  const busy = useRef(false);
  const again = useRef(false);
  const alive = useRef(true);
  const load = useCallback(async () => {
    if (busy.current) { again.current = true; return; }
    busy.current = true;
    try {
      do {
        again.current = false;
        try {
          const data = await fetcher();
          if (alive.current) setState({ data, error: null, loading: false, at: Date.now() / 1000 });
        } catch (error) {
          if (alive.current) setState((s) => ({ data: s.data, error, loading: false }));
        }
      } while (again.current && alive.current);
    } finally { busy.current = false; }
  }, deps);
  useEffect(() => {
    alive.current = true;
    setState((s) => ({ ...s, loading: true }));
    load();
    const s = stream(ns);
    const onChange = (msg) => { if (matches(msg, topics)) load(); };
    s.listeners.add(onChange);
    return () => { alive.current = false; s.listeners.delete(onChange); };
  }, [ns, load]);
  return { ...state, reload: load };
}

// A clock that ticks every `ms` (ages on screen grow between pushes; no request is made).
export function useNow(ms = 1000) {
  const [now, setNow] = useState(Date.now() / 1000);
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now() / 1000), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}
