// spike: a base arrival rate, a sudden rise to a peak, the peak held, and back.
//
//   k6 run -e MESH_TARGET=127.0.0.1:50051 -e MESH_NAMESPACE=k6-spike loadtests/k6/spike.js
//
// BASE_RATE (tasks/s, default 10), PEAK_RATE (default 100), BASE_DURATION (each
// side of the spike, default 2m), RAMP (default 10s), PEAK_DURATION (default 3m).
// `make loadtest` runs the short form (BASE_DURATION=10s RAMP=5s PEAK_DURATION=10s).
// Every task must still complete and dispatch stay under the bar through the spike.

import {
  SUBMIT_DELAY_S, baseline, collect, collectorScenario, envDuration, envNumber, seconds,
  submitOne, thresholds,
} from './lib/mesh.js';

const BASE = envNumber('BASE_RATE', 10);
const PEAK = envNumber('PEAK_RATE', 100);
const BASE_DURATION = envDuration('BASE_DURATION', '2m');
const RAMP = envDuration('RAMP', '10s');
const PEAK_DURATION = envDuration('PEAK_DURATION', '3m');
const DRAIN_S = seconds(envDuration('DRAIN', '60s'));
const STAGES = [
  { target: BASE, duration: BASE_DURATION },
  { target: PEAK, duration: RAMP },
  { target: PEAK, duration: PEAK_DURATION },
  { target: BASE, duration: RAMP },
  { target: BASE, duration: BASE_DURATION },
];
const SUBMIT_END_S = SUBMIT_DELAY_S + STAGES.reduce((s, st) => s + seconds(st.duration), 0) + 1;

export const options = {
  scenarios: {
    collector: collectorScenario(SUBMIT_END_S, DRAIN_S),
    submit: {
      executor: 'ramping-arrival-rate',
      exec: 'submitter',
      startTime: `${SUBMIT_DELAY_S}s`,
      startRate: BASE,
      timeUnit: '1s',
      stages: STAGES,
      preAllocatedVUs: Math.max(10, PEAK),
      maxVUs: Math.max(20, 3 * PEAK),
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
