// Shared state: keys by prefix with their versions, and the locks held now.
import { useContext, useState } from 'preact/hooks';
import { useLocation } from 'preact-iso';
import { get, useLive } from '../api.js';
import { ErrorBox, Loading, Pager } from '../components/common.jsx';
import { Payload } from '../components/Payload.jsx';
import { ago, when } from '../format.js';
import { Ns } from '../context.js';

export function StatePage() {
  const ns = useContext(Ns);
  const { query, route } = useLocation();
  const prefix = query.prefix || '';
  const [tokens, setTokens] = useState([]);
  const token = tokens[tokens.length - 1] || '';
  const entries = useLive(ns, () => get('/state', { namespace: ns, prefix, page_token: token }),
    [ns, prefix, token], ['state']);
  const locks = useLive(ns, () => get('/locks', { namespace: ns }), [ns], ['state']);
  const now = Date.now() / 1000;
  return (
    <div>
      <form class="filters" onSubmit={(e) => {
        e.preventDefault(); setTokens([]);
        const p = new FormData(e.currentTarget).get('prefix');
        route(p ? `/state?prefix=${encodeURIComponent(p)}` : '/state');
      }}>
        <label>Key prefix <input name="prefix" value={prefix} placeholder="team/" /></label>
        <button class="primary" type="submit">Browse</button>
        <button type="button" onClick={() => { entries.reload(); locks.reload(); }}>Refresh</button>
      </form>
      <h3>Locks held</h3>
      <ErrorBox error={locks.error} />
      {!locks.data ? <Loading what="locks" /> : !locks.data.locks.length ? <p class="muted">No lock is held.</p> : (
        <table class="grid" data-testid="locks">
          <thead><tr><th>Lock</th><th>Holder</th><th>Agent</th><th>Fencing token</th><th>Expires in</th></tr></thead>
          <tbody>
            {locks.data.locks.map((l) => (
              <tr><td><code>{l.name}</code></td><td>{l.owner}</td><td>{l.agent_name || l.agent_id || '—'}</td>
                <td><code>{l.fencing_token}</code></td><td>{ago(l.expire_time - now)}</td></tr>
            ))}
          </tbody>
        </table>
      )}
      <h3>Keys {entries.data ? <span class="muted">(namespace revision {entries.data.revision})</span> : null}</h3>
      <ErrorBox error={entries.error} />
      {!entries.data ? <Loading what="keys" /> : (
        <>
          <table class="grid" data-testid="entries">
            <thead><tr><th>Key</th><th>Version</th><th>Revision</th><th>Updated</th><th>Expires</th><th>Value</th></tr></thead>
            <tbody>
              {entries.data.entries.map((e) => (
                <tr><td><code>{e.key}</code></td><td>{e.version}</td><td>{e.revision}</td>
                  <td class="small">{when(e.update_time)}</td><td class="small">{e.expire_time ? when(e.expire_time) : '—'}</td>
                  <td><details><summary>{e.value ? `${e.value.size} bytes` : '—'}</summary><Payload label="Value" value={e.value} /></details></td></tr>
              ))}
            </tbody>
          </table>
          <Pager token={entries.data.next_page_token} atStart={!tokens.length}
            onOlder={(t) => setTokens([...tokens, t])} onNewest={() => setTokens([])} />
        </>
      )}
    </div>
  );
}
