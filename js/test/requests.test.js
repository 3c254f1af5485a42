// publish, rpc and history requests, load-then-subscribe (getState), rewind and ephemeral
// messages, on fake sockets and a fake clock.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WsBusRequestError } from "../wsbus.js";
import { harness, settle } from "../test-support/fakes.js";

function message(channel, offset, data, extra = {}) {
  return { type: "message", channel, offset, epoch: "e1", data, ...extra };
}

/** The promise's outcome once settled: ["ok", value] or ["error", code]. */
function outcome(promise) {
  const result = { value: null };
  promise.then(
    (value) => (result.value = ["ok", value]),
    (error) => (result.value = ["error", error.code, error instanceof WsBusRequestError]),
  );
  return result;
}

test("publish, rpc and history send frames with refs and resolve on their answers", async () => {
  const h = harness();
  await h.connect();
  const published = outcome(h.bus.publish("a", { text: "hi" }, { id: "m1" }));
  const typing = outcome(h.bus.publish("a", "typing", { ephemeral: true }));
  const called = outcome(h.bus.rpc("add", [1, 2]));
  const page = outcome(h.bus.history("a", { limit: 2, before: 9 }));
  const sent = h.socket.sent.slice(1);
  assert.deepEqual(sent, [
    { type: "publish", channel: "a", data: { text: "hi" }, id: "m1", ref: 0 },
    { type: "publish", channel: "a", data: "typing", ephemeral: true, ref: 1 },
    { type: "rpc", method: "add", data: [1, 2], ref: 2 },
    { type: "history", channel: "a", limit: 2, before: 9, ref: 3 },
  ]);
  // Answers come in any order.
  h.socket.receive({ type: "rpc_result", ref: 2, data: 3 });
  h.socket.receive({ type: "history_result", ref: 3, channel: "a", position: { offset: 8, epoch: "e1" }, messages: [] });
  h.socket.receive({ type: "published", ref: 1 });
  h.socket.receive({ type: "published", ref: 0, offset: 5, epoch: "e1" });
  await settle();
  assert.deepEqual(published.value, ["ok", { offset: 5, epoch: "e1" }]);
  assert.deepEqual(typing.value, ["ok", undefined]);
  assert.deepEqual(called.value, ["ok", 3]);
  assert.deepEqual(page.value, ["ok", { channel: "a", position: { offset: 8, epoch: "e1" }, messages: [] }]);
});

test("an error answer rejects with a WsBusRequestError carrying the code", async () => {
  const h = harness();
  await h.connect();
  const refused = h.bus.publish("a", 1);
  h.socket.receive({ type: "error", ref: 0, error: "forbidden" });
  await assert.rejects(refused, (error) => error instanceof WsBusRequestError && error.code === "forbidden");
  const invalid = h.bus.rpc("check");
  h.socket.receive({ type: "error", ref: 1, error: "invalid", reason: "quantity must be positive" });
  await assert.rejects(invalid, { code: "invalid", reason: "quantity must be positive" });
});

test("requests made while disconnected wait for the next welcome, bounded by their timeout", async () => {
  const h = harness({ requestTimeout: 5000 });
  const early = outcome(h.bus.rpc("ping"));
  const late = outcome(h.bus.rpc("ping", null, { timeout: 1000 }));
  await h.open();
  assert.equal(h.socket.framesOfType("rpc").length, 0, "nothing before the welcome");
  await h.clock.advance(1500);
  assert.deepEqual(late.value, ["error", "timeout", true]);
  h.welcome();
  assert.deepEqual(h.socket.framesOfType("rpc"), [{ type: "rpc", method: "ping", data: null, ref: 0 }]);
  h.socket.receive({ type: "rpc_result", ref: 0, data: "pong" });
  await settle();
  assert.deepEqual(early.value, ["ok", "pong"]);
});

test("after a drop, publishes with an id and history reads are sent again; others reject disconnected", async () => {
  const h = harness();
  await h.connect();
  const withId = outcome(h.bus.publish("a", 1, { id: "once" }));
  const withoutId = outcome(h.bus.publish("a", 2));
  const called = outcome(h.bus.rpc("charge"));
  const page = outcome(h.bus.history("a"));
  h.socket.drop(1006);
  await settle();
  assert.deepEqual(withoutId.value, ["error", "disconnected", true]);
  assert.deepEqual(called.value, ["error", "disconnected", true]);
  await h.clock.advance(1000);
  await h.connect();
  assert.deepEqual(
    h.socket.sent.slice(1).map((frame) => [frame.type, frame.ref]),
    [["publish", 0], ["history", 3]],
  );
  h.socket.receive({ type: "published", ref: 0, offset: 1, epoch: "e1" });
  h.socket.receive({ type: "history_result", ref: 3, channel: "a", position: { offset: 1, epoch: "e1" }, messages: [] });
  await settle();
  assert.equal(withId.value[0], "ok");
  assert.equal(page.value[0], "ok");
});

test("at most 16 requests are in flight; the rest wait for answers", async () => {
  const h = harness();
  await h.connect();
  const results = Array.from({ length: 20 }, (_, n) => outcome(h.bus.rpc("slow", n)));
  assert.equal(h.socket.framesOfType("rpc").length, 16);
  h.socket.receive({ type: "rpc_result", ref: 0, data: 0 });
  h.socket.receive({ type: "rpc_result", ref: 1, data: 1 });
  assert.deepEqual(h.socket.framesOfType("rpc").slice(16).map((frame) => frame.ref), [16, 17]);
  await settle();
  assert.deepEqual(results[0].value, ["ok", 0]);
});

test("close() rejects what is pending, and requests after it, as closed", async () => {
  const h = harness();
  await h.connect();
  const pending = outcome(h.bus.rpc("slow"));
  h.bus.close();
  await settle();
  assert.deepEqual(pending.value, ["error", "closed", true]);
  await assert.rejects(h.bus.history("a"), { code: "closed" });
});

test("an ephemeral message reaches handlers with no position, and is no gap", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", (data, meta) => seen.push([data, meta]));
  await h.connect({ positions: { a: { offset: 4, epoch: "e1" } } });
  h.socket.receive({ type: "message", channel: "a", ephemeral: true, data: "typing" });
  h.socket.receive(message("a", 5, "said"));
  assert.deepEqual(seen, [
    ["typing", { channel: "a", offset: 0, epoch: "", recovered: false, ephemeral: true }],
    ["said", { channel: "a", offset: 5, epoch: "e1", recovered: false }],
  ]);
  assert.deepEqual(h.log.recovered, []);
});

test("getState runs before the first subscribe, which starts from its position", async () => {
  const h = harness({ channels: [] });
  await h.connect();
  let release;
  const loaded = new Promise((resolve) => (release = resolve));
  const calls = [];
  h.bus.subscribe("room", () => {}, {
    getState: async () => {
      calls.push("getState");
      return loaded;
    },
  });
  await settle();
  assert.deepEqual(calls, ["getState"]);
  assert.deepEqual(h.socket.framesOfType("subscribe"), [], "not asked for before the state is loaded");
  release({ offset: 7, epoch: "e1" });
  await settle();
  assert.deepEqual(h.socket.framesOfType("subscribe"), [
    { type: "subscribe", channels: ["room"], since: { room: { offset: 7, epoch: "e1" } } },
  ]);
});

test("a failed recovery calls getState again and subscribes from its new position", async () => {
  const h = harness({ channels: [] });
  await h.connect();
  const states = [{ offset: 3, epoch: "e1" }, { offset: 40, epoch: "e2" }];
  h.bus.subscribe("room", () => {}, { getState: async () => states.shift() });
  await settle();
  h.socket.receive({ type: "subscribed", subscribed: ["room"], denied: {}, recovered: { room: true }, positions: { room: { offset: 3, epoch: "e1" } } });
  h.socket.drop(1006);
  await h.clock.advance(1000);
  const hello = await h.open();
  assert.deepEqual(hello.since, { room: { offset: 3, epoch: "e1" } });
  h.welcome({ recovered: { room: false }, positions: { room: { offset: 40, epoch: "e2" } } });
  h.socket.receive(message("room", 41, "dropped: replayed after the reload"));
  await settle();
  assert.deepEqual(h.socket.sent.slice(1), [
    { type: "unsubscribe", channels: ["room"] },
    { type: "subscribe", channels: ["room"], since: { room: { offset: 40, epoch: "e2" } } },
  ]);
  assert.deepEqual(h.log.recovered, [["room", true]], "no recovered: false: the app reloaded instead");
  assert.deepEqual(h.log.messages, []);
});

test("rewind is asked for on the first subscribe only, and its replay is kept", async () => {
  const h = harness({ channels: [] });
  await h.connect();
  const seen = [];
  h.bus.subscribe("room", (data) => seen.push(data), { rewind: 2 });
  await settle(); // frames leave at the end of the task
  assert.deepEqual(h.socket.framesOfType("subscribe"), [{ type: "subscribe", channels: ["room"], rewind: { room: 2 } }]);
  h.socket.receive({ type: "subscribed", subscribed: ["room"], denied: {}, recovered: {}, positions: { room: { offset: 9, epoch: "e1" } } });
  h.socket.receive(message("room", 8, "eight", { recovered: true }));
  h.socket.receive(message("room", 9, "nine", { recovered: true }));
  assert.deepEqual(seen, ["eight", "nine"]);
  h.socket.drop(1006);
  await h.clock.advance(1000);
  const hello = await h.open();
  assert.deepEqual(hello.since, { room: { offset: 9, epoch: "e1" } });
  assert.equal(hello.rewind, undefined);
});

test("since positions the first subscribe", async () => {
  const h = harness({ channels: [] });
  await h.connect();
  h.bus.subscribe("room", null, { since: { offset: 12, epoch: "e1" } });
  await settle(); // frames leave at the end of the task
  assert.deepEqual(h.socket.framesOfType("subscribe"), [
    { type: "subscribe", channels: ["room"], since: { room: { offset: 12, epoch: "e1" } } },
  ]);
  assert.throws(() => h.bus.subscribe("x", null, { rewind: -1 }), TypeError);
  assert.throws(() => h.bus.subscribe("x", null, { getState: 5 }), TypeError);
});
