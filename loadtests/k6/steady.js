// steady: a constant arrival rate of tasks (default 10 tasks/s for 10 minutes).
//
//   k6 run -e MESH_TARGET=127.0.0.1:50051 -e MESH_NAMESPACE=k6-steady loadtests/k6/steady.js
//
// RATE (tasks/s, default 10), DURATION (default 10m); the rest is in lib/mesh.js.
// `make loadtest` runs the short form (RATE=10 DURATION=20s) with agents it starts.

import {
  SUBMIT_DELAY_S, baseline, collect, collectorScenario, envDuration, envNumber, seconds,
  submitOne, thresholds,
} from './lib/mesh.js';

const RATE = envNumber('RATE', 10);
const DURATION = envDuration('DURATION', '10m');
const DRAIN_S = seconds(envDuration('DRAIN', '60s'));
const SUBMIT_END_S = SUBMIT_DELAY_S + seconds(DURATION) + 1;

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
  },
  thresholds: thresholds({ dropped_iterations: ['count==0'] }),
};

export function setup() {
  return baseline();
}

export function submitter() {
  submitOne();
}

export function collector(data) {
  collect(data, { submitEndS: SUBMIT_END_S, drainS: DRAIN_S });
}
