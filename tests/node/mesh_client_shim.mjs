// A stand-in for the reference Mesh 2.0.x browser/Node client (`MeshClient`).
//
// Why it exists: the reference client package (@mesh-kit/client, @mesh-kit/core)
// cannot be installed from the npm registry reachable here (the whole @mesh-kit
// scope answers 404). reference_client.mjs uses the real package when it can be
// imported and falls back to this file otherwise; its JSON output says which one
// ran ("client_impl").
//
// This file is written from the reference client's documented behaviour and
// its public API, so a scenario written against the real client runs unchanged
// on it. What it reproduces on the wire (this is what matters for our server):
//   * it opens a plain WebSocket (globalThis.WebSocket) and treats itself as
//     connected only after the first `mesh/assign-id` frame;
//   * every frame it sends is `{"id", "command", "payload"}` with an integer id,
//     and `payload` is `{}` when the caller gave none (null/undefined);
//   * `ping` is answered with `{"id": n, "command": "pong", "payload": {}}`
//     (an id is reserved and released at once: no response is expected);
//   * `latency:request` is answered with `latency:response` echoing the payload,
//     with an id, fire-and-forget;
//   * ids are `(Date.now() % 10000) * 10000 + counter`, reused after release;
//   * a response is matched by id only; an error payload `{error, code, name}`
//     RESOLVES the promise (it is not a rejection);
//   * no response within `expiresIn` (default 30 s) rejects with code ETIMEOUT;
//   * heartbeat: a timer fires every `pingTimeout` ms and counts a missed ping,
//     a received ping resets the count; when the count exceeds `maxMissedPings`
//     the client drops the socket and reconnects (when `shouldReconnect`);
//   * server pushes (frames whose command is not a system command) are emitted
//     as client events: `client.on("chat", payload => ...)`, except
//     `mesh/presence-update`, which goes to the room's presence callback only;
//   * presence (reference 2.x): `joinRoom(room, onPresence)` joins, then
//     subscribes (`mesh/subscribe-presence`) when a callback is given; the
//     callback is first called with the whole subscribe result when someone
//     is present, then with each update payload; `leaveRoom` also
//     unsubscribes; `publishPresenceState(room, {state, expireAfter, silent})`
//     and `clearPresenceState(room)` resolve the server's boolean (false on an
//     error); after a reconnect every joined room is joined again with its
//     callback, then `forcePresenceUpdate(room)` asks `mesh/get-presence-state`
//     and hands `(present, states)` to the callback's `init` when it has one.

const Status = Object.freeze({
  ONLINE: "online",
  CONNECTING: "connecting",
  RECONNECTING: "reconnecting",
  OFFLINE: "offline",
});

class CodeError extends Error {
  constructor(message, code, name) {
    super(message);
    this.code = code;
    if (name) this.name = name;
  }
}

// Minimal emitter with eventemitter3 semantics (an "error" event without a
// listener is dropped, not thrown).
class Emitter {
  #listeners = new Map();
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, []);
    this.#listeners.get(event).push({ fn, once: false });
    return this;
  }
  once(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, []);
    this.#listeners.get(event).push({ fn, once: true });
    return this;
  }
  off(event, fn) {
    const list = this.#listeners.get(event);
    if (!list) return this;
    this.#listeners.set(
      event,
      list.filter((l) => l.fn !== fn),
    );
    return this;
  }
  removeListener(event, fn) {
    return this.off(event, fn);
  }
  listenerCount(event) {
    return (this.#listeners.get(event) || []).length;
  }
  emit(event, ...args) {
    const list = this.#listeners.get(event);
    if (!list || list.length === 0) return false;
    for (const l of [...list]) {
      if (l.once) this.off(event, l.fn);
      try {
        l.fn(...args);
      } catch (e) {
        if (event !== "error") this.emit("error", e);
      }
    }
    return true;
  }
}

class IdManager {
  #inUse = new Set();
  #counter = 0;
  reserve() {
    for (let i = 0; i < 10000; i++) {
      this.#counter = (this.#counter + 1) % 10000;
      const id = (Date.now() % 10000) * 10000 + this.#counter;
      if (!this.#inUse.has(id)) {
        this.#inUse.add(id);
        return id;
      }
    }
    throw new Error("no free command id");
  }
  release(id) {
    this.#inUse.delete(id);
  }
}

const SYSTEM_COMMANDS = new Set(["ping", "pong", "latency", "latency:request", "latency:response"]);

export class MeshClient extends Emitter {
  constructor(url, opts = {}) {
    super();
    this.url = url;
    this.options = {
      pingTimeout: opts.pingTimeout ?? 30_000,
      maxMissedPings: opts.maxMissedPings ?? 1,
      shouldReconnect: opts.shouldReconnect ?? true,
      reconnectInterval: opts.reconnectInterval ?? 2_000,
      maxReconnectAttempts: opts.maxReconnectAttempts ?? Infinity,
    };
    this.socket = null;
    this.connectionId = undefined;
    this._status = Status.OFFLINE;
    this._ids = new IdManager();
    this._callbacks = new Map();
    this._queue = [];
    this._pingTimer = undefined;
    this.missedPings = 0;
    this.isReconnecting = false;
    this.joinedRooms = new Map();
    this.presenceSubscriptions = new Map();
  }

  get status() {
    return this._status;
  }

  // ---- socket plumbing -------------------------------------------------

  _isOpen() {
    return !!this.socket && this.socket.readyState === 1;
  }

  _send(frame) {
    if (!this._isOpen()) return false;
    try {
      this.socket.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _attach(socket, reconnection) {
    socket.onclose = () => {
      if (socket !== this.socket) return;
      this._status = Status.OFFLINE;
      this.emit("close");
      this._reconnect();
    };
    socket.onerror = (err) => {
      this.emit("error", err?.error ?? err);
    };
    socket.onmessage = (event) => this._onMessage(event.data);
    if (reconnection) {
      const queued = this._queue.splice(0);
      const now = Date.now();
      for (const q of queued) if (q.expires > now) this._send(q.frame);
    }
  }

  _onMessage(raw) {
    let data;
    try {
      data = JSON.parse(typeof raw === "string" ? raw : Buffer.from(raw).toString("utf8"));
    } catch (e) {
      this.emit("error", e);
      return;
    }
    if (!data || typeof data !== "object") return;
    this.emit("message", data);
    const { command, payload } = data;
    if (command === "mesh/assign-id") {
      this.connectionId = payload;
      this.emit("id-assigned", payload);
    } else if (command === "latency:request") {
      this._fireAndForget("latency:response", payload);
    } else if (command === "latency") {
      this.emit("latency", payload);
    } else if (command === "ping") {
      this._heartbeat();
      this.emit("ping");
      this._fireAndForget("pong", {});
    } else if (command === "mesh/presence-update") {
      this._onPresenceUpdate(payload);
    } else if (typeof command === "string" && !SYSTEM_COMMANDS.has(command)) {
      this.emit(command, payload);
    }
    if (data.id !== undefined && this._callbacks.has(data.id)) {
      this._callbacks.get(data.id)(payload);
    }
  }

  _fireAndForget(command, payload) {
    const id = this._ids.reserve();
    this._send({ id, command, payload: payload ?? {} });
    this._ids.release(id);
  }

  _heartbeat() {
    this.missedPings = 0;
    if (!this._pingTimer) {
      this._pingTimer = setTimeout(() => this._checkPing(), this.options.pingTimeout);
    }
  }

  _checkPing() {
    this._pingTimer = undefined;
    this.missedPings++;
    if (this.missedPings > this.options.maxMissedPings) {
      if (this.options.shouldReconnect) this._reconnect(true);
    } else {
      this._pingTimer = setTimeout(() => this._checkPing(), this.options.pingTimeout);
    }
  }

  _stopHeartbeat() {
    clearTimeout(this._pingTimer);
    this._pingTimer = undefined;
    this.missedPings = 0;
  }

  _openSocket(reconnection) {
    return new Promise((resolve, reject) => {
      let socket;
      try {
        socket = new globalThis.WebSocket(this.url);
      } catch (e) {
        reject(e);
        return;
      }
      this.socket = socket;
      let opened = false;
      socket.onerror = () => {
        if (!opened) reject(new CodeError("WebSocket connection error", "ECONNECTION", "ConnectionError"));
      };
      socket.onclose = () => {
        if (!opened) reject(new CodeError("WebSocket closed before open", "ECONNECTION", "ConnectionError"));
      };
      socket.onopen = () => {
        opened = true;
        this._status = Status.ONLINE;
        this._attach(socket, reconnection);
        this._heartbeat();
        const previousId = this.connectionId;
        this.connectionId = undefined;
        this.once("id-assigned", () => resolve(previousId));
      };
    });
  }

  // ---- public API (same names and shapes as the reference client) -------

  connect() {
    if (this._status === Status.ONLINE) return Promise.resolve();
    if (this._status === Status.CONNECTING || this._status === Status.RECONNECTING) {
      return new Promise((resolve, reject) => {
        const ok = () => {
          this.off("error", bad);
          resolve();
        };
        const bad = (e) => {
          this.off("connect", ok);
          reject(e);
        };
        this.once("connect", ok);
        this.once("error", bad);
      });
    }
    this._status = Status.CONNECTING;
    return this._openSocket(false).then(
      () => {
        this.emit("connect");
      },
      (e) => {
        this._status = Status.OFFLINE;
        throw e;
      },
    );
  }

  _reconnect(dropSocket = false) {
    if (!this.options.shouldReconnect || this.isReconnecting) return;
    this._status = Status.RECONNECTING;
    this.isReconnecting = true;
    this._stopHeartbeat();
    if (this.socket) {
      const old = this.socket;
      this.socket = null;
      if (dropSocket) {
        try {
          old.close();
        } catch {}
      }
      this.emit("disconnect");
    }
    let attempt = 1;
    const tryOnce = () => {
      this._openSocket(true).then(
        async () => {
          this.isReconnecting = false;
          const rejoined = [];
          for (const [roomName, onPresence] of [...this.joinedRooms.entries()]) {
            try {
              const r = await this.joinRoom(roomName, onPresence);
              if (r.success) rejoined.push(roomName);
            } catch {}
          }
          for (const roomName of rejoined) {
            try {
              await this.forcePresenceUpdate(roomName);
            } catch {}
          }
          this.emit("connect");
          this.emit("reconnect");
        },
        () => {
          attempt++;
          if (attempt <= this.options.maxReconnectAttempts) {
            setTimeout(tryOnce, this.options.reconnectInterval);
          } else {
            this.isReconnecting = false;
            this._status = Status.OFFLINE;
            this.emit("reconnectfailed");
          }
        },
      );
    };
    tryOnce();
  }

  async command(command, payload, expiresIn = 30_000) {
    if (this._status !== Status.ONLINE) await this.connect();
    const id = this._ids.reserve();
    const frame = { id, command, payload: payload ?? {} };
    if (!this._send(frame)) this._queue.push({ frame, expires: Date.now() + (expiresIn || 30_000) });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        if (!this._callbacks.has(id)) return;
        this._callbacks.delete(id);
        this._ids.release(id);
        reject(new CodeError(`Command timed out after ${expiresIn}ms.`, "ETIMEOUT", "TimeoutError"));
      }, expiresIn);
      this._callbacks.set(id, (result) => {
        clearTimeout(timer);
        this._callbacks.delete(id);
        this._ids.release(id);
        resolve(result);
      });
    });
  }

  async joinRoom(roomName, onPresence) {
    const result = await this.command("mesh/join-room", { roomName });
    if (!result || !result.success) return { success: false, present: [] };
    this.joinedRooms.set(roomName, onPresence);
    if (!onPresence) return { success: true, present: result.present || [] };
    const sub = await this.subscribePresence(roomName, onPresence);
    return { success: sub.success, present: result.present || [] };
  }

  async leaveRoom(roomName) {
    const result = await this.command("mesh/leave-room", { roomName });
    if (result && result.success) {
      this.joinedRooms.delete(roomName);
      if (this.presenceSubscriptions.has(roomName)) await this.unsubscribePresence(roomName);
    }
    return { success: result ? result.success : undefined };
  }

  // ---- presence ----------------------------------------------------------

  async _onPresenceUpdate(payload) {
    const callback = payload && this.presenceSubscriptions.get(payload.roomName);
    if (callback) {
      try {
        await callback(payload);
      } catch {}
    }
  }

  async subscribePresence(roomName, callback) {
    try {
      const result = await this.command("mesh/subscribe-presence", { roomName });
      if (result && result.success) {
        this.presenceSubscriptions.set(roomName, callback);
        if (result.present && result.present.length > 0) await callback(result);
      }
      return {
        success: !!(result && result.success),
        present: (result && result.present) || [],
        states: (result && result.states) || {},
      };
    } catch {
      return { success: false, present: [] };
    }
  }

  async unsubscribePresence(roomName) {
    try {
      const ok = await this.command("mesh/unsubscribe-presence", { roomName });
      if (ok) this.presenceSubscriptions.delete(roomName);
      return ok;
    } catch {
      return false;
    }
  }

  async publishPresenceState(roomName, options) {
    try {
      return await this.command("mesh/publish-presence-state", {
        roomName,
        state: options.state,
        expireAfter: options.expireAfter,
        silent: options.silent,
      });
    } catch {
      return false;
    }
  }

  async clearPresenceState(roomName) {
    try {
      return await this.command("mesh/clear-presence-state", { roomName });
    } catch {
      return false;
    }
  }

  async forcePresenceUpdate(roomName) {
    const handler = this.presenceSubscriptions.get(roomName);
    if (!handler) return false;
    let result;
    try {
      result = await this.command("mesh/get-presence-state", { roomName }, 5000);
    } catch {
      return false;
    }
    if (!result || !result.success) return false;
    if (typeof handler.init === "function") handler.init(result.present, result.states || {});
    return true;
  }

  async getRoomMetadata(roomName) {
    try {
      const result = await this.command("mesh/get-room-metadata", { roomName });
      return result.metadata;
    } catch {
      return null;
    }
  }

  async getConnectionMetadata(connectionId) {
    try {
      const result = connectionId
        ? await this.command("mesh/get-connection-metadata", { connectionId })
        : await this.command("mesh/get-my-connection-metadata");
      return result.metadata;
    } catch {
      return null;
    }
  }

  async setConnectionMetadata(metadata, options) {
    try {
      const result = await this.command("mesh/set-my-connection-metadata", { metadata, options });
      return result.success;
    } catch {
      return false;
    }
  }

  close() {
    this.options.shouldReconnect = false;
    this._stopHeartbeat();
    if (this._status === Status.OFFLINE || !this.socket) {
      this._status = Status.OFFLINE;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      this.once("close", () => {
        this._status = Status.OFFLINE;
        this.emit("disconnect");
        resolve();
      });
      try {
        this.socket.close();
      } catch {
        resolve();
      }
    });
  }
}

export { Status, CodeError };
