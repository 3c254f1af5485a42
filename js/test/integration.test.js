// WsBus against a real aiohttp server with the plugin (tests/js_server.py, a Python
// subprocess): real sockets, real tokens, real close codes, real recovery.
//
// Needs Python with aiohttp_wsbus installed (WSBUS_PYTHON, else ../.venv/bin/python)
// and Node's WebSocket (`node --experimental-websocket` on Node 20; `npm test` passes
// it). Without them the tests are skipped, unless WSBUS_PYTHON is set (as in CI),
// where that is a failure.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { generateKeyPairSync } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { WsBus } from "../wsbus.js";
import { until, WAIT } from "../test-support/waiting.js";

const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const FAST = { minReconnectDelay: 20, maxReconnectDelay: 100 };

function findPython() {
  if (process.env.WSBUS_PYTHON) return process.env.WSBUS_PYTHON;
  const venv = join(REPO, ".venv", "bin", "python");
  return existsSync(venv) ? venv : null;
}

const python = findPython();
const missing = !python
  ? "no Python with aiohttp_wsbus (set WSBUS_PYTHON)"
  : typeof globalThis.WebSocket !== "function"
    ? "no global WebSocket: run with node --experimental-websocket (npm test does)"
    : null;
if (missing && process.env.WSBUS_PYTHON) {
  throw new Error(`integration tests are required but ${missing}`);
}
const it = (name, fn) => test(name, { skip: missing ?? false, timeout: 30000 }, fn);

/** The Python server (tests/js_server.py; `args` are its options): started once for this file, killed in after(). */
class Server {
  async start(args = []) {
    this.process = spawn(python, ["-m", "tests.js_server", ...args], {
      cwd: REPO,
      stdio: ["pipe", "pipe", "inherit"], // its stdin closing stops it too
    });
    const exited = new Promise((_, reject) => {
      this.process.once("exit", (code) => reject(new Error(`server exited early (${code})`)));
    });
    const lines = createInterface({ input: this.process.stdout });
    const ready = new Promise((resolve) => lines.once("line", resolve));
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("server did not start in time")), 15000);
    });
    try {
      const { port, api_key: apiKey } = JSON.parse(await Promise.race([ready, exited, timeout]));
      this.port = port;
      this.base = `http://127.0.0.1:${port}`;
      this.apiKey = apiKey;
    } finally {
      clearTimeout(timer);
      exited.catch(() => {}); // once started, an exit is stop()'s business
    }
  }

  async stop(signal = "SIGTERM") {
    const child = this.process;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const gone = new Promise((resolve) => child.once("exit", resolve));
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
    await gone;
    clearTimeout(timer);
  }

  async post(path, body, headers = {}) {
    const response = await fetch(this.base + path, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...headers },
      body: JSON.stringify(body ?? {}),
      signal: AbortSignal.timeout(WAIT),
    });
    const answer = await response.json();
    assert.ok(response.ok, `${path} answered ${response.status}: ${JSON.stringify(answer)}`);
    return answer;
  }

  token(claims = {}) {
    return this.post("/test/token", claims);
  }

  publish(channel, data) {
    return this.post("/ws/emit", { channel, data }, { "X-API-Key": this.apiKey });
  }

  kill() {
    return this.post("/test/kill");
  }

  /** GET with the API key; the parsed answer. */
  async get(path) {
    const response = await fetch(this.base + path, {
      headers: { "X-API-Key": this.apiKey },
      signal: AbortSignal.timeout(WAIT),
    });
    const answer = await response.json();
    assert.ok(response.ok, `${path} answered ${response.status}: ${JSON.stringify(answer)}`);
    return answer;
  }

  /** The bus's own control API (API key only): POST {base}/users/{user}/{action}, answered 202. */
  control(user, action, body = {}) {
    return this.post(`/ws/users/${encodeURIComponent(user)}/${action}`, body, { "X-API-Key": this.apiKey });
  }

  setBroker(available) {
    return this.post("/test/broker", { available });
  }

  /** The bus's own presence endpoint (API key): {channel, count, members?}. */
  async presence(channel) {
    const response = await fetch(`${this.base}/ws/channels/${channel}/presence`, {
      headers: { "X-API-Key": this.apiKey },
      signal: AbortSignal.timeout(WAIT),
    });
    assert.equal(response.status, 200);
    return response.json();
  }

  async subscribers(channel) {
    const response = await fetch(`${this.base}/test/subscribers/${channel}`, {
      signal: AbortSignal.timeout(WAIT),
    });
    return (await response.json()).count;
  }

  /** Resolves once `count` sockets are subscribed to `channel` on the server. */
  async untilSubscribers(channel, count) {
    const deadline = Date.now() + WAIT;
    while ((await this.subscribers(channel)) !== count) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${count} on ${channel}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  }
}

const server = new Server();
before(async () => {
  if (!missing) await server.start();
});
after(() => server.stop());

/** A WsBus on the server (or `on`) that records what it sees; closed when the test ends. */
function connect(t, { claims = {}, hold = async () => {}, on = server, ...options } = {}) {
  const seen = {
    states: [], subscribed: [], denied: [], errors: [], recovered: [], tokens: [], disconnected: [], backoffs: 0,
    presence: [], joins: [], leaves: [],
  };
  const bus = new WsBus(on.base + "/ws", {
    ...FAST,
    getToken: async () => {
      await hold(); // lets a test keep the client disconnected
      const { token, expires_at: expiresAt } = await on.token(claims);
      seen.tokens.push(expiresAt);
      return token;
    },
    random: () => {
      seen.backoffs += 1; // drawn once per backoff delay
      return Math.random();
    },
    ...options,
    autoConnect: false, // listen first, then connect
  });
  bus.on("state", (state) => seen.states.push(state));
  bus.on("subscribed", (channel, meta) => seen.subscribed.push([channel, meta]));
  bus.on("denied", (channel, reason) => seen.denied.push([channel, reason]));
  bus.on("error", (error) => seen.errors.push(error));
  bus.on("recovered", (channel, ok) => seen.recovered.push([channel, ok]));
  bus.on("disconnected", (reason) => seen.disconnected.push([reason, bus.state]));
  bus.on("presence", (channel, members, count) => seen.presence.push([channel, users(members), count]));
  bus.on("join", (channel, user, info) => seen.joins.push([channel, user, info]));
  bus.on("leave", (channel, user) => seen.leaves.push([channel, user]));
  t.after(() => bus.close());
  bus.connect();
  return { bus, seen };
}

/** Claims of a token that may read the presence of chat channels, with a display name. */
function member(sub) {
  return { sub, presence: ["chat:*"], info: { name: sub.toUpperCase() } };
}

/** The users of a members() Map, sorted; null stays null. */
function users(members) {
  return members && [...members.keys()].sort();
}

/** A members() Map in the form of the presence endpoint's `members`. */
function plain(members) {
  return Object.fromEntries([...members].map(([user, { info, connections }]) => [user, { info, connections }]));
}

/** Subscribes a handler that records [data, meta] pairs. */
function record(bus, channel) {
  const received = [];
  bus.subscribe(channel, (data, meta) => received.push([data, meta]));
  return received;
}

it("receives a published message on its channel, and nothing from other channels", async (t) => {
  const { bus, seen } = connect(t);
  const a = record(bus, "chat:a");
  const b = record(bus, "chat:b");
  await until(() => bus.state === "connected", "connected");

  const published = await server.publish("chat:b", { text: "to b" });
  await server.publish("chat:other", "granted but not subscribed");
  await server.publish("chat:a", { text: "to a" });
  await until(() => a.length === 1 && b.length === 1, "one message on each channel");

  const [{ offset, epoch }] = published.published;
  assert.deepEqual(b, [[{ text: "to b" }, { channel: "chat:b", offset, epoch, recovered: false }]]);
  assert.deepEqual(a[0][0], { text: "to a" });
  // A later message on chat:a arrives after anything else would have: nothing more came.
  await server.publish("chat:a", "last");
  await until(() => a.length === 2, "the last message");
  assert.equal(b.length, 1);
  assert.deepEqual(seen.errors, []);
});

it("offers the token in the handshake when told (the server echoes wsbus.v1 only), or a connect frame", async (t) => {
  const opened = [];
  class RecordedWebSocket extends globalThis.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      opened.push(this);
    }
  }
  for (const tokenInHeader of [true, false]) {
    const { bus, seen } = connect(t, { WebSocket: RecordedWebSocket, tokenInHeader });
    const received = record(bus, "chat:handshake");
    await until(() => bus.state === "connected", "connected");
    await server.publish("chat:handshake", tokenInHeader);
    await until(() => received.length === 1, "the message");
    assert.deepEqual(seen.errors, []);
    bus.close();
  }
  assert.deepEqual(
    opened.map((socket) => [socket.protocol, socket.url]),
    [
      ["wsbus.v1", `ws://127.0.0.1:${server.port}/ws?channels=chat%3Ahandshake`],
      ["", `ws://127.0.0.1:${server.port}/ws`],
    ],
  );
});

it("reports a channel the token does not grant as denied, and still serves the others", async (t) => {
  const { bus, seen } = connect(t, { channels: ["chat:ok", "secret:x"] });
  const ok = record(bus, "chat:ok");
  const secret = record(bus, "secret:x");
  await until(() => seen.denied.length === 1, "the denial");

  assert.deepEqual(seen.denied, [["secret:x", "forbidden"]]);
  await server.publish("secret:x", "not for alice");
  await server.publish("chat:ok", "for alice");
  await until(() => ok.length === 1, "the granted channel's message");
  assert.deepEqual(secret, []);
  assert.equal(bus.state, "connected");
});

it("refreshes a short-lived token on the live socket before the server would close it", async (t) => {
  // exp is 2 to 3 s away and the server allows no leeway: without a refresh it closes with 4001.
  const { bus, seen } = connect(t, { claims: { exp_in: 2 }, refreshBefore: 1 });
  const received = record(bus, "chat:refresh");
  await until(() => bus.state === "connected", "connected");
  const firstExpiry = seen.tokens[0];

  await until(
    () => Date.now() / 1000 > firstExpiry + 0.5 && seen.tokens.length >= 2,
    "the first token's expiry to pass",
  );
  await server.publish("chat:refresh", "still here");
  await until(() => received.length === 1, "a message after the first token expired");

  assert.deepEqual(seen.states, ["connecting", "connected"]); // never dropped
  assert.deepEqual(seen.errors, []);
});

it("recovers after the server drops the socket: every message once, in order", async (t) => {
  let gate = null; // while set, getToken waits on it: the client stays disconnected
  const { bus, seen } = connect(t, { hold: () => gate?.promise });
  const received = record(bus, "chat:recover");
  await until(() => bus.state === "connected", "connected");

  for (let n = 1; n <= 3; n++) await server.publish("chat:recover", n);
  await until(() => received.length === 3, "the live messages");

  gate = deferred();
  assert.equal((await server.kill()).killed, 1);
  await until(() => seen.states.includes("disconnected"), "the drop to be noticed");
  for (let n = 4; n <= 23; n++) await server.publish("chat:recover", n);
  // A publisher keeps going through the reconnect.
  const publisher = (async () => {
    for (let n = 24; n <= 43; n++) await server.publish("chat:recover", n);
  })();
  gate.resolve();
  await publisher;
  await until(() => received.length >= 43, "all 43 messages");
  await server.publish("chat:recover", 44);
  await until(() => received.length >= 44, "the last live message");

  const values = received.map(([data]) => data);
  assert.deepEqual(values, Array.from({ length: 44 }, (_, i) => i + 1));
  const offsets = received.map(([, meta]) => meta.offset);
  assert.deepEqual(offsets, Array.from({ length: 44 }, (_, i) => offsets[0] + i));
  assert.equal(new Set(received.map(([, meta]) => meta.epoch)).size, 1);
  const recovered = received.filter(([, meta]) => meta.recovered).map(([data]) => data);
  for (let n = 4; n <= 23; n++) assert.ok(recovered.includes(n), `message ${n} was replayed`);
  assert.ok(!recovered.some((n) => n <= 3 || n === 44), `only missed messages replayed: ${recovered}`);
  assert.deepEqual(seen.recovered, [["chat:recover", true]]);
  assert.deepEqual(
    seen.states,
    ["connecting", "connected", "disconnected", "connecting", "connected"],
  );
});

it("recovers a channel it had seen nothing on yet, from the welcome's position", async (t) => {
  let gate = null;
  const { bus, seen } = connect(t, { hold: () => gate?.promise });
  const received = record(bus, "chat:quiet");
  await until(() => bus.state === "connected", "connected");

  gate = deferred();
  assert.equal((await server.kill()).killed, 1);
  await until(() => seen.states.includes("disconnected"), "the drop to be noticed");
  for (let n = 1; n <= 3; n++) await server.publish("chat:quiet", n);
  gate.resolve();
  await until(() => received.length === 3, "the three missed messages");

  assert.deepEqual(
    received.map(([data, meta]) => [data, meta.offset, meta.recovered]),
    [[1, 1, true], [2, 2, true], [3, 3, true]],
  );
  assert.deepEqual(seen.recovered, [["chat:quiet", true]]);
});

it("subscribes and unsubscribes on a live connection", async (t) => {
  const { bus, seen } = connect(t, { channels: ["chat:always"] });
  const always = record(bus, "chat:always");
  await until(() => bus.state === "connected", "connected");

  const later = record(bus, "chat:later"); // a subscribe frame on the open socket
  await server.untilSubscribers("chat:later", 1);
  await server.publish("chat:later", "one");
  await until(() => later.length === 1, "the first message on the new channel");

  bus.unsubscribe("chat:later");
  await server.untilSubscribers("chat:later", 0);
  await server.publish("chat:later", "not delivered");
  await server.publish("chat:always", "marker");
  await until(() => always.length === 1, "a message on the channel still joined");
  const again = record(bus, "chat:later");
  await server.untilSubscribers("chat:later", 1);
  await server.publish("chat:later", "two");
  await until(() => again.length === 1, "a message after joining again");

  assert.deepEqual(later.map(([data]) => data), ["one"]);
  assert.deepEqual(again.map(([data]) => data), ["two"]);
  assert.deepEqual(seen.states, ["connecting", "connected"]);
});

it("reports each channel the server subscribed, with its position, and again after a reconnect", async (t) => {
  let gate = null;
  const { bus, seen } = connect(t, { channels: ["chat:told", "secret:no"], hold: () => gate?.promise });
  const told = record(bus, "chat:told");
  await until(() => seen.subscribed.length === 1, "the welcome's channel");
  const [[channel, { position }]] = seen.subscribed;
  assert.equal(channel, "chat:told");
  assert.equal(position.offset, 0, "nothing published yet");
  assert.deepEqual(seen.denied, [["secret:no", "forbidden"]]);

  const published = (await server.publish("chat:told-later", "first")).published[0];
  record(bus, "chat:told-later"); // a subscribe frame on the live socket
  await until(() => seen.subscribed.length === 2, "the channel joined later");
  assert.deepEqual(seen.subscribed[1], ["chat:told-later", { position: { offset: 1, epoch: published.epoch } }]);

  await server.publish("chat:told", "seen live");
  await until(() => told.length === 1, "a live message");
  gate = deferred();
  assert.equal((await server.kill()).killed, 1);
  await until(() => seen.states.includes("disconnected"), "the drop to be noticed");
  const missed = (await server.publish("chat:told", "missed")).published[0];
  gate.resolve();
  await until(() => seen.subscribed.length === 4, "both channels again in the new welcome");
  assert.deepEqual(new Map(seen.subscribed.slice(2)), new Map([
    ["chat:told", { position: { offset: 2, epoch: missed.epoch }, recovered: true }],
    ["chat:told-later", { position: { offset: 1, epoch: published.epoch }, recovered: true }],
  ]));
  await until(() => told.length === 2, "the missed message, replayed");
  assert.deepEqual(told.map(([data, meta]) => [data, meta.recovered]), [["seen live", false], ["missed", true]]);
  assert.deepEqual(seen.errors, []);
});

it("retries a channel denied as unavailable while the broker is down, and keeps its handlers", async (t) => {
  // Connected first: while the broker is down, new sockets are refused with 1013.
  const { bus, seen } = connect(t, { channels: [] });
  await until(() => bus.state === "connected", "connected");
  await server.setBroker(false);
  t.after(() => server.setBroker(true));
  const received = record(bus, "chat:flaky");
  await until(() => seen.denied.length >= 2, "the denial, and a retry denied too");
  assert.ok(seen.denied.every(([channel, reason]) => channel === "chat:flaky" && reason === "unavailable"));
  assert.equal(bus.state, "connected");

  await server.setBroker(true);
  await server.untilSubscribers("chat:flaky", 1);
  await server.publish("chat:flaky", "back");
  await until(() => received.length === 1, "a message once the broker is back");
  assert.deepEqual(received[0][0], "back");
  assert.deepEqual(seen.states, ["connecting", "connected"]);
});

it("stops for good when the application ends the session (4410), with the application's reason", async (t) => {
  const { bus, seen } = connect(t, { claims: { sub: "ended" }, channels: ["chat:ended"] });
  await until(() => bus.state === "connected", "connected");
  const other = connect(t, { claims: { sub: "bystander" }, channels: ["chat:ended"] });
  await until(() => other.bus.state === "connected", "the other user connected");

  assert.deepEqual(await server.control("ended", "disconnect", { reason: "signed out everywhere" }), {
    accepted: true,
  });
  await until(() => bus.state === "closed", "closed");
  assert.deepEqual(seen.disconnected, [["signed out everywhere", "closed"]]);
  assert.deepEqual(seen.states, ["connecting", "connected", "closed"]);
  assert.deepEqual(seen.errors, []);
  await server.untilSubscribers("chat:ended", 1); // only the bystander's socket is left
  bus.connect(); // closed is final: no socket, no token
  assert.equal(bus.state, "closed");
  assert.equal(seen.tokens.length, 1);
  assert.equal(seen.backoffs, 0);
  assert.equal(other.bus.state, "connected");
  assert.deepEqual(other.seen.disconnected, []);
});

it("a revoked token ends the session as 4410 with reason token revoked, and the client stops", async (t) => {
  const { bus, seen } = connect(t, { claims: { sub: "revoked-user" } });
  await until(() => bus.state === "connected", "connected");
  const revokedUntil = Math.floor(Date.now() / 1000) + 60;
  await server.post("/ws/revocations", { user: "revoked-user", until: revokedUntil }, { "X-API-Key": server.apiKey });
  await until(() => bus.state === "closed", "closed");
  assert.deepEqual(seen.disconnected, [["token revoked", "closed"]]);
  assert.deepEqual(seen.errors, []);
  assert.equal(seen.tokens.length, 1, "no reconnect attempt");
});

it("reconnects at once with a fresh token when asked to (4012), and the new token rules", async (t) => {
  const claims = { sub: "regranted", channels: ["chat:*", "secret:*"] };
  const { bus, seen } = connect(t, { claims, channels: ["chat:kept", "secret:plans"] });
  const kept = record(bus, "chat:kept");
  await until(() => bus.state === "connected", "connected");
  await server.publish("chat:kept", "before");
  await until(() => kept.length === 1, "a message before");

  claims.channels = ["chat:*"]; // the application takes secret:* away, then asks for a new token
  await server.control("regranted", "disconnect", { reconnect: true });
  await until(() => seen.states.filter((state) => state === "connected").length === 2, "a welcome again");
  await until(() => seen.denied.length === 1, "the channel the fresh token no longer grants");

  assert.deepEqual(seen.denied, [["secret:plans", "forbidden"]]);
  assert.equal(seen.tokens.length, 2, "getToken asked again");
  assert.equal(seen.backoffs, 0, "no backoff delay");
  assert.deepEqual(seen.states, ["connecting", "connected", "disconnected", "connecting", "connected"]);
  assert.deepEqual(seen.disconnected, []);
  assert.deepEqual(seen.errors, []);
  await server.publish("chat:kept", "after");
  await until(() => kept.length === 2, "a message after");
  assert.deepEqual(kept.map(([data]) => data), ["before", "after"]);
});

it("drops a channel the application unsubscribed the user from, and is told why", async (t) => {
  const { bus, seen } = connect(t, { claims: { sub: "moved" }, channels: ["chat:old", "chat:stay"] });
  const old = record(bus, "chat:old");
  const stay = record(bus, "chat:stay");
  await until(() => bus.state === "connected", "connected");

  await server.control("moved", "unsubscribe", { channels: ["chat:old"] });
  await until(() => seen.denied.length === 1, "the server's unsubscribe");
  assert.deepEqual(seen.denied, [["chat:old", "server"]]);
  await server.untilSubscribers("chat:old", 0);
  await server.publish("chat:old", "never delivered");
  await server.publish("chat:stay", "marker");
  await until(() => stay.length === 1, "a message on the channel still joined");
  assert.deepEqual(old, []);
  assert.equal(bus.state, "connected");
  assert.deepEqual(seen.errors, []);
});

it("reconnects after the server is killed and restarted on the same port", async (t) => {
  // Node 20's WebSocket fires `error` and no `close` when the connection is refused;
  // a client that waits for `close` stays "connecting" forever once the server is gone.
  const keyDir = mkdtempSync(join(tmpdir(), "wsbus-restart-"));
  t.after(() => rmSync(keyDir, { recursive: true, force: true }));
  const keyFile = join(keyDir, "key.pem");
  const { privateKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  writeFileSync(keyFile, privateKey.export({ type: "pkcs8", format: "pem" }));
  const restarting = new Server();
  await restarting.start(["--key-file", keyFile]);
  t.after(() => restarting.stop());

  // One token, minted before the kill: both servers sign with the same key, and the
  // token endpoint is down while the server is, so only the WebSocket can fail.
  let token = null;
  let attempts = 0;
  let backoffs = 0;
  const seen = { states: [], errors: [] };
  const bus = new WsBus(restarting.base + "/ws", {
    ...FAST,
    getToken: async () => {
      attempts += 1;
      token ??= (await restarting.token()).token;
      return token;
    },
    random: () => {
      backoffs += 1;
      return Math.random();
    },
    autoConnect: false,
  });
  t.after(() => bus.close());
  bus.on("state", (state) => seen.states.push(state));
  bus.on("error", (error) => seen.errors.push(error));
  const received = record(bus, "chat:restart");
  bus.connect();
  await until(() => bus.state === "connected", "connected");

  await restarting.stop("SIGKILL");
  const attemptsBefore = attempts;
  await until(() => attempts >= attemptsBefore + 3, "connect attempts against the dead server");
  await restarting.start(["--key-file", keyFile, "--port", String(restarting.port)]);
  await until(() => seen.states.filter((state) => state === "connected").length === 2, "a welcome again");
  await restarting.publish("chat:restart", "after the restart");
  await until(() => received.length === 1, "a message from the restarted server");

  assert.deepEqual(received[0][0], "after the restart");
  // Every failed attempt is one connecting -> disconnected step, never two of either.
  const steps = seen.states.slice(2, -1);
  assert.ok(steps.length >= 6, `attempts while down: ${steps}`);
  steps.forEach((state, i) => assert.equal(state, i % 2 ? "connecting" : "disconnected", `${steps}`));
  assert.equal(backoffs, steps.length / 2, "one backoff delay per failed attempt");
  assert.deepEqual(seen.errors, []);
});

it("publishes and calls RPC methods over the socket; refusals reject with their code", async (t) => {
  const { bus, seen } = connect(t, { claims: { channels: ["chat:*", "stamped:*"], publish: ["chat:*", "stamped:*"] } });
  const own = record(bus, "chat:two-way");
  const stamped = record(bus, "stamped:room");
  await until(() => bus.state === "connected", "connected");

  const landed = await bus.publish("chat:two-way", { text: "hi" }, { id: "js-1" });
  assert.equal(landed.offset, 1);
  assert.deepEqual(await bus.publish("chat:two-way", { text: "hi" }, { id: "js-1" }), landed, "published once");
  await bus.publish("stamped:room", { text: "who?" });
  await until(() => own.length === 1 && stamped.length === 1, "both messages");
  assert.deepEqual(own[0], [{ text: "hi" }, { channel: "chat:two-way", ...landed, recovered: false }]);
  assert.deepEqual(stamped[0][0], { from: "alice", data: { text: "who?" } });
  await assert.rejects(bus.publish("news:x", 1), { name: "WsBusRequestError", code: "forbidden" });

  assert.deepEqual(await bus.rpc("echo", [1, 2]), { user: "alice", data: [1, 2] });
  await assert.rejects(bus.rpc("nope"), { code: "not_found" });
  await assert.rejects(bus.rpc("invalid"), { code: "invalid", reason: "always invalid" });
  assert.deepEqual(seen.errors, []);
});

it("delivers ephemeral messages live, with no position, and reads history over the socket", async (t) => {
  const { bus: speaker } = connect(t, { claims: { sub: "bob", publish: ["chat:*"] } });
  const { bus: listener, seen } = connect(t);
  const received = record(listener, "chat:typing");
  await until(() => speaker.state === "connected", "speaker connected");
  await server.untilSubscribers("chat:typing", 1);

  assert.equal(await speaker.publish("chat:typing", "bob is typing", { ephemeral: true }), undefined);
  await server.publish("chat:typing", "said");
  await until(() => received.length === 2, "both messages");
  assert.deepEqual(received[0], ["bob is typing", { channel: "chat:typing", offset: 0, epoch: "", recovered: false, ephemeral: true }]);
  assert.equal(received[1][1].offset, 1);
  const page = await listener.history("chat:typing", { limit: 5 });
  assert.deepEqual(page.messages, [{ offset: 1, data: "said" }], "the ephemeral one is not in history");
  assert.deepEqual(seen.recovered, [], "an ephemeral message is no gap");
});

it("getState closes the load-then-subscribe race: what is published meanwhile arrives once, in order", async (t) => {
  for (const n of [1, 2, 3]) await server.publish("chat:loaded", `before ${n}`);
  const { bus, seen } = connect(t);
  await until(() => bus.state === "connected", "connected");
  let loaded = null;
  const received = [];
  bus.subscribe("chat:loaded", (data) => received.push(data), {
    getState: async () => {
      loaded = await server.get("/ws/channels/chat:loaded/history");
      // Published after the state was read and before the subscribe: the race.
      for (const n of [1, 2, 3]) await server.publish("chat:loaded", `during ${n}`);
      return loaded.position;
    },
  });
  await until(() => received.length >= 3, "the three published during the load");
  await server.publish("chat:loaded", "after");
  await until(() => received.length >= 4, "the live one");

  assert.deepEqual(loaded.messages.map((m) => m.data), ["before 1", "before 2", "before 3"]);
  assert.deepEqual(received, ["during 1", "during 2", "during 3", "after"]);
  assert.deepEqual(seen.recovered, [["chat:loaded", true]]);
  assert.deepEqual(seen.errors, []);
});

it("rewind replays the last messages on the first subscribe", async (t) => {
  for (const n of [1, 2, 3, 4, 5]) await server.publish("chat:rewound", n);
  const { bus } = connect(t);
  const received = [];
  bus.subscribe("chat:rewound", (data, meta) => received.push([data, meta.recovered]), { rewind: 2 });
  await until(() => received.length === 2, "the last two");
  await server.publish("chat:rewound", 6);
  await until(() => received.length === 3, "the live one");
  assert.deepEqual(received, [[4, true], [5, true], [6, false]]);
});

it("a reconnect storm under the default limits: every client comes back, none is refused", async (t) => {
  const clients = [];
  for (let i = 0; i < 30; i += 1) {
    const { bus, seen } = connect(t, { claims: { sub: `storm-${i % 3}` } });
    const received = record(bus, "chat:storm");
    clients.push({ bus, seen, received });
  }
  await until(() => clients.every(({ bus }) => bus.state === "connected"), "all connected");
  // Each also joins channels one subscribe() at a time on the live socket.
  for (const { bus } of clients) for (let n = 0; n < 20; n += 1) bus.subscribe(`chat:storm-${n}`);
  await server.untilSubscribers("chat:storm-19", 30);
  for (let drop = 1; drop <= 5; drop += 1) {
    await server.kill();
    const welcomes = drop + 1;
    await until(
      () => clients.every(({ seen }) => seen.states.filter((s) => s === "connected").length === welcomes),
      `every client back after drop ${drop}`,
    );
  }
  await server.untilSubscribers("chat:storm", 30);
  await server.publish("chat:storm", "after the storm");
  await until(() => clients.every(({ received }) => received.length === 1), "every client got it");
  for (const { seen } of clients) assert.deepEqual(seen.errors, []);
  const response = await fetch(`${server.base}/test/rate_limited`, { signal: AbortSignal.timeout(WAIT) });
  assert.deepEqual(await response.json(), {}, "no limit was reached");
});

it("a user's socket beyond max_connections_per_user is closed 4408: that client stops with an error", async (t) => {
  const limited = new Server();
  await limited.start(["--settings", JSON.stringify({ max_connections_per_user: 1 })]);
  t.after(() => limited.stop());
  const { token } = await limited.token({ sub: "alice" });
  const open = (seen) => {
    const bus = new WsBus(limited.base + "/ws", { ...FAST, getToken: async () => token, autoConnect: false });
    t.after(() => bus.close());
    bus.on("state", (state) => seen.states.push(state));
    bus.on("error", (error) => seen.errors.push(error));
    bus.connect();
    return bus;
  };
  const first = { states: [], errors: [] };
  const firstBus = open(first);
  await until(() => firstBus.state === "connected", "the first socket connected");
  const second = { states: [], errors: [] };
  const secondBus = open(second);
  await until(() => secondBus.state === "closed", "the second client stopped");
  assert.equal(second.errors.length, 1);
  assert.equal(second.errors[0].code, 4408);
  assert.deepEqual(second.states, ["connecting", "closed"]);
  assert.equal(firstBus.state, "connected");
  assert.deepEqual(first.errors, []);
});

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

it("lists who is in a presence channel and follows each join and leave once", async (t) => {
  const room = "chat:presence";
  const alice = connect(t, { claims: member("alice"), channels: [room] });
  await until(() => alice.seen.presence.length === 1, "alice's snapshot");
  assert.deepEqual(alice.seen.presence, [[room, ["alice"], 1]]);

  const bob = connect(t, { claims: member("bob"), channels: [room] });
  await until(() => alice.seen.joins.length === 1, "bob's join");
  assert.deepEqual(alice.seen.joins, [[room, "bob", { name: "BOB" }]]); // her own join was no event
  const bobAgain = connect(t, { claims: member("bob"), channels: [room] }); // a second tab
  await until(() => bobAgain.seen.presence.length === 1, "the second tab's snapshot");
  assert.deepEqual(plain(bobAgain.bus.members(room)), (await server.presence(room)).members);
  assert.equal(bobAgain.bus.members(room).get("bob").connections, 2);
  await until(() => bob.bus.presenceCount(room) === 2, "bob's list has alice and bob");

  bob.bus.close();
  bobAgain.bus.close();
  await until(() => alice.seen.leaves.length === 1, "bob's leave");
  const carol = connect(t, { claims: member("carol"), channels: [room] });
  await until(() => alice.seen.joins.length === 2, "carol's join, after anything bob's tabs caused");
  assert.deepEqual(alice.seen.leaves, [[room, "bob"]]); // one leave for two tabs
  assert.deepEqual(users(alice.bus.members(room)), ["alice", "carol"]);
  assert.deepEqual(plain(alice.bus.members(room)), (await server.presence(room)).members);
  assert.deepEqual(carol.seen.joins, []);
  assert.deepEqual([alice.seen.errors, bob.seen.errors, carol.seen.errors], [[], [], []]);
});

it("after a drop the welcome's fresh snapshot replaces the list, with no join or leave for what changed", async (t) => {
  const room = "chat:presence-drop";
  let gate = null;
  const alice = connect(t, {
    claims: member("alice"),
    channels: [room],
    hold: () => gate?.promise,
  });
  await until(() => alice.seen.presence.length === 1, "alice's snapshot");
  const bob = connect(t, { claims: member("bob"), channels: [room] });
  await until(() => alice.seen.joins.length === 1 && bob.bus.presenceCount(room) === 2, "both listed");

  gate = deferred();
  assert.ok((await server.kill()).killed >= 2);
  await until(() => alice.bus.state !== "connected", "alice dropped");
  assert.equal(alice.bus.members(room), null); // no stale list while disconnected
  await until(() => bob.bus.state === "connected" && bob.bus.presenceCount(room) === 1, "bob back, alone");
  bob.bus.close();
  const carol = connect(t, { claims: member("carol"), channels: [room] });
  await until(() => carol.bus.presenceCount(room) === 1, "carol in, bob gone");
  gate.resolve();
  await until(() => alice.seen.presence.length === 2, "alice's fresh snapshot");

  assert.deepEqual(alice.seen.presence, [
    [room, ["alice"], 1],
    [room, ["alice", "carol"], 2],
  ]);
  // carol came and bob went while she was away: the snapshot says so, no event does.
  assert.deepEqual(alice.seen.joins, [[room, "bob", { name: "BOB" }]]);
  assert.deepEqual(alice.seen.leaves, []);
});

it("unsubscribing drops the list; a token without the presence grant gets none", async (t) => {
  const room = "chat:presence-leave";
  const alice = connect(t, { claims: member("alice"), channels: [room] });
  const blind = connect(t, { claims: { sub: "eve" }, channels: [room] });
  await until(() => alice.bus.presenceCount(room) === 2, "eve listed for alice");
  await until(() => blind.seen.subscribed.length === 1, "eve subscribed");
  assert.equal(blind.bus.members(room), null);
  assert.equal(blind.bus.presenceCount(room), null);

  alice.bus.unsubscribe(room);
  assert.equal(alice.bus.members(room), null);
  assert.equal(alice.bus.presenceCount(room), null);
  // eve is present all the same: she is listed, with no info in her token.
  assert.deepEqual((await server.presence(room)).members.eve, { info: {}, connections: 1 });
  assert.deepEqual([blind.seen.presence, blind.seen.joins, blind.seen.leaves], [[], [], []]);
});

it("above max_presence_members a snapshot is a count: members() is null", async (t) => {
  const small = new Server();
  await small.start(["--max-presence-members", "1"]);
  t.after(() => small.stop());
  const room = "chat:crowded";
  const alice = connect(t, { on: small, claims: member("alice"), channels: [room] });
  await until(() => alice.seen.presence.length === 1, "alice's snapshot");
  const bob = connect(t, { on: small, claims: member("bob"), channels: [room] });
  await until(() => bob.seen.presence.length === 1, "bob's snapshot");

  assert.deepEqual(alice.seen.presence, [[room, ["alice"], 1]]);
  assert.deepEqual(bob.seen.presence, [[room, null, 2]]);
  assert.equal(bob.bus.members(room), null);
  assert.equal(bob.bus.presenceCount(room), 2);
  assert.deepEqual(await small.presence(room), { channel: room, count: 2 });
});
