// Dead letters by filter: re-drive one, or all that match; the audit trail below.
import { useContext, useState } from 'preact/hooks';
import { useLocation } from 'preact-iso';
import { get, post, useLive } from '../api.js';
import { Badge, ErrorBox, Loading, Pager } from '../components/common.jsx';
import { Filters, filterParams } from '../components/Filters.jsx';
import { BulkActions } from '../components/Bulk.jsx';
import { labels, since, when } from '../format.js';
import { Ns, Session } from '../context.js';

function Audit({ ns }) {
  const { data } = useLive(ns, () => get('/audit', { namespace: ns, limit: 20 }), [ns], ['tasks', 'agents']);
  if (!data || !data.records.length) return null;
  return (
    <>
      <h3>Audit trail (this server, newest first)</h3>
      <table class="grid small" data-testid="audit">
        <thead><tr><th>When</th><th>Who</th><th>Action</th><th>Resource</th><th>Outcome</th></tr></thead>
        <tbody>
          {data.records.map((r) => (
            <tr><td>{when(r.time)}</td><td>{r.principal} ({r.role})</td><td>{r.action}</td>
              <td><code>{r.resource}</code></td><td>{r.outcome}</td></tr>
          ))}
        </tbody>
      </table>
    </>
  );
}

export function DeadLetters() {
  const ns = useContext(Ns);
  const session = useContext(Session);
  const { query, route } = useLocation();
  const filter = filterParams(query);
  delete filter.state;
  const [tokens, setTokens] = useState([]);
  const [rowError, setRowError] = useState(null);
  const token = tokens[tokens.length - 1] || '';
  const key = JSON.stringify(filter);
  const { data, error, reload } = useLive(ns,
    () => get('/dead-letters', { namespace: ns, ...filter, page_token: token }), [ns, key, token],
    ['tasks']);
  const apply = (v) => {
    setTokens([]);
    const q = new URLSearchParams(Object.entries(v).filter(([k, x]) => x && k !== 'state'));
    route(`/dead-letters${q.toString() ? `?${q}` : ''}`);
  };
  const now = Date.now() / 1000;
  const retryOne = async (id) => {
    setRowError(null);
    try { await post(`/tasks/${id}/retry`, {}); reload(); } catch (e) { setRowError(e); }
  };
  return (
    <div>
      <Filters key={key} values={filter} onApply={apply} showState={false} error={error} />
      <ErrorBox error={error} />
      <ErrorBox error={rowError} />
      <BulkActions filter={{ ...filter, state: 'DEAD_LETTERED' }} kinds={['retry']} onDone={reload} />
      {!data ? (!error && <Loading what="dead letters" />) : (
        <>
          {!data.tasks.length ? <p class="muted" data-testid="empty">No dead letters match.</p> : (
            <table class="grid" data-testid="dead-table">
              <thead><tr><th>Task</th><th>Capability</th><th>Attempts</th><th>Labels</th><th>Ended</th><th>Last error</th><th /></tr></thead>
              <tbody>
                {data.tasks.map((t) => (
                  <tr data-task={t.id}>
                    <td><a href={`/tasks/${t.id}`}>{t.step_id ? `${t.workflow_id} / ${t.step_id}` : t.id}</a> <Badge state={t.state} /></td>
                    <td>{t.capability}</td><td>{t.attempt}</td><td class="small">{labels(t.labels)}</td>
                    <td class="small">{since(t.end_time, now)}</td><td class="small bad-text">{t.error}</td>
                    <td>{session.actions.RetryTask && <button class="small-btn" data-testid="retry-one"
                      onClick={() => retryOne(t.id)}>Re-drive</button>}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
          {data.partial && <p class="muted" data-testid="partial">Read {data.scanned_up_to.toLocaleString()} tasks
            without filling the page; <em>Older →</em> reads on.</p>}
          <Pager token={data.next_page_token} atStart={!tokens.length}
            onOlder={(t) => setTokens([...tokens, t])} onNewest={() => setTokens([])} />
        </>
      )}
      <Audit ns={ns} />
    </div>
  );
}
