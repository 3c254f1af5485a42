import { test } from "node:test";
import assert from "node:assert/strict";
import { harness, settle } from "../test-support/fakes.js";

function message(channel, offset, data, extra = {}) {
  return { type: "message", channel, offset, epoch: "e1", data, ...extra };
}

test("subscribe while connected sends a subscribe frame for a new channel only", async () => {
  const h = harness();
  await h.connect();
  h.bus.subscribe("b", () => {});
  h.bus.subscribe("b", () => {});
  h.bus.subscribe("a", () => {});
  await settle(); // frames leave at the end of the task
  assert.deepEqual(h.socket.framesOfType("subscribe"), [{ type: "subscribe", channels: ["b"] }]);
});

test("unsubscribe while connected sends an unsubscribe frame and drops handlers", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", (data) => seen.push(data));
  await h.connect();
  h.bus.unsubscribe("a");
  await settle();
  assert.deepEqual(h.socket.framesOfType("unsubscribe"), [{ type: "unsubscribe", channels: ["a"] }]);
  h.socket.receive(message("a", 1, "late"));
  assert.deepEqual(seen, []);
  assert.deepEqual(h.log.messages, [], "messages for a channel we left are dropped");
});

test("subscribe and unsubscribe while disconnected are queued into the connect frame", async () => {
  const h = harness({ channels: ["a", "b"] });
  h.bus.subscribe("c", () => {});
  h.bus.unsubscribe("b");
  const hello = await h.open();
  assert.deepEqual(hello.channels, ["a", "c"]);
  assert.equal(h.socket.sent.length, 1);
});

test("changes between the connect frame and the welcome are sent after the welcome", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.open();
  h.bus.subscribe("c");
  h.bus.unsubscribe("b");
  assert.equal(h.socket.sent.length, 1, "nothing sent before the welcome");
  h.welcome();
  await settle();
  assert.deepEqual(h.socket.sent.slice(1), [
    { type: "unsubscribe", channels: ["b"] },
    { type: "subscribe", channels: ["c"] },
  ]);
});

test("changes during a backoff wait are sent in the next connect frame", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(1006);
  h.bus.subscribe("b");
  h.bus.unsubscribe("a");
  assert.equal(h.socket.sent.length, 1, "nothing sent on a dead socket");
  await h.clock.advance(1000);
  const hello = await h.open();
  assert.deepEqual(hello.channels, ["b"]);
});

test("after a reconnect the connect frame resubscribes everything", async () => {
  const h = harness({ channels: ["a"] });
  await h.connect();
  h.bus.subscribe("b");
  h.bus.subscribe("c");
  h.socket.drop(1011);
  await h.clock.advance(1000);
  const hello = await h.connect();
  assert.deepEqual(hello.channels, ["a", "b", "c"]);
  assert.deepEqual(h.socket.sent.slice(1), [], "no separate subscribe frames");
});

test("messages go only to that channel's handlers; 'message' sees them all", async () => {
  const h = harness({ channels: ["a", "b"] });
  const seenA = [];
  const seenB = [];
  h.bus.subscribe("a", (data, meta) => seenA.push([data, meta]));
  h.bus.subscribe("b", (data) => seenB.push(data));
  await h.connect();
  h.socket.receive(message("a", 1, { text: "hi" }));
  h.socket.receive(message("b", 1, "for b"));
  assert.deepEqual(seenA, [[{ text: "hi" }, { channel: "a", offset: 1, epoch: "e1", recovered: false }]]);
  assert.deepEqual(seenB, ["for b"]);
  assert.deepEqual(
    h.log.messages.map(([channel, data]) => [channel, data]),
    [["a", { text: "hi" }], ["b", "for b"]],
  );
});

test("the function subscribe returns removes that handler only", async () => {
  const h = harness();
  const first = [];
  const second = [];
  const off = h.bus.subscribe("a", (data) => first.push(data));
  h.bus.subscribe("a", (data) => second.push(data));
  await h.connect();
  off();
  h.socket.receive(message("a", 1, "x"));
  assert.deepEqual(first, []);
  assert.deepEqual(second, ["x"]);
  assert.deepEqual(h.socket.framesOfType("unsubscribe"), [], "the channel stays");
});

test("a throwing handler is reported and does not stop the others or the client", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", () => {
    throw new Error("app bug");
  });
  h.bus.subscribe("a", (data) => seen.push(data));
  h.bus.on("message", () => {
    throw new Error("listener bug");
  });
  await h.connect();
  h.socket.receive(message("a", 1, "x"));
  h.socket.receive(message("a", 2, "y"));
  assert.deepEqual(seen, ["x", "y"]);
  assert.deepEqual(
    h.log.errors.map((error) => error.message),
    ["app bug", "listener bug", "app bug", "listener bug"],
  );
});

test("a throwing error or state listener does not break the client", async () => {
  const h = harness();
  h.bus.on("error", () => {
    throw new Error("error listener bug");
  });
  h.bus.on("state", () => {
    throw new Error("state listener bug");
  });
  await h.connect();
  assert.equal(h.bus.state, "connected");
  assert.ok(h.log.errors.some((error) => error.message === "state listener bug"));
});

test("on() returns a function that stops listening", async () => {
  const h = harness();
  const states = [];
  const off = h.bus.on("state", (state) => states.push(state));
  await h.open();
  off();
  h.welcome();
  assert.deepEqual(states, ["connecting"]);
});

test("denied channels in the welcome are reported, dropped and never asked for again", async () => {
  const h = harness({ channels: ["a", "b", "c"] });
  const seen = [];
  h.bus.subscribe("b", (data) => seen.push(data));
  await h.connect({ subscribed: ["a"], denied: { b: "forbidden", c: "limit" } });
  assert.deepEqual(h.log.denied, [["b", "forbidden"], ["c", "limit"]]);
  assert.deepEqual(h.socket.sent.slice(1), [], "no unsubscribe for what the server never held");
  h.socket.drop(1006);
  await h.clock.advance(1000);
  const hello = await h.open();
  assert.deepEqual(hello.channels, ["a"]);
});

test("denied channels in a subscribed frame are reported and dropped", async () => {
  const h = harness();
  await h.connect();
  h.bus.subscribe("bad channel", () => {});
  h.socket.receive({ type: "subscribed", channels: [], denied: { "bad channel": "invalid" } });
  assert.deepEqual(h.log.denied, [["bad channel", "invalid"]]);
  h.bus.subscribe("x");
  await settle();
  assert.deepEqual(h.socket.framesOfType("subscribe").at(-1).channels, ["x"]);
});

test("channels revoked on refresh are denied once and no longer requested", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect();
  h.socket.receive({ type: "refreshed", expires_at: Math.floor(h.clock.now() / 1000) + 3600, revoked: ["b"] });
  h.socket.receive({ type: "unsubscribed", channels: ["b"], reason: "revoked" });
  assert.deepEqual(h.log.denied, [["b", "revoked"]]);
  assert.deepEqual(h.socket.framesOfType("unsubscribe"), []);
  h.socket.drop(1001);
  await h.clock.advance(1000);
  const hello = await h.open();
  assert.deepEqual(hello.channels, ["a"]);
});

test("unsubscribed with reason revoked denies; reason client is only a confirmation", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect();
  h.socket.receive({ type: "unsubscribed", channels: ["a"], reason: "revoked" });
  h.socket.receive({ type: "unsubscribed", channels: ["b"], reason: "client" });
  assert.deepEqual(h.log.denied, [["a", "revoked"]]);
  const seen = [];
  h.bus.subscribe("b", (data) => seen.push(data));
  h.socket.receive(message("b", 1, "still here"));
  assert.deepEqual(seen, ["still here"]);
});

test("unsubscribed with reason server drops the channel, its handlers and position, and denies it", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect();
  const seen = [];
  h.bus.subscribe("a", (data) => seen.push(data));
  h.socket.receive(message("a", 1, "before"));
  h.socket.receive({ type: "unsubscribed", channels: ["a"], reason: "server" });
  assert.deepEqual(h.log.denied, [["a", "server"]]);
  h.socket.receive(message("a", 2, "late")); // in flight when the server dropped it
  assert.deepEqual(seen, ["before"]);
  assert.deepEqual(h.socket.framesOfType("unsubscribe"), [], "the server holds it no more");
  h.socket.drop(1001);
  await h.clock.advance(1000);
  const hello = await h.open();
  assert.deepEqual(hello.channels, ["b"], "not asked for again");
  assert.equal(hello.since, undefined, "its position is forgotten");
});

test("a channel the server dropped can be joined again by the app", async () => {
  const h = harness({ channels: ["a"] });
  await h.connect();
  h.socket.receive({ type: "unsubscribed", channels: ["a"], reason: "server" });
  h.bus.subscribe("a");
  await settle();
  assert.deepEqual(h.socket.framesOfType("subscribe").at(-1).channels, ["a"]);
});

test("an unreadable frame is reported; pong and unknown frame types are ignored", async () => {
  const h = harness();
  await h.connect();
  h.socket.receive("not json{");
  h.socket.receive({ type: "pong" });
  h.socket.receive({ type: "something-new", x: 1 });
  h.socket.receive("null");
  assert.equal(h.log.errors.length, 1);
  assert.equal(h.bus.state, "connected");
  await settle();
});

test("a channel denied as unavailable keeps its handlers and position and is asked for again after backoff", async () => {
  const h = harness({ channels: ["a", "b"] });
  const seen = [];
  h.bus.subscribe("b", (data) => seen.push(data));
  await h.connect({ subscribed: ["a"], denied: { b: "unavailable" }, positions: { a: { offset: 0, epoch: "e1" } } });
  assert.deepEqual(h.log.denied, [["b", "unavailable"]]);
  assert.deepEqual(h.clock.pendingDelays().filter((delay) => delay === 750), [750]); // 500 + 0.5 * (1000 - 500)

  await h.clock.advance(749);
  assert.deepEqual(h.socket.framesOfType("subscribe"), []);
  await h.clock.advance(1);
  assert.deepEqual(h.socket.framesOfType("subscribe"), [{ type: "subscribe", channels: ["b"] }]);

  h.socket.receive({ type: "subscribed", subscribed: ["b"], denied: {}, recovered: {}, positions: { b: { offset: 4, epoch: "e1" } } });
  h.socket.receive(message("b", 5, "back"));
  assert.deepEqual(seen, ["back"]);
  assert.deepEqual(h.log.errors, []);
});

test("retries of an unavailable channel back off, send since, and reset once the server subscribes", async () => {
  const h = harness({ channels: ["b"] });
  await h.connect();
  h.socket.receive(message("b", 8, "seen"));
  h.socket.drop(1006);
  await h.clock.advance(750);
  await h.open();
  h.welcome({ subscribed: [], denied: { b: "unavailable" }, recovered: {} });
  const unavailable = { type: "subscribed", subscribed: [], denied: { b: "unavailable" }, recovered: {}, positions: {} };

  await h.clock.advance(750); // attempt 1: 500 + 0.5 * (1000 - 500)
  assert.deepEqual(h.socket.framesOfType("subscribe"), [
    { type: "subscribe", channels: ["b"], since: { b: { offset: 8, epoch: "e1" } } },
  ]);
  h.socket.receive(unavailable);
  await h.clock.advance(1249);
  assert.equal(h.socket.framesOfType("subscribe").length, 1);
  await h.clock.advance(1); // attempt 2: 500 + 0.5 * (2000 - 500)
  assert.equal(h.socket.framesOfType("subscribe").length, 2);

  h.socket.receive({ type: "subscribed", subscribed: ["b"], denied: {}, recovered: { b: true }, positions: {} });
  h.socket.receive(unavailable); // down again: back to attempt 1
  await h.clock.advance(750);
  assert.equal(h.socket.framesOfType("subscribe").length, 3);
  assert.deepEqual(h.log.denied, [["b", "unavailable"], ["b", "unavailable"], ["b", "unavailable"]]);
});

test("a reconnect asks for unavailable channels in its connect frame and cancels the pending retry", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect({ subscribed: ["a"], denied: { b: "unavailable" } });
  h.socket.drop(1006);
  await h.clock.advance(750); // the reconnect's backoff; the retry timer is gone
  const hello = await h.open();
  assert.deepEqual(hello.channels, ["a", "b"]);
  h.welcome();
  await h.clock.advance(60000);
  assert.deepEqual(h.socket.framesOfType("subscribe"), []);
  h.bus.close();
  assert.deepEqual(h.clock.pendingDelays(), []);
});

// -- the subscribed event ------------------------------------------------------

test("a welcome reports each subscribed channel with its position; denied ones are not", async () => {
  const h = harness({ channels: ["a", "b", "c"] });
  await h.connect({
    subscribed: ["a", "b"],
    denied: { c: "forbidden" },
    positions: { a: { offset: 4, epoch: "e1" }, b: { offset: 0, epoch: "e0" } },
  });
  assert.deepEqual(h.log.subscribed, [
    ["a", { position: { offset: 4, epoch: "e1" } }],
    ["b", { position: { offset: 0, epoch: "e0" } }],
  ]);
  assert.deepEqual(h.log.denied, [["c", "forbidden"]]);
});

test("a subscribed frame reports the channels joined later; no position, no position in meta", async () => {
  const h = harness();
  await h.connect({ positions: { a: { offset: 0, epoch: "e0" } } });
  h.bus.subscribe("b");
  h.bus.subscribe("c");
  h.socket.receive({
    type: "subscribed",
    subscribed: ["b", "c"],
    denied: {},
    recovered: {},
    positions: { b: { offset: 2, epoch: "e1" } },
  });
  assert.deepEqual(h.log.subscribed, [
    ["a", { position: { offset: 0, epoch: "e0" } }],
    ["b", { position: { offset: 2, epoch: "e1" } }],
    ["c", {}],
  ]);
});

test("after a reconnect the welcome reports every channel again, with whether it recovered", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect({ positions: { a: { offset: 0, epoch: "e1" }, b: { offset: 0, epoch: "e1" } } });
  h.socket.receive(message("a", 1, "one"));
  h.socket.receive(message("b", 1, "one"));
  h.socket.drop(1006);
  await h.clock.advance(1000);
  await h.connect({
    recovered: { a: true, b: false },
    positions: { a: { offset: 1, epoch: "e1" }, b: { offset: 9, epoch: "e2" } },
  });
  assert.deepEqual(h.log.subscribed.slice(2), [
    ["a", { position: { offset: 1, epoch: "e1" }, recovered: true }],
    ["b", { position: { offset: 9, epoch: "e2" }, recovered: false }],
  ]);
  assert.deepEqual(h.log.recovered, [["a", true], ["b", false]]);
});

test("subscribed comes before that channel's recovered event and its replayed messages", async () => {
  const h = harness({ channels: ["a"] });
  const order = [];
  h.bus.on("subscribed", (channel) => order.push(["subscribed", channel]));
  h.bus.on("recovered", (channel, ok) => order.push(["recovered", channel, ok]));
  h.bus.subscribe("a", (data) => order.push(["message", data]));
  await h.connect();
  h.socket.receive(message("a", 1, "live"));
  h.socket.drop(1006);
  await h.clock.advance(1000);
  await h.connect({ recovered: { a: true }, positions: { a: { offset: 2, epoch: "e1" } } });
  h.socket.receive(message("a", 2, "missed", { recovered: true }));
  assert.deepEqual(order.slice(2), [
    ["subscribed", "a"],
    ["recovered", "a", true],
    ["message", "missed"],
  ]);
});

test("a channel left while the server was subscribing it is not reported", async () => {
  const h = harness({ channels: ["a"] });
  await h.connect();
  h.bus.subscribe("b");
  h.bus.unsubscribe("b"); // before the server's answer to the subscribe
  h.socket.receive({ type: "subscribed", subscribed: ["b"], denied: {}, recovered: {}, positions: {} });
  assert.deepEqual(
    h.log.subscribed.map(([channel]) => channel),
    ["a"],
  );
});

test("a subscribed listener that closes the client stops the events of that frame", async () => {
  const h = harness({ channels: ["a", "b"] });
  const seen = [];
  h.bus.on("subscribed", (channel) => {
    seen.push(channel);
    h.bus.close();
  });
  await h.connect({ recovered: {} });
  assert.deepEqual(seen, ["a"]);
  assert.equal(h.bus.state, "closed");
  assert.deepEqual(h.socket.framesOfType("subscribe"), []);
});

test("a throwing subscribed listener is reported and the others still hear of every channel", async () => {
  const h = harness({ channels: ["a", "b"] });
  h.bus.on("subscribed", () => {
    throw new Error("listener bug");
  });
  await h.connect();
  assert.deepEqual(
    h.log.subscribed.map(([channel]) => channel),
    ["a", "b"],
  );
  assert.deepEqual(
    h.log.errors.map((error) => error.message),
    ["listener bug", "listener bug"],
  );
  assert.equal(h.bus.state, "connected");
});
