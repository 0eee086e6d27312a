// The task filter form; its values live in the URL so a view can be shared.
import { useState } from 'preact/hooks';

export const STATES = ['', 'PENDING', 'QUEUED', 'RUNNING', 'RETRYING', 'SUCCEEDED', 'FAILED',
  'CANCELLED', 'DEAD_LETTERED'];

export function Filters({ values, onApply, showState = true, error }) {
  const [v, setV] = useState({ ...values });
  const set = (k) => (e) => setV({ ...v, [k]: e.currentTarget.value });
  const bad = (k) => (error && error.field === k ? 'bad' : '');
  const submit = (e) => { e.preventDefault(); onApply(v); };
  return (
    <form class="filters" onSubmit={submit}>
      {showState && (
        <label>State
          <select name="state" value={v.state || ''} onChange={set('state')} class={bad('state')}>
            {STATES.map((s) => <option value={s}>{s || 'any'}</option>)}
          </select>
        </label>
      )}
      <label>Capability
        <input name="capability" value={v.capability || ''} onInput={set('capability')}
          class={bad('capability')} placeholder="any" />
      </label>
      <label>Labels
        <input name="label" value={v.label || ''} onInput={set('label')} class={bad('label')}
          placeholder="team=blue,tier=1" />
      </label>
      <label>Since
        <input name="since" value={v.since || ''} onInput={set('since')} class={bad('since')}
          placeholder="15m, 2h or 2026-01-31T03:00" />
      </label>
      <label>Until
        <input name="until" value={v.until || ''} onInput={set('until')} class={bad('until')}
          placeholder="ISO time or age" />
      </label>
      <button type="submit" class="primary">Apply</button>
    </form>
  );
}

export function filterParams(query) {
  const out = {};
  for (const k of ['state', 'capability', 'label', 'since', 'until', 'workflow']) {
    if (query[k]) out[k] = query[k];
  }
  return out;
}

export function describe(f) {
  const parts = Object.entries(f).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`);
  return parts.length ? parts.join(', ') : 'no filter (every task)';
}
