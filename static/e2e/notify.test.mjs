// notify.test.mjs: notify.js's event emitter and state events, run by node's
// test runner (`make test-js`). notify.js touches browser APIs only once it
// connects, so it imports in node; its long-poll transport is plain fetch,
// which node has, so the ladder runs here against a small loopback server.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { NotifyClient, PROBE_DELAYS, REASONS, probeDelay } from '../notify.js';

const closedPort = 'http://127.0.0.1:1';

/** Waits until cond holds (polling), or fails after ms. */
async function until(cond, what, ms = 10000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

test('off() removes a listener added with once()', () => {
  const n = new NotifyClient(closedPort, { token: 't', autoConnect: false });
  let removed = 0;
  const fn = () => { removed++; };
  n.once('state', fn);
  n.off('state', fn);
  let kept = 0;
  n.once('state', () => { kept++; });
  n.close(); // idle -> closed
  assert.equal(removed, 0, 'a once() listener removed with off() was called');
  assert.equal(kept, 1, 'a once() listener left in place was not called once');
});

test('a once() listener is called once', () => {
  const n = new NotifyClient(closedPort, { token: 't', autoConnect: false, negotiate: false, transports: ['longpoll'] });
  const states = [];
  n.once('state', (ev) => { states.push(ev.state); });
  n.open(); // idle -> connecting
  n.close(); // connecting -> closed
  assert.deepEqual(states, ['connecting']);
});

/**
 * Starts a stand-in for notifyd on a loopback port: handle(req, reply)
 * answers each request; reply(status, body) sends JSON.
 * @param {(req: import('node:http').IncomingMessage, reply: (status: number, body: any) => void) => void} handle
 */
async function standIn(handle) {
  const server = createServer((req, res) => {
    handle(req, (status, body) => {
      res.writeHead(status, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify(body));
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${/** @type {any} */ (server.address()).port}`;
  return { url, stop: () => { server.closeAllConnections(); server.close(); } };
}

/**
 * A stand-in for notifyd's long-poll side on a loopback port: the first poll
 * says hello and synced, the second says bye (shutdown, retry in 5 ms), and
 * every later poll and /readyz answer 503, so the client keeps reconnecting.
 */
async function byeThenDown() {
  let polls = 0;
  const srv = await standIn((req, reply) => {
    if (req.url.startsWith('/v1/poll')) {
      polls++;
      if (polls === 1) {
        return reply(200, { session: 's1', cursor: 0, messages: [
          { type: 'hello', session: 's1', user: 'u', transport: 'longpoll', ping_interval_ms: 20000, ping_timeout_ms: 60000 },
          { type: 'synced', cursor: 0, unread: 0 },
        ] });
      }
      if (polls === 2) return reply(200, { session: 's1', cursor: 0, messages: [{ type: 'bye', reason: 'shutdown', retry_ms: 5 }] });
    }
    if (req.method === 'DELETE') return reply(204, {});
    return reply(503, { error: { code: 'unavailable', message: 'down' } });
  });
  return srv;
}

test('state events fire only when the state or the transport changes', async (t) => {
  const srv = await byeThenDown();
  t.after(srv.stop);
  const n = new NotifyClient(srv.url, {
    token: 't', autoConnect: false, negotiate: false, transports: ['longpoll'], backoffBase: 1, backoffMax: 1,
  });
  const events = [];
  n.on('state', (ev) => { events.push(ev); });
  n.open();
  // Connected, told bye, then several passes down the ladder, each failing.
  await until(() => n.history.filter((h) => h.event === 'state' && h.reason === 'unreachable').length >= 3, 'three failed passes');
  n.close();
  n.close();
  for (let i = 1; i < events.length; i++) {
    const prev = events[i - 1];
    const ev = events[i];
    assert.ok(ev.state !== prev.state || ev.transport !== prev.transport,
      `state event ${i} repeats ${ev.state}/${ev.transport} (reason ${ev.reason})`);
    assert.deepEqual(ev.previous, { state: prev.state, transport: prev.transport });
  }
  assert.deepEqual(events.map((ev) => `${ev.state}/${ev.transport}/${ev.reason}`),
    ['connecting/null/connect', 'connected/longpoll/connected', 'reconnecting/null/shutdown', 'closed/null/client']);
  assert.equal(events[2].message, 'bye shutdown');
  for (const h of n.history) {
    if (h.event === 'state') assert.ok(Object.hasOwn(REASONS, h.reason), `state reason ${h.reason} is not one of REASONS`);
  }
  // The history keeps every step, repeats included.
  assert.ok(n.history.filter((h) => h.event === 'state' && h.state === 'reconnecting').length >= 7);
});

test('the probe schedule: soon after synced, then backing off, the last step repeating', () => {
  assert.deepEqual(PROBE_DELAYS, [1500, 30000, 120000, 600000]);
  // The jitter's bounds: ±20%.
  assert.equal(probeDelay(PROBE_DELAYS, 0, () => 0), 1200);
  assert.equal(probeDelay(PROBE_DELAYS, 0, () => 0.999999), 1800);
  assert.ok(probeDelay(PROBE_DELAYS, 0, () => 0.999999) < 2000, 'the first probe comes within 2 s of synced');
  assert.deepEqual([0, 1, 2, 3, 4, 9].map((step) => probeDelay(PROBE_DELAYS, step, () => 0.5)), [1500, 30000, 120000, 600000, 600000, 600000]);
  assert.equal(probeDelay([], 0), -1, 'an empty schedule never probes');
});

test('probeInterval replaces the schedule; 0 turns probing off', () => {
  assert.deepEqual(new NotifyClient(closedPort, { token: 't', autoConnect: false }).opts.probeDelays, PROBE_DELAYS);
  assert.deepEqual(new NotifyClient(closedPort, { token: 't', autoConnect: false, probeInterval: 2500 }).opts.probeDelays, [2500]);
  assert.deepEqual(new NotifyClient(closedPort, { token: 't', autoConnect: false, probeInterval: 0 }).opts.probeDelays, []);
});

/**
 * Holds a poll for 200 ms and answers it with no messages.
 * @param {import('node:http').IncomingMessage} req
 * @param {(status: number, body: any) => void} reply
 * @param {string} session
 * @param {number} cursor
 */
function holdEmpty(req, reply, session, cursor) {
  const t = setTimeout(() => reply(200, { session, cursor, messages: [] }), 200);
  req.on('close', () => clearTimeout(t));
}

/**
 * Answers what a stand-in does not model: a kick (DELETE) 204, /readyz 200, anything else 404.
 * @param {import('node:http').IncomingMessage} req
 * @param {(status: number, body: any) => void} reply
 */
function answerRest(req, reply) {
  if (req.method === 'DELETE') return reply(204, {});
  if (req.url === '/readyz') return reply(200, { ok: true });
  return reply(404, { error: { code: 'not_found', message: 'no' } });
}

/**
 * A long-poll stand-in that says hello and synced and then holds each poll
 * for a while (empty answers), counting polls.
 */
async function pollOnly() {
  const stats = { polls: 0 };
  const srv = await standIn((req, reply) => {
    if (req.url.startsWith('/v1/poll')) {
      stats.polls++;
      if (stats.polls === 1) {
        return reply(200, { session: 's1', cursor: 0, messages: [
          { type: 'hello', session: 's1', user: 'u', transport: 'longpoll', ping_interval_ms: 20000, ping_timeout_ms: 60000 },
          { type: 'synced', cursor: 0, unread: 0 },
        ] });
      }
      return holdEmpty(req, reply, 's1', 0);
    }
    return answerRest(req, reply);
  });
  return { ...srv, stats };
}

test('a client below the top probes after synced, then at each next step while probes fail', async (t) => {
  const srv = await pollOnly();
  t.after(srv.stop);
  // node has no EventSource: every SSE probe fails at once ('error'), which is what a schedule test needs.
  const n = new NotifyClient(srv.url, {
    token: 't', negotiate: false, transports: ['sse', 'longpoll'], probeDelays: [100, 300, 600], share: false,
  });
  t.after(() => n.close());
  const probes = () => n.history.filter((h) => h.event === 'attempt' && h.role === 'probe');
  await until(() => probes().length >= 5, 'five probes');
  n.close();
  assert.equal(n.history.filter((h) => h.event === 'attempt' && h.role === 'attempt' && h.ok).length, 1);
  const synced = n.history.find((h) => h.event === 'state' && h.state === 'connected');
  assert.ok(synced, 'connected over long-poll');
  assert.equal(synced.transport, 'longpoll');
  const scheduled = n.history.filter((h) => h.event === 'probe_scheduled');
  assert.deepEqual(scheduled.slice(0, 5).map((h) => h.step), [0, 1, 2, 3, 4]);
  const bases = [100, 300, 600, 600, 600];
  scheduled.slice(0, 5).forEach((h, i) => {
    assert.ok(h.delay >= bases[i] * 0.8 && h.delay <= bases[i] * 1.2, `probe ${i} after ${h.delay} ms, want ${bases[i]} ±20%`);
  });
  // The gaps between probes grow by the schedule (timers fire no earlier than set).
  const at = probes().map((h) => h.t);
  for (let i = 1; i < 4; i++) {
    assert.ok(at[i] - at[i - 1] >= bases[i] * 0.8 - 5, `probe ${i} came ${at[i] - at[i - 1]} ms after probe ${i - 1}`);
  }
  assert.ok(probes().every((h) => h.transport === 'sse' && !h.ok));
  assert.equal(n.transport, null); // closed
  assert.equal(srv.stats.polls >= 2, true, 'the long-poll kept running under the probes');
});

test('a client on the top of its ladder never probes', async (t) => {
  const srv = await pollOnly();
  t.after(srv.stop);
  const n = new NotifyClient(srv.url, { token: 't', negotiate: false, transports: ['longpoll'], probeDelays: [10], share: false });
  t.after(() => n.close());
  await until(() => n.state === 'connected', 'connected');
  await new Promise((r) => setTimeout(r, 200));
  n.close();
  assert.equal(n.history.filter((h) => h.event === 'probe_scheduled' || h.role === 'probe').length, 0);
});

/**
 * A long-poll stand-in for a cluster without sticky sessions: the first poll
 * says hello and synced as session s1, the second fails (503), and the
 * reconnect's poll naming s1 lands on a node that adopts it: the answer
 * carries the new id s2 and the notification above the cursor, with no
 * hello and no synced. Later polls hold a while and answer empty.
 */
async function movesOnReconnect() {
  const stats = { polls: 0, resumed: '' };
  const srv = await standIn((req, reply) => {
    if (req.url.startsWith('/v1/poll')) {
      stats.polls++;
      const q = new URL(req.url, 'http://x').searchParams;
      if (stats.polls === 1) {
        return reply(200, { session: 's1', cursor: 0, messages: [
          { type: 'hello', session: 's1', user: 'u', transport: 'longpoll', ping_interval_ms: 20000, ping_timeout_ms: 60000 },
          { type: 'synced', cursor: 0, unread: 0 },
        ] });
      }
      if (stats.polls === 2) return reply(503, { error: { code: 'unavailable', message: 'down' } });
      if (q.get('session') === 's1') {
        stats.resumed = 's1';
        return reply(200, { session: 's2', cursor: 1, messages: [
          { type: 'notification', id: 'n1', seq: 1, topic: 't', data: {}, replayed: true },
        ] });
      }
      return holdEmpty(req, reply, 's2', 1);
    }
    return answerRest(req, reply);
  });
  return { ...srv, stats };
}

test('a long-poll session that moved on a reconnect goes on under its new id and still probes', async (t) => {
  const srv = await movesOnReconnect();
  t.after(srv.stop);
  const n = new NotifyClient(srv.url, {
    token: 't', negotiate: false, transports: ['sse', 'longpoll'], probeDelays: [100], backoffBase: 10, share: false,
  });
  t.after(() => n.close());
  const got = [];
  n.on('notification', (m) => got.push(m.id));
  const connects = () => n.history.filter((h) => h.event === 'state' && h.state === 'connected');
  await until(() => connects().length >= 2 && got.length === 1, 'reconnected onto the moved session');
  assert.equal(srv.stats.resumed, 's1', 'the reconnect named the old session');
  assert.equal(n.session, 's2');
  assert.deepEqual(got, ['n1']);
  const reconnectedAt = n.history.indexOf(connects()[1]);
  await until(() => n.history.slice(reconnectedAt).some((h) => h.event === 'attempt' && h.role === 'probe'), 'a probe after the move');
  n.close();
});

test('a tab that hears the leading tab\'s synced before it follows still catches up from its own cursor', async (t) => {
  const inbox = [
    { id: 'n2', seq: 2, topic: 't', data: {}, created_at: '2026-01-01T00:00:00Z' },
    { id: 'n1', seq: 1, topic: 't', data: {}, created_at: '2026-01-01T00:00:00Z' },
  ];
  const srv = await standIn((req, reply) => {
    if (req.url.startsWith('/v1/users/u/notifications')) return reply(200, { notifications: inbox, unread: 2, truncated: false });
    return answerRest(req, reply);
  });
  t.after(srv.stop);
  const n = new NotifyClient(srv.url, { token: 't', autoConnect: false, negotiate: false, transports: ['longpoll'] });
  t.after(() => n.close());
  const got = [];
  n.on('notification', (m) => got.push(m.id));
  // What TabShare does for a tab that joins while the leader relays the end of its replay: the
  // channel is open (so the leader's synced arrives) before the lock says this tab follows.
  n._wantOpen = true;
  n.user = 'u';
  n._share = /** @type {any} */ ({ leader: false, post() {}, leave() {} });
  n._onShared({ t: 'msg', m: { type: 'synced', cursor: 2, unread: 2 } });
  n._follow();
  await until(() => n.history.some((h) => h.event === 'share' && h.role === 'caught_up'), 'the catch-up');
  assert.deepEqual(got.sort(), ['n1', 'n2'], 'the notifications of the replay this tab did not see');
});

/** The string literals of a union type alias of notify.d.ts, following the aliases it names. */
function unionOf(dts, name) {
  const m = dts.match(new RegExp(`export type ${name} =([^;]+);`));
  assert.ok(m, `notify.d.ts declares ${name}`);
  const out = [];
  for (const part of m[1].split('|').map((x) => x.trim()).filter(Boolean)) {
    if (part.startsWith("'")) out.push(part.slice(1, -1));
    else out.push(...unionOf(dts, part));
  }
  return out;
}

test('the reasons are a closed set: notify.d.ts declares exactly those REASONS has text for', () => {
  const dts = readFileSync(new URL('../notify.d.ts', import.meta.url), 'utf8');
  assert.deepEqual(unionOf(dts, 'Reason').sort(), Object.keys(REASONS).sort());
  assert.deepEqual(unionOf(dts, 'State').sort(), ['closed', 'connected', 'connecting', 'idle', 'reconnecting']);
  for (const [code, text] of Object.entries(REASONS)) assert.ok(text.length > 0, `${code} has no text`);
});
