// The chat page's user interface over ImClient (imclient.js). It owns the DOM and nothing of the
// protocol: every frame is sent and every answer read by the client, which tells this file what changed.
//
// Everything the user should know is on screen: the connection state in the side bar (#status, with
// data-state), every error in #errors (a request refused, a message not sent, a lost connection that
// will not come back), each unacked message in the outbox under the conversation with its state.

import { ImClient, directConv, directPeer, groupOf, validId } from "./imclient.js";

const $ = (id) => document.getElementById(id);
const TYPING_SHOWN_MS = 4000;
const PRESENCE_EVERY_MS = 20000;

const client = new ImClient({ routerUrl: "", storage: window.localStorage, outboxStorage: window.sessionStorage });
let current = null;          // the open conversation id
const typingUntil = new Map(); // conv -> Map(user -> ms)
window.imChat = client;      // for the console (and the browser test's diagnostics)

// --- small DOM helpers ----------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function showError(text) {
  const item = el("div", { class: "error" }, el("span", {}, text), el("button", {
    type: "button", title: "dismiss", onclick: () => item.remove(),
  }, "×"));
  $("errors").append(item);
  while ($("errors").children.length > 5) $("errors").firstElementChild.remove();
  console.warn("im-actors:", text);
}

/** Run an async action from a control; its failure is shown, never swallowed. */
function act(what, fn) {
  return async (ev) => {
    ev?.preventDefault();
    try {
      await fn(ev);
    } catch (err) {
      showError(`${what}: ${err.message}`);
    }
  };
}

function timeOf(ms) {
  const d = new Date(ms);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function bodyText(body) {
  if (typeof body === "string") return body;
  if (body && typeof body.b64 === "string") return `[binary, ${Math.floor((body.b64.length * 3) / 4)} bytes]`;
  return JSON.stringify(body);
}

function parseUsers(text) {
  return text.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
}

// --- names ----------------------------------------------------------------------------------------

function convTitle(conv) {
  const peer = directPeer(conv, client.user);
  if (peer !== null) return peer;
  const info = client.groups.get(groupOf(conv));
  return info ? info.name : conv;
}

function presenceText(user) {
  const p = client.presence.get(user);
  if (!p) return "";
  if (p.online) return "online";
  return p.last_seen ? `last seen ${new Date(p.last_seen).toLocaleString()}` : "offline";
}

function systemText(m) {
  const meta = m.meta || {};
  const who = m.from || meta.owner || "someone";
  const users = (meta.users || []).join(", ");
  switch (meta.event) {
    case "created": return `${who} created the group${meta.name ? ` “${meta.name}”` : ""}${users ? ` with ${users}` : ""}`;
    case "added": return `${who} added ${users}`;
    case "removed": return `${who} removed ${users}`;
    case "left": return `${users || who} left`;
    case "role": return `${users} is now ${meta.role}`;
    case "renamed": return `${who} renamed the group to “${meta.name}”`;
    default: return `${meta.event || "system"} ${users}`;
  }
}

// --- screens --------------------------------------------------------------------------------------

function showSignIn(message = "") {
  $("chat").hidden = true;
  $("signin").hidden = false;
  if (message) showError(message);
  $("signin-user").focus();
}

function showChat() {
  $("signin").hidden = true;
  $("chat").hidden = false;
  $("me").textContent = client.user;
  renderConvs();
}

// --- conversation list ----------------------------------------------------------------------------

function renderConvs() {
  const list = $("convs");
  const items = [...client.cursors.values()]
    .filter((c) => !c.left || c.conv === current)
    .sort((a, b) => lastTs(b) - lastTs(a) || a.conv.localeCompare(b.conv));
  list.replaceChildren(...items.map((cur) => {
    const unread = cur.conv === current ? 0 : cur.unread(client.user);
    const peer = directPeer(cur.conv, client.user);
    const online = peer !== null && client.presence.get(peer)?.online;
    return el("li", {
      class: `conv${cur.conv === current ? " active" : ""}`,
      "data-conv": cur.conv,
      onclick: act("open", () => openConv(cur.conv)),
    },
    el("span", { class: `dot${online ? " online" : ""}`, title: peer ? presenceText(peer) : "group" }, peer ? "●" : "#"),
    el("span", { class: "name" }, convTitle(cur.conv)),
    unread ? el("span", { class: "badge", "data-unread": unread }, unread) : "");
  }));
}

function lastTs(cur) {
  const m = cur.entries[cur.entries.length - 1];
  return m ? m.ts : 0;
}

// --- one conversation -----------------------------------------------------------------------------

async function openConv(conv) {
  current = conv;
  $("empty").hidden = true;
  $("conv").hidden = false;
  $("entries").replaceChildren();
  $("outbox").replaceChildren();
  renderHeader();
  renderConvs();
  const cur = await client.open(conv);
  if (current !== conv) return;
  renderEntries(true);
  renderOutbox();
  await fillView();
  refreshPresence().catch((err) => showError(`presence: ${err.message}`));
  markRead();
  $("composer-text").focus();
}

function renderHeader() {
  const conv = current;
  const group = groupOf(conv);
  const cur = client.cursors.get(conv);
  $("conv-title").textContent = convTitle(conv);
  $("conv").dataset.conv = conv;
  if (group) {
    const info = client.groups.get(group);
    $("conv-sub").textContent = cur?.left ? "you are not a member any more"
      : info ? `${info.members.length} members: ${info.members.join(", ")}` : "";
    delete $("conv-sub").dataset.presence;
  } else {
    const peer = directPeer(conv, client.user);
    $("conv-sub").textContent = presenceText(peer);
    $("conv-sub").dataset.presence = client.presence.get(peer)?.online ? "online" : "offline";
  }
  $("add-form").hidden = !group || cur?.left;
  $("leave").hidden = !group || cur?.left;
  $("composer").hidden = Boolean(cur?.left);
}

function entryNode(m, cur) {
  if (m.kind === "system") {
    return el("li", { class: "msg system", "data-seq": m.seq }, systemText(m));
  }
  const mine = m.from === client.user;
  const node = el("li", { class: `msg${mine ? " mine" : ""}`, "data-seq": m.seq, "data-from": m.from, "data-cmid": m.cmid },
    el("div", { class: "meta" }, mine ? "" : el("span", { class: "from" }, m.from), el("time", {}, timeOf(m.ts))),
    el("div", { class: "body" }, bodyText(m.body)));
  if (mine) node.append(el("div", { class: "state" }, readState(m, cur)));
  return node;
}

/** "read" / "read by N" under this user's own messages, from the receipts of the others. */
function readState(m, cur) {
  const readers = [...cur.receipts.entries()].filter(([u, seq]) => u !== client.user && seq >= m.seq).map(([u]) => u);
  if (!readers.length) return "✓ sent";
  return directPeer(cur.conv, client.user) !== null ? "✓✓ read" : `✓✓ read by ${readers.join(", ")}`;
}

function nearBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 60;
}

function renderEntries(scrollToEnd = false) {
  const cur = client.cursors.get(current);
  if (!cur) return;
  const box = $("messages");
  const stick = scrollToEnd || nearBottom(box);
  $("entries").replaceChildren(...cur.entries.map((m) => entryNode(m, cur)));
  $("history-edge").textContent = cur.atStart ? "Beginning of the conversation" : "Scroll up for older messages";
  $("history-edge").dataset.atStart = cur.atStart ? "yes" : "no";
  if (stick) box.scrollTop = box.scrollHeight;
}

function renderOutbox() {
  const items = [...client.outbox.values()].filter((i) => i.conv === current);
  $("outbox").replaceChildren(...items.map((i) => el("li", {
    class: `msg mine pending ${i.state}`, "data-cmid": i.cmid, "data-state": i.state,
  },
  el("div", { class: "body" }, i.body),
  el("div", { class: "state" }, i.state === "failed" ? `not sent: ${i.error} ` : i.state === "acked" ? "✓ sent" : "sending…",
    i.state === "failed" ? el("button", { type: "button", onclick: () => client.retry(i.cmid) }, "retry") : "",
    i.state === "failed" ? el("button", { type: "button", onclick: () => client.discard(i.cmid) }, "discard") : ""))));
  const box = $("messages");
  if (nearBottom(box) || items.length) box.scrollTop = box.scrollHeight;
}

/** Load older pages while the list does not fill the view (no scroll bar, so no scroll event). */
async function fillView() {
  const box = $("messages");
  const cur = client.cursors.get(current);
  while (cur && current === cur.conv && !cur.atStart && box.scrollHeight <= box.clientHeight + 10) {
    const added = await client.loadOlder(cur.conv);
    if (!added.length) break;
  }
}

async function loadOlderOnScroll() {
  const box = $("messages");
  if (!current || box.scrollTop > 40) return;
  const conv = current;
  const height = box.scrollHeight;
  const added = await client.loadOlder(conv);
  if (added.length && current === conv) box.scrollTop += box.scrollHeight - height; // keep the view still
}

let readAfterReconnect = false;

function markRead() {
  if (!current || document.hidden) return;
  client.markRead(current).catch((err) => {
    if (err.code === "connection_lost" || err.code === "not_connected") readAfterReconnect = true; // sent once back
    else showError(`read receipt: ${err.message}`);
  });
}

function renderTyping() {
  const now = Date.now();
  const users = [...(typingUntil.get(current) || new Map()).entries()].filter(([, until]) => until > now).map(([u]) => u);
  $("typing").textContent = users.length ? `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing…` : "";
}

async function refreshPresence() {
  if (!current || client.state !== "online") return;
  const peer = directPeer(current, client.user);
  const info = client.groups.get(groupOf(current));
  const users = peer !== null ? [peer] : (info?.members || []).filter((u) => u !== client.user);
  if (users.length) await client.presenceGet(users.slice(0, 100));
}

// --- events from the client -----------------------------------------------------------------------

client.on("state", (state, detail) => {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = state === "online" ? `online · ${detail.replace(/^.*-(hub-\d+)$/, "$1")}` : state;
  status.title = detail || state;
  if (state === "reconnecting") status.textContent = `reconnecting: ${detail}`;
  if (state === "offline") status.textContent = `offline (click to reconnect): ${detail}`;
  if (state === "online" && readAfterReconnect) {
    readAfterReconnect = false;
    markRead();
  }
});
client.on("convs", () => {
  renderConvs();
  if (current) renderHeader();
});
client.on("entries", (conv, added) => {
  if (conv !== current) return;
  renderEntries();
  renderOutbox();
  if (added.some((m) => m.from !== client.user)) markRead();
  for (const m of added) typingUntil.get(conv)?.delete(m.from);
  renderTyping();
});
client.on("older", (conv) => {
  if (conv === current) renderEntries();
});
client.on("outbox", (conv) => {
  if (conv === current) renderOutbox();
});
client.on("receipt", (conv) => {
  if (conv === current) renderEntries();
});
client.on("typing", (conv, user) => {
  if (!typingUntil.has(conv)) typingUntil.set(conv, new Map());
  typingUntil.get(conv).set(user, Date.now() + TYPING_SHOWN_MS);
  if (conv === current) {
    renderTyping();
    setTimeout(renderTyping, TYPING_SHOWN_MS + 50);
  }
});
client.on("presence", () => {
  renderConvs();
  if (current) renderHeader();
});
client.on("error", (text) => showError(text));
client.on("fatal", (text) => {
  showError(text);
  if (/authentication|401/.test(text)) {
    client.signOut();
    showSignIn("sign in again");
  }
});

// --- controls -------------------------------------------------------------------------------------

$("signin-form").addEventListener("submit", act("sign in", async () => {
  const user = $("signin-user").value.trim();
  const token = $("signin-token").value.trim();
  $("signin-submit").disabled = true;
  try {
    await client.signIn({ user, token, device: deviceId() });
  } finally {
    $("signin-submit").disabled = false;
  }
  $("signin-token").value = "";
  showChat();
}));

$("signout").addEventListener("click", () => {
  client.signOut();
  current = null;
  $("conv").hidden = true;
  $("empty").hidden = false;
  showSignIn();
});

$("status").addEventListener("click", () => client.resume());

$("dm-form").addEventListener("submit", act("open direct conversation", async () => {
  const peer = $("dm-user").value.trim();
  if (!validId(peer)) throw new Error("a user id is 1 to 64 of A-Z a-z 0-9 _ . -");
  if (peer === client.user) throw new Error("that is you");
  $("dm-user").value = "";
  await openConv(directConv(client.user, peer));
}));

$("group-form").addEventListener("submit", act("create group", async () => {
  const name = $("group-name").value.trim();
  const members = parseUsers($("group-members").value);
  const bad = members.filter((u) => !validId(u));
  if (bad.length) throw new Error(`not a user id: ${bad.join(", ")}`);
  const answer = await client.groupCreate(name, members);
  $("group-name").value = "";
  $("group-members").value = "";
  await openConv(answer.conv);
}));

$("add-form").addEventListener("submit", act("add members", async () => {
  const users = parseUsers($("add-users").value);
  const bad = users.filter((u) => !validId(u));
  if (bad.length) throw new Error(`not a user id: ${bad.join(", ")}`);
  await client.groupAdd(groupOf(current), users);
  $("add-users").value = "";
  renderHeader();
}));

$("leave").addEventListener("click", act("leave group", async () => {
  const conv = current;
  if (!window.confirm(`Leave ${convTitle(conv)}?`)) return;
  await client.groupLeave(groupOf(conv));
  renderHeader();
  renderConvs();
}));

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("composer-text").value;
  if (!text.trim() || !current) return;
  client.send(current, text);
  $("composer-text").value = "";
});

$("composer-text").addEventListener("input", () => {
  if (current && $("composer-text").value) client.typing(current);
});

$("messages").addEventListener("scroll", () => {
  loadOlderOnScroll().catch((err) => showError(`older messages: ${err.message}`));
});

document.addEventListener("visibilitychange", markRead);
setInterval(() => refreshPresence().catch((err) => showError(`presence: ${err.message}`)), PRESENCE_EVERY_MS);

/** A device id per browser tab, kept over a reload (a second tab is a second device, not a replacement). */
function deviceId() {
  let id = sessionStorage.getItem("im-actors.device");
  if (!id) {
    id = `web-${Math.random().toString(36).slice(2, 10)}`;
    sessionStorage.setItem("im-actors.device", id);
  }
  return id;
}

// --- start ----------------------------------------------------------------------------------------

async function start() {
  const saved = client.saved();
  if (!saved) {
    showSignIn();
    return;
  }
  try {
    await client.signIn({ user: saved.user, token: saved.devLogin ? "" : saved.token, device: deviceId() });
    showChat();
  } catch (err) {
    showSignIn(`sign in again: ${err.message}`);
  }
}

start();
