// A payload shown safely: text nodes only (never HTML), JSON pretty, bytes as hex.
export function Payload({ value, label }) {
  if (!value) return <p class="muted">{label}: none</p>;
  const head = (
    <div class="payload-head">
      <strong>{label}</strong>
      <span class="muted"> {value.size} bytes{value.encoding ? ` · ${value.encoding}` : ''}
        {value.kind === 'binary' ? ' · binary' : ''}
        {value.truncated ? ' · truncated: first 64 KiB shown' : ''}</span>
    </div>
  );
  if (value.kind === 'empty') return <div class="payload">{head}<p class="muted">empty</p></div>;
  if (value.kind === 'binary') {
    return (
      <div class="payload">{head}
        <pre class="code" data-kind="binary">{value.hex}</pre>
        <details><summary>base64</summary><pre class="code">{value.base64}</pre></details>
      </div>
    );
  }
  return <div class="payload">{head}<pre class="code" data-kind={value.kind}>{value.text}</pre></div>;
}
