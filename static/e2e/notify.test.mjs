// notify.test.mjs: notify.js's event emitter and state events, run by node's
// test runner (`make test-js`). notify.js touches browser APIs only once it
// connects, so it imports in node; its long-poll transport is plain fetch,
// which node has, so the ladder runs here against a small loopback server.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { NotifyClient } from '../notify.js';

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
 * A stand-in for notifyd's long-poll side on a loopback port: the first poll
 * says hello and synced, the second says bye (shutdown, retry in 5 ms), and
 * every later poll and /readyz answer 503, so the client keeps reconnecting.
 */
async function byeThenDown() {
  let polls = 0;
  const server = createServer((req, res) => {
    const reply = (status, body) => {
      res.writeHead(status, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify(body));
    };
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
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${/** @type {any} */ (server.address()).port}`;
  return { url, stop: () => { server.closeAllConnections(); server.close(); } };
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
  await until(() => n.history.filter((h) => h.event === 'state' && h.reason.startsWith('unreachable')).length >= 3, 'three failed passes');
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
    ['connecting/null/connect', 'connected/longpoll/connected', 'reconnecting/null/bye shutdown', 'closed/null/client']);
  // The history keeps every step, repeats included.
  assert.ok(n.history.filter((h) => h.event === 'state' && h.state === 'reconnecting').length >= 7);
});
