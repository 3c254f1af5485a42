// Types for wsbus.js, the aiohttp-wsbus client.

/** The close codes the server uses. */
export declare const CloseCodes: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  /** aiohttp: a frame that breaks RFC 6455; the client stops. */
  PROTOCOL_ERROR: 1002;
  ABNORMAL: 1006;
  /** aiohttp: a text frame that is not UTF-8; the client stops. */
  INVALID_PAYLOAD: 1007;
  MESSAGE_TOO_BIG: 1009;
  INTERNAL_ERROR: 1011;
  TRY_AGAIN_LATER: 1013;
  TOKEN_EXPIRED: 4001;
  SLOW_CONSUMER: 4002;
  /** The application changed this user's permissions: the client reconnects at once with a fresh token. */
  RECONNECT: 4012;
  BAD_REQUEST: 4400;
  UNAUTHORIZED: 4401;
  FORBIDDEN: 4403;
  /** The user holds as many sockets as the server allows: the client stops (with an `error`). */
  TOO_MANY_CONNECTIONS: 4408;
  /** The application ended this session (sign-out, ban, revoked token): the client stops. */
  SESSION_ENDED: 4410;
  /** The socket sent frames or channels too fast: the client reconnects after 5 s or more. */
  TOO_MANY_REQUESTS: 4429;
}>;

export type WsBusState = "connecting" | "connected" | "disconnected" | "closed";

/**
 * Why a channel was refused or taken away; all but "unavailable" are final (the client
 * drops the channel). "revoked": a refreshed token no longer grants it; "server": the
 * application unsubscribed this user from it.
 */
export type DenyReason = "forbidden" | "invalid" | "limit" | "revoked" | "server" | "unavailable";

/** Where a message sits in its channel's history. */
export interface MessageMeta {
  channel: string;
  /** Per-channel position, counting from 1 within `epoch` (0 for an ephemeral message: it has none). */
  offset: number;
  /** The id of the history `offset` counts in ("" for an ephemeral message). */
  epoch: string;
  /** True for messages replayed after a reconnect (or by `rewind`). */
  recovered: boolean;
  /** Set on an ephemeral message (typing indicators, cursors): live only, never stored or replayed. */
  ephemeral?: true;
}

export type MessageHandler<T = unknown> = (data: T, meta: MessageMeta) => void;

/** A channel's place in its history: the last `offset` in `epoch` (0: nothing published yet). */
export interface ChannelPosition {
  offset: number;
  epoch: string;
}

export interface SubscribeOptions {
  /** Start the first subscribe from this position (messages after it are replayed, if the server still holds them). */
  since?: ChannelPosition;
  /**
   * Called (and awaited) before the first subscribe, once the app has loaded this channel's state: returns
   * the position that state was read at (e.g. `history()`'s or the HTTP history's `position`). Messages after
   * it are replayed exactly once. Called again whenever recovery fails, instead of a `recovered: false`.
   */
  getState?: () => ChannelPosition | Promise<ChannelPosition>;
  /** Replay the last N messages on the first subscribe (at most the server's `history_size`). */
  rewind?: number;
}

/** Codes a request rejects with: the server's, or the client's own (`timeout`, `disconnected`, `closed`). */
export type RequestErrorCode =
  | "forbidden"
  | "invalid"
  | "limit"
  | "unavailable"
  | "disabled"
  | "not_found"
  | "timeout"
  | "internal"
  | "disconnected"
  | "closed";

/** Why a publish, rpc or history request failed. */
export declare class WsBusRequestError extends Error {
  readonly name: "WsBusRequestError";
  /** "disconnected": the socket dropped after a request that is not safe to repeat was sent. */
  readonly code: RequestErrorCode | (string & {});
  /** The server's explanation, for people (may be empty). */
  readonly reason: string;
}

export interface RequestOptions {
  /** Ms to wait for the answer, including while disconnected. Default `requestTimeout` (10000). */
  timeout?: number;
}

export interface PublishOptions extends RequestOptions {
  /** Idempotency id (1 to 128 printable ASCII characters): published once, sent again after a reconnect. */
  id?: string;
  /** Live only, never stored or replayed; takes no `id`. */
  ephemeral?: boolean;
}

export interface HistoryOptions extends RequestOptions {
  /** How many messages, 1 to 100000. Default 50. */
  limit?: number;
  /** Only messages with offsets below this one. Default: up to the last. */
  before?: number;
}

/** A channel's last messages, oldest first, and its position (the last message's, without `before`). */
export interface HistoryPage<T = unknown> {
  channel: string;
  position: ChannelPosition;
  messages: { offset: number; data: T }[];
}

/** What the server said about a channel it has just subscribed. */
export interface SubscribedMeta {
  /** The channel's current position, when the server gave one. */
  position?: ChannelPosition;
  /**
   * Present when the client asked to recover (a reconnect, a retry): true when every
   * missed message follows, false when the app must reload this channel's state.
   */
  recovered?: boolean;
}

/** One user present in a channel (a presence channel the token may read). */
export interface PresenceMember {
  /** The member's info: the `info` claim of their token (a JSON object; `{}` without one). */
  readonly info: Record<string, unknown>;
  /**
   * How many sockets the user had in the channel when the snapshot was taken (1 for a
   * user who joined since): the server announces a user's first socket and last one only.
   */
  readonly connections: number;
}

/**
 * The part of the WebSocket API the client uses. Handler parameters are `any` so that
 * both the DOM WebSocket and Node implementations (e.g. `ws`) are accepted.
 */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string[]) => WebSocketLike;

/** The clock the client schedules with; injectable for tests. */
export interface Timers {
  setTimeout(callback: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  /** Milliseconds since the Unix epoch. */
  now(): number;
}

export interface WsBusOptions {
  /** Returns a JWT; called for every (re)connect and for every refresh. */
  getToken: () => string | Promise<string>;
  /** Channels to join from the start. Default: none. */
  channels?: Iterable<string>;
  /** Backoff floor in ms. Default 500. */
  minReconnectDelay?: number;
  /** Backoff ceiling in ms. Default 20000. */
  maxReconnectDelay?: number;
  /** Seconds before the token's expiry to send a refresh. Default 30. */
  refreshBefore?: number;
  /**
   * Ms from opening a socket until the server's `welcome`; past it the attempt has
   * failed: the socket is closed, an `error` reported, and the client backs off. Default 10000.
   */
  connectTimeout?: number;
  /**
   * Offer the token in the handshake (`Sec-WebSocket-Protocol: wsbus.v1, wsbus.bearer.TOKEN`,
   * channels in the URL query) so the server welcomes without a connect frame: one round trip
   * less. Tokens over 4096 characters, or outside base64url and dots, go in the connect frame
   * whatever this says. Default false: measured on loopback it was no faster, and the
   * server keeps the handshake's headers (the token with them) for the socket's life,
   * about 1.3 KB more per idle socket.
   */
  tokenInHeader?: boolean;
  /** Start connecting in the constructor. Default true. */
  autoConnect?: boolean;
  /** WebSocket implementation. Default globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Source of randomness for the backoff jitter, in [0, 1). Default Math.random. */
  random?: () => number;
  /** Timer functions and clock. Default the global ones and Date.now. */
  timers?: Partial<Timers>;
  /** Default ms a publish, rpc or history request waits for its answer. Default 10000. */
  requestTimeout?: number;
}

/** An Error for a close code that made the client stop; `code` and `reason` are the server's. */
export interface WsBusCloseError extends Error {
  code: number;
  reason: string;
}

export interface WsBusEvents {
  state: (state: WsBusState) => void;
  /**
   * The server has subscribed `channel` (in a `welcome` or a `subscribed` frame): after
   * every connect and reconnect, and for each channel joined later. Comes before that
   * channel's `recovered` event and its messages.
   */
  subscribed: (channel: string, meta: SubscribedMeta) => void;
  denied: (channel: string, reason: DenyReason) => void;
  /**
   * The application ended this session (close code 4410: sign-out, ban, revoked token);
   * `reason` is the server's close reason. The client is already "closed" and will not reconnect.
   */
  disconnected: (reason: string) => void;
  /**
   * Something went wrong; the client carries on (or, for a close code that stops it, `code`
   * is set and state becomes "closed"; 1000 and 4410 are no error: 4410 is `disconnected`).
   */
  error: (error: Error | WsBusCloseError | unknown) => void;
  /** After a reconnect: `ok` true when missed messages follow, false when the app must reload this channel's state. */
  recovered: (channel: string, ok: boolean) => void;
  /** Every message, whatever the channel. */
  message: (channel: string, data: unknown, meta: MessageMeta) => void;
  /**
   * A presence snapshot of `channel` arrived (after its `subscribed`: on every connect and
   * reconnect, and for each presence channel joined later); it replaces the list.
   * `members` is that list (a copy), or null when the channel has more users than the
   * server lists (`max_presence_members`): then only `count` is known, and it is not
   * kept up to date. Rebuild the whole list here; `join` and `leave` are the changes after it.
   */
  presence: (channel: string, members: Map<string, PresenceMember> | null, count: number) => void;
  /** `user` joined `channel` (their first socket there), after its snapshot. Not for users already listed. */
  join: (channel: string, user: string, info: Record<string, unknown>) => void;
  /** `user` left `channel` (their last socket there went). Only for listed users. */
  leave: (channel: string, user: string) => void;
}

/** A connection to an aiohttp-wsbus server. */
export declare class WsBus {
  /**
   * @param url ws(s):// or http(s):// URL of the bus (in browsers, relative to the page).
   * @throws TypeError when `getToken` is missing or no WebSocket implementation is available.
   */
  constructor(url: string | URL, options: WsBusOptions);

  readonly state: WsBusState;

  /** Starts connecting (needed only with autoConnect: false); reconnects at once while waiting to retry. Does nothing once closed. */
  connect(): void;

  /** Listens to an event; returns a function that stops listening. */
  on<E extends keyof WsBusEvents>(event: E, listener: WsBusEvents[E]): () => void;

  /**
   * Joins `channel` (if new) and calls `handler` for its messages; returns a function that removes this handler
   * (the channel stays joined). `options` count on the first subscribe only.
   */
  subscribe<T = unknown>(channel: string, handler?: MessageHandler<T> | null, options?: SubscribeOptions): () => void;

  /**
   * Publishes over the socket (the server needs `client_publish` and a publish grant); resolves where the message
   * landed (nothing for an ephemeral one). Made while disconnected, it waits for the next connection.
   */
  publish(channel: string, data: unknown, options: PublishOptions & { ephemeral: true }): Promise<void>;
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<ChannelPosition>;

  /** Calls the application's `bus.rpc(method)` handler; resolves what it returns. Not repeated after a reconnect. */
  rpc<T = unknown>(method: string, data?: unknown, options?: RequestOptions): Promise<T>;

  /** Reads a channel's last messages (the token must allow subscribing to it). */
  history<T = unknown>(channel: string, options?: HistoryOptions): Promise<HistoryPage<T>>;

  /** Leaves `channel` and drops its handlers. */
  unsubscribe(channel: string): void;

  /**
   * Who is in `channel` now, by user: a new Map each call. Null when this connection holds
   * no list for it: a channel without presence, a token without the presence grant, no
   * snapshot yet, not connected (lists are dropped with the socket and on `unsubscribe`
   * and `denied`), or a channel above the server's `max_presence_members` (see `presenceCount`).
   */
  members(channel: string): Map<string, PresenceMember> | null;

  /** How many users are in `channel`: the list's size, or the snapshot's count above `max_presence_members`; null when `members` has no list and no count. */
  presenceCount(channel: string): number | null;

  /** Stops for good: closes the socket, cancels timers, removes browser listeners. */
  close(): void;
}
