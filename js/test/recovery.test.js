import { test } from "node:test";
import assert from "node:assert/strict";
import { harness, settle } from "../test-support/fakes.js";

function message(channel, offset, data, extra = {}) {
  return { type: "message", channel, offset, epoch: "e1", data, ...extra };
}

async function reconnect(h) {
  h.socket.drop(1006);
  await h.clock.advance(20000);
  return h.open();
}

test("the last offset and epoch seen per channel are sent as since on reconnect", async () => {
  const h = harness({ channels: ["a", "b", "c"] });
  await h.connect();
  h.socket.receive(message("a", 41, "x"));
  h.socket.receive({ type: "message", channel: "b", offset: 7, epoch: "e2", data: "y" });
  const hello = await reconnect(h);
  assert.deepEqual(hello.since, { a: { offset: 41, epoch: "e1" }, b: { offset: 7, epoch: "e2" } });
  assert.deepEqual(hello.channels, ["a", "b", "c"]);
});

test("positions from the welcome are where a fresh channel recovers from", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect({ positions: { a: { offset: 57, epoch: "e1" }, b: { offset: 0, epoch: "e9" } } });
  const hello = await reconnect(h);
  assert.deepEqual(hello.since, { a: { offset: 57, epoch: "e1" }, b: { offset: 0, epoch: "e9" } });
});

test("positions from a subscribed frame are kept, and never move a channel back", async () => {
  const h = harness({ channels: [] });
  await h.connect();
  h.bus.subscribe("b");
  h.socket.receive(message("b", 12, "raced ahead of the subscribed frame"));
  h.socket.receive({ type: "subscribed", channels: ["b"], denied: {}, positions: { b: { offset: 11, epoch: "e1" } } });
  h.bus.subscribe("c");
  h.socket.receive({ type: "subscribed", channels: ["c"], denied: {}, positions: { c: { offset: 3, epoch: "e1" } } });
  const hello = await reconnect(h);
  assert.deepEqual(hello.since, { b: { offset: 12, epoch: "e1" }, c: { offset: 3, epoch: "e1" } });
});

test("recovered true: event, then replayed messages with meta.recovered, then live ones", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", (data, meta) => seen.push([data, meta.offset, meta.recovered]));
  await h.connect();
  h.socket.receive(message("a", 41, "before"));
  await reconnect(h);
  h.welcome({ recovered: { a: true }, positions: { a: { offset: 43, epoch: "e1" } } });
  h.socket.receive(message("a", 42, "missed 1", { recovered: true }));
  h.socket.receive(message("a", 43, "missed 2", { recovered: true }));
  h.socket.receive(message("a", 44, "live"));
  assert.deepEqual(h.log.recovered, [["a", true]]);
  assert.deepEqual(seen, [
    ["before", 41, false],
    ["missed 1", 42, true],
    ["missed 2", 43, true],
    ["live", 44, false],
  ]);
});

test("recovered false: event, and the server's position is where we continue from", async () => {
  const h = harness();
  await h.connect();
  h.socket.receive(message("a", 41, "old epoch"));
  await reconnect(h);
  h.welcome({ recovered: { a: false }, positions: { a: { offset: 5, epoch: "e2" } } });
  assert.deepEqual(h.log.recovered, [["a", false]]);
  const hello = await reconnect(h);
  assert.deepEqual(hello.since, { a: { offset: 5, epoch: "e2" } });
});

test("recovered false in the same epoch moves the position even backwards", async () => {
  const h = harness();
  await h.connect();
  h.socket.receive(message("a", 500, "ahead of the stream"));
  await reconnect(h);
  h.welcome({ recovered: { a: false }, positions: { a: { offset: 20, epoch: "e1" } } });
  const seen = [];
  h.bus.subscribe("a", (data) => seen.push(data));
  h.socket.receive(message("a", 21, "next"));
  assert.deepEqual(seen, ["next"]);
});

test("duplicates (offset not above the last in the same epoch) are dropped", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", (data) => seen.push(data));
  await h.connect();
  for (const offset of [1, 2, 2, 1, 3]) h.socket.receive(message("a", offset, offset));
  h.socket.receive({ type: "message", channel: "a", offset: 1, epoch: "e2", data: "new epoch" });
  assert.deepEqual(seen, [1, 2, 3, "new epoch"]);
  assert.equal(h.log.messages.length, 4);
});

test("a recovered channel's replay overlapping what we saw is deduplicated", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", (data) => seen.push(data));
  await h.connect();
  h.socket.receive(message("a", 10, 10));
  await reconnect(h);
  h.welcome({ recovered: { a: true }, positions: { a: { offset: 11, epoch: "e1" } } });
  h.socket.receive(message("a", 10, 10, { recovered: true }));
  h.socket.receive(message("a", 11, 11, { recovered: true }));
  assert.deepEqual(seen, [10, 11]);
});

test("a subscribe frame for a channel never seen carries no since", async () => {
  const h = harness({ channels: ["a"] });
  await h.open();
  h.bus.subscribe("b");
  h.welcome({ positions: { a: { offset: 3, epoch: "e1" } } });
  await settle();
  assert.deepEqual(h.socket.framesOfType("subscribe"), [{ type: "subscribe", channels: ["b"] }]);
});

test("unsubscribing forgets the channel's position", async () => {
  const h = harness({ channels: ["a"] });
  await h.connect();
  h.socket.receive(message("a", 9, "x"));
  h.bus.unsubscribe("a");
  await settle();
  h.bus.subscribe("a");
  await settle();
  assert.deepEqual(h.socket.framesOfType("subscribe"), [{ type: "subscribe", channels: ["a"] }]);
});

test("no since at all when nothing is known", async () => {
  const h = harness({ channels: ["a"] });
  await h.connect();
  const hello = await reconnect(h);
  assert.equal("since" in hello, false);
});

test("a new epoch on a live socket is reported as recovered false, then delivered", async () => {
  const h = harness();
  const seen = [];
  h.bus.subscribe("a", (data, meta) => seen.push([data, meta.offset, meta.epoch]));
  await h.connect();
  h.socket.receive(message("a", 41, "before"));
  h.socket.receive({ type: "message", channel: "a", offset: 1, epoch: "e2", data: "restarted" });
  assert.deepEqual(h.log.recovered, [["a", false]]);
  assert.deepEqual(seen, [["before", 41, "e1"], ["restarted", 1, "e2"]]);
  const hello = await reconnect(h);
  assert.deepEqual(hello.since, { a: { offset: 1, epoch: "e2" } });
});

test("a hole in the offsets on a live socket is reported as recovered false", async () => {
  const h = harness();
  await h.connect();
  h.socket.receive(message("a", 5, "x"));
  h.socket.receive(message("a", 6, "next"));
  assert.deepEqual(h.log.recovered, []);
  h.socket.receive(message("a", 9, "after a hole"));
  assert.deepEqual(h.log.recovered, [["a", false]]);
});

test("from offset 0 (nothing published yet), a first message at offset 1 continues in any epoch", async () => {
  const h = harness({ channels: ["a"] });
  const seen = [];
  h.bus.subscribe("a", (data, meta) => seen.push([data, meta.offset, meta.epoch]));
  await h.connect({ positions: { a: { offset: 0, epoch: "unpublished-a" } } });
  h.socket.receive(message("a", 1, "first"));
  h.socket.receive(message("a", 2, "second"));
  assert.deepEqual(h.log.recovered, [], "no gap: nothing was ever missed");
  assert.deepEqual(seen, [["first", 1, "e1"], ["second", 2, "e1"]]);
  const hello = await reconnect(h);
  assert.deepEqual(hello.since, { a: { offset: 2, epoch: "e1" } }, "the first message's epoch adopted");
});

test("from offset 0, a later offset in a new epoch, or a hole in the same one, is still a gap", async () => {
  const h = harness({ channels: ["a", "b"] });
  await h.connect({
    positions: { a: { offset: 0, epoch: "unpublished-a" }, b: { offset: 0, epoch: "e1" } },
  });
  h.socket.receive(message("a", 3, "published twice before we heard"));
  h.socket.receive(message("b", 2, "offset 1 went missing"));
  assert.deepEqual(h.log.recovered, [["a", false], ["b", false]]);
});

test("a subscribed frame's offset 0 is continued by offset 1 in another epoch too", async () => {
  const h = harness({ channels: [] });
  await h.connect();
  h.bus.subscribe("c");
  h.socket.receive({ type: "subscribed", subscribed: ["c"], denied: {}, positions: { c: { offset: 0, epoch: "unpublished-c" } } });
  h.socket.receive(message("c", 1, "first"));
  assert.deepEqual(h.log.recovered, []);
  assert.equal(h.log.messages.length, 1);
});
