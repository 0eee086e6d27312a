// Workflows, newest first; one workflow's DAG with each step's live state.
import { useContext, useState } from 'preact/hooks';
import { useLocation, useRoute } from 'preact-iso';
import { get, useLive } from '../api.js';
import { Badge, ErrorBox, Loading, Pager } from '../components/common.jsx';
import { Dag } from '../components/Dag.jsx';
import { since, when } from '../format.js';
import { Ns } from '../context.js';

export function Workflows() {
  const ns = useContext(Ns);
  const { query, route } = useLocation();
  const [tokens, setTokens] = useState([]);
  const token = tokens[tokens.length - 1] || '';
  const state = query.state || '';
  const { data, error } = useLive(ns,
    () => get('/workflows', { namespace: ns, state, page_token: token }), [ns, state, token],
    ['workflows', 'workflow:']);
  const now = Date.now() / 1000;
  return (
    <div>
      <form class="filters" onSubmit={(e) => e.preventDefault()}>
        <label>State
          <select value={state} onChange={(e) => { setTokens([]); route(e.currentTarget.value ? `/workflows?state=${e.currentTarget.value}` : '/workflows'); }}>
            <option value="">any</option><option>RUNNING</option><option>SUCCEEDED</option>
            <option>FAILED</option><option>CANCELLED</option>
          </select>
        </label>
      </form>
      <ErrorBox error={error} />
      {!data ? <Loading what="workflows" /> : (
        <>
          <table class="grid">
            <thead><tr><th>Workflow</th><th>Name</th><th>State</th><th>Steps</th><th>Created</th><th>Reason</th></tr></thead>
            <tbody>
              {data.workflows.map((w) => (
                <tr data-workflow={w.id}>
                  <td><a href={`/workflows/${w.id}`}>{w.id}</a></td><td>{w.name}</td>
                  <td><Badge state={w.state} /></td><td>{w.steps}</td>
                  <td class="small">{since(w.create_time, now)}</td><td class="small bad-text">{w.failure_reason}</td>
                </tr>
              ))}
            </tbody>
          </table>
          <Pager token={data.next_page_token} atStart={!tokens.length}
            onOlder={(t) => setTokens([...tokens, t])} onNewest={() => setTokens([])} />
        </>
      )}
    </div>
  );
}

export function WorkflowPage() {
  const ns = useContext(Ns);
  const { params } = useRoute();
  const { route } = useLocation();
  const { data, error } = useLive(ns, () => get(`/workflows/${encodeURIComponent(params.id)}`),
    [params.id], [`workflow:${params.id}`]);
  if (!data) return error ? <ErrorBox error={error} /> : <Loading what="the workflow" />;
  const w = data.workflow;
  const done = w.steps.filter((s) => s.state === 'SUCCEEDED').length;
  return (
    <div>
      <h2>Workflow <code>{w.id}</code> {w.name && <span class="muted">{w.name}</span>} <Badge state={w.state} /></h2>
      <p class="muted">{done} of {w.steps.length} steps succeeded · created {when(w.create_time)}
        {w.failure_reason && <span class="bad-text"> · {w.failure_reason}</span>}</p>
      <ErrorBox error={error} />
      <div class="dag-box"><Dag steps={w.steps} onOpen={(s) => route(`/tasks/${s.task_id}`)} /></div>
      <table class="grid">
        <thead><tr><th>Step</th><th>Capability</th><th>Depends on</th><th>State</th><th>Attempt</th><th>Error</th></tr></thead>
        <tbody>
          {w.steps.map((s) => (
            <tr><td><a href={`/tasks/${s.task_id}`}>{s.id}</a></td><td>{s.capability}</td>
              <td>{s.depends_on.join(', ')}</td><td><Badge state={s.state} /></td><td>{s.attempt}</td>
              <td class="bad-text small">{s.error}</td></tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
