// Shared parts of the k6 scenarios: one place for the mesh's gRPC calls, the
// metrics and the thresholds, so steady/spike/stress/soak differ only in how
// fast they submit.
//
// How a task is counted. Submitters only queue tasks (SubmitTask); a task is
// done when its result is back: one "collector" VU holds a WatchTasks stream
// on the run's namespace and capability and sees every task end, with the
// agent's output and the attempts' timestamps. Once the submitters have
// stopped, the collector asks the server (GetStats of the run's namespace) how
// many tasks exist and waits until each one of them has come back, or the
// drain time is over. Every task that was created but whose result did not
// come back (failed, lost, still queued) is a `task_completed` false, and the
// threshold `rate==1` fails the run.
//
// Dispatch latency is the server's own figure: the first attempt's lease time
// minus the task's create time (Task.attempts[0].start_time - Task.create_time),
// both read from the task in the watch event.
//
// Environment (every scenario):
//   MESH_TARGET      host:port[,host:port...] of the mesh (one per replica);
//                    VUs are spread over them round robin
//   MESH_NAMESPACE   namespace of this run (its agents must be there); use a
//                    fresh one per run, the counts are taken from its statistics
//   MESH_CAPABILITY  capability the agents offer (default "noop")
//   PROTO_DIR        where protos/ is (default ../../protos, from the scenario file)
//   DRAIN            longest wait, after the last submit, for results (default 60s)
//   DISPATCH_P95_MS  threshold of the dispatch p95 in ms (default 1000, stress 2500; the
//                    plan's bar is 5000 and p99 < 5000 always holds)

import { check } from 'k6';
import encoding from 'k6/encoding';
import exec from 'k6/execution';
import grpc from 'k6/net/grpc';
import { Counter, Gauge, Rate, Trend } from 'k6/metrics';
import { setTimeout } from 'k6/timers';

export const TARGETS = (__ENV.MESH_TARGET || '127.0.0.1:50051').split(',').filter((t) => t);
export const NAMESPACE = __ENV.MESH_NAMESPACE || 'default';
export const CAPABILITY = __ENV.MESH_CAPABILITY || 'noop';
const PROTO_DIR = __ENV.PROTO_DIR || '../../protos';
const SUBMIT = 'agentmesh.v1.TaskService/SubmitTask';
const STATS = 'agentmesh.v1.TaskService/GetStats';
const WATCH = 'agentmesh.v1.TaskService/WatchTasks';
const OPEN_STATES = ['PENDING', 'QUEUED', 'RUNNING', 'RETRYING'];
const ENDED = ['TASK_STATE_SUCCEEDED', 'TASK_STATE_FAILED', 'TASK_STATE_CANCELLED',
  'TASK_STATE_DEAD_LETTERED'];
/** Seconds between the collector's start and the first submit (the watch is open by then). */
export const SUBMIT_DELAY_S = 2;

export const meshErrors = new Rate('mesh_errors');
export const tasksSubmitted = new Counter('tasks_submitted');
export const tasksCreated = new Counter('tasks_created');
export const taskCompleted = new Rate('task_completed');
export const tasksFailed = new Counter('tasks_failed');
export const tasksRetried = new Counter('tasks_retried');
export const taskDispatch = new Trend('task_dispatch', true);
export const taskE2e = new Trend('task_e2e', true);
export const peakRunning = new Gauge('peak_running');

const client = new grpc.Client();
client.load([PROTO_DIR], 'agentmesh/v1/task.proto');
let connected = false;

/** Seconds in a k6 duration string ("90s", "10m", "1h", "1m30s", or a number of seconds). */
export function seconds(value) {
  if (/^\d+(\.\d+)?$/.test(String(value))) {
    return Number(value);
  }
  const units = { ms: 0.001, s: 1, m: 60, h: 3600 };
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let matched = '';
  let m = re.exec(value);
  while (m !== null) {
    total += Number(m[1]) * units[m[2]];
    matched += m[0];
    m = re.exec(value);
  }
  if (matched !== value) {
    throw new Error(`not a duration: ${value}`);
  }
  return total;
}

/** A positive number from the environment. */
export function envNumber(name, fallback) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') {
    return fallback;
  }
  const n = Number(raw);
  if (!(n > 0)) {
    throw new Error(`${name} must be a positive number, got ${raw}`);
  }
  return n;
}

/** A duration from the environment, as a k6 duration string. */
export function envDuration(name, fallback) {
  const raw = __ENV[name] || fallback;
  seconds(raw);
  return raw;
}

/** Milliseconds since the epoch of an RFC 3339 timestamp, nanoseconds kept as a fraction. */
export function millis(ts) {
  const m = /^(.*T\d\d:\d\d:\d\d)(\.\d+)?Z$/.exec(ts || '');
  if (m === null) {
    return NaN;
  }
  return Date.parse(`${m[1]}Z`) + (m[2] ? Number(`0${m[2]}`) * 1000 : 0);
}

function connect() {
  if (!connected) {
    const target = TARGETS[exec.vu.idInTest % TARGETS.length];
    client.connect(target, { plaintext: true, timeout: '10s' });
    connected = true;
  }
  return client;
}

function invoke(method, request) {
  const res = connect().invoke(method, request, { timeout: '10s' });
  const ok = res !== null && res.status === grpc.StatusOK;
  meshErrors.add(!ok);
  if (!ok) {
    console.warn(`${method}: ${res ? `status ${res.status}: ${JSON.stringify(res.error)}` : 'no response'}`);
  }
  return ok ? res.message : null;
}

function stats() {
  return invoke(STATS, { namespace: NAMESPACE });
}

function counts(message) {
  const byState = (message && message.tasksByState) || {};
  let total = 0;
  let open = 0;
  for (const [state, n] of Object.entries(byState)) {
    total += Number(n);
    if (OPEN_STATES.includes(state)) {
      open += Number(n);
    }
  }
  return { total, open };
}

/** setup(): the namespace's counts before the run; refuses to start with no live agent. */
export function baseline() {
  const message = stats();
  if (message === null) {
    throw new Error(`GetStats on ${TARGETS.join(',')} failed: is the mesh up?`);
  }
  if (Number(message.agentsLive || 0) < 1) {
    throw new Error(`no live agent in namespace ${NAMESPACE}: start agents offering ${CAPABILITY}`);
  }
  const c = counts(message);
  if (c.open > 0) {
    throw new Error(`namespace ${NAMESPACE} has ${c.open} unfinished tasks already: use a fresh one`);
  }
  return { before: c.total };
}

/** One submitter iteration: queue one task whose input the agent echoes back. */
export function submitOne() {
  const body = JSON.stringify({ vu: exec.vu.idInTest, iter: exec.vu.iterationInInstance });
  const message = invoke(SUBMIT, {
    task: {
      capability: CAPABILITY,
      namespace: NAMESPACE,
      input: {
        data: encoding.b64encode(body),
        metadata: { encoding: encoding.b64encode('json/plain') },
      },
    },
  });
  if (check(message, { 'task queued': (m) => m !== null && m.task.state !== undefined })) {
    tasksSubmitted.add(1);
  }
}

function decoded(payload) {
  if (!payload || !payload.data) {
    return null;
  }
  try {
    return JSON.stringify(JSON.parse(encoding.b64decode(payload.data, 'std', 's')));
  } catch (e) {
    return null;
  }
}

/** The most attempts that ran at once, from [start, end] pairs in milliseconds. */
export function peakOverlap(intervals) {
  const edges = [];
  for (const [start, end] of intervals) {
    edges.push([start, 1], [end, -1]);
  }
  // An attempt that ends at the instant another starts does not overlap it.
  edges.sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let now = 0;
  let peak = 0;
  for (const [, step] of edges) {
    now += step;
    peak = Math.max(peak, now);
  }
  return peak;
}

/**
 * The collector: one iteration that watches every task of the run end and,
 * from `submitEndS` seconds after it started, reconciles with the server's count.
 *
 * `expected` is the least number of tasks the run must create (the stress
 * scenario knows it exactly); `keepIntervals` records attempts for `peak_running`.
 */
export function collect(data, { submitEndS, drainS, expected = 1, keepIntervals = false }) {
  const c = connect();
  const started = Date.now();
  const seen = new Set();
  const intervals = [];
  let succeeded = 0;
  let closing = false;
  let broken = false;
  const stream = new grpc.Stream(c, WATCH, { timeout: `${Math.ceil(submitEndS + drainS + 60)}s` });

  function ended(task) {
    if (seen.has(task.name)) {
      return;
    }
    seen.add(task.name);
    const attempts = task.attempts || [];
    if (attempts.length > 1) {
      tasksRetried.add(1);
    }
    if (keepIntervals) {
      for (const a of attempts) {
        if (a.startTime && a.endTime) {
          intervals.push([millis(a.startTime), millis(a.endTime)]);
        }
      }
    }
    const created = millis(task.createTime);
    if (attempts.length > 0) {
      taskDispatch.add(millis(attempts[0].startTime) - created);
    }
    const echoed = task.state === 'TASK_STATE_SUCCEEDED' && decoded(task.output) !== null
      && decoded(task.output) === decoded(task.input);
    if (check(task, { 'result is the echoed input': () => echoed })) {
      succeeded += 1;
      taskE2e.add(millis(task.endTime) - created);
    } else {
      tasksFailed.add(1);
      console.warn(`${task.name} ended ${task.state}: ${JSON.stringify(task.failure || {})}`);
    }
  }

  stream.on('data', (response) => {
    for (const task of response.tasks || []) {
      ended(task);
    }
  });
  stream.on('error', (err) => {
    if (!closing) {
      broken = true;
      meshErrors.add(true);
      console.error(`WatchTasks broke: ${JSON.stringify(err)}`);
    }
  });
  stream.write({ namespace: NAMESPACE, capability: CAPABILITY, states: ENDED, maxBatchSize: 1000 });

  function finish(created) {
    tasksCreated.add(created);
    for (let i = 0; i < created; i += 1) {
      taskCompleted.add(i < succeeded);
    }
    if (created === 0) {
      taskCompleted.add(false);
    }
    if (keepIntervals) {
      peakRunning.add(peakOverlap(intervals));
    }
    console.log(`collector: ${created} tasks created, ${succeeded} results back, ${seen.size - succeeded} ended otherwise`);
    closing = true;
    c.close();
  }

  function reconcile() {
    const now = (Date.now() - started) / 1000;
    const message = stats();
    const { total, open } = counts(message);
    const created = total - data.before;
    const caughtUp = message !== null && open === 0 && seen.size >= created && created >= expected;
    if (caughtUp || broken || now > submitEndS + drainS) {
      finish(Math.max(created, seen.size));
    } else {
      setTimeout(reconcile, 500);
    }
  }

  setTimeout(reconcile, submitEndS * 1000);
}

/**
 * Thresholds every scenario shares: the plan's acceptance bar and ours.
 * `p95Ms` is the default dispatch p95 bar (DISPATCH_P95_MS overrides it).
 */
export function thresholds(extra = {}, p95Ms = 1000) {
  const p95 = envNumber('DISPATCH_P95_MS', p95Ms);
  return {
    mesh_errors: ['rate<0.001'],
    task_completed: ['rate==1'],
    task_dispatch: [`p(95)<${p95}`, 'p(99)<5000'],
    checks: ['rate>0.999'],
    ...extra,
  };
}

/** The collector scenario, started first and running until the drain ends. */
export function collectorScenario(submitEndS, drainS) {
  return {
    executor: 'per-vu-iterations',
    exec: 'collector',
    vus: 1,
    iterations: 1,
    maxDuration: `${Math.ceil(submitEndS + drainS + 30)}s`,
  };
}
