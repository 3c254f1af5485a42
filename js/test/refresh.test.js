import { test } from "node:test";
import assert from "node:assert/strict";
import { harness } from "../test-support/fakes.js";

const SECOND = 1000;

test("refresh is sent with a fresh token refreshBefore seconds before expires_at", async () => {
  const h = harness({ refreshBefore: 30 });
  await h.open();
  const expiresAt = Math.floor(h.clock.now() / SECOND) + 120;
  h.welcome({ expires_at: expiresAt });
  const refreshAt = expiresAt * SECOND - 30 * SECOND;
  await h.clock.advance(refreshAt - h.clock.now() - 1);
  assert.deepEqual(h.socket.framesOfType("refresh"), [], "not early");
  await h.clock.advance(1);
  assert.deepEqual(h.socket.framesOfType("refresh"), [{ type: "refresh", token: "token-2" }]);
});

test("each refreshed frame schedules the next refresh from its expires_at", async () => {
  const h = harness({ refreshBefore: 30 });
  await h.open();
  let expiresAt = Math.floor(h.clock.now() / SECOND) + 100;
  h.welcome({ expires_at: expiresAt });
  for (let round = 1; round <= 3; round += 1) {
    await h.clock.advance(expiresAt * SECOND - 30 * SECOND - h.clock.now());
    assert.equal(h.socket.framesOfType("refresh").length, round);
    expiresAt += 100;
    h.socket.receive({ type: "refreshed", expires_at: expiresAt, revoked: [] });
  }
  assert.deepEqual(h.clock.pendingDelays(), [100 * SECOND]); // 130 s left, minus 30
  assert.equal(h.sockets.length, 1, "the connection never dropped");
});

test("without a refreshed answer no second refresh is sent", async () => {
  const h = harness();
  await h.open();
  h.welcome({ expires_at: Math.floor(h.clock.now() / SECOND) + 100 });
  await h.clock.advance(200 * SECOND);
  assert.equal(h.socket.framesOfType("refresh").length, 1);
});

test("a token shorter-lived than refreshBefore refreshes halfway, not in a loop", async () => {
  const h = harness({ refreshBefore: 30 });
  await h.open();
  h.welcome({ expires_at: Math.floor(h.clock.now() / SECOND) + 20 });
  assert.deepEqual(h.clock.pendingDelays(), [10 * SECOND]);
  await h.clock.advance(10 * SECOND);
  h.socket.receive({ type: "refreshed", expires_at: h.clock.now() / SECOND - 5, revoked: [] });
  assert.deepEqual(h.clock.pendingDelays(), [1000], "an already-past expiry waits a floor delay");
});

test("getToken failing on refresh reports and retries while the connection stays up", async () => {
  const h = harness({ tokens: ["t1", new Error("idp hiccup"), "t3"] });
  await h.open();
  h.welcome({ expires_at: Math.floor(h.clock.now() / SECOND) + 100 });
  await h.clock.advance(70 * SECOND);
  assert.equal(h.log.errors[0].message, "idp hiccup");
  assert.equal(h.bus.state, "connected");
  const [retry] = h.clock.pendingDelays();
  assert.ok(retry >= 500 && retry <= 1000);
  await h.clock.advance(retry);
  assert.deepEqual(h.socket.framesOfType("refresh"), [{ type: "refresh", token: "t3" }]);
});

test("a dropped connection cancels its refresh timer", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(1006);
  assert.equal(h.clock.pendingDelays().length, 1, "only the reconnect timer");
});

test("a refresh whose token arrives after a drop is not sent anywhere", async () => {
  let release;
  let calls = 0;
  const h = harness({
    getToken: () => {
      calls += 1;
      return calls === 2 ? new Promise((resolve) => (release = resolve)) : Promise.resolve(`t${calls}`);
    },
  });
  await h.open();
  h.welcome({ expires_at: Math.floor(h.clock.now() / SECOND) + 100 });
  await h.clock.advance(70 * SECOND);
  const first = h.socket;
  first.drop(1006);
  await h.clock.advance(1000);
  h.socket.open();
  release("late");
  await h.clock.advance(0);
  assert.deepEqual(first.framesOfType("refresh"), []);
  assert.deepEqual(h.socket.framesOfType("refresh"), []);
});
