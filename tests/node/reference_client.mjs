#!/usr/bin/env node
// Drives a Mesh client against a server running examples/demo.py and prints
// ONE JSON line of results on stdout. Exit 0: every step ran and every
// built-in check passed; 1: a step failed or a check failed; 2: usage error or
// global watchdog timeout.
//
// Usage:
//   node reference_client.mjs ws://127.0.0.1:PORT                 # scenario
//   node reference_client.mjs ws://127.0.0.1:PORT idle SECONDS [PING_TIMEOUT_MS] [MAX_MISSED_PINGS]
//   node reference_client.mjs ws://127.0.0.1:PORT channels        # channels scenario
//   node reference_client.mjs ws://127.0.0.1:PORT presence [ROOM] # presence scenario
//
// Which client runs:
//   * MESH_CLIENT_MODULE=<package name or path to the client's entry file>
//     forces that module (it must export MeshClient);
//   * otherwise "@mesh-kit/client" then "@mesh-kit/core/client" are tried;
//   * otherwise the stand-in ./mesh_client_shim.mjs is used, unless
//     MESH_REQUIRE_REFERENCE=1, which makes a missing reference client an error.
// The output's "client_impl" names the module that ran.
//
// Every WebSocket frame each client sends and receives is recorded (the
// WebSocket global is a recording subclass of `ws`'s WebSocket: Node 20 has no
// global WebSocket, and the reference client uses the global one) and is
// printed under "wire" so tests can assert on the exact frames.

import { pathToFileURL } from "node:url";
import { isAbsolute, resolve as resolvePath } from "node:path";
import { existsSync } from "node:fs";
import { WebSocket as WsWebSocket } from "ws";

// Anything a client library logs must not reach stdout (one JSON line only).
const realStdoutWrite = process.stdout.write.bind(process.stdout);
for (const k of ["log", "info", "warn", "error", "debug", "trace"]) {
  console[k] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
}

// ---- wire recording --------------------------------------------------------

const WIRE_LIMIT = Number(process.env.MESH_WIRE_LIMIT || 400);
const wire = [];
let wireDropped = 0;
let socketSeq = 0;
const t0 = Date.now();

function record(sock, dir, data) {
  if (wire.length >= WIRE_LIMIT) {
    wireDropped++;
    return;
  }
  let text = typeof data === "string" ? data : Buffer.from(data).toString("utf8");
  let frame;
  try {
    frame = JSON.parse(text);
  } catch {
    frame = { unparsed: text };
  }
  wire.push({ sock, dir, t: Date.now() - t0, frame });
}

class RecordingWebSocket extends WsWebSocket {
  constructor(url, protocols, options) {
    super(url, protocols, options);
    this._meshSock = ++socketSeq;
    this.addEventListener("message", (ev) => record(this._meshSock, "in", ev.data));
  }
  send(data, ...rest) {
    record(this._meshSock, "out", data);
    return super.send(data, ...rest);
  }
}
globalThis.WebSocket = RecordingWebSocket;

// ---- client loading --------------------------------------------------------

async function loadClient() {
  const forced = process.env.MESH_CLIENT_MODULE;
  const candidates = forced ? [forced] : ["@mesh-kit/client", "@mesh-kit/core/client"];
  const errors = [];
  for (const spec of candidates) {
    let target = spec;
    if (spec.startsWith(".") || isAbsolute(spec)) {
      const p = resolvePath(spec);
      if (!existsSync(p)) {
        errors.push(`${spec}: no such file`);
        continue;
      }
      target = pathToFileURL(p).href;
    }
    try {
      const mod = await import(target);
      const MeshClient = mod.MeshClient ?? mod.default?.MeshClient;
      if (typeof MeshClient === "function") return { MeshClient, impl: spec };
      errors.push(`${spec}: no MeshClient export`);
    } catch (e) {
      errors.push(`${spec}: ${e.code || e.message}`);
    }
  }
  if (forced || process.env.MESH_REQUIRE_REFERENCE === "1") {
    throw new Error(`reference Mesh client not importable: ${errors.join("; ")}`);
  }
  const mod = await import("./mesh_client_shim.mjs");
  return { MeshClient: mod.MeshClient, impl: "shim", loadErrors: errors };
}

// ---- helpers ---------------------------------------------------------------

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timeout after ${ms}ms: ${what}`)), ms);
    }),
  ]);
}

function errInfo(e) {
  return { message: String(e?.message ?? e), code: e?.code ?? null, name: e?.name ?? null };
}

let emitted = false;
function emit(obj, code) {
  if (emitted) return;
  emitted = true;
  realStdoutWrite(JSON.stringify(obj) + "\n", () => process.exit(code));
}

const STEP_TIMEOUT = Number(process.env.MESH_STEP_TIMEOUT_MS || 10_000);

// A step runs under the step timeout; its value (or its error) lands in
// `steps[name]`, and a failure is also listed in `failures`.
function stepper(steps, failures) {
  return async function step(name, fn) {
    try {
      const value = await withTimeout(Promise.resolve().then(fn), STEP_TIMEOUT, name);
      steps[name] = value === undefined ? null : value;
      return value;
    } catch (e) {
      steps[name] = { __error__: errInfo(e) };
      failures.push({ step: name, ...errInfo(e) });
      return undefined;
    }
  };
}

// ---- scenario --------------------------------------------------------------

async function scenario(url, MeshClient, out) {
  const steps = (out.steps = {});
  const failures = (out.failures = []);
  const checks = (out.checks = {});
  const step = stepper(steps, failures);

  const opts = { shouldReconnect: false };
  const a = new MeshClient(url, opts);
  const events = (out.events = { a: [], b: [] });
  for (const ev of ["connect", "disconnect", "reconnect", "reconnectfailed", "close"]) {
    a.on(ev, () => events.a.push(ev));
  }
  a.on("error", () => events.a.push("error"));

  await step("connect", () => a.connect());
  out.connection_id = a.connectionId ?? null;
  steps.connection_id = out.connection_id;
  if (!out.connection_id) throw new Error("no connection id after connect");

  const echoPayload = { hello: "world", n: [1, 2, 3] };
  await step("echo", () => a.command("echo", echoPayload));
  await step("noop", () => a.command("mesh/noop"));
  await step("my_metadata_initial", () => a.getConnectionMetadata());
  await step("set_metadata", () =>
    a.setConnectionMetadata({ role: "moderator", name: "alice" }, { strategy: "merge" }),
  );
  await step("my_metadata_after_set", () => a.getConnectionMetadata());
  await step("create_room", () =>
    a.command("create-room", { roomName: "lobby", type: "public", maxUsers: 10 }),
  );
  await step("join_room", () => a.joinRoom("lobby"));
  await step("room_metadata_after_join", () => a.getRoomMetadata("lobby"));
  await step("update_room_topic", () => a.command("update-room-topic", { roomName: "lobby", topic: "Hi" }));
  await step("room_metadata_after_topic", () => a.getRoomMetadata("lobby"));
  await step("list_public_rooms", () => a.command("list-public-rooms", {}));

  // server push: register the handler before asking for the broadcast
  let pushResolve;
  const pushPromise = new Promise((r) => (pushResolve = r));
  const pushes = [];
  a.on("chat", (payload) => {
    pushes.push(payload);
    pushResolve(payload);
  });
  await step("broadcast_room", () =>
    a.command("broadcast-room", { roomName: "lobby", event: "chat", data: { text: "yo" } }),
  );
  await step("chat_push", () => withTimeout(pushPromise, 5_000, "push 'chat'"));
  steps.chat_push_count = pushes.length;

  await step("unknown_command", () => a.command("no-such-command"));
  await step("leave_room", () => a.leaveRoom("lobby"));
  await step("room_metadata_after_leave", () => a.getRoomMetadata("lobby"));

  const b = new MeshClient(url, opts);
  for (const ev of ["connect", "disconnect", "reconnect", "reconnectfailed", "close"]) {
    b.on(ev, () => events.b.push(ev));
  }
  b.on("error", () => events.b.push("error"));
  await step("second_connect", () => b.connect());
  steps.second_connection_id = b.connectionId ?? null;
  await step("second_reads_first_metadata", () => b.getConnectionMetadata(out.connection_id));
  await step("second_reads_unknown_metadata", () => b.getConnectionMetadata("conn-does-not-exist"));
  // b has no role: the demo app must refuse (error payload, the client resolves)
  await step("second_update_topic_denied", () =>
    b.command("update-room-topic", { roomName: "lobby", topic: "nope" }),
  );

  await step("close_a", () => a.close());
  await step("close_b", () => b.close());

  // ---- built-in checks (the Python test asserts on `steps` too) ----------
  const s = steps;
  const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  const same = (x, y) => JSON.stringify(x) === JSON.stringify(y);
  checks.connection_id_is_string = typeof out.connection_id === "string" && out.connection_id.length > 0;
  checks.echo_roundtrip = same(s.echo, echoPayload);
  checks.noop_true = s.noop === true;
  checks.connected_at_set = isObj(s.my_metadata_initial) && typeof s.my_metadata_initial.connectedAt === "number";
  checks.set_metadata_success = s.set_metadata === true;
  checks.merge_kept_connected_at =
    isObj(s.my_metadata_after_set) &&
    s.my_metadata_after_set.role === "moderator" &&
    s.my_metadata_after_set.name === "alice" &&
    s.my_metadata_after_set.connectedAt === s.my_metadata_initial?.connectedAt;
  checks.join_success = isObj(s.join_room) && s.join_room.success === true;
  checks.join_present_has_self =
    Array.isArray(s.join_room?.present) && s.join_room.present.some((p) => p && p.id === out.connection_id);
  checks.member_count_1 = isObj(s.room_metadata_after_join) && s.room_metadata_after_join.memberCount === 1;
  checks.topic_update_success = isObj(s.update_room_topic) && s.update_room_topic.success === true;
  checks.list_has_lobby =
    isObj(s.list_public_rooms) &&
    Array.isArray(s.list_public_rooms.rooms) &&
    s.list_public_rooms.rooms.some((r) => r && r.id === "lobby");
  checks.push_received = same(s.chat_push, { text: "yo" });
  checks.unknown_command_error =
    isObj(s.unknown_command) &&
    s.unknown_command.code === "ENOTFOUND" &&
    s.unknown_command.name === "CommandError" &&
    typeof s.unknown_command.error === "string";
  checks.leave_success = isObj(s.leave_room) && s.leave_room.success === true;
  checks.member_count_0 = isObj(s.room_metadata_after_leave) && s.room_metadata_after_leave.memberCount === 0;
  checks.second_sees_first_metadata =
    isObj(s.second_reads_first_metadata) &&
    s.second_reads_first_metadata.role === "moderator" &&
    s.second_reads_first_metadata.name === "alice";
  checks.second_unknown_metadata_null = s.second_reads_unknown_metadata === null;
  checks.non_moderator_denied =
    isObj(s.second_update_topic_denied) &&
    typeof s.second_update_topic_denied.error === "string" &&
    s.second_update_topic_denied.error.includes("Insufficient permissions");
  checks.no_reconnects = !events.a.includes("reconnect") && !events.b.includes("reconnect");
  // wire-level: every frame the clients sent has an integer id and a payload
  const sent = wire.filter((w) => w.dir === "out").map((w) => w.frame);
  checks.sent_frames_have_int_id = sent.every((f) => Number.isInteger(f.id));
  checks.sent_frames_have_payload = sent.every((f) => "payload" in f);
  checks.first_frame_is_assign_id = [1, 2].every((sock) => {
    const first = wire.find((w) => w.sock === sock && w.dir === "in");
    return !first || first.frame.command === "mesh/assign-id";
  });
}

// ---- channels ----------------------------------------------------------------

async function channels(url, MeshClient, out) {
  const steps = (out.steps = {});
  const failures = (out.failures = []);
  const checks = (out.checks = {});
  const step = stepper(steps, failures);
  const same = (x, y) => JSON.stringify(x) === JSON.stringify(y);
  const opts = { shouldReconnect: false };
  const a = new MeshClient(url, opts);
  const b = new MeshClient(url, opts);
  await step("connect_a", () => a.connect());
  await step("connect_b", () => b.connect());
  const post = (channel, message, history) => a.command("post", { channel, message, history });
  for (let i = 1; i <= 5; i++) await step(`post_old${i}`, () => post("chat:general", `old${i}`, 3));

  const got = (out.got = []);
  let waiter = null;
  const arrived = (n) =>
    new Promise((resolve) => {
      if (got.length >= n) return resolve(got.length);
      waiter = { n, resolve };
    });
  const onMessage = (message) => {
    got.push(message);
    if (waiter && got.length >= waiter.n) {
      waiter.resolve(got.length);
      waiter = null;
    }
  };
  await step("subscribe_with_history", () =>
    b.subscribeChannel("chat:general", onMessage, { historyLimit: 2 }),
  );
  steps.got_after_subscribe = [...got];
  const plain = [];
  await step("subscribe_without_history", () => a.subscribeChannel("chat:general", (m) => plain.push(m)));
  for (let i = 0; i < 10; i++) await step(`post_live${i}`, () => post("chat:general", `live${i}`));
  await step("live_arrived", () => withTimeout(arrived(12), 5_000, "12 messages"));
  steps.got_live = [...got];
  steps.plain_live = [...plain];
  await step("history_3", () => b.getChannelHistory("chat:general", { limit: 3 }));
  await step("subscribe_admin_denied", () => b.subscribeChannel("chat:admin", () => {}));
  await step("subscribe_not_exposed", () => b.subscribeChannel("news", () => {}));
  await step("subscribe_internal", () => b.subscribeChannel("mesh:channel:chat:general", () => {}));
  await step("history_not_exposed", () => b.getChannelHistory("news"));
  await step("become_admin", () => b.setConnectionMetadata({ role: "admin" }, { strategy: "merge" }));
  const admin = [];
  await step("subscribe_admin", () => b.subscribeChannel("chat:admin", (m) => admin.push(m)));
  await step("post_admin", () => post("chat:admin", "for admins"));
  await step("admin_arrived", async () => {
    for (let i = 0; i < 100 && admin.length === 0; i++) await sleep(20);
    return [...admin];
  });
  await step("unsubscribe", () => b.unsubscribeChannel("chat:general"));
  await step("post_after_unsubscribe", () => post("chat:general", "after"));
  await step("after_unsubscribe", async () => {
    await sleep(300);
    return [...got];
  });
  await step("unsubscribe_again", () => b.unsubscribeChannel("chat:general"));
  await step("negative_history_limit", () =>
    b.command("mesh/subscribe-channel", { channel: "chat:x", historyLimit: -1 }),
  );
  await step("huge_history_limit", () =>
    b.command("mesh/subscribe-channel", { channel: "chat:x", historyLimit: 1e9 }),
  );
  await step("missing_channel", () => b.command("mesh/subscribe-channel", {}));
  await step("non_string_message", () => a.command("post", { channel: "chat:x", message: { x: 1 } }));
  for (let i = 0; i < 6; i++) await step(`post_short${i}`, () => post("chat:short", `s${i}`, 4));
  await step("history_trimmed", () => b.getChannelHistory("chat:short", { limit: 10 }));
  await step("close_a", () => a.close());
  await step("close_b", () => b.close());

  const s = steps;
  const isErr = (v, code) => v && typeof v === "object" && v.code === code && typeof v.error === "string";
  checks.history_is_latest_n = same(s.subscribe_with_history, { success: true, history: ["old4", "old5"] });
  checks.history_handed_to_callback = same(s.got_after_subscribe, ["old4", "old5"]);
  checks.no_history_when_not_asked = same(s.subscribe_without_history, { success: true, history: [] });
  const live = Array.from({ length: 10 }, (_, i) => `live${i}`);
  checks.live_in_order = same(s.got_live, ["old4", "old5", ...live]);
  checks.live_in_order_plain = same(s.plain_live, live);
  checks.get_history = same(s.history_3, { success: true, history: ["live7", "live8", "live9"] });
  const refused = { success: false, history: [] };
  checks.guard_refuses = same(s.subscribe_admin_denied, refused);
  checks.not_exposed_refused = same(s.subscribe_not_exposed, refused);
  checks.internal_refused = same(s.subscribe_internal, refused);
  checks.history_not_exposed_refused = same(s.history_not_exposed, refused);
  checks.guard_admits_admin = same(s.subscribe_admin, { success: true, history: [] });
  checks.admin_message = same(s.admin_arrived, ["for admins"]);
  checks.unsubscribe_true = s.unsubscribe === true;
  checks.unsubscribe_stops_delivery = same(s.after_unsubscribe, ["old4", "old5", ...live]);
  checks.unsubscribe_again_false = s.unsubscribe_again === false;
  checks.negative_limit_error = isErr(s.negative_history_limit, "EINVAL");
  checks.huge_limit_error = isErr(s.huge_history_limit, "EINVAL");
  checks.missing_channel_error = isErr(s.missing_channel, "EINVAL");
  checks.non_string_message_error = isErr(s.non_string_message, "EINVAL");
  checks.history_trimmed_to_n = same(s.history_trimmed, { success: true, history: ["s2", "s3", "s4", "s5"] });
  const pushes = wire.filter((w) => w.dir === "in" && w.frame.command === "mesh/subscription-message");
  checks.push_shape = pushes.length > 0 && pushes.every((w) => typeof w.frame.payload.channel === "string" &&
    typeof w.frame.payload.message === "string" && !("id" in w.frame));
}

// ---- records ---------------------------------------------------------------
//
// Records and collections as a reference-client application uses them: a
// patch-mode subscriber keeps its copy with fast-json-patch's applyPatch (the
// library the reference server makes its patches with), a full-mode one takes
// each value; every kind of JSON value and all three strategies; guards,
// writable and read-only patterns, deletion, and the "docs" collection.

async function records(url, MeshClient, out) {
  const { applyPatch, deepClone } = (await import("fast-json-patch")).default;
  const steps = (out.steps = {});
  const failures = (out.failures = []);
  const checks = (out.checks = {});
  const same = (x, y) => JSON.stringify(x) === JSON.stringify(y);
  const step = stepper(steps, failures);
  const opts = { shouldReconnect: false };
  const a = new MeshClient(url, opts);
  const b = new MeshClient(url, opts);
  await step("connect", () => Promise.all([a.connect(), b.connect()]));

  // a: patch mode, applying patches; b: full mode
  const local = { value: undefined, version: 0, updates: [] };
  const fulls = [];
  let wake = () => {};
  const settled = (version) =>
    new Promise((resolve) => {
      const check = () => (local.version >= version && fulls.some((f) => f.version >= version) ? resolve() : null);
      wake = check;
      check();
    });
  await step("write_initial", () => a.command("write-record", { recordId: "doc:1", value: { title: "t", n: 0 } }));
  steps.subscribe_patch = await step("subscribe_patch", () =>
    a.subscribeRecord(
      "doc:1",
      (u) => {
        local.updates.push(u);
        if (u.patch) local.value = applyPatch(deepClone(local.value), u.patch, true, false).newDocument;
        else if (u.full !== undefined) local.value = u.full;
        local.version = u.version;
        wake();
      },
      { mode: "patch" },
    ),
  );
  await step("subscribe_full", () =>
    b.subscribeRecord("doc:1", (u) => {
      fulls.push(u);
      wake();
    }),
  );
  const writes = [
    [{ title: "t", n: 1 }, "replace"],
    [{ extra: { deep: [1, 2] } }, "merge"],
    [{ extra: { more: true } }, "deepMerge"],
    [[1, 2, 3], "replace"],
    [[1, 3], "replace"],
    [42, "replace"],
    [true, "replace"],
    ["text", "replace"],
    [null, "replace"],
    [{ back: "to an object" }, "replace"],
  ];
  let version = steps.subscribe_patch?.version ?? 0;
  const mismatches = [];
  for (const [value, strategy] of writes) {
    await a.command("write-record", { recordId: "doc:1", value, strategy });
    version += 1;
    await withTimeout(settled(version), 5_000, `version ${version}`);
    const stored = (await a.command("get-record", { recordId: "doc:1" })).record;
    if (!same(local.value, stored) || !same(fulls.at(-1).full, stored)) mismatches.push({ version, local: local.value, stored });
  }
  steps.final_version = local.version;
  steps.patch_updates = local.updates.filter((u) => u.patch).length;
  steps.mismatches = mismatches;

  // writable and read-only patterns
  steps.write_note = await step("write_note", () => b.writeRecord("note:1", { text: "hi" }));
  steps.write_note_merge = await step("write_note_merge", () =>
    b.writeRecord("note:1", { more: 1 }, { strategy: "merge" }),
  );
  await step("note_value", () => a.command("get-record", { recordId: "note:1" }));
  await step("write_doc_refused", () => b.writeRecord("doc:1", { hacked: true }));
  await step("write_doc_refused_raw", () =>
    b.command("mesh/publish-record-update", { recordId: "doc:1", newValue: { hacked: true } }),
  );
  await step("write_secret_refused", () => b.writeRecord("secret:1", { x: 1 }));
  await step("secret_setup", () => a.command("write-record", { recordId: "secret:1", value: { pin: 1234 } }));
  await step("secret_denied", () => b.subscribeRecord("secret:1", () => {}));
  await step("become_admin", () => b.setConnectionMetadata({ role: "admin" }, { strategy: "merge" }));
  await step("secret_allowed", () => b.subscribeRecord("secret:1", () => {}));
  await step("bad_strategy", () =>
    b.command("mesh/publish-record-update", { recordId: "note:1", newValue: 1, options: { strategy: "upsert" } }),
  );

  // the docs collection: initial members, added, changed, removed
  const diffs = [];
  let diffWake = () => {};
  const untilDiffs = (n) =>
    new Promise((resolve) => {
      diffWake = () => (diffs.length >= n ? resolve() : null);
      diffWake();
    });
  await step("write_doc2", () => a.command("write-record", { recordId: "doc:2", value: { title: "two" } }));
  await step("subscribe_docs", () =>
    b.subscribeCollection("docs", {
      onDiff: (d) => {
        diffs.push(d);
        diffWake();
      },
    }),
  );
  await step("add_doc3", () => a.command("write-record", { recordId: "doc:3", value: { title: "three" } }));
  await step("diff_added", () => withTimeout(untilDiffs(2), 5_000, "added diff"));
  await step("update_doc2", () =>
    a.command("write-record", { recordId: "doc:2", value: { title: "TWO" }, strategy: "merge" }),
  );
  await step("diff_changed", () => withTimeout(untilDiffs(3), 5_000, "changed diff"));
  await step("delete_doc3", () => a.command("delete-record", { recordId: "doc:3" }));
  await step("diff_removed", () => withTimeout(untilDiffs(4), 5_000, "removed diff"));
  steps.diffs = diffs;

  // deletion reaches the record subscribers
  const deletedPromise = new Promise((resolve) => {
    const prev = a.recordSubscriptions.get("doc:1").callback;
    a.recordSubscriptions.get("doc:1").callback = (u) => (u.deleted ? resolve(u) : prev(u));
  });
  await step("delete_doc1", () => a.command("delete-record", { recordId: "doc:1" }));
  await step("deleted_push", () => withTimeout(deletedPromise, 5_000, "record-deleted"));
  await step("unsubscribe_collection", () => b.unsubscribeCollection("docs"));
  await step("unsubscribe_record", () => b.unsubscribeRecord("secret:1"));
  await step("close", () => Promise.all([a.close(), b.close()]));

  const s = steps;
  checks.patch_copy_tracks_every_write = mismatches.length === 0 && s.final_version === version;
  checks.patches_were_used = s.patch_updates === writes.length;
  checks.subscribe_full_value = same(s.subscribe_patch?.record, { title: "t", n: 0 });
  checks.note_writable = s.write_note === true && s.write_note_merge === true;
  checks.note_merged = same(s.note_value?.record, { text: "hi", more: 1 });
  checks.doc_not_writable = s.write_doc_refused === false && s.write_secret_refused === false;
  checks.not_writable_error = same(s.write_doc_refused_raw, {
    error: 'Record "doc:1" is not writable by this connection.',
    code: "ESERVER",
    name: "Error",
  });
  checks.secret_guarded = s.secret_denied?.success === false && s.secret_allowed?.success === true;
  checks.secret_value = same(s.secret_allowed?.record, { pin: 1234 });
  checks.bad_strategy_error = s.bad_strategy?.code === "EINVAL";
  checks.collection_initial = same(
    diffs[0]?.added.map((r) => r.id),
    ["doc:1", "doc:2"],
  );
  checks.collection_added = same(diffs[1]?.added.map((r) => r.id), ["doc:3"]) && diffs[1]?.version === 2;
  checks.collection_changed = diffs[2]?.changed?.[0]?.id === "doc:2" && diffs[2]?.changed?.[0]?.record?.title === "TWO";
  checks.collection_removed = same(diffs[3]?.removed.map((r) => r.id), ["doc:3"]) && diffs[3]?.version === 3;
  checks.deleted = s.deleted_push?.deleted === true;
  checks.unsubscribed = s.unsubscribe_collection === true && s.unsubscribe_record === true;
}

// ---- presence --------------------------------------------------------------

async function presence(url, MeshClient, out, room) {
  const steps = (out.steps = {});
  const failures = (out.failures = []);
  const checks = (out.checks = {});
  const step = stepper(steps, failures);
  const until = async (pred, what, ms = 5_000) => {
    const deadline = Date.now() + ms;
    while (!pred()) {
      if (Date.now() > deadline) throw new Error(`timeout: ${what}`);
      await sleep(20);
    }
  };
  const opts = { shouldReconnect: false };
  const a = new MeshClient(url, opts); // socket 1: the member
  const b = new MeshClient(url, opts); // socket 2: joins with a presence callback
  const c = new MeshClient(url, opts); // socket 3: subscribes without joining
  await step("connect", async () => {
    await a.connect();
    await b.connect();
    await c.connect();
  });
  out.ids = { a: a.connectionId, b: b.connectionId, c: c.connectionId };
  const bUpdates = (out.b_updates = []);
  const cUpdates = (out.c_updates = []);
  await step("b_join", () => b.joinRoom(room, (u) => bUpdates.push(u)));
  await step("a_join", () => a.joinRoom(room));
  await step("b_sees_join", () => until(() => bUpdates.some((u) => u.type === "join"), "join"));
  await step("a_publish", () => a.publishPresenceState(room, { state: { typing: true } }));
  await step("b_sees_state", () => until(() => bUpdates.some((u) => u.type === "state"), "state"));
  await step("a_publish_silent", () => a.publishPresenceState(room, { state: { quiet: 1 }, silent: true }));
  await step("a_get_state", () => a.command("mesh/get-presence-state", { roomName: room }));
  await step("c_subscribe", () => c.subscribePresence(room, (u) => cUpdates.push(u)));
  await step("a_publish_expiring", () =>
    a.publishPresenceState(room, { state: { typing: false }, expireAfter: 500 }),
  );
  await step("b_sees_expiry", () =>
    until(() => bUpdates.some((u) => u.type === "state" && u.state === null), "expiry", 3_000),
  );
  await step("a_clear_after_expiry", () => a.clearPresenceState(room));
  await step("publish_untracked", () => a.publishPresenceState("not-tracked", { state: { x: 1 } }));
  await step("subscribe_untracked", () => a.subscribePresence("not-tracked", () => {}));
  await step("publish_without_state", () => a.command("mesh/publish-presence-state", { roomName: room }));
  await step("a_leave", () => a.leaveRoom(room));
  await step("b_sees_leave", () => until(() => bUpdates.some((u) => u.type === "leave"), "leave"));
  await step("c_unsubscribe", () => c.unsubscribePresence(room));
  await step("c_unsubscribe_again", () => c.unsubscribePresence(room));
  await sleep(400); // duplicates, if any, arrive by now
  await step("close", async () => {
    await a.close();
    await b.close();
    await c.close();
  });
  const onSocket = (sock) =>
    wire.filter((w) => w.sock === sock && w.dir === "in" && w.frame.command === "mesh/presence-update");
  out.presence_frames = { b: onSocket(2).map((w) => w.frame.payload), c: onSocket(3).map((w) => w.frame.payload) };
  checks.no_failures = failures.length === 0;
}

// ---- idle ------------------------------------------------------------------

async function idle(url, MeshClient, out, seconds, pingTimeout, maxMissedPings) {
  const opts = {};
  if (pingTimeout) opts.pingTimeout = pingTimeout;
  if (maxMissedPings !== undefined) opts.maxMissedPings = maxMissedPings;
  out.client_options = opts;
  const c = new MeshClient(url, opts);
  const counts = (out.counts = {
    ping: 0,
    latency: 0,
    latency_request: 0,
    connect: 0,
    disconnect: 0,
    reconnect: 0,
    close: 0,
    error: 0,
  });
  const latencies = (out.latencies = []);
  c.on("ping", () => counts.ping++);
  c.on("latency", (v) => {
    counts.latency++;
    latencies.push(v);
  });
  c.on("message", (m) => {
    if (m && m.command === "latency:request") counts.latency_request++;
  });
  for (const ev of ["connect", "disconnect", "reconnect", "close", "error"]) c.on(ev, () => counts[ev]++);

  await withTimeout(c.connect(), STEP_TIMEOUT, "connect");
  out.connection_id = c.connectionId ?? null;
  await sleep(seconds * 1000);
  out.connection_id_after = c.connectionId ?? null;
  out.status_after = c.status ?? null;
  const failures = (out.failures = []);
  try {
    out.noop_after = await withTimeout(c.command("mesh/noop"), STEP_TIMEOUT, "noop after idle");
  } catch (e) {
    failures.push({ step: "noop_after", ...errInfo(e) });
  }
  // count the server's socket-level activity as seen on the wire
  const inFrames = wire.filter((w) => w.dir === "in").map((w) => w.frame.command);
  const outFrames = wire.filter((w) => w.dir === "out").map((w) => w.frame);
  out.wire_counts = {
    sockets_opened: socketSeq,
    ping_in: inFrames.filter((c) => c === "ping").length,
    pong_out: outFrames.filter((f) => f.command === "pong").length,
    latency_request_in: inFrames.filter((c) => c === "latency:request").length,
    latency_response_out: outFrames.filter((f) => f.command === "latency:response").length,
    latency_in: inFrames.filter((c) => c === "latency").length,
  };
  try {
    await withTimeout(c.close(), STEP_TIMEOUT, "close");
  } catch (e) {
    failures.push({ step: "close", ...errInfo(e) });
  }
  out.checks = {
    same_connection: out.connection_id !== null && out.connection_id === out.connection_id_after,
    one_socket: socketSeq === 1,
    no_disconnect_before_close: counts.reconnect === 0 && counts.connect === 1,
    noop_after_true: out.noop_after === true,
  };
}

// ---- main ------------------------------------------------------------------

async function main() {
  const url = process.argv[2];
  const mode = process.argv[3] || "scenario";
  if (!url || !/^wss?:\/\//.test(url) || !["scenario", "idle", "channels", "records", "presence"].includes(mode)) {
    emit({ ok: false, error: "usage: reference_client.mjs ws://host:port [idle SECONDS [PING_TIMEOUT_MS [MAX_MISSED_PINGS]]]" }, 2);
    return;
  }
  const out = { ok: false, mode, url, node: process.version };
  let seconds = 0;
  if (mode === "idle") {
    seconds = Number(process.argv[4] ?? 10);
    if (!(seconds >= 0)) {
      emit({ ok: false, error: "idle SECONDS must be a number >= 0" }, 2);
      return;
    }
  }
  const watchdogMs =
    Number(process.env.MESH_WATCHDOG_MS) || (mode === "idle" ? seconds * 1000 + 3 * STEP_TIMEOUT + 5_000 : 90_000);
  const watchdog = setTimeout(() => {
    out.error = `watchdog: gave up after ${watchdogMs}ms`;
    out.wire = wire;
    emit(out, 2);
  }, watchdogMs);

  try {
    const { MeshClient, impl, loadErrors } = await loadClient();
    out.client_impl = impl;
    if (loadErrors) out.client_load_errors = loadErrors;
    if (mode === "idle") {
      const pingTimeout = process.argv[5] ? Number(process.argv[5]) : undefined;
      const maxMissed = process.argv[6] !== undefined ? Number(process.argv[6]) : undefined;
      await idle(url, MeshClient, out, seconds, pingTimeout, maxMissed);
    } else if (mode === "channels") {
      await channels(url, MeshClient, out);
    } else if (mode === "records") {
      await records(url, MeshClient, out);
    } else if (mode === "presence") {
      await presence(url, MeshClient, out, process.argv[4] || "p:lobby");
    } else {
      await scenario(url, MeshClient, out);
    }
    out.failed_checks = Object.entries(out.checks || {})
      .filter(([, v]) => !v)
      .map(([k]) => k);
    out.ok = (out.failures || []).length === 0 && out.failed_checks.length === 0;
  } catch (e) {
    out.error = errInfo(e);
    out.ok = false;
  }
  out.wire = wire;
  if (wireDropped) out.wire_dropped = wireDropped;
  clearTimeout(watchdog);
  emit(out, out.ok ? 0 : 1);
}

main();
