// The client's API as TypeScript sees it through wsbus.d.ts: what must compile, and
// (each `@ts-expect-error`) what must not. Checked by check.js with README.md's
// TypeScript recipe, importing from the served path as a page does.

import { CloseCodes, WsBus, WsBusRequestError } from "/ws/wsbus.js";
import type {
  ChannelPosition,
  DenyReason,
  HistoryPage,
  MessageMeta,
  PresenceMember,
  RequestErrorCode,
  SubscribedMeta,
  WsBusOptions,
  WsBusState,
} from "/ws/wsbus.js";

interface ChatMessage {
  text: string;
}

const options: WsBusOptions = {
  getToken: async () => "a JWT",
  channels: new Set(["chat:lobby"]),
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  refreshBefore: 30,
  connectTimeout: 10000,
  autoConnect: false,
  random: Math.random,
  timers: { now: Date.now },
  requestTimeout: 5000,
};
const bus = new WsBus(new URL("wss://bus.example/ws"), options);
bus.connect();

const state: WsBusState = bus.state;
const removeHandler: () => void = bus.subscribe<ChatMessage>("chat:lobby", (message, meta) => {
  const text: string = message.text;
  const where: [string, number, string, boolean] = [meta.channel, meta.offset, meta.epoch, meta.recovered];
  console.log(text, where);
});
removeHandler();
bus.subscribe("chat:quiet"); // joined without a handler
bus.on("state", (next: WsBusState) => console.log(state, next));
bus.on("subscribed", (channel: string, meta: SubscribedMeta) => {
  const position: ChannelPosition | undefined = meta.position;
  const recovered: boolean | undefined = meta.recovered;
  console.log(channel, position?.offset, position?.epoch, recovered);
});
bus.on("denied", (channel: string, reason: DenyReason) => console.log(channel, reason));
const takenAway: DenyReason = "server";
bus.on("disconnected", (reason: string) => console.log("signed out:", reason, takenAway));
bus.on("recovered", (channel: string, ok: boolean) => console.log(channel, ok));
bus.on("message", (channel: string, data: unknown, meta: MessageMeta) => console.log(channel, data, meta));
bus.on("presence", (channel: string, members: Map<string, PresenceMember> | null, count: number) => {
  for (const [user, member] of members ?? []) console.log(channel, user, member.info.name, member.connections);
  console.log(count);
});
bus.on("join", (channel: string, user: string, info: Record<string, unknown>) => console.log(channel, user, info));
bus.on("leave", (channel: string, user: string) => console.log(channel, user));
const online: Map<string, PresenceMember> | null = bus.members("chat:lobby");
const howMany: number | null = bus.presenceCount("chat:lobby");
console.log(online?.get("alice")?.info, howMany);
const stop: () => void = bus.on("error", (error) => console.error(error));
stop();
const expired: 4001 = CloseCodes.TOKEN_EXPIRED;
const ended: 4410 = CloseCodes.SESSION_ENDED;
const reconnect: 4012 = CloseCodes.RECONNECT;
const stops: [1002, 1007] = [CloseCodes.PROTOCOL_ERROR, CloseCodes.INVALID_PAYLOAD];
console.log(expired, ended, reconnect, stops);
bus.subscribe<ChatMessage>("chat:loaded", (message, meta) => console.log(message.text, meta.ephemeral === true), {
  getState: async () => {
    const page: HistoryPage<ChatMessage> = await bus.history<ChatMessage>("chat:loaded", { limit: 50 });
    const texts: string[] = page.messages.map((m) => m.data.text);
    console.log(texts, page.messages[0]?.offset);
    return page.position;
  },
});
bus.subscribe("chat:rewound", null, { rewind: 10, since: { offset: 3, epoch: "e" } });

async function twoWay(): Promise<void> {
  const landed: ChannelPosition = await bus.publish("chat:lobby", { text: "hi" }, { id: "m-1", timeout: 2000 });
  const nothing: void = await bus.publish("chat:lobby", "typing", { ephemeral: true });
  const sum: number = await bus.rpc<number>("add", [1, 2], { timeout: 1000 });
  console.log(landed.offset, nothing, sum);
  try {
    await bus.rpc("nope");
  } catch (error) {
    if (error instanceof WsBusRequestError) {
      const code: RequestErrorCode | string = error.code;
      console.log(code, error.reason);
    }
  }
}
void twoWay();

bus.unsubscribe("chat:lobby");
bus.close();

// @ts-expect-error getToken is required
new WsBus("/ws", {});
// @ts-expect-error connectTimeout is a number of ms
new WsBus("/ws", { getToken: () => "t", connectTimeout: "10s" });
// @ts-expect-error no such event
bus.on("welcome", () => {});
// @ts-expect-error a disconnected listener gets the reason, a string, not a close code
bus.on("disconnected", (code: number) => console.log(code));
// @ts-expect-error a subscribed listener's position may be missing
bus.on("subscribed", (channel: string, meta: SubscribedMeta) => console.log(channel, meta.position.offset));
// @ts-expect-error a denied listener gets (channel, reason), not a number
bus.on("denied", (channel: string, reason: number) => console.log(channel, reason));
// @ts-expect-error data is unknown until the handler says what it is
bus.subscribe("chat:lobby", (data) => data.text);
// @ts-expect-error members may be null: no presence data
bus.members("chat:lobby").size;
// @ts-expect-error a member is read-only: the client's list is not the app's to change
bus.members("chat:lobby")!.get("alice")!.connections = 2;
// @ts-expect-error a leave carries no info
bus.on("leave", (channel: string, user: string, info: Record<string, unknown>) => console.log(channel, user, info));
// @ts-expect-error state is read-only
bus.state = "connected";
// @ts-expect-error CloseCodes is frozen
CloseCodes.NORMAL = 1001;
// @ts-expect-error an ephemeral publish resolves nothing: it has no position
bus.publish("chat:lobby", "typing", { ephemeral: true }).then((position: ChannelPosition) => position.offset);
// @ts-expect-error getState returns a position
bus.subscribe("chat:lobby", null, { getState: async () => "state" });
// @ts-expect-error rewind is a count
bus.subscribe("chat:lobby", null, { rewind: "10" });
