// wsbus.js: the browser (and Node 20+) client for aiohttp-wsbus.
// One dependency-free ES module. The protocol and close codes are documented in
// docs/protocol.md; recovery (offsets, epochs, `since`) in docs/recovery.md.

/** The close codes the server uses; see the table in README.md for what the client does. */
export const CloseCodes = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_PAYLOAD: 1007,
  MESSAGE_TOO_BIG: 1009,
  INTERNAL_ERROR: 1011,
  TRY_AGAIN_LATER: 1013,
  TOKEN_EXPIRED: 4001,
  SLOW_CONSUMER: 4002,
  RECONNECT: 4012,
  BAD_REQUEST: 4400,
  UNAUTHORIZED: 4401,
  FORBIDDEN: 4403,
  TOO_MANY_CONNECTIONS: 4408,
  SESSION_ENDED: 4410,
  TOO_MANY_REQUESTS: 4429,
});

// Codes after which reconnecting cannot help: the client goes to "closed".
const FATAL_CODES = new Set([
  CloseCodes.NORMAL,
  CloseCodes.PROTOCOL_ERROR,
  CloseCodes.INVALID_PAYLOAD,
  CloseCodes.MESSAGE_TOO_BIG,
  CloseCodes.BAD_REQUEST,
  CloseCodes.FORBIDDEN,
  CloseCodes.TOO_MANY_CONNECTIONS,
  CloseCodes.SESSION_ENDED,
]);

// Closes that are the application's decision, not a failure: no "error" event.
const INTENDED_CODES = new Set([CloseCodes.NORMAL, CloseCodes.SESSION_ENDED]);

const OPEN = 1; // WebSocket.OPEN, without relying on the implementation's statics
// The token in the handshake (docs/protocol.md): offered as a second subprotocol next to
// PROTOCOL, the server echoing PROTOCOL only. Past these sizes proxies may refuse the
// header or the URL, so the connect frame carries the token instead.
const PROTOCOL = "wsbus.v1";
const BEARER_PREFIX = "wsbus.bearer.";
const HEADER_TOKEN = /^[A-Za-z0-9._-]{1,4096}$/;
const MAX_HANDSHAKE_URL = 4096;
const MAX_REQUESTS_IN_FLIGHT = 16; // the server answers "limit" past it: the rest wait here
const MIN_REFRESH_DELAY = 1000; // never refresh in a tight loop, whatever the clocks say
const RATE_LIMITED_DELAY = 5000; // after 4429 the protocol asks for at least this long
const noop = () => {};

/** A real-time channel bus connection: subscribe to channels, survive drops, keep the token fresh. */
export class WsBus {
  constructor(url, options = {}) {
    if (typeof options.getToken !== "function") {
      throw new TypeError("WsBus: options.getToken must be a function returning a token");
    }
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("WsBus: no WebSocket implementation; pass options.WebSocket");
    }
    this._url = resolveUrl(url);
    this._getToken = options.getToken;
    this._minDelay = options.minReconnectDelay ?? 500;
    this._maxDelay = Math.max(options.maxReconnectDelay ?? 20000, this._minDelay);
    this._refreshBefore = options.refreshBefore ?? 30;
    this._connectTimeout = options.connectTimeout ?? 10000;
    this._tokenInHeader = options.tokenInHeader ?? false;
    this._random = options.random ?? Math.random;
    const timers = options.timers ?? {};
    this._timers = {
      setTimeout: timers.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms)),
      clearTimeout: timers.clearTimeout ?? ((id) => globalThis.clearTimeout(id)),
      now: timers.now ?? (() => Date.now()),
    };

    this._state = "disconnected";
    this._listeners = new Map(); // event -> Set of listeners
    this._handlers = new Map(); // channel -> Set of (data, meta) handlers
    this._wanted = new Set(); // channels the app wants, whatever the connection does
    this._requested = new Set(); // channels asked of the current connection
    this._positions = new Map(); // channel -> {offset, epoch}: where to recover from
    this._unavailable = new Set(); // channels the server could not subscribe yet: asked again on a timer
    this._loaders = new Map(); // channel -> the app's getState(): its position after loading its state
    this._loading = new Set(); // channels waiting for getState() before they are asked for
    this._justLoaded = new Set(); // channels whose next subscribe starts from getState()'s position
    this._rewind = new Map(); // channel -> messages to replay on its first subscribe
    this._requestTimeout = options.requestTimeout ?? 10000;
    this._requests = new Map(); // ref -> a publish, rpc or history request waiting for its answer
    this._nextRef = 0;
    this._presence = new Map(); // channel -> {members: Map user -> member, or null, count}: this connection's
    for (const channel of options.channels ?? []) this._wanted.add(channel);

    this._ws = null;
    this._generation = 0; // bumped whenever a connection is abandoned; stale callbacks check it
    this._isWelcomed = false;
    this._attempt = 0; // backoff attempts since the last welcome
    this._refreshAttempt = 0;
    this._resubscribeAttempt = 0; // retries of channels denied as "unavailable"
    this._hasRetriedUnauthorized = false;
    this._reconnectTimer = null;
    this._connectTimer = null; // from socket creation until the welcome
    this._refreshTimer = null;
    this._resubscribeTimer = null;
    this._isStarted = false;
    this._isClosed = false;
    this._onOnline = () => this._handleOnline();
    this._onOffline = () => this._handleOffline();

    if (options.autoConnect ?? true) this.connect();
  }

  /** "connecting" | "connected" | "disconnected" | "closed" */
  get state() {
    return this._state;
  }

  /** Starts connecting (needed only with autoConnect: false); connects at once if waiting to retry. */
  connect() {
    if (this._isClosed || this._state === "connecting" || this._state === "connected") return;
    if (!this._isStarted) {
      this._isStarted = true;
      if (typeof globalThis.addEventListener === "function") {
        globalThis.addEventListener("online", this._onOnline);
        globalThis.addEventListener("offline", this._onOffline);
      }
    }
    this._clearReconnectTimer();
    this._open();
  }

  /** Listens to "state", "subscribed", "denied", "disconnected", "error", "recovered", "message", "presence", "join" or "leave"; returns a function that stops listening. */
  on(event, listener) {
    let listeners = this._listeners.get(event);
    if (!listeners) this._listeners.set(event, (listeners = new Set()));
    const entry = (...args) => listener(...args); // same listener twice gets two entries
    listeners.add(entry);
    return () => listeners.delete(entry);
  }

  /**
   * Joins `channel` (if new) and calls `handler(data, meta)` for its messages; returns a function that removes the handler.
   * On the first subscribe, `options.since` ({offset, epoch}) starts it from that position, `options.rewind` (N)
   * replays its last N messages, and `options.getState()` (async, returns {offset, epoch} once the app loaded its
   * state) is awaited before subscribing from its position, and again whenever recovery fails.
   */
  subscribe(channel, handler, options = {}) {
    if (typeof channel !== "string") throw new TypeError("WsBus.subscribe: channel must be a string");
    if (handler !== undefined && handler !== null && typeof handler !== "function") {
      throw new TypeError("WsBus.subscribe: handler must be a function");
    }
    const { since, getState, rewind } = options ?? {};
    if (getState !== undefined && typeof getState !== "function") {
      throw new TypeError("WsBus.subscribe: getState must be a function");
    }
    if (rewind !== undefined && !(Number.isInteger(rewind) && rewind >= 0)) {
      throw new TypeError("WsBus.subscribe: rewind must be an integer >= 0");
    }
    if (since !== undefined && !isPosition(since)) {
      throw new TypeError("WsBus.subscribe: since must be {offset, epoch}");
    }
    let entry = null;
    if (handler) {
      let handlers = this._handlers.get(channel);
      if (!handlers) this._handlers.set(channel, (handlers = new Set()));
      entry = (data, meta) => handler(data, meta);
      handlers.add(entry);
    }
    if (!this._wanted.has(channel)) {
      this._wanted.add(channel);
      if (since !== undefined) this._positions.set(channel, { offset: since.offset, epoch: since.epoch });
      if (rewind) this._rewind.set(channel, rewind);
      if (getState) {
        this._loaders.set(channel, getState);
        this._load(channel);
      } else {
        this._sync();
      }
    }
    return () => {
      if (entry) this._handlers.get(channel)?.delete(entry);
    };
  }

  /** Leaves `channel` and drops its handlers. */
  unsubscribe(channel) {
    this._forget(channel);
    this._sync();
  }

  /**
   * Publishes `data` to `channel` over the socket (the server needs client_publish and a publish grant);
   * resolves {offset, epoch}, or undefined for an ephemeral message. `id` makes it idempotent: it is
   * sent again after a reconnect. Rejects with a WsBusRequestError carrying the code.
   */
  publish(channel, data, options = {}) {
    if (typeof channel !== "string") throw new TypeError("WsBus.publish: channel must be a string");
    const { id, ephemeral = false, timeout } = options ?? {};
    const frame = { type: "publish", channel, data: data === undefined ? null : data };
    if (id !== undefined) frame.id = id;
    if (ephemeral) frame.ephemeral = true;
    return this._request(frame, timeout, id !== undefined).then((answer) =>
      ephemeral ? undefined : { offset: answer.offset, epoch: answer.epoch },
    );
  }

  /** Calls the application's `bus.rpc(method)` handler; resolves what it returned. Rejects with a WsBusRequestError. */
  rpc(method, data, options = {}) {
    if (typeof method !== "string") throw new TypeError("WsBus.rpc: method must be a string");
    const frame = { type: "rpc", method, data: data === undefined ? null : data };
    return this._request(frame, options?.timeout, false).then((answer) => answer.data);
  }

  /** Reads the last `limit` (default 50) messages of `channel` before offset `before`; resolves {channel, position, messages}. */
  history(channel, options = {}) {
    if (typeof channel !== "string") throw new TypeError("WsBus.history: channel must be a string");
    const { limit, before, timeout } = options ?? {};
    const frame = { type: "history", channel };
    if (limit !== undefined) frame.limit = limit;
    if (before !== undefined) frame.before = before;
    return this._request(frame, timeout, true).then(({ position, messages }) => ({ channel, position, messages }));
  }

  /**
   * Who is in `channel` now: a new Map, user -> {info, connections}, or null when this
   * connection holds no list for it (no presence data, a channel above the server's
   * max_presence_members: see presenceCount, or not connected).
   */
  members(channel) {
    const members = this._presence.get(channel)?.members;
    return members ? new Map(members) : null;
  }

  /** How many users are in `channel`: the list's size, or the count a snapshot gave; null without presence data. */
  presenceCount(channel) {
    const presence = this._presence.get(channel);
    if (!presence) return null;
    return presence.members ? presence.members.size : presence.count;
  }

  /** Stops for good: closes the socket, cancels every timer, removes browser listeners. */
  close() {
    if (this._isClosed) return;
    this._isClosed = true;
    for (const ref of [...this._requests.keys()]) this._settle(ref, new WsBusRequestError("closed", "the client was closed"));
    this._abandonSocket();
    this._clearReconnectTimer();
    if (this._isStarted && typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
      globalThis.removeEventListener("offline", this._onOffline);
    }
    this._setState("closed");
  }

  // -- connecting -------------------------------------------------------------

  /** Starts one connection attempt; never lets a rejection escape. */
  _open() {
    this._connectAttempt().catch((error) => this._emitError(error));
  }

  async _connectAttempt() {
    const generation = ++this._generation;
    this._setState("connecting");
    if (generation !== this._generation) return; // a state listener called close()
    let token;
    try {
      token = await this._getToken();
    } catch (error) {
      if (generation !== this._generation) return;
      this._emitError(wrapError(error, "getToken failed"));
      this._disconnected();
      return;
    }
    if (generation !== this._generation) return;
    const connect = this._connectFields();
    const handshake = this._tokenInHeader ? handshakeUrl(this._url, token, connect) : null;
    let ws;
    try {
      ws = handshake
        ? new this._WebSocket(handshake, [PROTOCOL, BEARER_PREFIX + token])
        : new this._WebSocket(this._url);
    } catch (error) {
      // A URL the WebSocket constructor refuses will never work.
      this._emitError(wrapError(error, "cannot create WebSocket"));
      this.close();
      return;
    }
    this._ws = ws;
    this._isWelcomed = false;
    let isOpen = false;
    this._connectTimer = this._timers.setTimeout(() => {
      this._connectTimer = null;
      if (ws !== this._ws) return;
      this._emitError(new Error(`WsBus: no welcome from the server within ${this._connectTimeout} ms`));
      this._failAttempt();
    }, this._connectTimeout);
    this._requested = new Set(connect.channels);
    ws.onopen = () => {
      isOpen = true;
      // With the token in the handshake the welcome is already on its way.
      if (ws === this._ws && !handshake) this._send({ type: "connect", token, ...connect });
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._receive(event.data);
    };
    // A refused connect: browsers fire error then close, Node 20 only error. Either way
    // the attempt has failed, once (abandoning the socket silences a close that follows).
    // After open, a close event always follows an error; that is where we decide.
    ws.onerror = () => {
      if (ws === this._ws && !isOpen) this._failAttempt();
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._handleClose(event.code, event.reason ?? "");
    };
  }

  /** Gives up on the current socket as a network failure would: closes it, backs off, retries. */
  _failAttempt() {
    this._abandonSocket();
    this._disconnected();
  }

  /** What a connect asks for: the wanted channels (but those still loading), with `since` and `rewind`. */
  _connectFields() {
    const channels = [...this._wanted].filter((channel) => !this._loading.has(channel));
    const fields = { channels };
    this._addPositions(fields, channels);
    return fields;
  }

  _handleClose(code, reason) {
    const wasWelcomed = this._isWelcomed;
    this._abandonSocket();
    if (FATAL_CODES.has(code)) {
      if (!INTENDED_CODES.has(code)) this._emitError(closeError(code, reason));
      this.close();
      // After close(): listeners see state "closed", the reason is the application's.
      if (code === CloseCodes.SESSION_ENDED) this._emit("disconnected", reason);
      return;
    }
    if (code === CloseCodes.UNAUTHORIZED) {
      if (this._hasRetriedUnauthorized) {
        this._emitError(closeError(code, reason));
        this.close();
        return;
      }
      this._hasRetriedUnauthorized = true;
      this._disconnected({ isImmediate: true }); // getToken() runs again on every connect: that is the fresh token
      return;
    }
    // 4001 after a good session: the token ran out; 4012: the application changed this
    // user's permissions. A new token fixes either at once, once per welcome: without a
    // welcome first, an immediate retry could spin, so back off instead.
    const wantsFreshToken = code === CloseCodes.TOKEN_EXPIRED || code === CloseCodes.RECONNECT;
    // 4429: this socket sent too much; the next one waits at least 5 s.
    const atLeast = code === CloseCodes.TOO_MANY_REQUESTS ? RATE_LIMITED_DELAY : 0;
    this._disconnected({ isImmediate: wantsFreshToken && wasWelcomed, atLeast });
  }

  /** Goes to "disconnected", then reconnects at once or after the next backoff delay (at least `atLeast` ms). */
  _disconnected({ isImmediate = false, atLeast = 0 } = {}) {
    this._setState("disconnected");
    if (this._isClosed) return; // a state listener may have called close()
    if (isImmediate) {
      this._open();
      return;
    }
    this._attempt += 1;
    const wait = Math.max(atLeast, this._backoffDelay(this._attempt));
    this._clearReconnectTimer();
    this._reconnectTimer = this._timers.setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._isClosed && this._state === "disconnected") this._open();
    }, wait);
  }

  /** Full jitter: attempt n (from 1) waits a uniform random time in [min, min(max, min * 2^n)] ms. */
  _backoffDelay(attempt) {
    const ceiling = Math.min(this._maxDelay, this._minDelay * 2 ** attempt);
    return this._minDelay + this._random() * (ceiling - this._minDelay);
  }

  _abandonSocket() {
    this._generation += 1;
    this._isWelcomed = false;
    this._requested = new Set();
    this._clearConnectTimer();
    this._clearRefreshTimer();
    this._unavailable.clear(); // the next connect frame asks for every wanted channel
    this._presence.clear(); // stale once the socket is gone: the next welcome brings fresh snapshots
    this._clearResubscribeTimer();
    // A request sent on this socket may or may not have been done: only those safe to repeat go again.
    for (const [ref, request] of this._requests) {
      if (request.sentOn === null) continue;
      if (request.isRetryable) request.sentOn = null;
      else this._settle(ref, new WsBusRequestError("disconnected", "the connection dropped before the answer"));
    }
    const ws = this._ws;
    this._ws = null;
    if (!ws) return;
    // No-ops rather than null: some implementations (ws) throw on an unheard "error".
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = noop;
    try {
      ws.close(CloseCodes.NORMAL);
    } catch {
      // already closing or closed
    }
  }

  _handleOnline() {
    if (!this._isClosed && this._state === "disconnected") this.connect();
  }

  _handleOffline() {
    if (this._isClosed || this._state === "disconnected") return;
    this._failAttempt(); // "online" will cut the wait short
  }

  // -- receiving --------------------------------------------------------------

  _receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch (error) {
      this._emitError(wrapError(error, "unreadable frame from server"));
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "welcome":
        return this._handleWelcome(frame);
      case "subscribed":
        return this._handleSubscribed(frame);
      case "unsubscribed":
        return this._handleUnsubscribed(frame);
      case "refreshed":
        return this._handleRefreshed(frame);
      case "message":
        return this._handleMessage(frame);
      case "published":
      case "rpc_result":
      case "history_result":
      case "error":
        return this._handleAnswer(frame);
      case "join":
        return this._handleJoin(frame);
      case "leave":
        return this._handleLeave(frame);
      default:
        return; // "pong" and frame types newer than this client
    }
  }

  _handleWelcome(frame) {
    const generation = this._generation;
    this._isWelcomed = true;
    this._clearConnectTimer();
    this._attempt = 0;
    this._hasRetriedUnauthorized = false;
    this._scheduleRefresh(frame.expires_at);
    this._setState("connected");
    // Any listener below may call close(); the generation tells us to stop.
    if (generation !== this._generation) return;
    this._applySubscription(frame);
    if (generation !== this._generation) return;
    this._sync();
    this._sendRequests();
  }

  _handleSubscribed(frame) {
    this._applySubscription(frame);
  }

  /** Applies a welcome or subscribed frame: `denied`, `positions` and `recovered`, then tells the app what it joined. */
  _applySubscription(frame) {
    const generation = this._generation;
    const denied = frame.denied ?? {};
    const positions = frame.positions ?? {};
    const recovered = frame.recovered ?? {};
    if (!Object.values(denied).includes("unavailable")) this._resubscribeAttempt = 0; // the broker answers again
    for (const channel of Object.keys(denied)) this._deny(channel, denied[channel]);
    if (generation !== this._generation) return; // a denied listener called close()
    const snapshots = [];
    for (const [channel, snapshot] of Object.entries(frame.presence ?? {})) {
      if (!this._wanted.has(channel)) continue;
      const presence = readSnapshot(snapshot);
      this._presence.set(channel, presence);
      snapshots.push([channel, presence]);
    }
    for (const channel of Object.keys(positions)) {
      if (!this._wanted.has(channel) || channel in recovered) continue;
      // A rewind replays messages up to this position next: they set it, one by one.
      if (this._rewind.get(channel) && positions[channel]?.offset > 0) continue;
      this._advance(channel, positions[channel]); // fresh subscription: recover from here next time
    }
    for (const channel of Object.keys(recovered)) {
      if (!this._wanted.has(channel) || recovered[channel] === true) continue;
      if (this._loaders.has(channel) && !this._justLoaded.has(channel)) {
        this._reload(channel); // the app's getState() reloads it, then it is asked for from there
        continue;
      }
      // Too far behind or a new epoch: continue from the server's position, the app reloads.
      const position = positions[channel];
      if (isPosition(position)) this._positions.set(channel, { offset: position.offset, epoch: position.epoch });
      else this._positions.delete(channel);
    }
    // Listeners run once the client's own state is settled; any of them may close() or unsubscribe().
    const subscribed = Array.isArray(frame.subscribed) ? frame.subscribed : [];
    for (const channel of subscribed) {
      this._justLoaded.delete(channel);
      this._rewind.delete(channel); // replayed once, on the first subscribe
    }
    for (const channel of subscribed) {
      if (generation !== this._generation) return;
      if (!this._wanted.has(channel) || this._loading.has(channel)) continue; // left, or being reloaded
      const meta = {};
      const position = positions[channel];
      if (isPosition(position)) meta.position = { offset: position.offset, epoch: position.epoch };
      if (typeof recovered[channel] === "boolean") meta.recovered = recovered[channel];
      this._emit("subscribed", channel, meta);
    }
    for (const [channel, presence] of snapshots) {
      if (generation !== this._generation) return;
      if (this._presence.get(channel) !== presence) continue; // left or replaced meanwhile
      this._emit("presence", channel, this.members(channel), presence.count);
    }
    for (const channel of Object.keys(recovered)) {
      if (generation !== this._generation) return;
      if (this._wanted.has(channel) && !this._loading.has(channel)) {
        this._emit("recovered", channel, recovered[channel] === true);
      }
    }
  }

  _handleUnsubscribed(frame) {
    // "client" confirms what we asked; "revoked" (a refresh) and "server" (the
    // application) took channels away: dropped here too, and the app is told.
    if (frame.reason !== "revoked" && frame.reason !== "server") return;
    for (const channel of frame.channels ?? []) this._deny(channel, frame.reason);
  }

  _handleRefreshed(frame) {
    this._refreshAttempt = 0;
    for (const channel of frame.revoked ?? []) this._deny(channel, "revoked");
    this._scheduleRefresh(frame.expires_at);
  }

  _handleMessage(frame) {
    const channel = frame.channel;
    // Left it (the server has not caught up yet), or reloading it: what counts is replayed after getState().
    if (!this._wanted.has(channel) || this._loading.has(channel)) return;
    if (frame.ephemeral === true) {
      // Live only: no offset, so it says nothing about the channel's position.
      this._dispatch(channel, frame.data, { channel, offset: 0, epoch: "", recovered: false, ephemeral: true });
      return;
    }
    const { offset, epoch } = frame;
    if (typeof offset === "number") {
      const last = this._positions.get(channel);
      if (last && last.epoch === epoch && offset <= last.offset) return; // seen it already
      this._positions.set(channel, { offset, epoch });
      // A new epoch or a hole in the offsets on a live socket (the broker lost its
      // history, or a node fell too far behind): messages may be gone, so say so.
      // But a channel never published to is at offset 0 in an epoch of its own (the
      // server keeps no state for it): its first message, offset 1, continues it in any epoch.
      const isFirstMessage = last?.offset === 0 && offset === 1;
      if (last && !isFirstMessage && (last.epoch !== epoch || offset > last.offset + 1)) {
        if (this._loaders.has(channel)) {
          this._reload(channel);
          return;
        }
        this._emit("recovered", channel, false);
      }
    }
    this._dispatch(channel, frame.data, { channel, offset, epoch, recovered: frame.recovered === true });
  }

  _dispatch(channel, data, meta) {
    for (const handler of [...(this._handlers.get(channel) ?? [])]) {
      try {
        handler(data, meta);
      } catch (error) {
        this._emitError(error);
      }
    }
    this._emit("message", channel, data, meta);
  }

  /** Asks the app's getState() for the channel's position, then subscribes from there (see subscribe). */
  _load(channel) {
    const getState = this._loaders.get(channel);
    this._loading.add(channel);
    this._justLoaded.delete(channel);
    const isCurrent = () => this._loaders.get(channel) === getState && this._loading.has(channel);
    const loaded = (position) => {
      this._loading.delete(channel);
      if (position) {
        this._positions.set(channel, position);
        this._justLoaded.add(channel);
      }
      this._sync();
    };
    Promise.resolve()
      .then(() => getState())
      .then(
        (state) => {
          if (!isCurrent()) return; // unsubscribed meanwhile
          if (!isPosition(state)) this._emitError(new TypeError(`WsBus: getState() for ${channel} must return {offset, epoch}`));
          loaded(isPosition(state) ? { offset: state.offset, epoch: state.epoch } : null);
        },
        (error) => {
          if (!isCurrent()) return;
          this._emitError(wrapError(error, `getState failed for ${channel}`));
          this._positions.delete(channel);
          loaded(null); // subscribed from the server's position: the app was told
        },
      );
  }

  /** Recovery failed on a channel with getState: leave it, let the app reload, ask again from its new position. */
  _reload(channel) {
    if (this._requested.has(channel)) {
      this._requested.delete(channel);
      this._send({ type: "unsubscribe", channels: [channel] });
    }
    this._positions.delete(channel);
    this._load(channel);
  }

  // Joins and leaves follow the channel's snapshot. A join for a listed user (the
  // socket's own, or one the snapshot already counted) only updates the info; a leave
  // for an unlisted one changes nothing. In count mode the server announces neither.
  _handleJoin(frame) {
    const members = this._presence.get(frame.channel)?.members;
    if (!members || typeof frame.user !== "string") return;
    const info = frame.info ?? {};
    const member = members.get(frame.user);
    if (member) {
      members.set(frame.user, presenceMember(info, member.connections));
      return;
    }
    members.set(frame.user, presenceMember(info, 1)); // a join is a user's first socket
    this._emit("join", frame.channel, frame.user, info);
  }

  _handleLeave(frame) {
    const members = this._presence.get(frame.channel)?.members;
    if (!members || !members.delete(frame.user)) return;
    this._emit("leave", frame.channel, frame.user);
  }

  /** Stops asking for `channel` and tells the app why, once; "unavailable" is retried instead. */
  _deny(channel, reason) {
    this._requested.delete(channel); // the server does not hold it; never unsubscribe it
    this._presence.delete(channel); // not subscribed, so no joins or leaves follow
    if (!this._wanted.has(channel)) return;
    if (reason === "unavailable") {
      // The server's broker is down: keep the channel, its handlers and position, ask again later.
      this._unavailable.add(channel);
      this._scheduleResubscribe();
    } else {
      this._forget(channel);
    }
    this._emit("denied", channel, reason);
  }

  /** Asks again, after the next backoff delay, for the channels the server could not subscribe. */
  _scheduleResubscribe() {
    if (this._resubscribeTimer !== null) return;
    this._resubscribeAttempt += 1;
    this._resubscribeTimer = this._timers.setTimeout(() => {
      this._resubscribeTimer = null;
      this._unavailable.clear();
      this._sync(); // a subscribe frame for every wanted channel the server does not hold
    }, this._backoffDelay(this._resubscribeAttempt));
  }

  _forget(channel) {
    this._wanted.delete(channel);
    this._presence.delete(channel);
    this._unavailable.delete(channel);
    this._loaders.delete(channel);
    this._loading.delete(channel);
    this._justLoaded.delete(channel);
    this._rewind.delete(channel);
    this._handlers.delete(channel);
    this._positions.delete(channel);
  }

  /** Moves a channel's position forward, never back within the same epoch. */
  _advance(channel, position) {
    if (!isPosition(position)) return;
    const last = this._positions.get(channel);
    if (last && last.epoch === position.epoch && last.offset >= position.offset) return;
    this._positions.set(channel, { offset: position.offset, epoch: position.epoch });
  }

  // -- sending ----------------------------------------------------------------

  /**
   * Brings the server's subscriptions in line with what the app wants (only once welcomed),
   * at the end of the current task: subscribe() and unsubscribe() calls made together
   * leave in one frame each way, within the server's client_rate however many there are.
   */
  _sync() {
    if (!this._isWelcomed || this._isSyncQueued) return; // the connect frame carries everything
    this._isSyncQueued = true;
    queueMicrotask(() => {
      this._isSyncQueued = false;
      this._syncNow();
    });
  }

  _syncNow() {
    if (!this._isWelcomed) return;
    const added = [...this._wanted].filter(
      (channel) => !this._requested.has(channel) && !this._unavailable.has(channel) && !this._loading.has(channel),
    );
    const removed = [...this._requested].filter((channel) => !this._wanted.has(channel));
    if (removed.length) {
      for (const channel of removed) this._requested.delete(channel);
      this._send({ type: "unsubscribe", channels: removed });
    }
    if (added.length) {
      for (const channel of added) this._requested.add(channel);
      const frame = { type: "subscribe", channels: added };
      this._addPositions(frame, added);
      this._send(frame);
    }
  }

  /** Adds `since` (where each channel was left) and `rewind` (first subscribes) to a connect or subscribe frame. */
  _addPositions(frame, channels) {
    const since = {};
    const rewind = {};
    for (const channel of channels) {
      const position = this._positions.get(channel);
      if (position) since[channel] = { offset: position.offset, epoch: position.epoch };
      else if (this._rewind.has(channel)) rewind[channel] = this._rewind.get(channel);
    }
    if (Object.keys(since).length) frame.since = since;
    if (Object.keys(rewind).length) frame.rewind = rewind;
  }

  // -- requests: publish, rpc, history ----------------------------------------

  /** Sends `frame` with a new ref once welcomed (at most 16 in flight); settles on its answer or after `timeout` ms. */
  _request(frame, timeout = this._requestTimeout, isRetryable = false) {
    if (this._isClosed) return Promise.reject(new WsBusRequestError("closed", "the client was closed"));
    return new Promise((resolve, reject) => {
      const ref = this._nextRef++;
      const request = { frame: { ...frame, ref }, resolve, reject, isRetryable, sentOn: null, timer: null };
      request.timer = this._timers.setTimeout(
        () => this._settle(ref, new WsBusRequestError("timeout", `no answer within ${timeout} ms`)),
        timeout,
      );
      this._requests.set(ref, request);
      this._sendRequests();
    });
  }

  /** Sends waiting requests on the current connection, keeping at most 16 in flight. */
  _sendRequests() {
    if (!this._isWelcomed) return; // requests made while disconnected wait for the next welcome
    let inFlight = 0;
    for (const request of this._requests.values()) if (request.sentOn === this._generation) inFlight += 1;
    for (const request of this._requests.values()) {
      if (inFlight >= MAX_REQUESTS_IN_FLIGHT) return;
      if (request.sentOn !== null) continue;
      request.sentOn = this._generation;
      inFlight += 1;
      this._send(request.frame);
    }
  }

  _handleAnswer(frame) {
    const request = this._requests.get(frame.ref);
    if (!request || request.sentOn !== this._generation) return; // timed out, or asked on an earlier socket
    if (frame.type === "error") this._settle(frame.ref, new WsBusRequestError(String(frame.error), frame.reason));
    else this._settle(frame.ref, null, frame);
  }

  _settle(ref, error, answer) {
    const request = this._requests.get(ref);
    if (!request) return;
    this._requests.delete(ref);
    this._timers.clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(answer);
    this._sendRequests(); // room for one that waits
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return;
    try {
      ws.send(JSON.stringify(frame));
    } catch (error) {
      this._emitError(wrapError(error, "send failed"));
    }
  }

  // -- token refresh ----------------------------------------------------------

  _scheduleRefresh(expiresAt) {
    this._clearRefreshTimer();
    if (typeof expiresAt !== "number") return;
    const remaining = expiresAt * 1000 - this._timers.now();
    let delay = remaining - this._refreshBefore * 1000;
    // Token shorter-lived than refreshBefore (or skewed clocks): refresh halfway, not in a loop.
    if (delay < 0) delay = Math.max(remaining / 2, MIN_REFRESH_DELAY);
    this._setRefreshTimer(delay);
  }

  _setRefreshTimer(delay) {
    const generation = this._generation;
    this._refreshTimer = this._timers.setTimeout(() => {
      this._refreshTimer = null;
      if (generation === this._generation) this._refresh().catch((error) => this._emitError(error));
    }, delay);
  }

  async _refresh() {
    const generation = this._generation;
    let token;
    try {
      token = await this._getToken();
    } catch (error) {
      if (generation !== this._generation) return;
      this._emitError(wrapError(error, "getToken failed (refresh)"));
      this._refreshAttempt += 1;
      this._setRefreshTimer(this._backoffDelay(this._refreshAttempt));
      return;
    }
    if (generation !== this._generation) return;
    this._send({ type: "refresh", token });
  }

  // -- events and timers ------------------------------------------------------

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  _emit(event, ...args) {
    const listeners = this._listeners.get(event);
    if (!listeners) return;
    for (const listener of [...listeners]) {
      try {
        listener(...args);
      } catch (error) {
        if (event !== "error") this._emitError(error);
      }
    }
  }

  _emitError(error) {
    this._emit("error", error);
  }

  _clearReconnectTimer() {
    if (this._reconnectTimer !== null) this._timers.clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
  }

  _clearConnectTimer() {
    if (this._connectTimer !== null) this._timers.clearTimeout(this._connectTimer);
    this._connectTimer = null;
  }

  _clearResubscribeTimer() {
    if (this._resubscribeTimer !== null) this._timers.clearTimeout(this._resubscribeTimer);
    this._resubscribeTimer = null;
  }

  _clearRefreshTimer() {
    if (this._refreshTimer !== null) this._timers.clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
  }
}

/** A publish, rpc or history request that failed; `code` is the server's error code, or "timeout", "disconnected", "closed". */
export class WsBusRequestError extends Error {
  constructor(code, reason) {
    super(`WsBus request failed: ${code}${reason ? ` (${reason})` : ""}`);
    this.name = "WsBusRequestError";
    this.code = code;
    this.reason = reason ?? "";
  }
}

function isPosition(value) {
  return value !== null && typeof value === "object" && typeof value.offset === "number";
}

/**
 * A snapshot from a welcome or subscribed frame: {user: {info, connections}}, or
 * {count: N} above the server's max_presence_members (a user named "count" maps to an
 * object, never to a number).
 */
function readSnapshot(snapshot) {
  if (snapshot && typeof snapshot.count === "number") return { members: null, count: snapshot.count };
  const members = new Map();
  for (const [user, member] of Object.entries(snapshot ?? {})) {
    members.set(user, presenceMember(member?.info ?? {}, member?.connections ?? 1));
  }
  return { members, count: members.size };
}

/** A member as members() hands it out: frozen, so an app cannot change the client's list. */
function presenceMember(info, connections) {
  return Object.freeze({ info, connections });
}

function wrapError(error, message) {
  if (error instanceof Error) return error;
  const wrapped = new Error(`${message}: ${String(error)}`);
  wrapped.cause = error;
  return wrapped;
}

function closeError(code, reason) {
  const error = new Error(`connection closed by server: ${code}${reason ? ` ${reason}` : ""}`);
  error.code = code;
  error.reason = reason;
  return error;
}

/** The URL of a handshake carrying `connect`'s fields in its query, or null when the token or the URL would not fit in one. */
function handshakeUrl(url, token, connect) {
  if (!HEADER_TOKEN.test(token)) return null;
  const target = new URL(url);
  if (connect.channels.length) target.searchParams.set("channels", connect.channels.join(","));
  if (connect.since) target.searchParams.set("since", JSON.stringify(connect.since));
  if (connect.rewind) target.searchParams.set("rewind", JSON.stringify(connect.rewind));
  return target.href.length <= MAX_HANDSHAKE_URL ? target.href : null;
}

/** Accepts ws(s)://, http(s):// (switched to ws(s)) and, in browsers, paths relative to the page. */
function resolveUrl(url) {
  const base = globalThis.location?.href;
  const resolved = base ? new URL(url, base) : new URL(url);
  if (resolved.protocol === "http:") resolved.protocol = "ws:";
  else if (resolved.protocol === "https:") resolved.protocol = "wss:";
  return resolved.href;
}
