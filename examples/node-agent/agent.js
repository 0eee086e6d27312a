#!/usr/bin/env node
// An agentmesh agent in Node.js: @grpc/grpc-js + @grpc/proto-loader, loading
// the contracts from protos/ at run time (no generated code, no SDK).
//
// It speaks the agent protocol of docs/protocol.md: RegisterAgent, then the
// Heartbeat stream (open, wait for the first ack, a beat every interval), then
// the ProcessTasks stream (open, wait for `opened`, grant credits, run each
// assignment and report it under its fencing token). A broken session is
// re-established with backoff; SIGTERM/SIGINT drain it (no more credits,
// in-flight tasks finish and are reported, then it deregisters).
//
//   node examples/node-agent/agent.js --server 127.0.0.1:50051 --name node-1
//
// It offers two capabilities:
//   shout    input {"text": "hi"}    -> output {"text": "HI", "agent": <name>}
//   wordcount input {"text": "a b"}  -> output {"words": 2}
// A handler that throws reports a retryable failure with the error's name as
// error_type; input that is not JSON (or has no "text") is reported as a
// non-retryable failure (retrying cannot help).
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync(
  ['agentmesh/v1/discovery.proto', 'agentmesh/v1/task.proto'],
  // keepCase: field names as in the .proto; longs as strings (fencing tokens
  // are int64: never round them through a JS number); oneofs: `kind` names
  // the member that is set.
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String,
    defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).agentmesh.v1;

const { values: opts } = parseArgs({
  options: {
    server: { type: 'string', default: process.env.AGENTMESH_SERVER || '127.0.0.1:50051' },
    name: { type: 'string', default: `node-agent-${process.pid}` },
    namespace: { type: 'string', default: 'default' },
    concurrency: { type: 'string', default: '4' },
    grace: { type: 'string', default: '10' },
  },
});
const MAX_CONCURRENCY = Number(opts.concurrency);
const GRACE_MS = Number(opts.grace) * 1000;

class NonRetryable extends Error {}

// The handlers: input and output are JSON, as the Python SDK writes them.
const HANDLERS = {
  shout: (input) => ({ text: String(input.text).toUpperCase(), agent: opts.name }),
  wordcount: (input) => ({ words: String(input.text).split(/\s+/).filter(Boolean).length }),
};

const JSON_ENCODING = 'json/plain';

function decodeInput(payload) {
  const encoding = payload && payload.metadata && payload.metadata.encoding
    ? payload.metadata.encoding.toString() : '';
  if (encoding !== JSON_ENCODING) throw new NonRetryable(`expected ${JSON_ENCODING}, got '${encoding}'`);
  const value = JSON.parse(payload.data.toString('utf8'));
  if (value === null || typeof value !== 'object' || !('text' in value)) {
    throw new NonRetryable('input needs a "text" field');
  }
  return value;
}

function encodeOutput(value) {
  return { metadata: { encoding: Buffer.from(JSON_ENCODING) },
           data: Buffer.from(JSON.stringify(value)) };
}

const log = (...args) => console.error(`[${opts.name}]`, ...args);
const secondsOf = (d) => Number(d.seconds) + d.nanos / 1e9;
const deadline = (s) => new Date(Date.now() + s * 1000);

const credentials = grpc.credentials.createInsecure();
const discovery = new v1.DiscoveryService(opts.server, credentials);
const tasks = new v1.TaskService(opts.server, credentials);

let stopping = false; // set by SIGTERM/SIGINT: drain, deregister, exit
let stopRequested = null;
const stopSignal = new Promise((resolve) => { stopRequested = resolve; });

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(10) },
      (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// One session: register, heartbeat, work. Resolves when the session ends.
async function runSession() {
  const registered = await unary(discovery, 'RegisterAgent', {
    agent: {
      display_name: opts.name,
      namespace: opts.namespace,
      max_concurrency: MAX_CONCURRENCY,
      capabilities: Object.keys(HANDLERS).map((name) => ({ name, version: '1' })),
      labels: { language: 'node' },
    },
  });
  const agent = registered.agent.name; // "agents/{id}"
  const token = registered.session_token;
  let intervalS = secondsOf(registered.heartbeat_interval);
  log(`registered as ${agent}; heartbeat every ${intervalS}s`);

  const running = new Map(); // task name -> { token, cancelled }
  let accepting = true; // false once this session drains (stop or server drain)
  let beatTimer = null;
  let heartbeat = null;
  let work = null;

  const ended = new Promise((resolve) => {
    const finish = (why) => { clearInterval(beatTimer); resolve(why); };

    // 1. Heartbeat stream: `open` first; the server answers with an ack at
    //    once. Only after that ack does ProcessTasks accept this session.
    heartbeat = discovery.Heartbeat();
    heartbeat.write({ open: { agent, session_token: token } });
    let opened = false;
    heartbeat.on('data', (msg) => {
      if (msg.kind === 'ack') {
        intervalS = secondsOf(msg.ack.heartbeat_interval) || intervalS;
        if (!opened) { opened = true; openWork(); }
      } else if (msg.kind === 'drain') {
        log(`server asks to drain: ${msg.drain.reason}`);
        drain(secondsOf(msg.drain.grace_period) * 1000 || GRACE_MS).then(() => finish('drained'));
      }
    });
    heartbeat.on('error', (err) => finish(`heartbeat stream: ${err.code} ${err.details}`));
    heartbeat.on('end', () => finish('heartbeat stream ended'));

    beatTimer = setInterval(() => {
      heartbeat.write({ beat: { in_flight: running.size, load: running.size / MAX_CONCURRENCY } });
    }, intervalS * 1000);

    // 2. Work stream: `open`, wait for `opened`, then grant every slot once.
    //    Each reported result or failure returns its slot, so credits are only
    //    sent again for slots freed without a report (a server cancellation).
    function openWork() {
      work = tasks.ProcessTasks();
      work.write({ open: { agent, session_token: token, ack_reports: true } });
      work.on('data', (msg) => {
        switch (msg.kind) {
          case 'opened':
            log('work stream open');
            if (accepting) work.write({ credit: { count: MAX_CONCURRENCY } });
            break;
          case 'assignment':
            start(msg.assignment);
            break;
          case 'assignments':
            msg.assignments.assignments.forEach(start);
            break;
          case 'cancellation': {
            const entry = running.get(msg.cancellation.task);
            if (entry && entry.token === msg.cancellation.fencing_token) {
              entry.cancelled = true; // its result will not be sent
              running.delete(msg.cancellation.task);
              if (accepting) work.write({ credit: { count: 1 } });
            }
            break;
          }
          case 'ack':
            if (msg.ack.outcome !== 'TASK_REPORT_OUTCOME_ACCEPTED') {
              log(`report for ${msg.ack.task} (token ${msg.ack.fencing_token}) refused: ${msg.ack.outcome}`);
            }
            break;
          default:
            break;
        }
      });
      // FAILED_PRECONDITION (SESSION_ENDED / NO_HEARTBEAT_SESSION): register again.
      work.on('error', (err) => finish(`work stream: ${err.code} ${err.details}`));
      work.on('end', () => finish('work stream ended'));
    }

    function start(assignment) {
      const task = assignment.task;
      const entry = { token: assignment.fencing_token, cancelled: false };
      if (!accepting) return; // left leased: the session's end requeues it at once
      running.set(task.name, entry);
      Promise.resolve().then(() => {
        const handler = HANDLERS[task.capability];
        if (!handler) throw new NonRetryable(`no handler for ${task.capability}`);
        return handler(decodeInput(task.input), task);
      }).then((output) => {
        if (entry.cancelled) return;
        work.write({ result: { task: task.name, fencing_token: entry.token,
                               output: encodeOutput(output) } });
      }, (err) => {
        if (entry.cancelled) return;
        work.write({ failure: { task: task.name, fencing_token: entry.token, failure: {
          error_type: err instanceof NonRetryable ? 'InvalidInput' : (err.name || 'Error'),
          message: String(err.message || err).slice(0, 512),
          non_retryable: err instanceof NonRetryable } } });
      }).finally(() => {
        if (running.get(task.name) === entry) running.delete(task.name);
      });
    }
  });

  // 3. Drain: no more credits; wait for in-flight tasks (up to the grace
  //    period), half-close the work stream and wait for the server to end it
  //    (it handles every report first), then deregister.
  let drained = null;
  function drain(graceMs) {
    drained = drained || drainNow(graceMs);
    return drained;
  }
  async function drainNow(graceMs) {
    accepting = false;
    const until = Date.now() + graceMs;
    while (running.size && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    if (work) {
      const closed = new Promise((r) => { work.on('end', r); work.on('error', r); });
      work.end();
      await Promise.race([closed, new Promise((r) => setTimeout(r, 2000))]);
    }
  }

  let sessionOver = false;
  const stopped = stopSignal.then(async () => {
    if (sessionOver) return 'over';
    await drain(GRACE_MS);
    return 'stopped';
  });
  const why = await Promise.race([ended, stopped]);
  sessionOver = true;
  if (stopping) {
    // Deregister while the heartbeat stream is still open: closing it first
    // would already have marked the agent GONE.
    await unary(discovery, 'DeregisterAgent', { name: agent, session_token: token })
      .then(() => log('deregistered'), (err) => log(`deregister: ${err.details}`));
  }
  clearInterval(beatTimer);
  if (heartbeat) heartbeat.cancel();
  if (work) work.cancel();
  return why;
}

async function main() {
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => { stopping = true; stopRequested(); });
  }
  let attempt = 0;
  while (!stopping) {
    try {
      const why = await runSession();
      log(`session ended: ${why}`);
      attempt = 0;
    } catch (err) {
      log(`session failed: ${err.code} ${err.details || err.message}`);
    }
    if (stopping) break;
    // Jittered exponential backoff, capped at 5 s, before registering again.
    const delay = Math.random() * Math.min(5000, 100 * 2 ** attempt++);
    await Promise.race([new Promise((r) => setTimeout(r, delay)), stopSignal]);
  }
  discovery.close();
  tasks.close();
  log('stopped');
}

main();
