// The console shell: session, namespace, navigation, and the routed page.
import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { LocationProvider, Router, Route, useLocation } from 'preact-iso';
import { get, post, useConnected } from './api.js';
import { ErrorBox } from './components/common.jsx';
import { Ns, Session } from './context.js';
import { PAGES } from './routes.js';
import './style.css';

function Login({ onDone }) {
  const [token, setToken] = useState('');
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    try { await post('/login', { token }); onDone(); } catch (err) { setError(err); }
  };
  return (
    <form class="login" onSubmit={submit}>
      <h2>Sign in</h2>
      <p class="muted">This mesh requires a token (the same as for gRPC: <code>agentmesh auth</code>).</p>
      <input type="password" name="token" value={token} onInput={(e) => setToken(e.currentTarget.value)}
        placeholder="amt_…" autocomplete="off" />
      <button class="primary" type="submit">Sign in</button>
      <ErrorBox error={error} />
    </form>
  );
}

function NotFound() {
  return <p>No such page. <a href="/">Overview</a></p>;
}

function Header({ session, ns, setNs, onLogout }) {
  const { path } = useLocation();
  const up = useConnected(ns);
  const [draft, setDraft] = useState(ns);
  return (
    <header class="top">
      <a class="brand" href="/">agentmesh</a>
      <nav>
        {PAGES.filter((p) => p.nav).map((p) => (
          <a href={p.path} class={(p.path === '/' ? path === '/' : path.startsWith(p.path)) ? 'active' : ''}>{p.nav}</a>
        ))}
      </nav>
      <form class="ns" onSubmit={(e) => { e.preventDefault(); setNs(draft.trim() || 'default'); }}>
        <label>namespace <input value={draft} onInput={(e) => setDraft(e.currentTarget.value)} size="10" /></label>
      </form>
      <span class={`live ${up ? 'on' : 'off'}`} title="live updates (Server-Sent Events)">{up ? '● live' : '○ offline'}</span>
      {session.auth && session.principal && (
        <span class="who">{session.principal} <span class="muted">({session.role})</span>
          <button class="link" onClick={onLogout}>sign out</button></span>
      )}
    </header>
  );
}

function App() {
  const [session, setSession] = useState(null);
  const [error, setError] = useState(null);
  const [ns, setNsState] = useState(localStorage.getItem('agentmesh.ns') || 'default');
  const setNs = (v) => { localStorage.setItem('agentmesh.ns', v); setNsState(v); };
  const load = () => get('/session').then((s) => { setSession(s); setError(null); }).catch(setError);
  useEffect(() => { load(); }, []);
  if (error) return <ErrorBox error={error} />;
  if (!session) return <p class="muted">Loading…</p>;
  if (session.auth && !session.principal) return <Login onDone={load} />;
  return (
    <Session.Provider value={session}>
      <Ns.Provider value={ns}>
        <LocationProvider>
          <Header session={session} ns={ns} setNs={setNs}
            onLogout={async () => { await post('/logout'); load(); }} />
          <main key={ns}>
            <Router>
              {PAGES.map((p) => <Route path={p.path} component={p.component} />)}
              <Route default component={NotFound} />
            </Router>
          </main>
        </LocationProvider>
      </Ns.Provider>
    </Session.Provider>
  );
}

render(<App />, document.getElementById('app'));
