// Presence on a fake socket: snapshots in welcome and subscribed frames, joins and
// leaves applied once, lists dropped whenever the connection stops keeping them current.
// test/integration.test.js runs the same client against the real server.

import { test } from "node:test";
import assert from "node:assert/strict";
import { harness } from "../test-support/fakes.js";

const ALICE = { info: { name: "Alice" }, connections: 1 };
const BOB = { info: { name: "Bob" }, connections: 2 };

/** A harness that also records presence, join and leave events. */
function presenceHarness(options) {
  const h = harness(options);
  h.log.presence = [];
  h.log.joins = [];
  h.log.leaves = [];
  h.bus.on("presence", (channel, members, count) => h.log.presence.push([channel, plain(members), count]));
  h.bus.on("join", (channel, user, info) => h.log.joins.push([channel, user, info]));
  h.bus.on("leave", (channel, user) => h.log.leaves.push([channel, user]));
  return h;
}

/** A members() Map as a plain object, for deepEqual; null stays null. */
function plain(members) {
  return members && Object.fromEntries([...members].map(([user, member]) => [user, { ...member }]));
}

test("a welcome's snapshot becomes members() and a presence event, after subscribed", async () => {
  const h = presenceHarness({ channels: ["a", "b"] });
  const order = [];
  h.bus.on("subscribed", (channel) => order.push(`subscribed ${channel}`));
  h.bus.on("presence", (channel) => order.push(`presence ${channel}`));
  await h.connect({ presence: { a: { alice: ALICE, bob: BOB } } });

  assert.deepEqual(plain(h.bus.members("a")), { alice: ALICE, bob: BOB });
  assert.equal(h.bus.presenceCount("a"), 2);
  assert.deepEqual(h.log.presence, [["a", { alice: ALICE, bob: BOB }, 2]]);
  assert.deepEqual(order, ["subscribed a", "subscribed b", "presence a"]);
  assert.equal(h.bus.members("b"), null, "no presence data for b");
  assert.equal(h.bus.presenceCount("b"), null);
});

test("members() hands out a copy: changing it changes nothing in the client", async () => {
  const h = presenceHarness();
  await h.connect({ presence: { a: { alice: ALICE } } });
  const members = h.bus.members("a");
  members.delete("alice");
  assert.throws(() => {
    "use strict";
    h.bus.members("a").get("alice").connections = 5;
  }, TypeError);
  assert.deepEqual(plain(h.bus.members("a")), { alice: ALICE });
});

test("a join adds a user once; a join for a listed user only updates the info", async () => {
  const h = presenceHarness();
  await h.connect({ presence: { a: { alice: ALICE } } });
  // The socket's own join arrives after the snapshot that already lists it.
  h.socket.receive({ type: "join", channel: "a", user: "alice", info: { name: "Alice B." } });
  h.socket.receive({ type: "join", channel: "a", user: "carol", info: { name: "Carol" } });
  h.socket.receive({ type: "join", channel: "a", user: "carol", info: { name: "Carol" } });

  assert.deepEqual(h.log.joins, [["a", "carol", { name: "Carol" }]]);
  assert.deepEqual(plain(h.bus.members("a")), {
    alice: { info: { name: "Alice B." }, connections: 1 },
    carol: { info: { name: "Carol" }, connections: 1 },
  });
});

test("a leave removes a listed user once; a leave for an unlisted user is ignored", async () => {
  const h = presenceHarness();
  await h.connect({ presence: { a: { alice: ALICE, bob: BOB } } });
  h.socket.receive({ type: "leave", channel: "a", user: "bob" });
  h.socket.receive({ type: "leave", channel: "a", user: "bob" });
  h.socket.receive({ type: "leave", channel: "a", user: "dave" }); // raced the snapshot

  assert.deepEqual(h.log.leaves, [["a", "bob"]]);
  assert.deepEqual([...h.bus.members("a").keys()], ["alice"]);
  assert.equal(h.bus.presenceCount("a"), 1);
});

test("joins and leaves for a channel without a list are ignored", async () => {
  const h = presenceHarness({ channels: ["a", "b"] });
  await h.connect({ presence: { a: { alice: ALICE } } });
  h.socket.receive({ type: "join", channel: "b", user: "carol", info: {} });
  h.socket.receive({ type: "leave", channel: "b", user: "carol" });
  h.socket.receive({ type: "join", channel: "elsewhere", user: "carol", info: {} });
  assert.deepEqual([h.log.joins, h.log.leaves, h.log.errors], [[], [], []]);
  assert.equal(h.bus.members("b"), null);
});

test("above the server's limit a snapshot is a count: members() is null, presenceCount() the count", async () => {
  const h = presenceHarness({ channels: ["big", "small"] });
  // A user named "count" maps to an object, a count is a number.
  const counted = { info: { name: "Count" }, connections: 1 };
  await h.connect({ presence: { big: { count: 1001 }, small: { count: counted } } });

  assert.equal(h.bus.members("big"), null);
  assert.equal(h.bus.presenceCount("big"), 1001);
  assert.deepEqual(plain(h.bus.members("small")), { count: counted });
  assert.deepEqual(h.log.presence, [
    ["big", null, 1001],
    ["small", { count: counted }, 1],
  ]);
  h.socket.receive({ type: "join", channel: "big", user: "late", info: {} });
  assert.deepEqual(h.log.joins, []);
  assert.equal(h.bus.presenceCount("big"), 1001, "a count is the snapshot's, not kept live");
});

test("a subscribed frame brings the snapshot of a channel joined later", async () => {
  const h = presenceHarness();
  await h.connect();
  h.bus.subscribe("later");
  h.socket.receive({
    type: "subscribed",
    subscribed: ["later"],
    denied: {},
    recovered: {},
    positions: {},
    presence: { later: { bob: BOB } },
  });
  assert.deepEqual(plain(h.bus.members("later")), { bob: BOB });
  assert.deepEqual(h.log.presence, [["later", { bob: BOB }, 1]]);
});

test("unsubscribing drops the list and ignores its late joins", async () => {
  const h = presenceHarness();
  await h.connect({ presence: { a: { alice: ALICE } } });
  h.bus.unsubscribe("a");
  h.socket.receive({ type: "join", channel: "a", user: "carol", info: {} });
  assert.equal(h.bus.members("a"), null);
  assert.equal(h.bus.presenceCount("a"), null);
  assert.deepEqual(h.log.joins, []);
});

test("a denied or taken-away channel drops its list, an unavailable one too", async () => {
  const h = presenceHarness({ channels: ["a", "b", "c"] });
  await h.connect({ presence: { a: { alice: ALICE }, b: { alice: ALICE } } });
  h.socket.receive({ type: "unsubscribed", channels: ["a"], reason: "server" });
  h.socket.receive({ type: "refreshed", expires_at: Math.floor(h.clock.now() / 1000) + 3600, revoked: ["b"] });
  assert.equal(h.bus.members("a"), null);
  assert.equal(h.bus.members("b"), null);

  h.bus.subscribe("d");
  h.socket.receive({ type: "subscribed", subscribed: [], denied: { d: "unavailable" }, recovered: {}, positions: {} });
  assert.equal(h.bus.members("d"), null);
});

test("a drop forgets every list; the next welcome's snapshot replaces it without join or leave events", async () => {
  const h = presenceHarness();
  await h.connect({ presence: { a: { alice: ALICE, bob: BOB } } });
  h.socket.drop(1006);
  assert.equal(h.bus.members("a"), null, "not connected: the list would go stale");
  assert.equal(h.bus.presenceCount("a"), null);

  await h.clock.advance(1000);
  await h.connect({ presence: { a: { alice: ALICE, carol: ALICE } } });
  assert.deepEqual([...h.bus.members("a").keys()], ["alice", "carol"]);
  assert.deepEqual([h.log.joins, h.log.leaves], [[], []]);
  assert.deepEqual(
    h.log.presence.map(([channel, members]) => [channel, Object.keys(members)]),
    [
      ["a", ["alice", "bob"]],
      ["a", ["alice", "carol"]],
    ],
  );
});

test("close() forgets the lists", async () => {
  const h = presenceHarness();
  await h.connect({ presence: { a: { alice: ALICE } } });
  h.bus.close();
  assert.equal(h.bus.members("a"), null);
});

test("a presence listener that unsubscribes stops the other channels' events cleanly", async () => {
  const h = presenceHarness({ channels: ["a", "b"] });
  h.bus.on("presence", (channel) => {
    if (channel === "a") h.bus.unsubscribe("b");
  });
  await h.connect({ presence: { a: { alice: ALICE }, b: { bob: BOB } } });
  assert.deepEqual(
    h.log.presence.map(([channel]) => channel),
    ["a"],
    "b was left before its event",
  );
  assert.equal(h.bus.members("b"), null);
  assert.deepEqual(h.log.errors, []);
});
