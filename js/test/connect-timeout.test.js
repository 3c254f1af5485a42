// connectTimeout over a real socket: a raw TCP server that completes the WebSocket
// upgrade and then never answers (a stuck proxy, a wedged server). Needs Node's
// WebSocket (`node --experimental-websocket` on Node 20); skipped without it, unless
// WSBUS_PYTHON is set (as in CI), where that is a failure.

import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { once } from "node:events";
import { createServer } from "node:net";
import { WsBus } from "../wsbus.js";
import { until, WAIT } from "../test-support/waiting.js";

const missing = typeof globalThis.WebSocket !== "function" ? "no global WebSocket: run with node --experimental-websocket" : null;
if (missing && process.env.WSBUS_PYTHON) throw new Error(`these tests are required but ${missing}`);

/**
 * Accepts every WebSocket upgrade and never sends a frame. Records, per connection,
 * when it was upgraded and the opcodes of the frames the client sent (1 text, 8 close).
 */
async function silentServer() {
  const connections = [];
  const sockets = new Set();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    const connection = { upgradedAt: null, opcodes: [], closeFrameAt: null };
    connections.push(connection);
    let buffer = Buffer.alloc(0);
    socket.on("error", () => {});
    socket.on("data", (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      if (connection.upgradedAt === null) {
        const end = buffer.indexOf("\r\n\r\n");
        if (end < 0) return;
        const request = buffer.subarray(0, end).toString("latin1");
        buffer = buffer.subarray(end + 4);
        const key = /^sec-websocket-key:\s*(\S+)/im.exec(request)[1];
        const accept = createHash("sha1").update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest("base64");
        socket.write(
          "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
            `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
        );
        connection.upgradedAt = Date.now();
      }
      for (let frame; (frame = readClientFrame(buffer)); buffer = buffer.subarray(frame.length)) {
        connection.opcodes.push(frame.opcode);
        if (frame.opcode === 8) connection.closeFrameAt = Date.now();
      }
    });
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    connections,
    close: () => {
      for (const socket of sockets) socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}

/** The opcode and byte length of the first complete (masked) client frame in `buffer`, or null. */
function readClientFrame(buffer) {
  if (buffer.length < 2) return null;
  let length = buffer[1] & 0x7f;
  let offset = 2;
  if (length === 126) {
    if (buffer.length < 4) return null;
    length = buffer.readUInt16BE(2);
    offset = 4;
  } else if (length === 127) {
    if (buffer.length < 10) return null;
    length = Number(buffer.readBigUInt64BE(2));
    offset = 10;
  }
  const total = offset + 4 + length; // clients always mask: 4 key bytes
  return buffer.length < total ? null : { opcode: buffer[0] & 0x0f, length: total };
}

test("a server that upgrades and never welcomes is given up after connectTimeout, then retried", { skip: missing ?? false, timeout: 30000 }, async (t) => {
  const silent = await silentServer();
  const seen = { states: [], errors: [] };
  const bus = new WsBus(silent.url, {
    getToken: async () => "a token nobody checks",
    connectTimeout: 500,
    minReconnectDelay: 20,
    maxReconnectDelay: 100,
    autoConnect: false,
  });
  t.after(async () => {
    bus.close();
    await silent.close();
  });
  bus.on("state", (state) => seen.states.push(state));
  bus.on("error", (error) => seen.errors.push(error));
  bus.connect();

  await until(() => silent.connections.length >= 2, "a second attempt");
  const [first] = silent.connections;
  await until(() => first.closeFrameAt !== null, "the client to close the first socket");

  assert.deepEqual(first.opcodes, [1, 8], "the connect frame, then the client's close");
  const waited = first.closeFrameAt - first.upgradedAt;
  // The client's timer starts before the upgrade this server sees: leave room for it.
  assert.ok(waited >= 200 && waited < WAIT, `closed ${waited} ms after the upgrade`);
  assert.deepEqual(seen.states.slice(0, 3), ["connecting", "disconnected", "connecting"]);
  assert.match(seen.errors[0].message, /no welcome from the server within 500 ms/);
});
