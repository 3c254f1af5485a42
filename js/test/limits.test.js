// What the client does when the server's limits close it: 4408 (too many connections)
// stops with an error; 4429 (too many requests) reconnects after 5 s or more.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { CloseCodes } from "../wsbus.js";
import { harness, settle } from "../test-support/fakes.js";

// The pause after 4429, shared with the Python client's tests.
const { min_wait_ms: PAUSE } = JSON.parse(
  readFileSync(new URL("../test-support/policy-vectors.json", import.meta.url), "utf8"),
).rate_limited;

test("4408 (too many connections) stops with an error and never reconnects", async () => {
  const h = harness();
  await h.open();
  h.socket.drop(CloseCodes.TOO_MANY_CONNECTIONS, "too many connections");
  assert.equal(h.bus.state, "closed");
  assert.equal(h.log.errors.length, 1);
  assert.equal(h.log.errors[0].code, 4408);
  assert.equal(h.log.errors[0].reason, "too many connections");
  assert.deepEqual(h.log.disconnected, [], "not the application's decision");
  assert.deepEqual(h.clock.pendingDelays(), []);
  await h.clock.advance(3600 * 1000);
  assert.equal(h.sockets.length, 1);
});

test("4429 (too many requests) waits at least 5 s, whatever the backoff says, then reconnects", async () => {
  const h = harness({ minReconnectDelay: 20, maxReconnectDelay: 100, random: () => 1 });
  await h.connect();
  h.socket.drop(CloseCodes.TOO_MANY_REQUESTS, "too many requests");
  assert.equal(h.bus.state, "disconnected");
  assert.deepEqual(h.log.errors, [], "a reconnect, not a failure");
  assert.deepEqual(h.clock.pendingDelays(), [PAUSE]);
  await h.clock.advance(PAUSE - 1);
  assert.equal(h.sockets.length, 1, "not before the pause");
  await h.clock.advance(1);
  await settle();
  assert.equal(h.sockets.length, 2);
});

test("after 4429 a longer backoff is kept", async () => {
  const h = harness({ minReconnectDelay: 8000, maxReconnectDelay: 60000, random: () => 1 });
  await h.connect();
  h.socket.drop(CloseCodes.TOO_MANY_REQUESTS);
  const [delay] = h.clock.pendingDelays();
  assert.equal(delay, 16000);
});

test("subscribe() and unsubscribe() calls made together leave in one frame each way", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect();
  for (let n = 0; n < 128; n += 1) h.bus.subscribe(`c${n}`);
  h.bus.unsubscribe("a");
  h.bus.unsubscribe("b");
  assert.equal(h.socket.sent.length, 1, "nothing before the end of the task");
  await settle();
  const [unsubscribe, subscribe] = h.socket.sent.slice(1);
  assert.deepEqual(unsubscribe, { type: "unsubscribe", channels: ["a", "b"] });
  assert.equal(subscribe.type, "subscribe");
  assert.equal(subscribe.channels.length, 128);
  assert.equal(h.socket.sent.length, 3);
});
