// im-actors protocol client for the browser: PROTOCOL.md version 1 over the im.v1.json subprotocol.
//
// Two layers, as in im_actors/client.py:
//   ConvCursor  one conversation's state, no I/O: the entries held (a contiguous run of seqs in the
//               user's view), the read cursor and the receipts. It decides; ImClient does the I/O.
//   ImClient    the router lookup, the WebSocket, requests and their answers, the outbox of unacked
//               sends, reconnect and catch-up. The UI listens to its events (see ImClient.on).
//
// Delivery rule (PROTOCOL.md section 5): a msg at or below the held seq is a duplicate and dropped;
// seq == held + 1 is applied; one further ahead is buffered and the gap is filled with sync. A sync
// answer returns every entry after `after` the user may read, so a seq it skips does not exist for
// this user (a span when they were not a member) and is passed over.
//
// Reconnect rule (PROTOCOL.md section 7): 1007, 1009, 4400 and 4409 are final; 4401 is final unless
// the reason is "token expired" and the token came from the development login (log in again); every
// other close (1001, 1006, 1011, 4408, 4429 after a longer backoff, 4508) asks the router for another
// hub (exclude=<the failed hub>), authenticates, sends convs, syncs every conversation whose last is
// ahead of what is held and resends every unacked send with its original cmid (the server answers a
// committed one as dup with its original seq).

export const SUBPROTOCOL = "im.v1.json";
export const PROTO_VERSION = 1;
export const FINAL_CLOSE_CODES = new Set([1007, 1009, 4400, 4401, 4409]);
export const CLOSE_MEANINGS = {
  1000: "closed",
  1001: "hub going away",
  1006: "connection lost",
  1007: "invalid UTF-8 in a frame",
  1009: "frame over the size limit",
  1011: "server error",
  4400: "protocol violation",
  4401: "authentication failed",
  4408: "no auth frame in time",
  4409: "replaced by a newer connection of this device",
  4429: "rate limited",
  4508: "too slow: the send queue overflowed",
};

const PAGE = 30;          // entries per history page and per first load of a conversation
const SYNC_LIMIT = 200;   // entries per sync page while catching up
const REQUEST_TIMEOUT_MS = 10000;
/** Attempts of the first connection after a sign-in (or a reload) before asking to sign in again. */
const SIGN_IN_ATTEMPTS = 8;
const TYPING_EVERY_MS = 2500;
const BACKOFF_BASE_MS = 200;
const BACKOFF_MAX_MS = 5000;
const ANSWER_TYPES = new Set(["ack", "msgs", "convs", "ok", "group", "err", "contacts", "presence"]);

/** Direct conversation id of two users: d:<a>:<b> with a < b (ids are ASCII: code unit order is byte order). */
export function directConv(a, b) {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

/** The other user of a direct conversation, or null for a group. */
export function directPeer(conv, me) {
  if (!conv.startsWith("d:")) return null;
  const [, a, b] = conv.split(":");
  return a === me ? b : a;
}

/** Group id of a g:<id> conversation, or null. */
export function groupOf(conv) {
  return conv.startsWith("g:") ? conv.slice(2) : null;
}

export function validId(id) {
  return typeof id === "string" && /^[A-Za-z0-9_.-]{1,64}$/.test(id);
}

/** Full jitter exponential backoff (ms): uniform in [0, min(max, base * 2^attempt)]. */
export function backoffMs(attempt, baseMs = BACKOFF_BASE_MS, maxMs = BACKOFF_MAX_MS) {
  return Math.random() * Math.min(maxMs, baseMs * 2 ** attempt);
}

/** A client message id: 128 random bits in hex (crypto.getRandomValues works outside secure contexts too). */
export function newCmid() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** An error answer (t: "err") or a local failure, with the protocol's code and retry flag. */
export class ImError extends Error {
  constructor(code, msg, retry = false, extra = {}) {
    super(`${code}: ${msg}`);
    this.code = code;
    this.retry = retry;
    this.extra = extra;
  }
}

/** One conversation's state; no I/O. Every method returns what changed, the caller does the rest. */
export class ConvCursor {
  constructor(conv) {
    this.conv = conv;
    this.loaded = false;      // the newest page is in; from then on live entries are applied
    this.entries = [];        // ascending seq, what the user sees
    this.held = 0;            // highest seq applied
    this.oldest = 0;          // lowest seq loaded (0: none)
    this.atStart = false;     // history has no older entry
    this.last = 0;            // highest seq known to exist (convs, msg, ack, sync)
    this.read = 0;            // this user's read cursor (seq read up to and including)
    this.receipts = new Map(); // other member -> seq read
    this.early = new Map();   // seq -> msg that arrived before the newest page
    this.buffer = new Map();  // seq -> msg ahead of a gap
    this.dupsDropped = 0;
    this.left = false;        // this user left or was removed
  }

  /** Seqs known to exist and not held (what a fill must fetch). */
  get behind() {
    return this.loaded && this.held < this.last;
  }

  /** A live msg. Returns {added: [entries applied, ascending], gap: bool (a sync is needed)}. */
  offer(msg) {
    const seq = msg.seq;
    this.last = Math.max(this.last, seq);
    if (!this.loaded) {
      this.early.set(seq, msg);
      return { added: [], gap: false };
    }
    if (seq <= this.held || this.buffer.has(seq)) {
      this.dupsDropped += 1;
      return { added: [], gap: false };
    }
    if (seq === this.held + 1 || this.held === 0) {
      return { added: this._applyRun(msg), gap: this.held < this.last };
    }
    this.buffer.set(seq, msg);
    return { added: [], gap: true };
  }

  /** The answer to history{before: 0}: the newest page. Early msgs are then applied on top. */
  loadedNewest(answer) {
    const msgs = answer.msgs || [];
    this.entries = msgs.map((m) => ({ ...m, conv: this.conv }));
    this.held = msgs.length ? msgs[msgs.length - 1].seq : 0;
    this.oldest = msgs.length ? msgs[0].seq : 0;
    this.atStart = !answer.more;
    this.last = Math.max(this.last, answer.last || 0, this.held);
    this.loaded = true;
    const early = [...this.early.values()].sort((a, b) => a.seq - b.seq);
    this.early.clear();
    for (const m of early) this.offer(m);
    return { added: this.entries.slice(), gap: this.behind };
  }

  /** A sync answer (entries after `held`). Returns {added, more: another page to fetch now}. */
  synced(answer) {
    const before = this.held;
    const added = [];
    for (const m of answer.msgs || []) {
      if (m.seq <= this.held) continue;
      if (this.held !== 0 && m.seq > this.held + 1) {
        // sync returns every entry after `after` this user may read: the skipped seqs are not theirs.
        for (const s of [...this.buffer.keys()]) if (s < m.seq) this.buffer.delete(s);
        this.held = m.seq - 1;
      }
      this.buffer.delete(m.seq);
      added.push(...this._applyRun({ ...m, conv: this.conv }));
    }
    this.last = Math.max(this.last, answer.last || 0);
    return { added, more: Boolean(answer.more) && this.held > before, progressed: this.held > before };
  }

  /** A history answer for entries before `oldest`. Returns the entries prepended, ascending. */
  older(answer) {
    const msgs = (answer.msgs || []).filter((m) => this.oldest === 0 || m.seq < this.oldest);
    const added = msgs.map((m) => ({ ...m, conv: this.conv }));
    this.entries = added.concat(this.entries);
    if (added.length) this.oldest = added[0].seq;
    if (!answer.more || !added.length) this.atStart = true;
    return added;
  }

  /** A receipt: `user` read up to `seq`. Returns true when it moved a cursor. */
  receipt(user, seq, me) {
    if (user === me) {
      if (seq <= this.read) return false;
      this.read = seq;
      return true;
    }
    if (seq <= (this.receipts.get(user) || 0)) return false;
    this.receipts.set(user, seq);
    return true;
  }

  /** Entries the user has not read: held entries after the read cursor sent by others. */
  unread(me) {
    if (!this.loaded) return Math.max(0, this.last - this.read);
    return this.entries.filter((m) => m.seq > this.read && m.from !== me && m.kind !== "system").length
      + this.early.size;
  }

  _applyRun(msg) {
    const added = [];
    let next = msg;
    while (next) {
      this.entries.push(next);
      this.held = next.seq;
      if (!this.oldest) this.oldest = next.seq;
      added.push(next);
      next = this.buffer.get(this.held + 1);
      if (next) this.buffer.delete(next.seq);
    }
    return added;
  }
}

/**
 * The I/O side. Events (ImClient.on(name, fn)):
 *   state(state, detail)  "connecting" | "online" | "reconnecting" | "offline" | "signed-out"
 *   convs()               the set of conversations or their counters changed
 *   entries(conv, added)  entries appended to a conversation (ascending seq)
 *   older(conv, added)    entries prepended by a history page
 *   outbox(conv)          an unacked send changed (queued, acked, failed, delivered)
 *   receipt(conv, user, seq), typing(conv, user), presence(user, {online, last_seen})
 *   error(message)        something the user must see; nothing is swallowed
 *   fatal(message)        the connection will not be reopened (sign in again)
 */
export class ImClient {
  constructor({ routerUrl = "", storage = null, outboxStorage = null } = {}) {
    this.routerUrl = routerUrl.replace(/\/$/, "");
    this.storage = storage;      // a Storage (localStorage) to keep the sign-in over a reload, or null
    this.outboxStorage = outboxStorage; // a Storage (sessionStorage) to keep unacked sends over a reload
    this.user = null;
    this.device = null;
    this.token = null;
    this.devLogin = false;       // the token came from POST /v1/login: log in again when it expires
    this.hub = null;
    this.state = "signed-out";
    this.cursors = new Map();    // conv -> ConvCursor
    this.groups = new Map();     // group id -> group.info answer
    this.presence = new Map();   // user -> {online, last_seen}
    this.outbox = new Map();     // cmid -> {cmid, conv, body, state, seq, error, createdMs}
    // reconnects; resends (a send retried with its cmid); sendsQueued (written while disconnected);
    // dupsDropped (msgs already held); gapFills (sync runs).
    this.stats = { reconnects: 0, resends: 0, sendsQueued: 0, dupsDropped: 0, gapFills: 0 };
    this._ws = null;
    this._gen = 0;               // connection generation: a close of an old socket changes nothing
    this._ids = 1;
    this._pending = new Map();   // id -> {resolve, reject, timer}
    this._handlers = new Map();
    this._filling = new Set();
    this._typingSent = new Map();
    this._restored = null;       // the user whose saved outbox was restored
    this._stopped = true;
  }

  on(name, fn) {
    if (!this._handlers.has(name)) this._handlers.set(name, []);
    this._handlers.get(name).push(fn);
    return this;
  }

  _emit(name, ...args) {
    for (const fn of this._handlers.get(name) || []) {
      try {
        fn(...args);
      } catch (err) {
        console.error(`im-actors: ${name} handler failed`, err);
        if (name !== "error") this._emit("error", `page error in ${name}: ${err.message}`);
      }
    }
  }

  _setState(state, detail = "") {
    this.state = state;
    this._emit("state", state, detail);
  }

  // --- sign-in -------------------------------------------------------------------------------

  /**
   * Sign in and connect. With no token, the development login (POST /v1/login) makes one; the user
   * id then is required. With a token, the user id is what the hub's ready frame says.
   * Throws ImError (unauthorized, unavailable) when it cannot; the UI shows it.
   */
  async signIn({ user = "", token = "", device = "" } = {}) {
    this.device = device || `web-${newCmid().slice(0, 8)}`;
    if (token) {
      this.token = token.trim();
      this.devLogin = false;
      this.user = user || null;
    } else {
      if (!validId(user)) throw new ImError("bad_request", "user id must be 1 to 64 of A-Z a-z 0-9 _ . -");
      this.user = user;
      this.token = await this._login(user);
      this.devLogin = true;
    }
    this._stopped = false;
    this._setState("connecting");
    // A retryable failure of the first connection (a hub that just died and that the router still
    // hands out, 1006) is tried again on another hub, as a reconnect is; only a final answer (a
    // refused token, a protocol error) or SIGN_IN_ATTEMPTS failures send the user back to sign in.
    const exclude = [];
    for (let attempt = 0; ; attempt++) {
      try {
        await this._connect(exclude);
        break;
      } catch (err) {
        if (!err.retry || attempt + 1 >= SIGN_IN_ATTEMPTS || this._stopped) {
          this._stopped = true;
          this._setState("signed-out", err.message);
          throw err;
        }
        if (err.code === "no_hub") {
          exclude.length = 0;
        } else if (err.hub && !exclude.includes(err.hub)) {
          exclude.push(err.hub);
        }
        this._setState("connecting", `attempt ${attempt + 1}: ${err.message}`);
        await sleep(backoffMs(attempt));
      }
    }
    this._save();
  }

  /** Close the connection and forget the sign-in. */
  signOut() {
    this._stopped = true;
    this.storage?.removeItem("im-actors.session");
    const ws = this._ws;
    this._ws = null;
    this._gen += 1;
    if (ws) ws.close(1000, "signed out");
    this._failPending(new ImError("closed", "signed out"));
    this.cursors.clear();
    this.groups.clear();
    this.presence.clear();
    this.outbox.clear();
    if (this.user) this.outboxStorage?.removeItem(`im-actors.outbox.${this.user}`);
    this._restored = null;
    this._setState("signed-out");
  }

  /** Connect again after a final close (the user asked): a new hub, catch-up, resends. */
  resume() {
    if (!this._stopped || !this.token || this.state === "signed-out") return;
    this._stopped = false;
    this._reconnect(null, 0, "reconnect asked");
  }

  /** The saved sign-in of an earlier visit ({user, token, devLogin, device}) or null. */
  saved() {
    try {
      return JSON.parse(this.storage?.getItem("im-actors.session") || "null");
    } catch {
      return null;
    }
  }

  _save() {
    this.storage?.setItem(
      "im-actors.session",
      JSON.stringify({ user: this.user, token: this.token, devLogin: this.devLogin, device: this.device }),
    );
  }

  async _login(user) {
    let resp;
    try {
      resp = await fetch(`${this.routerUrl}/v1/login`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user }),
      });
    } catch (err) {
      throw new ImError("unavailable", `router unreachable: ${err.message}`, true);
    }
    if (resp.status === 404) throw new ImError("unauthorized", "development login is off: paste a token", false);
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new ImError("unauthorized", `login refused (${resp.status}): ${data.msg || data.error || ""}`);
    return data.token;
  }

  // --- connection ----------------------------------------------------------------------------

  async _lookup(exclude) {
    const query = exclude.map((h) => `exclude=${encodeURIComponent(h)}`).join("&");
    let resp;
    try {
      resp = await fetch(`${this.routerUrl}/v1/hub${query ? "?" + query : ""}`, { cache: "no-store" });
    } catch (err) {
      throw new ImError("unavailable", `router unreachable: ${err.message}`, true);
    }
    if (resp.status === 503) throw new ImError("no_hub", "no hub is alive", true);
    if (!resp.ok) throw new ImError("unavailable", `router answered ${resp.status}`, true);
    return resp.json();
  }

  /** One attempt: router lookup, WebSocket, auth, ready; then catch-up and resends. */
  async _connect(exclude) {
    const { hub, url } = await this._lookup(exclude);
    const gen = ++this._gen;
    const ws = new WebSocket(url, [SUBPROTOCOL]);
    const ready = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(Object.assign(new ImError("unavailable", `${hub}: no ready in time`, true), { hub }));
        ws.close();
      }, REQUEST_TIMEOUT_MS);
      ws.onopen = () => {
        ws.send(JSON.stringify({ t: "auth", token: this.token, device: this.device, proto: PROTO_VERSION }));
      };
      ws.onmessage = (ev) => {
        let frame;
        try {
          frame = JSON.parse(ev.data);
        } catch {
          return;
        }
        if (frame.t === "ready") {
          clearTimeout(timer);
          resolve(frame);
        } else if (frame.t === "err") {
          clearTimeout(timer);
          reject(Object.assign(new ImError(frame.code, frame.msg, frame.retry), { hub }));
          ws.close();
        }
      };
      ws.onclose = (ev) => {
        clearTimeout(timer);
        const meaning = CLOSE_MEANINGS[ev.code] || "closed";
        const err = new ImError(
          ev.code === 4401 ? "unauthorized" : "unavailable",
          `${hub}: ${meaning} (${ev.code}${ev.reason ? ": " + ev.reason : ""})`,
          !FINAL_CLOSE_CODES.has(ev.code),
        );
        reject(Object.assign(err, { hub, closeCode: ev.code, closeReason: ev.reason }));
      };
    });
    if (gen !== this._gen || this._stopped) {
      ws.close(1000);
      throw new ImError("closed", "signed out");
    }
    this._ws = ws;
    this.hub = ready.hub;
    this.user = ready.user;
    this.device = ready.device;
    ws.onmessage = (ev) => this._onFrame(ev.data);
    ws.onclose = (ev) => this._onClose(gen, hub, ev.code, ev.reason);
    this._setState("online", ready.hub);
    this._restoreOutbox();
    this._resendAll();
    await this._catchUp();
  }

  _onClose(gen, hub, code, reason) {
    if (gen !== this._gen) return;
    this._ws = null;
    this.hub = null;
    this._failPending(new ImError("connection_lost", `${CLOSE_MEANINGS[code] || "closed"} (${code})`, true));
    if (this._stopped) return;
    if (code === 4401 && reason === "token expired" && this.devLogin) {
      this.token = null; // log in again, then reconnect
    } else if (FINAL_CLOSE_CODES.has(code)) {
      const msg = `disconnected: ${CLOSE_MEANINGS[code] || "closed"} (${code}${reason ? ": " + reason : ""})`;
      this._stopped = true;
      this._setState("offline", msg);
      this._emit("fatal", msg);
      return;
    }
    this._reconnect(hub, code, reason);
  }

  async _reconnect(failedHub, code, reason) {
    const exclude = failedHub ? [failedHub] : [];
    let attempt = code === 4429 ? 4 : 0;
    const why = `${CLOSE_MEANINGS[code] || "closed"} (${code}${reason ? ": " + reason : ""})`;
    this._setState("reconnecting", `${failedHub}: ${why}`);
    await sleep(attempt ? backoffMs(attempt) : Math.random() * BACKOFF_BASE_MS);
    while (!this._stopped) {
      try {
        if (!this.token) this.token = await this._login(this.user);
        this.stats.reconnects += 1;
        await this._connect(exclude);
        this._save();
        return;
      } catch (err) {
        if (this._stopped) return;
        if (err.code === "no_hub") {
          exclude.length = 0; // only excluded hubs are left, or none: any of them again
        } else if (err.hub && !exclude.includes(err.hub)) {
          exclude.push(err.hub);
        }
        if (err.closeCode === 4401 && this.devLogin && attempt < 1) {
          this.token = null;
        } else if (!err.retry) {
          const msg = `cannot reconnect: ${err.message}`;
          this._stopped = true;
          this._setState("offline", msg);
          this._emit("fatal", msg);
          return;
        }
        this._setState("reconnecting", `attempt ${attempt + 1}: ${err.message}`);
      }
      await sleep(backoffMs(attempt));
      attempt = Math.min(attempt + 1, 10);
    }
  }

  _failPending(err) {
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
  }

  /** Send a request and resolve with its answer; rejects with ImError for an err answer or a lost socket. */
  request(t, fields = {}) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ImError("not_connected", "not connected (reconnecting)", true));
    }
    const id = this._ids++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new ImError("timeout", `${t}: no answer in ${REQUEST_TIMEOUT_MS / 1000} s`, true));
      }, REQUEST_TIMEOUT_MS);
      this._pending.set(id, {
        timer,
        resolve: (frame) => {
          if (frame.t === "err") {
            const extra = frame.retry_after_ms ? { retry_after_ms: frame.retry_after_ms } : {};
            reject(new ImError(frame.code, frame.msg || t, Boolean(frame.retry), extra));
          } else {
            resolve(frame);
          }
        },
        reject,
      });
      ws.send(JSON.stringify({ ...fields, t, id }));
    });
  }

  // --- incoming ------------------------------------------------------------------------------

  _onFrame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit("error", "the hub sent a frame that is not JSON");
      return;
    }
    if (frame.id !== undefined && ANSWER_TYPES.has(frame.t)) {
      const p = this._pending.get(frame.id);
      if (p) {
        this._pending.delete(frame.id);
        clearTimeout(p.timer);
        p.resolve(frame);
      }
      return;
    }
    switch (frame.t) {
      case "msg":
        this._onMsg(frame);
        break;
      case "receipt": {
        const cur = this._cursor(frame.conv);
        if (cur.receipt(frame.user, frame.seq, this.user)) {
          this._emit("receipt", frame.conv, frame.user, frame.seq);
          if (frame.user === this.user) this._emit("convs");
        }
        break;
      }
      case "typing":
        this._emit("typing", frame.conv, frame.user);
        break;
      case "presence":
        this.presence.set(frame.user, { online: frame.online, last_seen: frame.last_seen });
        this._emit("presence", frame.user, this.presence.get(frame.user));
        break;
      case "err":
        this._emit("error", `server: ${frame.code}: ${frame.msg}`);
        break;
      default:
        break; // unknown unsolicited frames are ignored (forward compatibility)
    }
  }

  _cursor(conv) {
    let cur = this.cursors.get(conv);
    if (!cur) {
      cur = new ConvCursor(conv);
      this.cursors.set(conv, cur);
    }
    return cur;
  }

  _onMsg(frame) {
    if (typeof frame.conv !== "string" || !Number.isInteger(frame.seq)) return;
    const known = this.cursors.has(frame.conv);
    const cur = this._cursor(frame.conv);
    const dups = cur.dupsDropped;
    const { added, gap } = cur.offer(frame);
    this.stats.dupsDropped += cur.dupsDropped - dups;
    this._applied(cur, added);
    if (gap) this._fill(cur);
    if (!known) {
      const g = groupOf(frame.conv);
      if (g) this.groupInfo(g).catch(() => {}); // its name, for the list; a failure shows the id instead
    }
    this._emit("convs");
  }

  /** Entries were applied: settle the outbox, track membership, tell the UI. */
  _applied(cur, added) {
    if (!added.length) return;
    for (const m of added) {
      if (m.from === this.user && this.outbox.has(m.cmid) && this.outbox.get(m.cmid).conv === cur.conv) {
        this.outbox.delete(m.cmid);
        this._outboxChanged(cur.conv);
      }
      if (m.kind === "system" && m.meta) {
        const users = m.meta.users || [];
        const g = groupOf(cur.conv);
        if ((m.meta.event === "left" || m.meta.event === "removed") && users.includes(this.user)) cur.left = true;
        if (m.meta.event === "added" && users.includes(this.user)) cur.left = false;
        if (g && this.groups.has(g)) this.groupInfo(g).catch(() => {});
      }
    }
    this._emit("entries", cur.conv, added);
  }

  /** Fill the gap of `cur` with sync, one fill at a time per conversation. */
  async _fill(cur) {
    if (this._filling.has(cur.conv)) return;
    this._filling.add(cur.conv);
    this.stats.gapFills += 1;
    let stalls = 0;
    try {
      while (cur.behind && !this._stopped) {
        let answer;
        try {
          answer = await this.request("sync", { conv: cur.conv, after: cur.held, limit: SYNC_LIMIT });
        } catch (err) {
          if (err.retry && this._ws) {
            await sleep(backoffMs(stalls++));
            if (stalls < 8) continue;
          }
          if (err.code !== "connection_lost" && err.code !== "not_connected") {
            this._emit("error", `catching up ${cur.conv} failed: ${err.message}`);
          }
          return; // the reconnect's catch-up starts it again
        }
        const { added, more, progressed } = cur.synced(answer);
        this._applied(cur, added);
        if (more) continue;
        if (!progressed && cur.behind) {
          if (++stalls > 8) {
            this._emit("error", `${cur.conv}: the server says seq ${cur.last} exists but sync stops at ${cur.held}`);
            return;
          }
          await sleep(backoffMs(stalls));
        }
      }
    } finally {
      this._filling.delete(cur.conv);
      this._emit("convs");
    }
  }

  /** convs, then a fill of every loaded conversation whose last is ahead of what is held. */
  async _catchUp() {
    let answer;
    try {
      answer = await this.request("convs");
    } catch (err) {
      if (err.code !== "connection_lost") this._emit("error", `conversation list failed: ${err.message}`);
      return;
    }
    for (const item of answer.convs || []) {
      const cur = this._cursor(item.conv);
      cur.last = Math.max(cur.last, item.last || 0);
      cur.read = Math.max(cur.read, item.read || 0);
      cur.left = false;
      const g = groupOf(item.conv);
      if (g && !this.groups.has(g)) this.groupInfo(g).catch(() => {});
      if (cur.behind) this._fill(cur);
    }
    this._emit("convs");
  }

  // --- what the UI calls ---------------------------------------------------------------------

  /** Load the newest page of `conv` once (history with before 0), then keep it live. */
  async open(conv) {
    const cur = this._cursor(conv);
    if (cur.loaded || cur.loading) return cur;
    cur.loading = true;
    try {
      let answer;
      try {
        answer = await this.request("history", { conv, before: 0, limit: PAGE });
      } catch (err) {
        if (err.code === "forbidden" && conv.startsWith("d:")) {
          answer = { msgs: [], more: false, last: 0 }; // a direct conversation nobody wrote in yet
        } else {
          throw err;
        }
      }
      const { added, gap } = cur.loadedNewest(answer);
      this._applied(cur, added);
      if (!added.length) this._emit("entries", conv, []);
      if (gap) this._fill(cur);
      this._emit("convs");
    } finally {
      cur.loading = false;
    }
    return cur;
  }

  /** The page before the oldest entry held; resolves to the entries prepended ([] at the start). */
  async loadOlder(conv) {
    const cur = this._cursor(conv);
    if (!cur.loaded || cur.atStart || cur.loadingOlder || !cur.oldest) return [];
    cur.loadingOlder = true;
    try {
      const answer = await this.request("history", { conv, before: cur.oldest, limit: PAGE });
      const added = cur.older(answer);
      this._emit("older", conv, added);
      return added;
    } finally {
      cur.loadingOlder = false;
    }
  }

  /** Queue a message; it is sent now if connected, else after the reconnect, always with the same cmid. */
  send(conv, body) {
    const item = { cmid: newCmid(), conv, body, state: "sending", seq: 0, error: "", createdMs: Date.now(), gen: -1 };
    this.outbox.set(item.cmid, item);
    this._typingSent.delete(conv); // the message ends this bout of typing: the next keystroke is news
    this._outboxChanged(conv);
    this._sendItem(item);
    return item;
  }

  /** Send a failed item again (same cmid). */
  retry(cmid) {
    const item = this.outbox.get(cmid);
    if (!item) return;
    item.state = "sending";
    item.error = "";
    item.gen = -1;
    this._outboxChanged(item.conv);
    this._sendItem(item);
  }

  /** Drop a failed item from the outbox. */
  discard(cmid) {
    const item = this.outbox.get(cmid);
    if (item && item.state === "failed") {
      this.outbox.delete(cmid);
      this._outboxChanged(item.conv);
    }
  }

  /** The outbox changed: keep its unacked sends (same cmids) for a reload, then tell the UI. */
  _outboxChanged(conv) {
    if (this.user && this.outboxStorage) {
      const keep = [...this.outbox.values()]
        .filter((i) => i.state !== "acked")
        .map(({ cmid, conv: c, body, state, error, createdMs }) => ({ cmid, conv: c, body, state, error, createdMs }));
      try {
        if (keep.length) this.outboxStorage.setItem(`im-actors.outbox.${this.user}`, JSON.stringify(keep));
        else this.outboxStorage.removeItem(`im-actors.outbox.${this.user}`);
      } catch (err) {
        this._emit("error", `unsent messages cannot be kept over a reload: ${err.message}`);
      }
    }
    this._emit("outbox", conv);
  }

  /** Once per sign-in: the unacked sends an earlier page of this tab left, sent again with their cmids. */
  _restoreOutbox() {
    if (!this.outboxStorage || this._restored === this.user) return;
    this._restored = this.user;
    let items = [];
    try {
      items = JSON.parse(this.outboxStorage.getItem(`im-actors.outbox.${this.user}`) || "[]");
    } catch {
      items = [];
    }
    for (const i of items) {
      if (this.outbox.has(i.cmid)) continue;
      this.outbox.set(i.cmid, { ...i, state: i.state === "failed" ? "failed" : "sending", seq: 0, gen: -1 });
      this._emit("outbox", i.conv);
    }
  }

  _resendAll() {
    const items = [...this.outbox.values()].filter((i) => i.state === "sending").sort((a, b) => a.createdMs - b.createdMs);
    for (const item of items) {
      if (item.gen !== this._gen) {
        this.stats.resends += item.gen === -1 ? 0 : 1;
        this._sendItem(item);
      }
    }
  }

  async _sendItem(item) {
    if (!this._ws) {
      this.stats.sendsQueued += 1;
      return; // the reconnect sends it
    }
    const gen = this._gen;
    item.gen = gen;
    let attempt = 0;
    while (this.outbox.get(item.cmid) === item && item.state === "sending") {
      try {
        const ack = await this.request("send", { conv: item.conv, cmid: item.cmid, body: item.body });
        item.state = "acked";
        item.seq = ack.seq;
        const cur = this._cursor(item.conv);
        cur.last = Math.max(cur.last, ack.seq);
        this._outboxChanged(item.conv);
        if (cur.loaded && cur.held >= ack.seq) {
          this.outbox.delete(item.cmid); // its msg came before its ack
          this._outboxChanged(item.conv);
        } else if (cur.loaded) {
          // The msg normally follows the ack at once; if it does not, sync fetches it.
          setTimeout(() => this.outbox.get(item.cmid) === item && this._fill(cur), 2000);
        }
        return;
      } catch (err) {
        if (err.code === "connection_lost" || err.code === "not_connected") {
          item.gen = -2; // resent after the reconnect
          return;
        }
        if (!err.retry) {
          item.state = "failed";
          item.error = err.message;
          this._outboxChanged(item.conv);
          this._emit("error", `message not sent: ${err.message}`);
          return;
        }
        if (gen !== this._gen) return; // a new connection resends it
        const wait = Math.max(backoffMs(attempt), err.extra.retry_after_ms || 0);
        attempt += 1;
        this.stats.resends += 1;
        await sleep(wait);
        if (gen !== this._gen) return;
      }
    }
  }

  /** Mark `conv` read up to its newest held entry (read request; others get a receipt). */
  async markRead(conv) {
    const cur = this.cursors.get(conv);
    if (!cur || !cur.loaded || cur.held <= cur.read || cur.left) return;
    const seq = cur.held;
    await this.request("read", { conv, seq });
    cur.read = Math.max(cur.read, seq);
    this._emit("convs");
  }

  /** Tell the members this user is typing (at most every 2.5 s per conversation; no answer). */
  typing(conv) {
    const now = Date.now();
    if (!this._ws || now - (this._typingSent.get(conv) || 0) < TYPING_EVERY_MS) return;
    this._typingSent.set(conv, now);
    this._ws.send(JSON.stringify({ t: "typing", conv }));
  }

  async presenceGet(users) {
    const wanted = users.filter(validId);
    if (!wanted.length) return {};
    const answer = await this.request("presence.get", { users: wanted });
    for (const [user, p] of Object.entries(answer.users || {})) {
      this.presence.set(user, p);
      this._emit("presence", user, p);
    }
    return answer.users || {};
  }

  async groupInfo(group) {
    const info = await this.request("group.info", { group });
    this.groups.set(group, info);
    this._emit("convs");
    return info;
  }

  async groupCreate(name, members) {
    const answer = await this.request("group.create", { name, members });
    this._cursor(answer.conv);
    await this.groupInfo(answer.group).catch(() => {});
    this._emit("convs");
    return answer;
  }

  async groupAdd(group, users) {
    await this.request("group.add", { group, users });
    await this.groupInfo(group).catch(() => {});
  }

  async groupLeave(group) {
    await this.request("group.leave", { group });
    const cur = this.cursors.get(`g:${group}`);
    if (cur) cur.left = true;
    this._emit("convs");
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
