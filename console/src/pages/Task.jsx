// One task in full: payloads, every attempt, fencing token, trace id; re-drive or cancel.
import { useContext, useState } from 'preact/hooks';
import { useRoute } from 'preact-iso';
import { get, post, useLive } from '../api.js';
import { Badge, Confirm, ErrorBox, KV, Loading } from '../components/common.jsx';
import { Payload } from '../components/Payload.jsx';
import { ago, labels, when } from '../format.js';
import { Ns, Session } from '../context.js';

const REDRIVABLE = ['DEAD_LETTERED', 'FAILED', 'CANCELLED'];
const LIVE = ['PENDING', 'QUEUED', 'RUNNING', 'RETRYING'];

export function TaskPage() {
  const ns = useContext(Ns);
  const session = useContext(Session);
  const { params } = useRoute();
  const [ask, setAsk] = useState(null);
  const { data, error, reload } = useLive(ns, () => get(`/tasks/${encodeURIComponent(params.id)}`),
    [params.id], [`task:${params.id}`]);
  if (!data) return error ? <ErrorBox error={error} /> : <Loading what="the task" />;
  const t = data.task;
  const canRetry = session.actions.RetryTask && REDRIVABLE.includes(t.state);
  const canCancel = session.actions.CancelTask && LIVE.includes(t.state);
  return (
    <div class="task-page">
      <h2>Task <code>{t.id}</code> <Badge state={t.state} /></h2>
      <ErrorBox error={error} />
      <div class="actions">
        {canRetry && <button class="primary" data-testid="retry"
          onClick={() => setAsk('retry')}>Re-drive</button>}
        {canCancel && <button class="danger" onClick={() => setAsk('cancel')}>Cancel</button>}
      </div>
      <KV rows={[
        ['Capability', t.capability],
        ['Namespace', t.namespace],
        t.workflow_id && ['Workflow', <a href={`/workflows/${t.workflow_id}`}>{t.workflow_id}</a>],
        t.step_id && ['Step', t.step_id],
        ['Attempt', `${t.attempt} of ${t.retry_policy.max_attempts} (budget)`],
        ['Fencing token', <code data-testid="fencing">{t.fencing_token}</code>],
        ['Agent', t.agent_id ? `${t.agent_name || '?'} (${t.agent_id})` : '—'],
        ['Trace id', t.trace_id ? <code data-testid="trace">{t.trace_id}</code> : '—'],
        ['Labels', labels(t.labels) || '—'],
        ['Created', when(t.create_time)],
        ['Updated', when(t.update_time)],
        t.end_time ? ['Ended', when(t.end_time)] : null,
        t.human_intervened ? ['Human action', 're-driven by an operator'] : null,
        t.failure && ['Failure', <span class="bad-text">{t.failure.error_type}: {t.failure.message}
          {t.failure.non_retryable ? ' (non-retryable)' : ''}</span>],
      ]} />
      <div class="payloads">
        <Payload label="Input" value={t.input} />
        <Payload label="Output" value={t.output} />
      </div>
      <h3>Attempts</h3>
      <table class="grid" data-testid="attempts">
        <thead><tr><th>#</th><th>Agent</th><th>Started</th><th>Took</th><th>Error</th></tr></thead>
        <tbody>
          {t.attempts.map((a) => (
            <tr>
              <td>{a.attempt}</td><td>{a.agent_name || a.agent_id}</td><td>{when(a.start_time)}</td>
              <td>{a.end_time ? ago(a.end_time - a.start_time) : 'running'}</td>
              <td class="bad-text">{a.error}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {ask && (
        <Confirm title={ask === 'retry' ? 'Re-drive this task?' : 'Cancel this task?'}
          danger={ask === 'cancel'} confirmLabel={ask === 'retry' ? 'Re-drive' : 'Cancel task'}
          body={<p>{ask === 'retry'
            ? 'It goes back to the queue with a fresh retry budget; recorded as a human action.'
            : 'A running attempt is told to stop; for a workflow step, its dependents are cancelled.'}</p>}
          onConfirm={async () => { await post(`/tasks/${t.id}/${ask}`, {}); reload(); }}
          onClose={() => setAsk(null)} />
      )}
    </div>
  );
}
