// Small pieces shared by the pages.
import { useState } from 'preact/hooks';

export function Badge({ state }) {
  return <span class={`badge s-${(state || '').toLowerCase()}`} data-state={state}>{state}</span>;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return (
    <div class="error" role="alert" data-field={error.field || ''}>
      <strong>{error.code || 'Error'}</strong>: {error.message}
    </div>
  );
}

export function Loading({ what }) {
  return <p class="muted">Loading {what}…</p>;
}

export function Pager({ token, onOlder, onNewest, atStart }) {
  return (
    <div class="pager">
      <button disabled={atStart} onClick={onNewest}>Newest</button>
      <button disabled={!token} onClick={() => onOlder(token)}>Older →</button>
    </div>
  );
}

// A modal confirmation; `body` says exactly what will happen.
export function Confirm({ title, body, confirmLabel, onConfirm, onClose, danger }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const go = async () => {
    setBusy(true);
    try { await onConfirm(); onClose(); } catch (e) { setError(e); setBusy(false); }
  };
  return (
    <div class="modal-back">
      <div class="modal" role="dialog" aria-label={title}>
        <h3>{title}</h3>
        <div class="modal-body">{body}</div>
        <ErrorBox error={error} />
        <div class="modal-actions">
          <button onClick={onClose} disabled={busy}>Cancel</button>
          <button class={danger ? 'danger' : 'primary'} onClick={go} disabled={busy}
            data-testid="confirm">{confirmLabel}</button>
        </div>
      </div>
    </div>
  );
}

export function KV({ rows }) {
  return (
    <dl class="kv">
      {rows.filter(Boolean).map(([k, v]) => [<dt>{k}</dt>, <dd>{v}</dd>])}
    </dl>
  );
}
