// The fleet as cards; a hung agent stands out before it is declared gone.
import { useContext, useState } from 'preact/hooks';
import { useLocation } from 'preact-iso';
import { get, post, useLive, useNow } from '../api.js';
import { Badge, Confirm, ErrorBox, Loading } from '../components/common.jsx';
import { ago, labels } from '../format.js';
import { Ns, Session } from '../context.js';

function Card({ a, canDrain, onDrain, focus, shift }) {
  const load = a.max_concurrency ? a.in_flight / a.max_concurrency : 0;
  // The server classed it at fetch time; the age keeps growing on screen until the next push.
  const age = a.heartbeat_age === null ? null : a.heartbeat_age + Math.max(0, shift);
  const missed = a.beats_missed === null || age === null ? a.beats_missed
    : Math.floor(age / a.heartbeat_interval);
  return (
    <section class={`agent-card h-${a.health} ${focus ? 'focus' : ''}`} data-agent={a.name}
      data-health={a.health}>
      <header>
        <strong>{a.name}</strong> <Badge state={a.state} />
        {a.health === 'hung' && <span class="alarm-tag">not beating</span>}
        {a.health === 'late' && <span class="warn-tag">late</span>}
      </header>
      <div class="muted small">{a.id}</div>
      <div>{a.capabilities.map((c) => <code>{c} </code>)}</div>
      {Object.keys(a.labels).length > 0 && <div class="small">{labels(a.labels)}</div>}
      <div class="meter" title="in flight / max concurrency"><div style={{ width: `${Math.min(100, load * 100)}%` }} /></div>
      <div class="small">{a.in_flight}/{a.max_concurrency} in flight · load {a.load.toFixed(2)} ·
        heartbeat {age === null ? 'never' : `${ago(age)} ago`}
        {missed ? ` · ${missed} beat(s) missed of ${a.misses_allowed}` : ''}</div>
      {a.open_breakers.length > 0 && <div class="bad-text small">breaker open: {a.open_breakers.join(', ')}</div>}
      {canDrain && a.state === 'ACTIVE' && (
        <button class="danger small-btn" onClick={() => onDrain(a)}>Drain</button>
      )}
    </section>
  );
}

export function Agents() {
  const ns = useContext(Ns);
  const session = useContext(Session);
  const { query, route } = useLocation();
  const [draining, setDraining] = useState(null);
  const params = { namespace: ns, state: query.state || '', capability: query.capability || '' };
  const now = useNow(1000);
  const { data, error, reload, at } = useLive(ns, () => get('/agents', params),
    [ns, params.state, params.capability], ['agents']);
  const canDrain = !!session.actions.DrainAgent;
  return (
    <div>
      <form class="filters" onSubmit={(e) => {
        e.preventDefault();
        const f = new FormData(e.currentTarget);
        route(`/agents?${new URLSearchParams([...f.entries()].filter(([, v]) => v))}`);
      }}>
        <label>State
          <select name="state" value={params.state}>
            <option value="">live</option><option>ACTIVE</option><option>DRAINING</option>
            <option>GONE</option><option value="ALL">all</option>
          </select>
        </label>
        <label>Capability <input name="capability" value={params.capability} /></label>
        <button class="primary" type="submit">Apply</button>
      </form>
      <ErrorBox error={error} />
      {!data ? <Loading what="agents" /> : (
        <>
          <p class="muted">{data.agents.length} agent(s){data.truncated ? ' (first 5000)' : ''}</p>
          <div class="agent-grid">
            {data.agents.map((a) => <Card a={a} canDrain={canDrain} onDrain={setDraining}
              focus={query.focus === a.id} shift={now - at} />)}
          </div>
        </>
      )}
      {draining && (
        <Confirm title={`Drain ${draining.name}?`} danger confirmLabel="Drain"
          body={<p>{draining.name} takes no new work from now on; it finishes its
            {` ${draining.in_flight}`} running task(s) and leaves. The action is audited.</p>}
          onConfirm={async () => { await post(`/agents/${draining.id}/drain`, {}); reload(); }}
          onClose={() => setDraining(null)} />
      )}
    </div>
  );
}
