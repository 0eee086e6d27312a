// What an operator wants first: who is alive, what waits, what fails, what nobody can run.
import { useContext } from 'preact/hooks';
import { get, useLive } from '../api.js';
import { Badge, ErrorBox, Loading } from '../components/common.jsx';
import { ago, autonomy } from '../format.js';
import { Ns } from '../context.js';

function Throughput({ buckets }) {
  const max = Math.max(1, ...buckets.map((b) => b.succeeded + b.failed));
  const w = 6;
  return (
    <svg class="spark" viewBox={`0 0 ${buckets.length * w} 60`} preserveAspectRatio="none"
      width="100%" height="60" role="img"
      aria-label="tasks per 5 s: succeeded and failed">
      {buckets.map((b, i) => {
        const hs = (b.succeeded / max) * 56;
        const hf = (b.failed / max) * 56;
        return (
          <g key={b.time}>
            <rect x={i * w} y={60 - hs} width={w - 1} height={hs} class="ok-bar" />
            <rect x={i * w} y={60 - hs - hf} width={w - 1} height={hf} class="fail-bar" />
          </g>
        );
      })}
    </svg>
  );
}

export function Overview() {
  const ns = useContext(Ns);
  const { data, error } = useLive(ns, () => get('/overview', { namespace: ns }), [ns],
    ['tasks', 'agents', 'workflows']);
  if (!data) return error ? <ErrorBox error={error} /> : <Loading what="the overview" />;
  const a = data.agents;
  const t = data.tasks;
  const recent = data.throughput.buckets.slice(-12);
  const sum = (k, list) => list.reduce((n, b) => n + b[k], 0);
  return (
    <div class="overview">
      <ErrorBox error={error} />
      <div class="cards">
        <section class="card" data-testid="agents-card">
          <h3>Agents</h3>
          <div class="big">{a.by_state.ACTIVE}<span class="muted"> active</span></div>
          <div>{a.by_state.DRAINING} draining · {a.by_state.GONE} gone (recently)</div>
          {(a.health.hung || a.health.late) ? (
            <div class="alarm" data-testid="troubled">
              {a.health.hung || 0} not beating, {a.health.late || 0} late:{' '}
              {a.troubled.map((x) => <a href={`/agents?focus=${x.id}`}>{x.name} ({ago(x.heartbeat_age)}) </a>)}
            </div>
          ) : <div class="muted">every live agent is beating</div>}
        </section>
        <section class="card">
          <h3>Queue</h3>
          <div class="big" data-testid="queued">{t.by_state.QUEUED}<span class="muted"> queued</span></div>
          <div>{t.by_state.RUNNING} running · {t.by_state.PENDING} pending · {t.by_state.RETRYING} retrying</div>
        </section>
        <section class="card">
          <h3>Last minute</h3>
          <div class="big">{sum('succeeded', recent)}<span class="muted"> succeeded</span></div>
          <div class={sum('failed', recent) ? 'bad-text' : ''}>{sum('failed', recent)} failed · {sum('started', recent)} started</div>
          <Throughput buckets={data.throughput.buckets} />
          <div class="muted small">5 min, 5 s per bar{data.throughput.lossy ? ' · some events were missed' : ''}</div>
        </section>
        <section class="card">
          <h3>Autonomy</h3>
          <div class="big" data-testid="autonomy">{autonomy(t.autonomy, t.ended)}</div>
          <div class="muted">{t.succeeded_autonomously} of {t.ended} ended tasks without a human</div>
        </section>
        <section class={`card ${t.by_state.DEAD_LETTERED ? 'warn' : ''}`}>
          <h3>Dead letters</h3>
          <div class="big"><a href="/dead-letters" data-testid="dead-count">{t.by_state.DEAD_LETTERED}</a></div>
          <div class="muted">{t.by_state.FAILED} failed · {t.by_state.CANCELLED} cancelled</div>
        </section>
      </div>
      {data.unschedulable.length > 0 && (
        <div class="alarm" data-testid="unschedulable">
          No live agent offers: {data.unschedulable.map((c) => <code>{c} </code>)} — their tasks wait.
        </div>
      )}
      {data.breakers.length > 0 && (
        <div class="alarm" data-testid="breakers">
          Open circuit breakers: {data.breakers.map((b) => <span>{b.agent_name || b.agent_id} × {b.capability}; </span>)}
        </div>
      )}
      <h3>By capability</h3>
      <table class="grid" data-testid="capabilities">
        <thead><tr><th>Capability</th><th>Agents</th><th>Queued</th><th>Running</th><th>Retrying</th><th>Pending</th><th /></tr></thead>
        <tbody>
          {data.capabilities.map((c) => (
            <tr class={c.unschedulable ? 'row-bad' : ''}>
              <td><a href={`/tasks?capability=${encodeURIComponent(c.capability)}`}>{c.capability}</a></td>
              <td>{c.agents}</td><td>{c.queued}</td><td>{c.running}</td><td>{c.retrying}</td><td>{c.pending}</td>
              <td>{c.unschedulable ? 'unschedulable' : ''}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {data.recent_dead_letters.length > 0 && (
        <>
          <h3>Latest dead letters</h3>
          <ul class="plain">
            {data.recent_dead_letters.map((d) => (
              <li><a href={`/tasks/${d.id}`}>{d.id}</a> <Badge state={d.state} /> {d.capability} — {d.error}</li>
            ))}
          </ul>
        </>
      )}
    </div>
  );
}
