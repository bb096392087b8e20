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
//     `mesh/subscription-message`, which goes to the callback given to
//     `subscribeChannel` for its channel (`payload.message` only) and is not
//     emitted as an event;
//   * channels (client.ts `subscribeChannel`, `unsubscribeChannel`,
//     `getChannelHistory`, `handleChannelMessage`): the subscription is
//     recorded *before* the command is sent, so live messages that arrive
//     before the response already reach the callback; the history in the
//     response is then handed to the callback too, in order; a failed
//     subscribe keeps the recorded subscription (as the reference does);
//     after a reconnect every channel is subscribed again with the same
//     `historyLimit` (resubscribeAll; no `since`), after the rooms;
//   * presence (reference 2.x): `mesh/presence-update` goes to the room's
//     presence callback only; `joinRoom(room, onPresence)` joins, then
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
    this.channelSubscriptions = new Map();
    this.recordSubscriptions = new Map(); // recordId -> { callback, localVersion, mode }
    this.collectionSubscriptions = new Map(); // collectionId -> { ids, version, onDiff }
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
    } else if (command === "mesh/subscription-message") {
      this._handleChannelMessage(payload);
    } else if (command === "mesh/record-update") {
      this._handleRecordUpdate(payload);
    } else if (command === "mesh/record-deleted") {
      this._handleRecordDeleted(payload);
    } else if (command === "mesh/collection-diff") {
      this._handleCollectionDiff(payload);
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
          for (const [channel, { callback, historyLimit }] of this.channelSubscriptions) {
            try {
              await this.subscribeChannel(channel, callback, { historyLimit });
            } catch {}
          }
          await this._resubscribeRecordsAndCollections();
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

  async _handleChannelMessage(payload) {
    const { channel, message } = payload || {};
    const subscription = this.channelSubscriptions.get(channel);
    if (subscription) {
      try {
        await subscription.callback(message);
      } catch (e) {
        this.emit("error", e);
      }
    }
  }

  async subscribeChannel(channel, callback, options) {
    this.channelSubscriptions.set(channel, { callback, historyLimit: options?.historyLimit });
    const result = await this.command("mesh/subscribe-channel", {
      channel,
      historyLimit: options?.historyLimit,
      since: options?.since,
    });
    if (result.success && result.history && result.history.length > 0) {
      result.history.forEach((message) => callback(message));
    }
    return { success: result.success, history: result.history || [] };
  }

  unsubscribeChannel(channel) {
    this.channelSubscriptions.delete(channel);
    return this.command("mesh/unsubscribe-channel", { channel });
  }

  async getChannelHistory(channel, options) {
    try {
      const result = await this.command("mesh/get-channel-history", {
        channel,
        limit: options?.limit,
        since: options?.since,
      });
      return { success: result.success, history: result.history || [] };
    } catch {
      return { success: false, history: [] };
    }
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

  // ---- records and collections ------------------------------------------

  async _handleRecordUpdate(payload) {
    const { recordId, full, patch, version } = payload || {};
    for (const [collectionId, sub] of this.collectionSubscriptions) {
      if (sub.ids.has(recordId) && sub.onDiff) {
        try {
          await sub.onDiff({ added: [], removed: [], changed: [{ id: recordId, record: full }], version });
        } catch (e) {
          console.error(`collection ${collectionId} callback failed`, e);
        }
      }
    }
    const sub = this.recordSubscriptions.get(recordId);
    if (!sub) return;
    if (patch) {
      if (version !== sub.localVersion + 1) {
        await this.unsubscribeRecord(recordId);
        await this.subscribeRecord(recordId, sub.callback, { mode: sub.mode });
        return;
      }
      sub.localVersion = version;
      if (sub.callback) await sub.callback({ recordId, patch, version });
    } else if (full !== undefined) {
      sub.localVersion = version;
      if (sub.callback) await sub.callback({ recordId, full, version });
    }
  }

  async _handleRecordDeleted(payload) {
    const { recordId, version } = payload || {};
    const sub = this.recordSubscriptions.get(recordId);
    if (sub && sub.callback) {
      try {
        await sub.callback({ recordId, deleted: true, version });
      } catch (e) {
        console.error(`record ${recordId} callback failed`, e);
      }
    }
    this.recordSubscriptions.delete(recordId);
  }

  async _handleCollectionDiff(payload) {
    const { collectionId, added, removed, version } = payload || {};
    const sub = this.collectionSubscriptions.get(collectionId);
    if (!sub) return;
    if (version !== sub.version + 1) {
      await this.unsubscribeCollection(collectionId);
      await this.subscribeCollection(collectionId, { onDiff: sub.onDiff });
      return;
    }
    sub.version = version;
    for (const r of added) sub.ids.add(r.id);
    for (const r of removed) sub.ids.delete(r.id);
    if (sub.onDiff) {
      try {
        await sub.onDiff({
          added: added.map((record) => ({ id: record.id, record })),
          removed: removed.map((record) => ({ id: record.id, record })),
          changed: [],
          version,
        });
      } catch (e) {
        console.error(`collection ${collectionId} callback failed`, e);
      }
    }
  }

  async subscribeRecord(recordId, callback, options) {
    const mode = options?.mode ?? "full";
    try {
      const result = await this.command("mesh/subscribe-record", { recordId, mode });
      if (result.success) {
        this.recordSubscriptions.set(recordId, { callback, localVersion: result.version, mode });
        if (callback) await callback({ recordId, full: result.record, version: result.version });
      }
      return { success: result.success, record: result.record ?? null, version: result.version ?? 0 };
    } catch {
      return { success: false, record: null, version: 0 };
    }
  }

  async unsubscribeRecord(recordId) {
    try {
      const success = await this.command("mesh/unsubscribe-record", { recordId });
      if (success) this.recordSubscriptions.delete(recordId);
      return success;
    } catch {
      return false;
    }
  }

  async writeRecord(recordId, newValue, options) {
    try {
      const result = await this.command("mesh/publish-record-update", { recordId, newValue, options });
      return result.success === true;
    } catch {
      return false;
    }
  }

  async subscribeCollection(collectionId, options = {}) {
    try {
      const result = await this.command("mesh/subscribe-collection", { collectionId });
      if (result.success) {
        this.collectionSubscriptions.set(collectionId, {
          ids: new Set(result.ids),
          version: result.version,
          onDiff: options.onDiff,
        });
        if (options.onDiff) {
          try {
            await options.onDiff({ added: result.records, removed: [], changed: [], version: result.version });
          } catch (e) {
            console.error(`collection ${collectionId} callback failed`, e);
          }
        }
      }
      return {
        success: result.success,
        ids: result.ids || [],
        records: result.records || [],
        version: result.version || 0,
      };
    } catch {
      return { success: false, ids: [], records: [], version: 0 };
    }
  }

  async unsubscribeCollection(collectionId) {
    try {
      const success = await this.command("mesh/unsubscribe-collection", { collectionId });
      if (success) this.collectionSubscriptions.delete(collectionId);
      return success;
    } catch {
      return false;
    }
  }

  async _resubscribeRecordsAndCollections() {
    const records = [...this.recordSubscriptions].map(([recordId, { callback, mode }]) =>
      this.subscribeRecord(recordId, callback, { mode }),
    );
    const collections = [...this.collectionSubscriptions].map(([collectionId, { onDiff }]) =>
      this.subscribeCollection(collectionId, { onDiff }),
    );
    await Promise.allSettled([...records, ...collections]);
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
