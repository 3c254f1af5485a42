// Test doubles for the WsBus unit tests: a controllable clock, a scriptable WebSocket,
// and a harness that wires them to a bus. Lives outside test/ because Node 20's
// `node --test test/` runs every .js file under test/ as a test file.

import { afterEach } from "node:test";
import assert from "node:assert/strict";
import { WsBus } from "../wsbus.js";

/** A clock whose timers run only when the test advances it. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.time = start;
    this.timers = new Map(); // id -> {at, fn, delay}
    this.nextId = 1;
    this.setTimeout = (fn, delay) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.time + delay, fn, delay });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
    this.now = () => this.time;
  }

  /** Delays of the timers still pending, in the order they were set. */
  pendingDelays() {
    return [...this.timers.values()].map((timer) => timer.delay);
  }

  /** Moves time forward, running due timers in order and settling promises after each. */
  async advance(ms) {
    const end = this.time + ms;
    for (;;) {
      const due = [...this.timers.entries()]
        .filter(([, timer]) => timer.at <= end)
        .sort((a, b) => a[1].at - b[1].at || a[0] - b[0]);
      if (!due.length) break;
      const [id, timer] = due[0];
      this.timers.delete(id);
      this.time = Math.max(this.time, timer.at);
      timer.fn();
      await settle();
    }
    this.time = end;
    await settle();
  }
}

/** Lets pending promise callbacks (getToken, async connect steps) run. */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** A WebSocket class whose instances the test drives from the server's side. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      // A token offered in the handshake is recorded as the connect frame it replaces.
      this.sent = protocols ? [handshakeConnect(url, protocols)] : [];
      this.closedByClient = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }

    close(code) {
      this.closedByClient = code ?? 1005;
      this.readyState = 3;
    }

    // -- the server's side --
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }

    receive(frame) {
      this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    }

    /** The connection cannot be made: Node 20 fires only `error`; browsers `error` then `close` (1006). */
    refuse({ thenClose = false } = {}) {
      this.readyState = 3;
      this.onerror?.({});
      if (thenClose) this.onclose?.({ code: 1006, reason: "" });
    }

    drop(code = 1006, reason = "") {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code, reason });
    }

    framesOfType(type) {
      return this.sent.filter((frame) => frame.type === type);
    }
  }
  return { FakeWebSocket, sockets };
}

/** The connect a handshake carries (docs/protocol.md): the token from its protocols, the rest from its query. */
export function handshakeConnect(url, protocols) {
  assert.equal(protocols.length, 2);
  assert.equal(protocols[0], "wsbus.v1");
  assert.ok(protocols[1].startsWith("wsbus.bearer."));
  const query = new URL(url).searchParams;
  const frame = { type: "connect", token: protocols[1].slice("wsbus.bearer.".length) };
  frame.channels = query.get("channels")?.split(",") ?? [];
  for (const name of ["since", "rewind"]) if (query.has(name)) frame[name] = JSON.parse(query.get(name));
  return frame;
}

// Every test file that imports this module fails on any unhandled rejection.
const unhandled = [];
process.on("unhandledRejection", (reason) => unhandled.push(reason));
afterEach(async () => {
  await settle();
  assert.deepEqual(unhandled.splice(0), [], "unhandled promise rejection");
});

/**
 * Builds a bus on a fake clock and fake sockets; records states, errors and events.
 * `tokens` is the sequence getToken() resolves to (Error entries reject).
 */
export function harness(options = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const log = { states: [], errors: [], subscribed: [], denied: [], recovered: [], messages: [], disconnected: [] };
  let tokenCalls = 0;
  const tokens = options.tokens;
  const getToken =
    options.getToken ??
    (async () => {
      tokenCalls += 1;
      const token = tokens ? tokens[Math.min(tokenCalls, tokens.length) - 1] : `token-${tokenCalls}`;
      if (token instanceof Error) throw token;
      return token;
    });
  const { tokens: _tokens, ...busOptions } = options;
  const bus = new WsBus("ws://bus.test/ws", {
    channels: ["a"],
    minReconnectDelay: 500,
    maxReconnectDelay: 20000,
    refreshBefore: 30,
    random: () => 0.5,
    autoConnect: false,
    ...busOptions,
    getToken,
    WebSocket: FakeWebSocket,
    timers: { setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now },
  });
  bus.on("state", (state) => log.states.push(state));
  bus.on("error", (error) => log.errors.push(error));
  bus.on("subscribed", (channel, meta) => log.subscribed.push([channel, meta]));
  bus.on("denied", (channel, reason) => log.denied.push([channel, reason]));
  bus.on("disconnected", (reason) => log.disconnected.push([reason, bus.state]));
  bus.on("recovered", (channel, ok) => log.recovered.push([channel, ok]));
  bus.on("message", (channel, data, meta) => log.messages.push([channel, data, meta]));

  const h = {
    bus,
    clock,
    sockets,
    log,
    get tokenCalls() {
      return tokenCalls;
    },
    get socket() {
      return sockets[sockets.length - 1];
    },
    /** connect() (if needed), open the socket; returns the connect frame. */
    async open() {
      if (bus.state === "disconnected" && !sockets.length) bus.connect();
      await settle();
      h.socket.open();
      return h.socket.sent[0];
    },
    /** Answers the current socket's connect frame with a welcome (fields overridable). */
    welcome(fields = {}) {
      const hello = h.socket.sent[0];
      h.socket.receive({
        type: "welcome",
        client: "c1",
        user: "u1",
        expires_at: Math.floor(clock.now() / 1000) + 3600,
        subscribed: hello.channels,
        denied: {},
        recovered: {},
        positions: {},
        ...fields,
      });
      return hello;
    },
    /** open() then welcome(); returns the connect frame. */
    async connect(fields = {}) {
      await h.open();
      return h.welcome(fields);
    },
  };
  return h;
}
