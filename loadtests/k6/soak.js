// soak: a long constant load (default 50 tasks/s for 1 hour) while a probe
// checks the mesh's health twice a second; `mesh_up` is the uptime seen.
//
//   k6 run -e MESH_TARGET=127.0.0.1:50051 -e MESH_NAMESPACE=k6-soak loadtests/k6/soak.js
//
// RATE (tasks/s, default 50), DURATION (default 1h), PROBE_RATE (health checks
// per second, default 2). `make loadtest` runs the short form (DURATION=20s).

import { check } from 'k6';
import exec from 'k6/execution';
import grpc from 'k6/net/grpc';
import { Rate } from 'k6/metrics';
import {
  SUBMIT_DELAY_S, TARGETS, baseline, collect, collectorScenario, envDuration, envNumber,
  seconds, submitOne, thresholds,
} from './lib/mesh.js';

const RATE = envNumber('RATE', 50);
const DURATION = envDuration('DURATION', '1h');
const PROBE_RATE = envNumber('PROBE_RATE', 2);
const DRAIN_S = seconds(envDuration('DRAIN', '60s'));
const SUBMIT_END_S = SUBMIT_DELAY_S + seconds(DURATION) + 1;

const meshUp = new Rate('mesh_up');
// Health is not in protos/: the server's reflection describes it.
const health = new grpc.Client();
let healthConnected = false;

export const options = {
  scenarios: {
    collector: collectorScenario(SUBMIT_END_S, DRAIN_S),
    submit: {
      executor: 'constant-arrival-rate',
      exec: 'submitter',
      startTime: `${SUBMIT_DELAY_S}s`,
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.max(10, RATE),
      maxVUs: Math.max(20, 3 * RATE),
    },
    probe: {
      executor: 'constant-arrival-rate',
      exec: 'probe',
      startTime: `${SUBMIT_DELAY_S}s`,
      rate: PROBE_RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: 1,
      maxVUs: 4,
    },
  },
  thresholds: thresholds({ dropped_iterations: ['count==0'], mesh_up: ['rate>=0.999'] }),
};

export function setup() {
  return baseline();
}

export function submitter() {
  submitOne();
}

/** One health check of one replica (round robin over MESH_TARGET). */
export function probe() {
  let up = false;
  try {
    if (!healthConnected) {
      health.connect(TARGETS[exec.vu.idInTest % TARGETS.length],
        { plaintext: true, reflect: true, timeout: '5s' });
      healthConnected = true;
    }
    const res = health.invoke('grpc.health.v1.Health/Check', {}, { timeout: '2s' });
    up = res.status === grpc.StatusOK && res.message.status === 'SERVING';
  } catch (e) {
    healthConnected = false;
    console.warn(`health probe: ${e}`);
  }
  check(up, { 'mesh serving': (u) => u });
  meshUp.add(up);
}

export function collector(data) {
  collect(data, { submitEndS: SUBMIT_END_S, drainS: DRAIN_S });
}
