import { test } from "node:test";
import assert from "node:assert/strict";
import { harness, settle } from "../test-support/fakes.js";

/** Gives globalThis browser-style online/offline events for the duration of `body`. */
async function withBrowserEvents(body) {
  const target = new EventTarget();
  const listening = new Map();
  globalThis.addEventListener = (type, listener) => {
    listening.set(type, (listening.get(type) ?? 0) + 1);
    target.addEventListener(type, listener);
  };
  globalThis.removeEventListener = (type, listener) => {
    listening.set(type, (listening.get(type) ?? 0) - 1);
    target.removeEventListener(type, listener);
  };
  try {
    await body({ fire: (type) => target.dispatchEvent(new Event(type)), listening });
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
}

test("close() while connected closes the socket, goes to closed and leaves no timer", async () => {
  const h = harness();
  await h.connect();
  const socket = h.socket;
  h.bus.close();
  assert.equal(socket.closedByClient, 1000);
  assert.equal(h.bus.state, "closed");
  assert.deepEqual(h.clock.pendingDelays(), [], "refresh timer cancelled");
  socket.drop(1006); // a late close event from the old socket changes nothing
  await h.clock.advance(3600 * 1000);
  assert.equal(h.sockets.length, 1);
  assert.deepEqual(h.log.states, ["connecting", "connected", "closed"]);
});

test("close() during a backoff wait cancels the reconnect for good", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(1006);
  h.bus.close();
  assert.deepEqual(h.clock.pendingDelays(), []);
  await h.clock.advance(60000);
  h.bus.connect(); // closed is final
  await settle();
  assert.equal(h.sockets.length, 1);
  assert.equal(h.bus.state, "closed");
});

test("close() while getToken is pending: no socket is ever created", async () => {
  let release;
  const h = harness({ getToken: () => new Promise((resolve) => (release = resolve)) });
  h.bus.connect();
  h.bus.close();
  release("late token");
  await settle();
  assert.equal(h.sockets.length, 0);
  assert.equal(h.bus.state, "closed");
});

test("close() before the socket opens abandons it without sending", async () => {
  const h = harness({ tokenInHeader: false });
  h.bus.connect();
  await settle();
  const socket = h.socket;
  h.bus.close();
  socket.open();
  assert.deepEqual(socket.sent, []);
});

test("close() from inside a state listener stops the reconnect", async () => {
  const h = harness();
  h.bus.on("state", (state) => {
    if (state === "disconnected") h.bus.close();
  });
  await h.connect();
  h.socket.drop(1006);
  assert.equal(h.bus.state, "closed");
  assert.deepEqual(h.clock.pendingDelays(), []);
});

test("close() is idempotent and emits closed once", async () => {
  const h = harness();
  await h.connect();
  h.bus.close();
  h.bus.close();
  assert.deepEqual(h.log.states.filter((state) => state === "closed"), ["closed"]);
});

test("no browser listeners are touched when globalThis.addEventListener is missing", async () => {
  assert.equal(typeof globalThis.addEventListener, "undefined");
  const h = harness();
  await h.connect();
  h.bus.close();
});

test("offline drops the socket; online reconnects at once", async () => {
  await withBrowserEvents(async ({ fire }) => {
    const h = harness();
    await h.connect();
    const first = h.socket;
    fire("offline");
    assert.equal(first.closedByClient, 1000);
    assert.equal(h.bus.state, "disconnected");
    fire("online");
    await settle();
    assert.equal(h.sockets.length, 2, "no backoff wait");
    // Only the new socket's welcome timeout: the backoff timer was cancelled.
    assert.deepEqual(h.clock.pendingDelays(), [10000]);
    assert.deepEqual(h.log.states, ["connecting", "connected", "disconnected", "connecting"]);
    h.bus.close();
  });
});

test("online while connected changes nothing", async () => {
  await withBrowserEvents(async ({ fire }) => {
    const h = harness();
    await h.connect();
    fire("online");
    await settle();
    assert.equal(h.sockets.length, 1);
    h.bus.close();
  });
});

test("close() removes the online/offline listeners", async () => {
  await withBrowserEvents(async ({ fire, listening }) => {
    const h = harness();
    await h.connect();
    assert.deepEqual([...listening.values()], [1, 1]);
    h.bus.close();
    assert.deepEqual([...listening.values()], [0, 0]);
    fire("online");
    await settle();
    assert.equal(h.sockets.length, 1);
  });
});

test("a client that is never started never listens to online/offline", async () => {
  await withBrowserEvents(async ({ listening }) => {
    const h = harness();
    h.bus.close();
    assert.equal(listening.size, 0);
  });
});

test("a long outage with failing tokens and drops leaves no unhandled rejection", async () => {
  // fakes.js fails any test that ends with an unhandled rejection.
  let calls = 0;
  const h = harness({
    getToken: async () => {
      calls += 1;
      if (calls % 3 === 0) return `t${calls}`;
      throw new Error(`fail ${calls}`);
    },
  });
  h.bus.on("error", () => Promise.reject(new Error("async listener, not ours to await")).catch(() => {}));
  h.bus.connect();
  for (let i = 0; i < 30; i += 1) {
    await h.clock.advance(20000);
    if (h.bus.state === "connecting" && h.socket && h.socket.readyState === 0) {
      h.socket.open();
      h.socket.drop(1011);
    }
  }
  assert.ok(h.log.errors.length >= 10);
  h.bus.close();
  assert.deepEqual(h.clock.pendingDelays(), []);
});

test("close() from a 'connecting' listener means getToken is never called", async () => {
  const h = harness();
  h.bus.on("state", (state) => {
    if (state === "connecting") h.bus.close();
  });
  h.bus.connect();
  await settle();
  assert.equal(h.tokenCalls, 0);
  assert.equal(h.bus.state, "closed");
});
