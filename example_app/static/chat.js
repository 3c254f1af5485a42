// The example chat page: signs in through the demo identity provider, joins rooms over
// the bus with the token, and shows what the bus grants and refuses. Private rooms
// (room:NAME) are in no token: the bus asks the app's authorizer, which lets members in.
// Messages go out on the socket (bus.publish; the app stamps the sender), typing
// indicators as ephemeral messages, and each room loads its last messages over HTTP
// before it subscribes from there (getState), so nothing published meanwhile is lost.
import { WsBus } from "/ws/wsbus.js";

const DIRECT = "direct"; // the view holding user:NAME, the signed-in user's own channel
const PRIVATE_PREFIX = "room:";
const ROOM_NAME = /^[a-z0-9_-]{1,32}$/; // as the app checks it (example_app/rooms.py)
const USER_NAME = /^[a-z0-9_-]{1,32}$/; // as the app checks it (example_app/identity.py)
const HISTORY_LIMIT = 50; // messages a room shows when it is loaded
const TYPING_EVERY = 2000; // ms between two "typing" messages from this page
const TYPING_SHOWN = 4000; // ms a "typing" message is shown
const NOTICE_TEXT = "Order #1042 shipped: emitted by a back end through POST /ws/emit";

const DENIAL_EXPLANATIONS = {
  forbidden: (channel) =>
    isPrivate(channel)
      ? `The app's authorizer says you are not a member of ${roomName(channel)}: a member can invite you. ` +
        "(Private rooms live in the app's memory: a restart forgets them.)"
      : `Your token's channels claim does not grant ${channel}.`,
  revoked: (channel) =>
    isPrivate(channel)
      ? `The app's authorizer no longer lets you into ${roomName(channel)}.`
      : `Your renewed token no longer grants ${channel}.`,
};

const isPrivate = (channel) => channel.startsWith(PRIVATE_PREFIX);
const roomName = (channel) => channel.slice(PRIVATE_PREFIX.length);

const $ = (id) => document.getElementById(id);

const session = {
  user: null,
  token: null,
  rooms: [], // the rooms tokens grant: { channel, title, about }
  privateRooms: new Map(), // channel -> { name, channel, members, invitedBy }
  bus: null,
  hasConnected: false, // distinguishes "connecting" from "reconnecting"
  active: null,
  views: new Map(), // view -> { list, unread, status, reason, shown, typing }; status: invited, joining, joined, denied
  grants: [], // the channels the token grants: these load their history before subscribing
  typingSentAt: new Map(), // channel -> when this page last said it is typing there
  clockTimer: null,
  expiresAt: 0,
};

// -- identity -----------------------------------------------------------------

async function login(user) {
  const response = await fetch("/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(describeError(body, response.status));
    error.isBanned = body.error === "banned";
    throw error;
  }
  return body;
}

/** Signs in again as the same user: after a server restart only a new token verifies. */
async function getToken() {
  let answer;
  try {
    answer = await login(session.user);
  } catch (error) {
    // Banned while this window was away (offline, reconnecting): the session is over here too.
    if (error.isBanned) endSession(error.message);
    throw error;
  }
  showToken(answer);
  return answer.token;
}

function describeError(body, status) {
  const fields = body && body.fields;
  if (fields) {
    const first = Object.values(fields).flat()[0];
    if (first) return String(first);
  }
  if (body && body.error === "banned") return `${body.user} is banned until ${clock(body.until * 1000)}`;
  if (body && body.error) return `${body.error.replaceAll("_", " ")} (HTTP ${status})`;
  return `request failed (HTTP ${status})`;
}

// -- signing in and out ---------------------------------------------------------

async function signIn(event) {
  event?.preventDefault();
  const name = $("signin-name").value.trim().toLowerCase();
  $("signin-error").textContent = "";
  $("signin-button").disabled = true;
  try {
    const answer = await login(name);
    sessionStorage.setItem("wsbus-example-user", answer.user);
    await startChat(answer);
  } catch (error) {
    $("signin-error").textContent = error.message;
  } finally {
    $("signin-button").disabled = false;
  }
}

function signOut() {
  session.bus?.close();
  clearInterval(session.clockTimer);
  sessionStorage.removeItem("wsbus-example-user");
  location.reload();
}

/** Ends every session of this user, this window's too: each shows "signed out" on its own. */
async function signOutEverywhere() {
  $("signout-everywhere").disabled = true;
  try {
    await post("/sign-out-everywhere", undefined, { isSigned: true });
  } catch (error) {
    $("composer-error").textContent = error.message;
    $("signout-everywhere").disabled = false;
  }
}

/** The app ended this session (the bus closed the socket with 4410, or a ban): show why, stop. */
function endSession(reason) {
  if (!$("signed-out").hidden) return;
  session.bus?.close(); // already closed after 4410; not yet if getToken found a ban
  clearInterval(session.clockTimer);
  sessionStorage.removeItem("wsbus-example-user"); // a reload does not sign in again
  $("chat").hidden = true;
  $("signin").hidden = true;
  $("signed-out-reason").textContent = reason || "session ended";
  $("signed-out").hidden = false;
  document.title = "Signed out · wsbus chat";
}

async function startChat(answer) {
  session.user = answer.user;
  session.rooms = answer.rooms;
  session.grants = answer.channels;
  showToken(answer);
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("me-name").textContent = answer.user;
  $("me-role").textContent = answer.is_staff ? "Staff" : "Member";
  $("moderation").hidden = !answer.is_staff;
  paintAvatar($("me-avatar"), answer.user);
  buildViews();
  select(session.rooms[0].channel);
  session.clockTimer = setInterval(showExpiry, 1000);
  // The private rooms we are a member of go in the first connect frame with the others.
  for (const room of await loadPrivateRooms()) addPrivateRoom(room);
  connect(answer.token);
}

// -- the bus ----------------------------------------------------------------

function connect(firstToken) {
  let pending = firstToken; // the sign-in token serves the first connect
  const bus = new WsBus("/ws", {
    autoConnect: false,
    getToken: () => {
      if (pending) {
        const token = pending;
        pending = null;
        return token;
      }
      return getToken();
    },
  });
  session.bus = bus;
  bus.on("state", (state) => {
    document.body.dataset.bus = state; // the client's own state, as it names it
    if (state === "connected") {
      session.hasConnected = true;
      // Whatever failed before the reconnect is stale now; the draft stays in the input.
      $("composer-error").textContent = "";
    }
    const isConnected = state === "connected";
    $("composer-send").disabled = !isConnected;
    $("composer-send").title = isConnected ? "" : "Sending resumes once the page is connected";
    showState(state);
    showOnline(); // the lists go with the socket; the next welcome brings them back
  });
  // A room shows as joined once the bus has really subscribed it, as denied when it refused.
  bus.on("subscribed", (channel) => setStatus(viewOf(channel), "joined"));
  bus.on("denied", (channel, reason) => setStatus(viewOf(channel), "denied", reason));
  bus.on("disconnected", (reason) => endSession(reason));
  bus.on("recovered", (channel, ok) => {
    if (!ok) addNote(viewOf(channel), "Reconnected. Messages sent while you were away could not be replayed.");
  });
  bus.on("error", (error) => console.warn("wsbus:", error.message));
  // Who is online: a snapshot with each (re)subscription, then joins and leaves.
  for (const event of ["presence", "join", "leave"]) {
    bus.on(event, (channel) => {
      if (channel === session.active) showOnline();
    });
  }
  // Ask for every room, granted or not: the bus decides, and the page shows its answer.
  // Those the token grants load their last messages first (a room it does not grant would
  // only be refused the history as well).
  for (const room of session.rooms) {
    const handle = (data, meta) => addMessage(room.channel, data, meta);
    const isGranted = session.grants.includes(room.channel);
    bus.subscribe(room.channel, handle, isGranted ? { getState: loader(room.channel, room.channel, handle) } : {});
  }
  for (const channel of session.privateRooms.keys()) subscribeRoom(channel, { isMember: true });
  const direct = `user:${session.user}`;
  const handleDirect = (data, meta) => {
    if (data?.kind === "invite") offerRoom(data);
    else addMessage(DIRECT, data, meta);
  };
  bus.subscribe(direct, handleDirect, { getState: loader(direct, DIRECT, handleDirect) });
  bus.connect();
}

/** Subscribes a private room; a member's page loads its last messages first. */
function subscribeRoom(channel, { isMember = false } = {}) {
  const handle = (data, meta) => addMessage(channel, data, meta);
  session.bus.subscribe(channel, handle, isMember ? { getState: loader(channel, channel, handle) } : {});
}

/**
 * The getState of a channel: loads its last messages over HTTP (GET /ws/channels/{channel}/history,
 * with this page's token) into view `name`, and answers the position they end at: the bus client
 * subscribes from there, so what is published meanwhile follows exactly once. Called again when the
 * bus cannot replay what a reconnect missed: then the page says so and shows what the server has.
 */
function loader(channel, name, handle) {
  let loads = 0;
  return async () => {
    const path = `/ws/channels/${encodeURIComponent(channel)}/history?limit=${HISTORY_LIMIT}`;
    const page = await request("GET", path, undefined, { isSigned: true });
    loads += 1;
    if (loads > 1) addNote(name, "Reconnected. Messages sent while you were away could not be replayed: here is what the server holds.");
    const epoch = page.position.epoch;
    for (const message of page.messages) {
      // Loaded, not new: no unread count for it.
      handle(message.data, { channel, offset: message.offset, epoch, recovered: false, isLoaded: true });
    }
    return page.position;
  };
}

function viewOf(channel) {
  return channel === `user:${session.user}` ? DIRECT : channel;
}

function showState(state) {
  let shown = state;
  if (state === "disconnected" || state === "connecting") {
    shown = session.hasConnected ? "reconnecting" : "connecting";
  } else if (state === "closed") {
    shown = "offline";
  }
  const labels = {
    connecting: "Connecting",
    connected: "Connected",
    reconnecting: "Reconnecting",
    offline: "Offline",
  };
  $("badge").dataset.state = shown;
  $("badge-text").textContent = labels[shown];
}

// -- views ------------------------------------------------------------------

function buildViews() {
  for (const room of session.rooms) {
    addNavItem($("rooms"), room.channel, room.title);
    createView(room.channel);
  }
  createView(DIRECT).status = "joined";
  const direct = document.querySelector('.nav-item[data-view="direct"]');
  direct.addEventListener("click", () => select(DIRECT));
}

function addNavItem(list, channel, title) {
  const item = document.createElement("li");
  item.innerHTML = `
    <button type="button" class="nav-item" data-view="">
      <span class="nav-icon" aria-hidden="true">#</span>
      <span class="nav-title"></span>
      <span class="unread" hidden></span>
      <span class="status" data-status="joining">joining</span>
    </button>`;
  const button = item.querySelector("button");
  button.dataset.view = channel;
  button.dataset.channel = channel;
  if (isPrivate(channel)) {
    const icon = button.querySelector(".nav-icon");
    icon.className = "nav-icon nav-lock";
    icon.textContent = "";
  }
  item.querySelector(".nav-title").textContent = title;
  button.addEventListener("click", () => select(channel));
  list.append(item);
}

function createView(name) {
  const list = document.createElement("ol");
  list.className = "messages";
  list.dataset.view = name;
  list.hidden = true;
  const empty = document.createElement("li");
  empty.className = "empty";
  empty.textContent = name === DIRECT ? "No direct messages yet." : "No messages yet. Say hello!";
  list.append(empty);
  $("views").append(list);
  // `shown`: the messages on screen, as "epoch:offset" (a reload may bring them again);
  // `typing`: who is typing here, and until when.
  const state = { list, unread: 0, status: "joining", reason: null, shown: new Set(), typing: new Map() };
  session.views.set(name, state);
  return state;
}

function view(name) {
  return session.views.get(name);
}

function select(name) {
  session.active = name;
  const state = view(name);
  state.unread = 0;
  for (const [other, { list }] of session.views) list.hidden = other !== name;
  for (const button of document.querySelectorAll(".nav-item")) {
    button.classList.toggle("active", button.dataset.view === name);
  }
  const room = session.rooms.find((r) => r.channel === name) ?? describePrivate(name);
  $("view-title").textContent = room ? `# ${room.title}` : "Direct messages";
  $("view-about").textContent = room
    ? `${room.channel} · ${room.about}`
    : `user:${session.user} · only you can read this channel`;
  $("composer-to").hidden = name !== DIRECT;
  $("composer-text").placeholder = room ? `Message # ${room.title}` : "Write a direct message";
  $("composer-error").textContent = "";
  $("invite-error").textContent = "";
  refreshView(name);
  showTyping();
  showOnline();
  scrollDown(state.list);
}

function setStatus(name, status, reason = null) {
  const state = view(name);
  if (!state) return;
  const room = session.privateRooms.get(name);
  if (room && status === "joined" && room.members.length === 0) updateMembers(room);
  state.status = status;
  state.reason = reason;
  refreshView(name);
}

/** Learns who is in a private room joined by invitation or by name. */
async function updateMembers(room) {
  const known = (await loadPrivateRooms()).find((r) => r.channel === room.channel);
  if (known) room.members = known.members;
  refreshView(room.channel);
}

/** Repaints a view's nav entry, and the main panel when it is the active one. */
function refreshView(name) {
  const state = view(name);
  const button = document.querySelector(`.nav-item[data-view="${CSS.escape(name)}"]`);
  const badge = button.querySelector(".status");
  if (badge) {
    badge.dataset.status = state.status;
    badge.textContent = state.status === "denied" ? "denied" : state.status;
    badge.title = state.reason ? `refused by the bus: ${state.reason}` : "";
  }
  button.classList.toggle("denied", state.status === "denied");
  const unread = button.querySelector(".unread");
  unread.hidden = state.unread === 0;
  unread.textContent = String(state.unread);
  if (name !== session.active) return;
  const isDenied = state.status === "denied";
  const isInvited = state.status === "invited";
  $("denied-panel").hidden = !isDenied;
  $("invited-panel").hidden = !isInvited;
  state.list.hidden = isDenied || isInvited;
  $("composer").hidden = isDenied || isInvited;
  $("denied-reason").textContent = state.reason ?? "";
  $("denied-explanation").textContent = DENIAL_EXPLANATIONS[state.reason]?.(name) ?? "";
  const room = session.privateRooms.get(name);
  $("room-bar").hidden = !room || state.status !== "joined";
  if (room) {
    $("room-members").textContent = room.members.join(", ") || "…";
    $("invited-by").textContent = room.invitedBy ?? "A member";
    $("invited-channel").textContent = name;
  }
}

// -- who is online ------------------------------------------------------------

/** Shows who is in the active room now, as the bus keeps it (nothing while it has no list). */
function showOnline() {
  const channel = session.active;
  const members = session.bus && channel !== DIRECT ? session.bus.members(channel) : null;
  const count = session.bus && channel !== DIRECT ? session.bus.presenceCount(channel) : null;
  $("online-bar").hidden = count === null;
  $("online-count").textContent = count === null ? "" : String(count);
  // Above the bus's max_presence_members only the count is known.
  const users = [...(members ?? new Map()).keys()].sort();
  $("online").replaceChildren(...users.map((user) => onlineItem(user, members.get(user).info)));
}

function onlineItem(user, info) {
  const item = document.createElement("li");
  item.className = "online-member";
  item.dataset.user = user;
  const avatar = document.createElement("span");
  avatar.className = "avatar";
  paintAvatar(avatar, user);
  const name = document.createElement("span");
  name.className = "online-name";
  name.textContent = user === session.user ? `${info.name ?? user} (you)` : (info.name ?? user);
  item.append(avatar, name);
  return item;
}

// -- private rooms ------------------------------------------------------------

function describePrivate(channel) {
  if (!session.privateRooms.has(channel)) return null;
  return { channel, title: roomName(channel), about: "private: the app's authorizer lets its members in" };
}

/** The private rooms we are a member of, as the app knows them (none if it cannot say). */
async function loadPrivateRooms() {
  try {
    return (await request("GET", "/rooms", undefined, { isSigned: true })).rooms;
  } catch (error) {
    $("room-error").textContent = error.message;
    return [];
  }
}

/** Lists a private room in the sidebar (once, status "joining"), with a view for its messages. */
function addPrivateRoom(room) {
  let known = session.privateRooms.get(room.channel);
  if (!known) {
    known = { name: room.name, channel: room.channel, members: [], invitedBy: null };
    session.privateRooms.set(room.channel, known);
    addNavItem($("private-rooms"), room.channel, room.name);
    createView(room.channel);
  }
  if (room.members?.length) known.members = room.members;
  return known;
}

/** Whether the bus client holds or still asks for `channel` (a retry after "unavailable"). */
function isWanted(channel) {
  const state = view(channel);
  return Boolean(
    state && (state.status === "joining" || state.status === "joined" || state.reason === "unavailable"),
  );
}

function readRoomName() {
  const name = $("room-name").value.trim().toLowerCase();
  $("room-error").textContent = ROOM_NAME.test(name)
    ? ""
    : "Room names are 1 to 32 characters from a-z, 0-9, _ and -.";
  return ROOM_NAME.test(name) ? name : null;
}

async function createRoom(event) {
  event.preventDefault();
  const name = readRoomName();
  if (!name) return;
  try {
    const answer = await post("/rooms", { name }, { isSigned: true });
    $("room-name").value = "";
    joinRoom(answer.room);
  } catch (error) {
    $("room-error").textContent = error.message;
  }
}

function joinRoomByName() {
  const name = readRoomName();
  if (!name) return;
  $("room-name").value = "";
  joinRoom({ name, channel: PRIVATE_PREFIX + name });
}

/** Asks the bus for a private room: its authorizer answers, "subscribed" or "denied". */
function joinRoom(room) {
  const wasWanted = isWanted(room.channel);
  addPrivateRoom(room);
  if (!wasWanted) {
    setStatus(room.channel, "joining");
    subscribeRoom(room.channel, { isMember: Boolean(room.members?.includes(session.user)) });
  }
  select(room.channel);
}

/** An invitation from a member, sent to our user:NAME channel: offer to join. */
function offerRoom(invitation) {
  if (isWanted(invitation.room)) return;
  const room = addPrivateRoom({ name: invitation.name, channel: invitation.room });
  room.invitedBy = invitation.from;
  setStatus(invitation.room, "invited");
}

async function invite(event) {
  event.preventDefault();
  const room = session.privateRooms.get(session.active);
  const user = $("invite-user").value.trim().toLowerCase();
  if (!room || !user) return;
  $("invite-error").textContent = "";
  try {
    const answer = await post(`/rooms/${room.name}/invite`, { user }, { isSigned: true });
    $("invite-user").value = "";
    room.members = answer.room.members;
    refreshView(room.channel);
  } catch (error) {
    $("invite-error").textContent = error.message;
  }
}

// -- moderation (staff) ---------------------------------------------------------

async function ban(event) {
  event.preventDefault();
  const user = $("ban-user").value.trim().toLowerCase();
  const status = $("ban-status");
  if (!user) return;
  delete status.dataset.outcome;
  status.textContent = "";
  try {
    const answer = await post("/admin/bans", { user }, { isSigned: true });
    $("ban-user").value = "";
    status.dataset.outcome = "banned";
    status.textContent = `${answer.banned} is banned until ${clock(answer.until * 1000)}; their windows are signed out.`;
  } catch (error) {
    status.textContent = error.message;
  }
}

// -- messages -----------------------------------------------------------------

function addMessage(name, data, meta) {
  const message = data && typeof data === "object" ? data : { text: String(data) };
  if (message.typing) {
    if (meta?.ephemeral) showTyping(name, message.from);
    return; // a typing indicator is never a message, even if someone stored one
  }
  const state = view(name);
  if (state && meta?.epoch && meta.offset > 0) {
    const key = `${meta.epoch}:${meta.offset}`;
    if (state.shown.has(key)) return; // loaded already
    state.shown.add(key);
  }
  if (state && message.from) state.typing.delete(message.from); // they sent it: no longer typing
  if (message.kind === "notice") {
    append(name, noticeItem(message), { isQuiet: meta?.isLoaded });
  } else if (message.kind === "member") {
    const room = session.privateRooms.get(name);
    if (room && Array.isArray(message.members)) room.members = message.members;
    append(name, eventItem(message), { isQuiet: meta?.isLoaded });
    refreshView(name);
  } else {
    append(name, messageItem(message, meta), { isQuiet: meta?.isLoaded });
  }
}

function messageItem(message, meta) {
  const isMine = message.from === session.user;
  const item = document.createElement("li");
  item.className = isMine ? "message mine" : "message";
  item.dataset.from = message.from ?? "";
  if (meta?.recovered) item.classList.add("recovered");
  const avatar = document.createElement("span");
  avatar.className = "avatar";
  paintAvatar(avatar, message.from ?? "?");
  const body = document.createElement("div");
  body.className = "bubble";
  const header = document.createElement("div");
  header.className = "meta";
  const author = document.createElement("strong");
  author.textContent = isMine ? "you" : message.from;
  header.append(author);
  if (message.to) {
    const to = document.createElement("span");
    to.className = "to";
    to.textContent = isMine ? `to ${message.to}` : "to you";
    header.append(to);
  }
  const time = document.createElement("time");
  time.textContent = clock(message.sent_at);
  header.append(time);
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = message.text;
  body.append(header, text);
  item.append(avatar, body);
  return item;
}

function noticeItem(message) {
  const item = document.createElement("li");
  item.className = "notice";
  const label = document.createElement("span");
  label.className = "notice-label";
  label.textContent = "Back end";
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = message.text;
  const time = document.createElement("time");
  time.textContent = clock(message.sent_at);
  item.append(label, text, time);
  return item;
}

function eventItem(message) {
  const item = document.createElement("li");
  item.className = "event";
  const text = document.createElement("span");
  text.textContent = message.text;
  const time = document.createElement("time");
  time.textContent = clock(message.sent_at);
  item.append(text, time);
  return item;
}

function addNote(name, text) {
  const item = document.createElement("li");
  item.className = "note";
  item.textContent = text;
  append(name, item, { isQuiet: true });
}

function append(name, item, { isQuiet = false } = {}) {
  const state = view(name);
  if (!state) return;
  state.list.querySelector(".empty")?.remove();
  const isAtBottom = state.list.scrollHeight - state.list.scrollTop - state.list.clientHeight < 40;
  state.list.append(item);
  if (name !== session.active && !isQuiet) {
    state.unread += 1;
    refreshView(name);
  } else if (isAtBottom) {
    scrollDown(state.list);
  }
}

function scrollDown(list) {
  list.scrollTop = list.scrollHeight;
}

// -- typing -------------------------------------------------------------------

/** Shows who is typing in `name` (from an ephemeral message), then repaints the active view's line. */
function showTyping(name, user) {
  const state = name && view(name);
  if (state && user && user !== session.user) {
    state.typing.set(user, Date.now() + TYPING_SHOWN);
    setTimeout(showTyping, TYPING_SHOWN + 50);
  }
  const active = view(session.active);
  const now = Date.now();
  const typing = active ? [...active.typing].filter(([, until]) => until > now).map(([who]) => who) : [];
  $("typing").textContent = typing.length ? `${typing.join(", ")} ${typing.length > 1 ? "are" : "is"} typing…` : "";
}

/** Tells the room this user is typing: an ephemeral message, at most every TYPING_EVERY ms. */
function typing() {
  const channel = session.active;
  if (channel === DIRECT || view(channel)?.status !== "joined" || session.bus?.state !== "connected") return;
  const now = Date.now();
  if (now - (session.typingSentAt.get(channel) ?? 0) < TYPING_EVERY) return;
  session.typingSentAt.set(channel, now);
  session.bus.publish(channel, { typing: true }, { ephemeral: true, timeout: TYPING_EVERY }).catch(() => {});
}

// -- sending ------------------------------------------------------------------

async function send(event) {
  event.preventDefault();
  if ($("composer-send").disabled) return; // not connected: Enter must not send either
  const input = $("composer-text");
  const text = input.value.trim();
  if (!text) return;
  const isDirect = session.active === DIRECT;
  const to = $("composer-to").value.trim().toLowerCase();
  if (isDirect && !to) {
    $("composer-error").textContent = "Who is it for? Type a user name.";
    $("composer-to").focus();
    return;
  }
  if (isDirect && !USER_NAME.test(to)) {
    $("composer-error").textContent = "user names are 1 to 32 characters from a-z, 0-9, _ and -";
    $("composer-to").focus();
    return;
  }
  const room = isDirect ? `user:${to}` : session.active;
  $("composer-error").textContent = "";
  try {
    // On the socket; the app stamps who sent it. The id makes a retry after a reconnect safe.
    await session.bus.publish(room, { text }, { id: messageId() });
    session.typingSentAt.delete(room);
    input.value = "";
    // A direct message goes to the recipient's channel only: show our copy here.
    if (isDirect && to !== session.user) addMessage(DIRECT, { from: session.user, to, text, sent_at: Date.now() }, null);
  } catch (error) {
    $("composer-error").textContent = describeRefusal(error);
  }
}

/** A new idempotency id for one message (random, so two pages never share one). */
function messageId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(12)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** What to tell the user about a publish the bus refused (a WsBusRequestError). */
function describeRefusal(error) {
  if (error.code === "forbidden") return "You may not write here.";
  if (error.code === "invalid" && error.reason) return error.reason;
  if (error.code === "disconnected" || error.code === "timeout") return "Not sent: the connection dropped. Try again.";
  return error.reason || error.message;
}

async function notifyFromBackEnd() {
  const state = view(session.active);
  const channel = session.active !== DIRECT && state.status === "joined" ? session.active : session.rooms[0].channel;
  try {
    await post("/api/notify", { channel, text: NOTICE_TEXT });
  } catch (error) {
    $("composer-error").textContent = error.message;
  }
}

function post(path, body, options) {
  return request("POST", path, body, options);
}

/** Sends JSON; a signed request whose token the server no longer accepts signs in again, once. */
async function request(method, path, body, { isSigned = false } = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = body === undefined ? {} : { "Content-Type": "application/json" };
    if (isSigned) headers.Authorization = `Bearer ${session.token}`;
    const init = { method, headers };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    const answer = await response.json().catch(() => ({}));
    if (response.ok) return answer;
    if (response.status === 401 && isSigned && attempt === 0) {
      await getToken();
      continue;
    }
    throw new Error(describeError(answer, response.status));
  }
}

// -- token card -------------------------------------------------------------

function showToken(answer) {
  session.token = answer.token;
  session.expiresAt = answer.expires_at;
  const grants = $("token-grants");
  grants.replaceChildren(
    ...answer.channels.map((channel) => {
      const chip = document.createElement("code");
      chip.className = "chip";
      chip.textContent = channel;
      return chip;
    }),
  );
  $("token-issued").textContent = clock(Date.now());
  showExpiry();
}

function showExpiry() {
  const seconds = Math.max(0, Math.round(session.expiresAt - Date.now() / 1000));
  const minutes = Math.floor(seconds / 60);
  $("token-expires").textContent = `in ${minutes}:${String(seconds % 60).padStart(2, "0")}`;
}

// -- helpers ----------------------------------------------------------------

function clock(milliseconds) {
  const date = typeof milliseconds === "number" ? new Date(milliseconds) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function paintAvatar(element, name) {
  let hash = 0;
  for (const character of name) hash = (hash * 31 + character.codePointAt(0)) % 360;
  element.style.setProperty("--hue", String(hash));
  element.textContent = name.slice(0, 1).toUpperCase();
}

// -- wiring -------------------------------------------------------------------

$("signin-form").addEventListener("submit", signIn);
$("composer").addEventListener("submit", send);
$("composer-text").addEventListener("input", typing);
$("signout").addEventListener("click", signOut);
$("signout-everywhere").addEventListener("click", signOutEverywhere);
$("signed-out-again").addEventListener("click", () => location.reload());
$("ban-form").addEventListener("submit", ban);
$("notify").addEventListener("click", notifyFromBackEnd);
$("room-form").addEventListener("submit", createRoom);
$("room-join").addEventListener("click", joinRoomByName);
$("invite-form").addEventListener("submit", invite);
$("join-room").addEventListener("click", () => {
  const room = session.privateRooms.get(session.active);
  if (room) joinRoom(room);
});

const remembered = sessionStorage.getItem("wsbus-example-user");
if (remembered) {
  $("signin-name").value = remembered;
  signIn();
} else {
  $("signin-name").focus();
}
