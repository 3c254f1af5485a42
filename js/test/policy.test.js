// The reconnect policy, from the vectors the Python client's tests read too
// (test-support/policy-vectors.json): the two clients cannot drift apart.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { harness, settle } from "../test-support/fakes.js";

const vectors = JSON.parse(
  readFileSync(new URL("../test-support/policy-vectors.json", import.meta.url), "utf8"),
);
const { backoff } = vectors;

/** What the client did after the close: "stop", "reconnect_now" or "backoff". */
function actionTaken(h, socketsBefore) {
  if (h.bus.state === "closed") return "stop";
  if (h.sockets.length > socketsBefore) return "reconnect_now";
  if (h.bus.state === "disconnected" && h.clock.pendingDelays().length === 1) return "backoff";
  return `unexpected: state ${h.bus.state}, pending ${h.clock.pendingDelays()}`;
}

for (const vector of vectors.close.cases) {
  const when = [
    vector.welcomed ? "after a welcome" : "before a welcome",
    vector.retried_unauthorized ? "after a first 4401" : "",
  ].join(" ");
  test(`close ${vector.code} ${when.trim()}: ${vector.action}${vector.error ? ", error" : ""}`, async () => {
    const h = harness({
      minReconnectDelay: backoff.min_reconnect_delay_ms,
      maxReconnectDelay: backoff.max_reconnect_delay_ms,
    });
    await h.open();
    if (vector.retried_unauthorized) {
      h.socket.drop(4401);
      await settle();
      h.socket.open();
    }
    if (vector.welcomed) h.welcome();
    const socketsBefore = h.sockets.length;
    const errorsBefore = h.log.errors.length;
    h.socket.drop(vector.code, "reason");
    await settle();
    assert.equal(actionTaken(h, socketsBefore), vector.action);
    assert.equal(h.log.errors.length > errorsBefore, vector.error, "error event");
  });
}

for (const { attempt, min_ms: low, max_ms: high } of backoff.attempts) {
  for (const [random, expected] of [
    [0, low],
    [1, high],
  ]) {
    test(`backoff attempt ${attempt} with random ${random} waits ${expected} ms`, async () => {
      const h = harness({
        random: () => random,
        minReconnectDelay: backoff.min_reconnect_delay_ms,
        maxReconnectDelay: backoff.max_reconnect_delay_ms,
      });
      await h.open();
      let delay;
      for (let n = 1; n <= attempt; n += 1) {
        h.socket.drop(1006);
        [delay] = h.clock.pendingDelays();
        await h.clock.advance(delay);
        h.socket.open();
      }
      assert.equal(delay, expected);
    });
  }
}

test("the defaults are the vectors' delays", async () => {
  const h = harness({ random: () => 1, minReconnectDelay: undefined, maxReconnectDelay: undefined });
  await h.open();
  h.socket.drop(1006);
  assert.deepEqual(h.clock.pendingDelays(), [backoff.attempts[0].max_ms]);
});

for (const { expires_in_s: expiresIn, refresh_before_s: refreshBefore, delay_s: delay } of vectors.refresh
  .cases) {
  test(`a token expiring in ${expiresIn} s is refreshed after ${delay} s`, async () => {
    const h = harness({ refreshBefore });
    await h.open();
    h.welcome({ expires_at: h.clock.now() / 1000 + expiresIn });
    assert.deepEqual(h.clock.pendingDelays(), [delay * 1000]);
  });
}
