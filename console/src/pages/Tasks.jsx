// Tasks filtered by state, capability, labels and time, newest first.
import { useContext, useState } from 'preact/hooks';
import { useLocation } from 'preact-iso';
import { get, useLive } from '../api.js';
import { Badge, ErrorBox, Loading, Pager } from '../components/common.jsx';
import { Filters, filterParams } from '../components/Filters.jsx';
import { BulkActions } from '../components/Bulk.jsx';
import { labels, since } from '../format.js';
import { Ns } from '../context.js';

export function TaskTable({ tasks, now }) {
  if (!tasks.length) return <p class="muted" data-testid="empty">No task matches.</p>;
  return (
    <table class="grid" data-testid="task-table">
      <thead><tr><th>Task</th><th>State</th><th>Capability</th><th>Attempt</th><th>Labels</th><th>Created</th><th>Error</th></tr></thead>
      <tbody>
        {tasks.map((t) => (
          <tr data-task={t.id}>
            <td><a href={`/tasks/${t.id}`}>{t.step_id ? `${t.workflow_id} / ${t.step_id}` : t.id}</a></td>
            <td><Badge state={t.state} /></td><td>{t.capability}</td><td>{t.attempt}</td>
            <td class="small">{labels(t.labels)}</td><td class="small">{since(t.create_time, now)}</td>
            <td class="small bad-text">{t.error}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function Tasks() {
  const ns = useContext(Ns);
  const { query, route } = useLocation();
  const filter = filterParams(query);
  const [tokens, setTokens] = useState([]);
  const token = tokens[tokens.length - 1] || '';
  const key = JSON.stringify(filter);
  const { data, error, reload } = useLive(ns,
    () => get('/tasks', { namespace: ns, ...filter, page_token: token }), [ns, key, token],
    ['tasks']);
  const apply = (v) => {
    setTokens([]);
    const q = new URLSearchParams(Object.entries(v).filter(([, x]) => x));
    route(`/tasks${q.toString() ? `?${q}` : ''}`);
  };
  const now = Date.now() / 1000;
  const kinds = ['FAILED', 'CANCELLED', 'DEAD_LETTERED'].includes(filter.state) ? ['retry']
    : ['cancel'];
  return (
    <div>
      <Filters key={key} values={filter} onApply={apply} error={error} />
      <ErrorBox error={error} />
      <BulkActions filter={filter} kinds={kinds} onDone={reload} />
      {!data ? (!error && <Loading what="tasks" />) : (
        <>
          <TaskTable tasks={data.tasks} now={now} />
          {data.partial && <p class="muted" data-testid="partial">Read {data.scanned_up_to.toLocaleString()} tasks
            without filling the page; <em>Older →</em> reads on.</p>}
          <Pager token={data.next_page_token} atStart={!tokens.length}
            onOlder={(t) => setTokens([...tokens, t])} onNewest={() => setTokens([])} />
        </>
      )}
    </div>
  );
}
