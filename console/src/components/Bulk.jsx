// Re-drive or cancel every task matching the filter: a dry run counts them first,
// the dialog says how many and which filter, then the action reports what it did.
import { useContext, useState } from 'preact/hooks';
import { post } from '../api.js';
import { Confirm, ErrorBox } from './common.jsx';
import { describe } from './Filters.jsx';
import { Ns, Session } from '../context.js';

export function BulkActions({ filter, kinds, onDone }) {
  const ns = useContext(Ns);
  const session = useContext(Session);
  const [ask, setAsk] = useState(null);
  const [result, setResult] = useState(null);
  const [error, setError] = useState(null);
  const allowed = kinds.filter((k) => session.actions[k === 'retry' ? 'BulkRetryTasks' : 'BulkCancelTasks']);
  if (!allowed.length) return null;
  const path = (k) => (k === 'retry' ? '/tasks/bulk-retry' : '/tasks/bulk-cancel');
  const preview = async (kind) => {
    setError(null); setResult(null);
    try {
      const r = await post(path(kind), { namespace: ns, filter, dry_run: true });
      setAsk({ kind, count: r.count, truncated: r.truncated });
    } catch (e) { setError(e); }
  };
  const verb = (k) => (k === 'retry' ? 'Re-drive' : 'Cancel');
  return (
    <div class="bulk">
      {allowed.map((k) => (
        <button class={k === 'retry' ? 'primary' : 'danger'} onClick={() => preview(k)}
          data-testid={`bulk-${k}`}>{verb(k)} all matching</button>
      ))}
      <ErrorBox error={error} />
      {result && <div class="notice" role="status" data-testid="bulk-result">
        {result.kind === 'retry' ? 'Re-drove' : 'Cancelled'} {result.count} task(s)
        {result.truncated ? '; more matched: run it again' : ''}.</div>}
      {ask && (
        <Confirm title={`${verb(ask.kind)} ${ask.count} task(s)?`} danger={ask.kind !== 'retry'}
          confirmLabel={`${verb(ask.kind)} ${ask.count}`}
          body={<>
            <p data-testid="bulk-count">{ask.count} task(s) match {describe(filter)} now
              {ask.truncated ? ' (the first 1000; run it again for the rest)' : ''}.</p>
            <p class="muted">Each one is acted on separately and recorded in the audit trail
              with your name; tasks that change state meanwhile are skipped.</p>
          </>}
          onConfirm={async () => {
            const r = await post(path(ask.kind), { namespace: ns, filter });
            setResult({ kind: ask.kind, ...r });
            if (onDone) onDone();
          }}
          onClose={() => setAsk(null)} />
      )}
    </div>
  );
}
