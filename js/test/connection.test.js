import { test } from "node:test";
import assert from "node:assert/strict";
import { CloseCodes, WsBus } from "../wsbus.js";
import { harness, settle } from "../test-support/fakes.js";

test("the handshake offers a fresh token as a subprotocol and every channel in the query, without since", async () => {
  const h = harness({ channels: ["a", "b"], tokens: ["aaa.bbb.c-_9"], tokenInHeader: true });
  const hello = await h.open();
  assert.deepEqual(h.socket.protocols, ["wsbus.v1", "wsbus.bearer.aaa.bbb.c-_9"]);
  assert.equal(h.socket.url, "ws://bus.test/ws?channels=a%2Cb");
  assert.deepEqual(hello, { type: "connect", token: "aaa.bbb.c-_9", channels: ["a", "b"] });
  assert.equal(h.socket.sent.length, 1); // no connect frame after the upgrade
});

test("by default the first frame is connect with a fresh token and every channel", async () => {
  const h = harness({ channels: ["a", "b"] });
  const hello = await h.open();
  assert.deepEqual(hello, { type: "connect", token: "token-1", channels: ["a", "b"] });
  assert.equal(h.socket.url, "ws://bus.test/ws");
  assert.equal(h.socket.protocols, undefined);
});

test("a token no header may carry, or a URL too long, goes in the connect frame", async () => {
  const long = "x".repeat(4097);
  const channels = Array.from({ length: 400 }, (_, n) => `channel:${n}`);
  for (const [token, wanted] of [["a b", ["a"]], ["a,b", ["a"]], [long, ["a"]], ["t", channels]]) {
    const h = harness({ channels: wanted, tokens: [token], tokenInHeader: true });
    const hello = await h.open();
    assert.equal(h.socket.protocols, undefined);
    assert.equal(h.socket.url, "ws://bus.test/ws");
    assert.deepEqual(hello, { type: "connect", token, channels: wanted });
    h.bus.close();
  }
});

test("state goes connecting then connected only once welcomed", async () => {
  const h = harness();
  assert.equal(h.bus.state, "disconnected");
  await h.open();
  assert.equal(h.bus.state, "connecting");
  await h.connect();
  assert.equal(h.bus.state, "connected");
  assert.deepEqual(h.log.states, ["connecting", "connected"]);
});

test("autoConnect (the default) starts connecting in the constructor", async () => {
  const h = harness({ autoConnect: true });
  assert.equal(h.bus.state, "connecting");
  await settle();
  assert.equal(h.sockets.length, 1);
  h.bus.close();
});

test("autoConnect: false waits for connect()", async () => {
  const h = harness();
  await settle();
  assert.equal(h.sockets.length, 0);
  assert.equal(h.tokenCalls, 0);
  h.bus.connect();
  await settle();
  assert.equal(h.sockets.length, 1);
});

test("a drop shows disconnected between connected and the next connecting", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(1006);
  assert.equal(h.bus.state, "disconnected");
  await h.clock.advance(h.clock.pendingDelays()[0]);
  assert.deepEqual(h.log.states, ["connecting", "connected", "disconnected", "connecting"]);
});

test("backoff attempt n waits min + random * (min(max, min * 2^n) - min)", async () => {
  const randoms = [0, 0.999999, 0.5, 1, 1, 1, 1, 1, 1, 1];
  const h = harness({ random: () => randoms.shift() });
  await h.open();
  const delays = [];
  for (let attempt = 1; attempt <= 10; attempt += 1) {
    h.socket.drop(1006);
    [delays[attempt]] = h.clock.pendingDelays();
    await h.clock.advance(delays[attempt]);
    assert.equal(h.sockets.length, attempt + 1, "one new socket per attempt");
    h.socket.open();
  }
  assert.equal(delays[1], 500); // random 0: the floor
  assert.ok(Math.abs(delays[2] - 2000) < 0.01); // ~1: the ceiling min * 2^2
  assert.equal(delays[3], 500 + 0.5 * (4000 - 500));
  assert.equal(delays[4], 8000);
  assert.equal(delays[5], 16000);
  for (const n of [6, 7, 8, 9, 10]) assert.equal(delays[n], 20000, "capped at maxReconnectDelay");
});

test("backoff delays stay within [min, ceiling] and are spread out (full jitter)", async () => {
  let seed = 42;
  const random = () => ((seed = (seed * 16807) % 2147483647) - 1) / 2147483646;
  const h = harness({ random });
  await h.open();
  const seen = [];
  for (let attempt = 1; attempt <= 8; attempt += 1) {
    h.socket.drop(1006);
    const [delay] = h.clock.pendingDelays();
    const ceiling = Math.min(20000, 500 * 2 ** attempt);
    assert.ok(delay >= 500 && delay <= ceiling, `attempt ${attempt}: ${delay}`);
    seen.push(delay);
    await h.clock.advance(delay);
    h.socket.open();
  }
  assert.equal(new Set(seen).size, seen.length);
});

test("a welcome resets the backoff", async () => {
  const h = harness({ random: () => 1 });
  await h.open();
  for (let attempt = 1; attempt <= 3; attempt += 1) {
    h.socket.drop(1006);
    await h.clock.advance(h.clock.pendingDelays()[0]);
    h.socket.open();
  }
  await h.connect();
  h.socket.drop(1006);
  assert.deepEqual(h.clock.pendingDelays(), [1000]); // attempt 1 again
});

for (const code of [1001, 1006, 1011, 1013, 4002, 1005, 4999]) {
  test(`close code ${code} reconnects with backoff`, async () => {
    const h = harness();
    await h.connect();
    h.socket.drop(code);
    assert.equal(h.bus.state, "disconnected");
    assert.equal(h.sockets.length, 1, "not at once");
    const [delay] = h.clock.pendingDelays();
    assert.ok(delay >= 500 && delay <= 1000);
    await h.clock.advance(delay);
    assert.equal(h.sockets.length, 2);
    assert.equal(h.tokenCalls, 2, "a fresh token for the new connection");
    assert.deepEqual(h.log.errors, []);
  });
}

test("a refused connect with only an error event (Node 20) backs off and tries again", async () => {
  const h = harness({ random: () => 1 });
  h.bus.connect();
  await settle();
  h.socket.refuse();
  assert.equal(h.bus.state, "disconnected");
  assert.equal(h.socket.closedByClient, 1000, "the failed socket is let go");
  assert.deepEqual(h.clock.pendingDelays(), [1000], "backoff attempt 1, no welcome timeout left");
  await h.clock.advance(1000);
  assert.equal(h.sockets.length, 2);
  await h.connect();
  assert.deepEqual(h.log.states, ["connecting", "disconnected", "connecting", "connected"]);
  assert.deepEqual(h.log.errors, []);
});

test("a refused connect with error then close (browsers) is one failed attempt, not two", async () => {
  const h = harness({ random: () => 1 });
  h.bus.connect();
  const delays = [];
  for (let attempt = 1; attempt <= 3; attempt += 1) {
    await settle();
    h.socket.refuse({ thenClose: true });
    delays.push(...h.clock.pendingDelays());
    await h.clock.advance(h.clock.pendingDelays()[0]);
  }
  assert.deepEqual(delays, [1000, 2000, 4000], "one backoff step per attempt");
  assert.equal(h.sockets.length, 4);
});

test("an error after open waits for the close event to decide", async () => {
  const h = harness();
  await h.open();
  h.socket.onerror({});
  assert.equal(h.bus.state, "connecting");
  assert.equal(h.socket.closedByClient, null);
  h.socket.drop(CloseCodes.UNAUTHORIZED); // the close code still rules: retry at once
  await settle();
  assert.equal(h.sockets.length, 2);
  assert.deepEqual(h.log.errors, []);
});

test("no welcome within connectTimeout (10 s by default): socket closed, error, backoff", async () => {
  const h = harness({ random: () => 1 });
  await h.open();
  assert.deepEqual(h.clock.pendingDelays(), [10000]);
  await h.clock.advance(9999);
  assert.equal(h.bus.state, "connecting");
  await h.clock.advance(1);
  assert.equal(h.socket.closedByClient, 1000);
  assert.equal(h.bus.state, "disconnected");
  assert.equal(h.log.errors.length, 1);
  assert.match(h.log.errors[0].message, /no welcome from the server within 10000 ms/);
  assert.deepEqual(h.clock.pendingDelays(), [1000]);
  h.socket.drop(1006); // a late close event from the abandoned socket changes nothing
  assert.deepEqual(h.clock.pendingDelays(), [1000]);
  await h.clock.advance(1000);
  assert.equal(h.sockets.length, 2);
});

test("a socket that never opens also times out", async () => {
  const h = harness({ connectTimeout: 3000 });
  h.bus.connect();
  await settle();
  await h.clock.advance(3000);
  assert.equal(h.socket.closedByClient, 1000);
  assert.equal(h.bus.state, "disconnected");
  assert.equal(h.log.errors.length, 1);
});

test("connectTimeout counts from the socket, not getToken, and a welcome cancels it", async () => {
  let release;
  const h = harness({ connectTimeout: 3000, getToken: () => new Promise((resolve) => (release = resolve)) });
  h.bus.connect();
  await h.clock.advance(60000); // a slow token endpoint is not the server's fault
  assert.equal(h.sockets.length, 0);
  release("late token");
  await settle();
  await h.clock.advance(2999);
  h.socket.open();
  h.welcome();
  await h.clock.advance(60000);
  assert.equal(h.bus.state, "connected");
  assert.equal(h.socket.closedByClient, null);
  assert.deepEqual(h.log.errors, []);
});

test("close code 1000 stops without an error", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(1000);
  assert.equal(h.bus.state, "closed");
  assert.deepEqual(h.clock.pendingDelays(), []);
  assert.deepEqual(h.log.errors, []);
  await h.clock.advance(60000);
  assert.equal(h.sockets.length, 1);
});

for (const code of [1002, 1007, 1009, 4400, 4403]) {
  test(`close code ${code} goes to closed and reports the code`, async () => {
    const h = harness();
    await h.connect();
    h.socket.drop(code, "nope");
    assert.equal(h.bus.state, "closed");
    assert.deepEqual(h.log.states.slice(-1), ["closed"]);
    assert.equal(h.log.errors.length, 1);
    assert.equal(h.log.errors[0].code, code);
    assert.equal(h.log.errors[0].reason, "nope");
    await h.clock.advance(60000);
    assert.equal(h.sockets.length, 1);
  });
}

test("4001 fetches a fresh token and reconnects at once", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(CloseCodes.TOKEN_EXPIRED);
  await settle();
  assert.equal(h.sockets.length, 2, "no backoff delay");
  h.socket.open();
  assert.equal(h.socket.sent[0].token, "token-2");
  assert.deepEqual(h.log.states, ["connecting", "connected", "disconnected", "connecting"]);
});

for (const code of [CloseCodes.TOKEN_EXPIRED, CloseCodes.RECONNECT]) {
  test(`${code} before any welcome backs off instead of spinning`, async () => {
    const h = harness();
    await h.open();
    h.socket.drop(code);
    await settle();
    assert.equal(h.sockets.length, 1);
    assert.equal(h.clock.pendingDelays().length, 1);
  });
}

test("4410 (session ended) stops: closed, disconnected(reason), no error, never reconnects", async () => {
  const h = harness();
  await h.connect();
  h.socket.drop(CloseCodes.SESSION_ENDED, "signed out everywhere");
  assert.equal(h.bus.state, "closed");
  assert.deepEqual(h.log.disconnected, [["signed out everywhere", "closed"]], "told once, already closed");
  assert.deepEqual(h.log.states, ["connecting", "connected", "closed"]);
  assert.deepEqual(h.log.errors, [], "the application's decision, not a failure");
  assert.deepEqual(h.clock.pendingDelays(), [], "no reconnect, refresh or welcome timer left");
  await h.clock.advance(3600 * 1000);
  h.bus.connect(); // closed is final
  await settle();
  assert.equal(h.sockets.length, 1);
  assert.equal(h.tokenCalls, 1);
});

test("4410 before a welcome stops too", async () => {
  const h = harness();
  await h.open();
  h.socket.drop(CloseCodes.SESSION_ENDED, "token revoked");
  assert.equal(h.bus.state, "closed");
  assert.deepEqual(h.log.disconnected, [["token revoked", "closed"]]);
  assert.deepEqual(h.clock.pendingDelays(), []);
});

test("other closes that stop the client emit no disconnected event", async () => {
  for (const code of [1000, 4403]) {
    const h = harness();
    await h.connect();
    h.socket.drop(code, "bye");
    assert.equal(h.bus.state, "closed");
    assert.deepEqual(h.log.disconnected, []);
  }
});

test("4012 fetches a fresh token and reconnects at once, recovering from where it was", async () => {
  const h = harness();
  await h.connect();
  h.socket.receive({ type: "message", channel: "a", offset: 7, epoch: "e", data: "seen" });
  h.socket.drop(CloseCodes.RECONNECT, "reconnect with a fresh token");
  await settle();
  assert.equal(h.sockets.length, 2, "no backoff delay");
  assert.equal(h.tokenCalls, 2);
  assert.deepEqual(h.clock.pendingDelays(), [10000], "only the new socket's welcome timeout");
  const hello = await h.open();
  assert.equal(hello.token, "token-2");
  assert.deepEqual(hello.since, { a: { offset: 7, epoch: "e" } });
  h.welcome();
  assert.deepEqual(h.log.states, ["connecting", "connected", "disconnected", "connecting", "connected"]);
  assert.deepEqual(h.log.errors, []);
  assert.deepEqual(h.log.disconnected, []);
});

test("a second 4012 before a welcome backs off instead of spinning", async () => {
  const h = harness({ random: () => 1 });
  await h.connect();
  h.socket.drop(CloseCodes.RECONNECT);
  await settle();
  assert.equal(h.sockets.length, 2);
  await h.open();
  h.socket.drop(CloseCodes.RECONNECT); // no welcome on this one
  await settle();
  assert.equal(h.sockets.length, 2, "not at once");
  assert.deepEqual(h.clock.pendingDelays(), [1000], "backoff attempt 1");
  await h.clock.advance(999);
  assert.equal(h.sockets.length, 2);
  await h.clock.advance(1);
  assert.equal(h.sockets.length, 3);
  assert.equal(h.tokenCalls, 3, "still a fresh token");
  await h.connect();
  h.socket.drop(CloseCodes.RECONNECT); // a welcome earns one immediate reconnect again
  await settle();
  assert.equal(h.sockets.length, 4);
});

test("4401 retries once at once with a fresh token, a second 4401 closes", async () => {
  const h = harness();
  await h.open();
  h.socket.drop(CloseCodes.UNAUTHORIZED);
  await settle();
  assert.equal(h.sockets.length, 2);
  h.socket.open();
  assert.equal(h.socket.sent[0].token, "token-2");
  h.socket.drop(CloseCodes.UNAUTHORIZED);
  assert.equal(h.bus.state, "closed");
  assert.equal(h.log.errors.length, 1);
  assert.equal(h.log.errors[0].code, 4401);
  await h.clock.advance(60000);
  assert.equal(h.sockets.length, 2);
});

test("4401 after a welcome counts afresh", async () => {
  const h = harness();
  await h.open();
  h.socket.drop(CloseCodes.UNAUTHORIZED);
  await h.connect();
  h.socket.drop(CloseCodes.UNAUTHORIZED);
  await settle();
  assert.equal(h.bus.state, "connecting");
  assert.equal(h.sockets.length, 3);
});

test("getToken rejection reports, backs off and retries until it works", async () => {
  const h = harness({ tokens: [new Error("idp down"), new Error("idp down"), "good"] });
  h.bus.connect();
  await settle();
  assert.equal(h.sockets.length, 0);
  assert.equal(h.bus.state, "disconnected");
  assert.equal(h.log.errors[0].message, "idp down");
  await h.clock.advance(h.clock.pendingDelays()[0]);
  assert.equal(h.log.errors.length, 2);
  const [second] = h.clock.pendingDelays();
  assert.ok(second >= 500 && second <= 2000, "attempt 2 of the backoff");
  await h.clock.advance(second);
  assert.equal(h.sockets.length, 1);
  const hello = await h.connect();
  assert.equal(hello.token, "good");
  assert.deepEqual(h.log.states, [
    "connecting", "disconnected", "connecting", "disconnected", "connecting", "connected",
  ]);
});

test("getToken that throws synchronously or returns a rejected non-Error is handled", async () => {
  let calls = 0;
  const h = harness({
    getToken: () => {
      calls += 1;
      if (calls === 1) throw new Error("sync throw");
      if (calls === 2) return Promise.reject("a string"); // eslint-disable-line prefer-promise-reject-errors
      return "plain value";
    },
  });
  h.bus.connect();
  await settle();
  await h.clock.advance(h.clock.pendingDelays()[0]);
  await h.clock.advance(h.clock.pendingDelays()[0]);
  assert.equal(h.log.errors.length, 2);
  assert.match(h.log.errors[1].message, /a string/);
  const hello = await h.open();
  assert.equal(hello.token, "plain value");
});

test("the WebSocket constructor throwing closes the bus with an error", async () => {
  const bus = new WsBus("ws://bus.test/ws", {
    getToken: async () => "t",
    autoConnect: false,
    WebSocket: class {
      constructor() {
        throw new SyntaxError("bad url");
      }
    },
  });
  const errors = [];
  bus.on("error", (error) => errors.push(error));
  bus.connect();
  await settle();
  assert.equal(bus.state, "closed");
  assert.equal(errors[0].message, "bad url");
});

test("http(s) URLs are turned into ws(s) URLs", async () => {
  const urls = [];
  for (const url of ["https://h.test/ws", "http://h.test/ws", "wss://h.test/ws"]) {
    const bus = new WsBus(url, {
      getToken: async () => "t",
      WebSocket: class {
        constructor(u) {
          urls.push(u);
        }
      },
    });
    await settle();
    bus.close();
  }
  assert.deepEqual(urls, ["wss://h.test/ws", "ws://h.test/ws", "wss://h.test/ws"]);
});

test("the constructor refuses a missing getToken or WebSocket", () => {
  assert.throws(() => new WsBus("ws://h.test/ws", { WebSocket: class {} }), TypeError);
  if (!globalThis.WebSocket) {
    assert.throws(() => new WsBus("ws://h.test/ws", { getToken: async () => "t" }), TypeError);
  }
});

test("CloseCodes lists the protocol's codes", () => {
  assert.deepEqual(
    Object.values(CloseCodes).sort(),
    [1000, 1001, 1002, 1006, 1007, 1009, 1011, 1013, 4001, 4002, 4012, 4400, 4401, 4403, 4408, 4410, 4429].sort(),
  );
  assert.ok(Object.isFrozen(CloseCodes));
  assert.equal(CloseCodes.SESSION_ENDED, 4410);
  assert.equal(CloseCodes.RECONNECT, 4012);
  assert.equal(CloseCodes.PROTOCOL_ERROR, 1002);
  assert.equal(CloseCodes.INVALID_PAYLOAD, 1007);
});

test("in a page, a relative URL resolves against location and becomes ws(s)", async () => {
  const urls = [];
  globalThis.location = { href: "https://app.test/rooms/1" };
  try {
    const bus = new WsBus("/ws", {
      getToken: async () => "t",
      WebSocket: class {
        constructor(u) {
          urls.push(u);
        }
      },
    });
    await settle();
    bus.close();
  } finally {
    delete globalThis.location;
  }
  assert.deepEqual(urls, ["wss://app.test/ws"]);
});
