// notify.js: the browser client of notifyd (an ES module, no build step).
//
//   import notify from '/notify.js';
//   const n = notify.connect('https://notify.example.com', { token });
//   n.on('notification', (msg) => show(msg));
//   n.on('state', ({ state, transport, reason }) => badge(state, transport));
//
// It tries WebSocket, then SSE, then long-poll (or the order GET /v1/negotiate
// learned for this network and browser); a step that does not deliver `hello`
// within helloTimeout is abandoned. On a fallback it probes the better
// transports now and then and moves up when one works. Reconnects use
// exponential backoff with full jitter and honour `bye.retry_ms`; the cursor
// and the session are sent on reconnect; duplicates are dropped by id; live
// seq gaps are filled from the inbox API. Types: notify.d.ts beside this file.

// The types are notify.d.ts's (a module path ending in .js resolves to the .d.ts beside it).
/** @typedef {import('./notify.js').Transport} Transport */
/** @typedef {import('./notify.js').State} State */
/** @typedef {import('./notify.js').Options} Options */
/** @typedef {import('./notify.js').Notification} Notification */
/** @typedef {import('./notify.js').EventMap} EventMap */
/** @typedef {import('./notify.js').NotifyClient} NotifyClientAPI */

/** The ladder, best first. */
export const TRANSPORTS = /** @type {Transport[]} */ (['websocket', 'sse', 'longpoll']);

/** @type {Record<number, string>} */
const CLOSE_REASONS = { 1012: 'shutdown', 4000: 'heartbeat_timeout', 4001: 'replaced', 4002: 'kicked', 4003: 'slow_consumer', 1011: 'server_error', 1009: 'message_too_big', 1008: 'policy' };
const SEEN_LIMIT = 10000;
const HISTORY_LIMIT = 300;

const now = () => (typeof performance !== 'undefined' ? performance.now() : Date.now());

/**
 * One connection over one transport. The client owns it; `role` says what it
 * is for: an `attempt` of the ladder, a `probe` for a better transport, the
 * `primary` that carries the session, or `dead` (everything it still receives
 * is ignored).
 */
class Conn {
  /**
   * @param {NotifyClient} client
   * @param {Transport} transport
   * @param {{token: string, cursor: number, session: string|null, role: string}} p
   */
  constructor(client, transport, p) {
    this.client = client;
    this.transport = transport;
    this.token = p.token;
    this.cursor = p.cursor;
    this.resume = p.session;
    this.role = p.role;
    /** @type {string|null} */
    this.session = null;
    this.startedAt = now();
    this.ended = false;
    /** @type {((ok: boolean, reason: string) => void)|null} the attempt's outcome, while it is one */
    this.settle = null;
  }

  /** Opens the connection (each transport has its own). */
  start() {}

  /**
   * Sends client messages upstream.
   * @param {object[]} msgs
   * @returns {Promise<void>}
   */
  send(msgs) { return Promise.resolve(); }

  /** Releases what the transport holds (socket, stream, pending poll). */
  teardown() {}

  /** @param {any} m */
  deliver(m) {
    if (this.role !== 'dead') this.client._onMessage(this, m);
  }

  /** @param {{reason: string, retryMs?: number, status?: number, bye?: boolean}} info */
  end(info) {
    if (this.ended) return;
    this.ended = true;
    this.teardown();
    if (this.role !== 'dead') this.client._onEnd(this, info);
  }

  /** Ends the connection without telling the client. */
  close() {
    this.role = 'dead';
    if (!this.ended) {
      this.ended = true;
      this.teardown();
    }
  }

  /**
   * @param {Record<string, string|number>} [extra] more query parameters
   * @returns {string}
   */
  query(extra) {
    const q = new URLSearchParams({ token: this.token });
    if (this.cursor > 0) q.set('cursor', String(this.cursor));
    if (this.resume) q.set('session', this.resume);
    for (const [k, v] of Object.entries(extra || {})) q.set(k, String(v));
    return q.toString();
  }

  /**
   * POST /v1/sessions/{session}/messages (SSE and long-poll upstream).
   * @param {object[]} msgs
   */
  async post(msgs) {
    if (!this.session) return;
    const resp = await fetch(`${this.client.url}/v1/sessions/${encodeURIComponent(this.session)}/messages`, {
      method: 'POST', cache: 'no-store',
      headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(msgs),
    });
    if (resp.status === 404) {
      this.end({ reason: 'unknown_session' });
      return;
    }
    if (!resp.ok) throw new Error(`messages: HTTP ${resp.status}`);
    const body = await resp.json();
    for (const m of body.messages || []) this.deliver(m);
  }
}

class WSConn extends Conn {
  start() {
    const ws = new WebSocket(`${this.client.url.replace(/^http/, 'ws')}/v1/ws?${this.query()}`);
    this.ws = ws;
    ws.onmessage = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch { return; }
      this.deliver(m);
    };
    ws.onclose = (e) => this.end({ reason: CLOSE_REASONS[e.code] || (e.code === 1006 ? 'connection_lost' : `closed_${e.code}`) });
    ws.onerror = () => {};
  }

  /**
   * @param {object[]} msgs
   */
  send(msgs) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      for (const m of msgs) this.ws.send(JSON.stringify(m));
    }
    return Promise.resolve();
  }

  teardown() {
    const ws = this.ws;
    if (!ws) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    if (ws.readyState === WebSocket.OPEN) ws.close(1000);
    else if (ws.readyState === WebSocket.CONNECTING) ws.onopen = () => ws.close(1000);
  }
}

class SSEConn extends Conn {
  start() {
    const es = new EventSource(`${this.client.url}/v1/sse?${this.query()}`);
    this.es = es;
    /** @param {MessageEvent} e */
    const onData = (e) => {
      let m;
      try { m = JSON.parse(e.data); } catch { return; }
      this.deliver(m);
    };
    for (const t of ['hello', 'notification', 'synced', 'pong', 'read', 'bye', 'message']) es.addEventListener(t, onData);
    // `event: error` from the server and the EventSource's own failure share a name.
    es.addEventListener('error', (e) => {
      if (e instanceof MessageEvent && typeof e.data === 'string') onData(e);
      else this.end({ reason: 'stream_error' });
    });
  }

  /**
   * @param {object[]} msgs
   */
  send(msgs) { return this.post(msgs); }

  teardown() {
    if (this.es) this.es.close();
  }
}

class PollConn extends Conn {
  start() {
    this.loop();
  }

  async loop() {
    const wait = this.client.opts.pollWait;
    let session = this.resume;
    let cursor = this.cursor;
    while (!this.ended) {
      const ac = new AbortController();
      this.abort = ac;
      const timer = setTimeout(() => ac.abort(), (wait + 15) * 1000);
      const q = new URLSearchParams({ wait: String(wait) });
      if (session) q.set('session', session);
      if (cursor > 0) q.set('cursor', String(cursor));
      let body;
      try {
        const resp = await fetch(`${this.client.url}/v1/poll?${q}`, {
          cache: 'no-store', signal: ac.signal, headers: { Authorization: `Bearer ${this.token}` },
        });
        if (!resp.ok) {
          let code = '';
          try { code = (await resp.json()).error.code; } catch { /* not JSON: a proxy's page */ }
          this.end({ reason: code || `http_${resp.status}`, status: resp.status });
          return;
        }
        body = await resp.json();
      } catch (err) {
        if (!this.ended) this.end({ reason: ac.signal.aborted ? 'poll_timeout' : 'network_error' });
        return;
      } finally {
        clearTimeout(timer);
      }
      if (this.ended) return;
      session = body.session || session;
      if (typeof body.cursor === 'number') cursor = body.cursor;
      for (const m of body.messages || []) {
        if (this.ended) return;
        this.deliver(m);
      }
    }
  }

  /**
   * @param {object[]} msgs
   */
  send(msgs) { return this.post(msgs); }

  teardown() {
    if (this.abort) this.abort.abort();
  }
}

const CONN = { websocket: WSConn, sse: SSEConn, longpoll: PollConn };

/**
 * A notifyd client. Events: `state`, `connect`, `disconnect`, `notification`,
 * `read`, `unread`, `synced`, `error`, `attempt` (see notify.d.ts).
 */
/** @implements {NotifyClientAPI} */
export class NotifyClient {
  /**
   * @param {string} url notifyd's base URL ('' or undefined: this page's origin)
   * @param {Options} options
   */
  constructor(url, options) {
    const base = url || (typeof location !== 'undefined' ? location.origin : '');
    this.url = base.replace(/\/+$/, '');
    this.opts = {
      transports: TRANSPORTS, helloTimeout: 3000, negotiate: true, probeInterval: 60000,
      backoffBase: 500, backoffMax: 30000, pollWait: 25, pongTimeout: 10000, cursor: 0, autoConnect: true,
      ...options,
    };
    this.opts.transports = this.opts.transports.filter((t) => TRANSPORTS.includes(t));
    if (this.opts.transports.length === 0) throw new Error('notify: no known transport in options.transports');
    /** @type {State} */
    this.state = 'idle';
    /** @type {Transport|null} */
    this.transport = null;
    /** @type {string|null} */
    this.session = null;
    /** @type {string|null} */
    this.user = null;
    /** @type {number|null} */
    this.unread = null;
    this.pingInterval = 20000;
    this.pingTimeout = 60000;
    /** Timings in ms since the page's time origin: start, hello, firstNotification. */
    this.timings = { start: 0, hello: 0, firstNotification: 0 };
    /** The recent state changes and attempts, oldest first (for debugging and tests). */
    /** @type {Array<Record<string, unknown>>} */
    this.history = [];

    /** @type {Map<string, Set<(arg: any) => void>>} the listeners of each event */
    this._listeners = new Map();
    /** @type {WeakMap<(arg: any) => void, (arg: any) => void>} once()'s wrappers: wrapper -> the listener given */
    this._onceOf = new WeakMap();
    this._seen = new Map();
    this._maxSeq = Math.max(0, Number(this.opts.cursor) || 0);
    /** @type {Array<[number, number]>} live seq ranges missing, being fetched */
    this._gaps = [];
    this._synced = false;
    /** @type {Conn|null} */
    this._conn = null;
    /** @type {Conn|null} */
    this._probe = null;
    /** @type {Conn|null} */
    this._attemptConn = null;
    this._pass = 0;
    this._failures = 0;
    /** @type {Transport|null} */
    this._lastGood = null;
    this._negotiateOK = false;
    /** @type {Record<string, ReturnType<typeof setTimeout>>} the pending timers and intervals, by name */
    this._timers = {};
    /** @type {string[]} ids waiting to be acknowledged */
    this._acks = [];
    this._localReads = new Set();
    this._localAll = 0;
    this._liveCount = 0;
    this._wantOpen = false;
    this._onOnline = () => { if (this.state === 'reconnecting') this._reconnectNow('online'); };
    if (this.opts.autoConnect) this.open();
  }

  // ---- public API ----------------------------------------------------------

  /** True while a transport carries the session. */
  get connected() { return this.state === 'connected'; }

  /** The highest seq held with nothing missing below it (sent as `cursor` on reconnect). */
  get cursor() {
    let c = this._maxSeq;
    for (const [from] of this._gaps) c = Math.min(c, from - 1);
    return c;
  }

  /**
   * Subscribes to an event; returns this for chaining.
   * @template {keyof EventMap} K
   * @param {K} event
   * @param {(arg: EventMap[K]) => void} fn
   * @returns {this}
   */
  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return this;
  }

  /**
   * Unsubscribes fn, also when once() added it (or every listener of event).
   * @template {keyof EventMap} K
   * @param {K} event
   * @param {(arg: EventMap[K]) => void} [fn]
   * @returns {this}
   */
  off(event, fn) {
    const set = this._listeners.get(event);
    if (!fn) this._listeners.delete(event);
    else if (set) {
      for (const l of set) if (l === fn || this._onceOf.get(l) === fn) set.delete(l);
    }
    return this;
  }

  /**
   * Subscribes for one call.
   * @template {keyof EventMap} K
   * @param {K} event
   * @param {(arg: EventMap[K]) => void} fn
   * @returns {this}
   */
  once(event, fn) {
    /** @param {EventMap[K]} arg */
    const wrap = (arg) => { this.off(event, wrap); fn(arg); };
    this._onceOf.set(wrap, fn);
    return this.on(event, wrap);
  }

  /** Connects (again, after close()). */
  open() {
    if (this._wantOpen) return this;
    this._wantOpen = true;
    if (!this.timings.start) this.timings.start = now();
    if (typeof window !== 'undefined') window.addEventListener('online', this._onOnline);
    this._pass++;
    this._runLadder('connect');
    return this;
  }

  /** Closes the session for good (until open()). */
  close() {
    this._wantOpen = false;
    this._pass++;
    for (const k of Object.keys(this._timers)) this._clear(k);
    if (typeof window !== 'undefined') window.removeEventListener('online', this._onOnline);
    if (this._probe) { this._probe.close(); this._probe = null; }
    if (this._attemptConn) { this._attemptConn.close(); this._attemptConn = null; }
    const c = this._conn;
    this._conn = null;
    if (c) {
      c.close();
      if (c.transport === 'longpoll' && c.session) this._kickSession(c.session, c.token);
    }
    this._setState('closed', null, 'client');
    return this;
  }

  /** socket.io-style alias of close(). */
  disconnect() { return this.close(); }

  /**
   * Marks notifications read (POST /v1/users/{user}/read); every session of
   * the user then gets a `read` event with the authoritative unread count.
   * @param {string[]} ids
   * @returns {Promise<{ids: string[], unread: number}>}
   */
  async markRead(ids) {
    if (!ids || ids.length === 0) return { ids: [], unread: this.unread ?? 0 };
    for (const id of ids) this._localReads.add(id);
    try {
      return await this._read({ ids });
    } finally {
      setTimeout(() => { for (const id of ids) this._localReads.delete(id); }, 2000);
    }
  }

  /** Marks everything up to the cursor read. */
  async markAllRead() {
    const upTo = this._maxSeq;
    if (upTo <= 0) return { ids: [], unread: this.unread ?? 0 };
    this._localAll++;
    try {
      return await this._read({ up_to_seq: upTo });
    } finally {
      setTimeout(() => { this._localAll--; }, 2000);
    }
  }

  // ---- events and state ----------------------------------------------------

  /**
   * @param {string} event
   * @param {any} arg
   */
  _emit(event, arg) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try { fn(arg); } catch (err) { setTimeout(() => { throw err; }); }
    }
  }

  /**
   * @param {Record<string, unknown>} entry
   */
  _record(entry) {
    this.history.push({ t: Math.round(now()), ...entry });
    if (this.history.length > HISTORY_LIMIT) this.history.shift();
  }

  /**
   * @param {State} state
   * @param {Transport|null} transport
   * @param {string} reason
   * @param {{delay?: number}} [extra]
   *
   * Every call is kept in the history; a `state` event fires only when the
   * state or the transport changes.
   */
  _setState(state, transport, reason, extra) {
    const previous = { state: this.state, transport: this.transport };
    this.state = state;
    this.transport = transport;
    this._record({ event: 'state', state, transport, reason, ...extra });
    if (previous.state === state && previous.transport === transport) return;
    this._emit('state', { state, transport, reason, previous, ...extra });
  }

  /**
   * @param {string} name a key of _timers
   */
  _clear(name) {
    if (this._timers[name]) {
      clearTimeout(this._timers[name]);
      clearInterval(this._timers[name]);
      delete this._timers[name];
    }
  }

  async _token() {
    const t = this.opts.token;
    return typeof t === 'function' ? await t() : t;
  }

  // ---- the ladder ------------------------------------------------------------

  /**
   * One pass down the ladder; on failure, schedules the next pass.
   * @param {string} reason
   */
  async _runLadder(reason) {
    const pass = this._pass;
    const live = () => this._wantOpen && pass === this._pass;
    this._setState(this.timings.hello ? 'reconnecting' : 'connecting', null, reason);
    let token;
    try {
      token = await this._token();
    } catch (err) {
      this._emit('error', { code: 'token', message: String(err) });
      if (live()) this._scheduleReconnect(null, 'token');
      return;
    }
    let order = this.opts.transports.slice();
    let source = 'default';
    if (this._lastGood && order.includes(this._lastGood)) {
      order = [this._lastGood, ...order.filter((t) => t !== this._lastGood)];
      source = 'last';
    } else if (this.opts.negotiate) {
      const neg = await this._negotiate(token);
      if (!live()) return;
      if (neg === 'unauthorized') {
        this._unauthorized();
        return;
      }
      if (neg) {
        const learned = neg.order.filter((t) => order.includes(t));
        order = [...learned, ...order.filter((t) => !learned.includes(t))];
        source = neg.learned ? 'learned' : 'default';
      }
    }
    this._record({ event: 'order', order, source });
    const outcomes = [];
    for (const transport of order) {
      if (!live()) return;
      const res = await this._attempt(transport, token, this.session, 'attempt');
      if (!live()) {
        if (res.conn) res.conn.close();
        return;
      }
      if (res.ok) {
        outcomes.push({ transport, ok: true, reason: '' });
        this._report(token, outcomes);
        return;
      }
      outcomes.push({ transport, ok: false, reason: res.reason });
      if (res.reason === 'unauthorized') {
        this._unauthorized();
        return;
      }
      // A step that failed because notifyd (or the way to it) is down says
      // nothing about the transport: back off instead of falling further.
      if (!(await this._reachable())) {
        if (live()) this._scheduleReconnect(null, `unreachable (${transport}: ${res.reason})`);
        return;
      }
    }
    if (live()) this._scheduleReconnect(null, 'all transports failed');
  }

  /**
   * Opens one transport and waits for its hello (or failure, or helloTimeout).
   * On hello the connection is promoted synchronously, so the messages after
   * hello in the same batch already go to the new primary.
   * @param {Transport} transport
   * @param {string} token
   * @param {string|null} session the session to resume
   * @param {'attempt'|'probe'} role
   * @returns {Promise<{ok: boolean, reason: string, conn?: Conn}>}
   */
  _attempt(transport, token, session, role) {
    return new Promise((resolve) => {
      const conn = new CONN[transport](this, transport, { token, cursor: this.cursor, session, role });
      const timer = setTimeout(() => done(false, 'timeout'), this.opts.helloTimeout);
      let settled = false;
      /** @param {boolean} ok @param {string} reason */
      const done = (ok, reason) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const ms = Math.round(now() - conn.startedAt);
        this._record({ event: 'attempt', transport, role, ok, reason, ms });
        this._emit('attempt', { transport, probe: role === 'probe', ok, reason, ms });
        if (!ok) conn.close();
        if (this._attemptConn === conn) this._attemptConn = null;
        resolve({ ok, reason, conn });
      };
      conn.settle = done;
      if (role === 'probe') this._probe = conn;
      else this._attemptConn = conn;
      try {
        conn.start();
      } catch (err) {
        done(false, 'error');
      }
    });
  }

  /**
   * GET /v1/negotiate: the learned order, null when unreachable.
   * @param {string} token
   * @returns {Promise<{order: Transport[], learned?: boolean}|'unauthorized'|null>}
   */
  async _negotiate(token) {
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), 1500);
    try {
      const resp = await fetch(`${this.url}/v1/negotiate`, {
        cache: 'no-store', signal: ac.signal, headers: { Authorization: `Bearer ${token}` },
      });
      if (resp.status === 401) return 'unauthorized';
      if (!resp.ok) return null;
      const body = await resp.json();
      if (!Array.isArray(body.order)) return null;
      this._negotiateOK = true;
      return body;
    } catch {
      return null;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * POST /v1/negotiate: what worked and what did not (fire and forget).
   * @param {string} token
   * @param {Array<{transport: Transport, ok: boolean, reason: string}>} outcomes
   */
  _report(token, outcomes) {
    if (!this.opts.negotiate || !this._negotiateOK || outcomes.length === 0) return;
    fetch(`${this.url}/v1/negotiate`, {
      method: 'POST', cache: 'no-store', keepalive: true,
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(outcomes),
    }).catch(() => {});
  }

  /** Whether notifyd answers plain HTTP (GET /readyz) through the same path. */
  async _reachable() {
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), 2000);
    try {
      const resp = await fetch(`${this.url}/readyz`, { cache: 'no-store', signal: ac.signal });
      return resp.ok;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  _unauthorized() {
    this._emit('error', { code: 'unauthorized', message: 'the token was refused' });
    if (typeof this.opts.token === 'function') {
      this._scheduleReconnect(null, 'unauthorized');
    } else {
      this._wantOpen = false;
      this._setState('closed', null, 'unauthorized');
    }
  }

  /**
   * Waits, then runs the ladder again: retryMs when the server said so (bye),
   * otherwise exponential backoff with full jitter.
   * @param {number|null} retryMs
   * @param {string} reason
   */
  _scheduleReconnect(retryMs, reason) {
    this._clear('reconnect');
    let delay;
    if (typeof retryMs === 'number' && retryMs >= 0) {
      delay = retryMs;
    } else {
      const bound = Math.min(this.opts.backoffMax, this.opts.backoffBase * 2 ** this._failures);
      delay = Math.round(Math.random() * bound);
      this._failures++;
    }
    this._setState('reconnecting', null, reason, { delay });
    const pass = ++this._pass;
    this._timers.reconnect = setTimeout(() => {
      delete this._timers.reconnect;
      if (this._wantOpen && pass === this._pass) this._runLadder('retry');
    }, delay);
  }

  /**
   * @param {string} reason
   */
  _reconnectNow(reason) {
    this._clear('reconnect');
    this._pass++;
    this._runLadder(reason);
  }

  // ---- probing for a better transport ---------------------------------------

  _better() {
    const cur = this.transport ? this.opts.transports.indexOf(this.transport) : -1;
    return cur > 0 ? this.opts.transports.slice(0, cur) : [];
  }

  _scheduleProbe() {
    this._clear('probe');
    if (this._better().length === 0 || !(this.opts.probeInterval > 0)) return;
    const delay = Math.round(this.opts.probeInterval * (0.8 + 0.4 * Math.random()));
    this._timers.probe = setTimeout(() => { delete this._timers.probe; this._runProbe(); }, delay);
  }

  /**
   * Tries the transports above the current one, best first, each as a new
   * session with the current cursor: a probe that never says hello costs the
   * live session nothing. The first that says hello takes over; its replay
   * starts above the cursor and duplicates are dropped by id, so nothing is
   * lost or shown twice.
   */
  async _runProbe() {
    const primary = this._conn;
    if (!primary || this._probe) return;
    let token;
    try { token = await this._token(); } catch { this._scheduleProbe(); return; }
    for (const transport of this._better()) {
      if (this._conn !== primary || !this._wantOpen) return;
      const res = await this._attempt(transport, token, null, 'probe');
      this._probe = null;
      if (res.ok) {
        this._report(token, [{ transport, ok: true, reason: 'probe' }]);
        return;
      }
      this._report(token, [{ transport, ok: false, reason: `probe_${res.reason}` }]);
    }
    if (this._conn === primary) this._scheduleProbe();
  }

  // ---- connection events ------------------------------------------------------

  /**
   * Makes conn the primary on its hello.
   * @param {Conn} conn
   * @param {any} hello the hello message
   */
  _promote(conn, hello) {
    if (!this._wantOpen) {
      conn.close();
      return;
    }
    const old = this._conn;
    const why = conn.role === 'probe' ? `upgrade from ${old ? old.transport : 'none'}` : (this._lastGood ? 'reconnected' : 'connected');
    if (old && old !== conn) {
      old.close();
      // A long-poll session has no connection whose end the server would see.
      if (old.transport === 'longpoll' && old.session && old.session !== hello.session) this._kickSession(old.session, old.token);
    }
    conn.role = 'primary';
    this._conn = conn;
    this._clearConnTimers();
    this.session = hello.session;
    this.user = hello.user || this.user;
    this._synced = false;
    this._failures = 0;
    this._lastGood = conn.transport;
    if (hello.ping_interval_ms > 0) this.pingInterval = hello.ping_interval_ms;
    if (hello.ping_timeout_ms > 0) this.pingTimeout = hello.ping_timeout_ms;
    if (!this.timings.hello) this.timings.hello = now();
    if (conn.settle) conn.settle(true, 'hello');
    this._setState('connected', conn.transport, why);
    this._emit('connect', { session: hello.session, user: hello.user, transport: conn.transport, hello });
    if (conn.transport !== 'longpoll') {
      this._timers.ping = setInterval(() => this._ping(conn), this.pingInterval);
    }
    this._scheduleProbe();
  }

  _clearConnTimers() {
    this._clear('ping');
    this._clear('pong');
    this._clear('probe');
    this._clear('ack');
    this._acks = [];
  }

  /**
   * @param {Conn} conn
   */
  _ping(conn) {
    if (conn !== this._conn) return;
    if (!this._timers.pong) {
      const wait = Math.min(this.opts.pongTimeout, this.pingTimeout);
      this._timers.pong = setTimeout(() => {
        delete this._timers.pong;
        if (conn === this._conn) conn.end({ reason: 'ping_timeout' });
      }, wait);
    }
    conn.send([{ type: 'ping' }]).catch(() => {});
  }

  /**
   * A message from conn.
   * @param {Conn} conn
   * @param {any} m a server message
   */
  _onMessage(conn, m) {
    if (!m || typeof m.type !== 'string') return;
    if (m.type === 'hello') {
      conn.session = m.session;
      if (conn.role === 'attempt' || conn.role === 'probe') {
        this._promote(conn, m);
      } else if (conn === this._conn && m.session !== this.session) {
        // A long-poll whose session had expired got a new one: a fresh replay follows.
        this.session = m.session;
        this._synced = false;
      }
      return;
    }
    if (conn !== this._conn) return;
    switch (m.type) {
      case 'notification': this._onNotification(m); break;
      case 'synced': this._onSynced(m); break;
      case 'pong': this._clear('pong'); break;
      case 'read': this._onRead(m); break;
      case 'bye':
        conn.end({ reason: m.reason || 'bye', retryMs: typeof m.retry_ms === 'number' ? m.retry_ms : undefined, bye: true });
        break;
      case 'error': this._emit('error', { code: m.code, message: m.message }); break;
      default: break;
    }
  }

  /**
   * conn ended (failed, closed by the server or the network).
   * @param {Conn} conn
   * @param {{reason: string, retryMs?: number, status?: number, bye?: boolean}} info
   */
  _onEnd(conn, info) {
    if (conn.role === 'attempt' || conn.role === 'probe') {
      if (conn.settle) conn.settle(false, info.reason);
      return;
    }
    if (conn !== this._conn) return;
    this._conn = null;
    this._clearConnTimers();
    if (this._probe) { this._probe.close(); this._probe = null; }
    this._emit('disconnect', { reason: info.reason, transport: conn.transport });
    if (info.reason === 'kicked') {
      this._wantOpen = false;
      this.session = null;
      this._setState('closed', null, 'kicked');
      return;
    }
    if (info.reason === 'replaced') this.session = null; // someone else resumed it: do not fight over it
    this._scheduleReconnect(info.retryMs ?? null, info.bye ? `bye ${info.reason}` : info.reason);
  }

  /**
   * @param {string} id
   */
  _remember(id) {
    this._seen.set(id, true);
    if (this._seen.size > SEEN_LIMIT) this._seen.delete(this._seen.keys().next().value);
  }

  /**
   * @param {Notification} m
   */
  _onNotification(m) {
    this._queueAck(m.id);
    const live = this._synced && !m.replayed;
    if (live && m.seq > this._maxSeq + 1) this._fillGap(this._maxSeq + 1, m.seq - 1);
    if (m.seq > this._maxSeq) this._maxSeq = m.seq;
    if (this._seen.has(m.id)) return;
    this._remember(m.id);
    if (!this.timings.firstNotification) this.timings.firstNotification = now();
    this._emit('notification', m);
    if (live && this.unread !== null) {
      this._liveCount++;
      this.unread++;
      this._emit('unread', this.unread);
    }
  }

  /**
   * @param {{cursor: number, unread: number, truncated?: boolean}} m
   */
  _onSynced(m) {
    this._synced = true;
    // The replay covered everything unread above the cursor this connection sent.
    this._gaps = [];
    if (m.cursor > this._maxSeq) this._maxSeq = m.cursor;
    this.unread = m.unread;
    this._emit('synced', { cursor: m.cursor, unread: m.unread, truncated: !!m.truncated });
    this._emit('unread', this.unread);
  }

  /**
   * @param {{ids?: string[], unread?: number}} m
   */
  _onRead(m) {
    const ids = m.ids || [];
    const local = this._localAll > 0 || (ids.length > 0 && ids.every((id) => this._localReads.has(id)));
    if (typeof m.unread === 'number') this.unread = m.unread;
    this._emit('read', { ids, unread: m.unread, local });
    this._emit('unread', this.unread);
    this._scheduleUnreadCheck();
  }

  /**
   * Reads the unread count again once read activity has settled. Two reads
   * of one user that commit at the same time can each count without the
   * other and their `read` messages can arrive in either order; the count
   * read after the last of them is right.
   */
  _scheduleUnreadCheck() {
    this._clear('unread');
    this._timers.unread = setTimeout(() => { delete this._timers.unread; this._checkUnread(); }, 400);
  }

  async _checkUnread() {
    const live = this._liveCount;
    try {
      const token = await this._token();
      const user = this.user || userOfToken(token);
      const resp = await fetch(`${this.url}/v1/users/${encodeURIComponent(user)}/notifications?unread=true&limit=1`, {
        cache: 'no-store', headers: { Authorization: `Bearer ${token}` },
      });
      if (!resp.ok) return;
      const body = await resp.json();
      if (live !== this._liveCount) {
        this._scheduleUnreadCheck(); // a live notification raced the count: count again
        return;
      }
      if (typeof body.unread === 'number' && body.unread !== this.unread) {
        this.unread = body.unread;
        this._emit('unread', this.unread);
      }
    } catch {
      // The next read or synced brings the count.
    }
  }

  /**
   * Fetches the unread notifications with seq in [from, to] from the inbox
   * (seqs are dense per user: a live jump means something was missed; read
   * ones are skipped, as a replay skips them). The connection stays up.
   * @param {number} from
   * @param {number} to
   */
  async _fillGap(from, to) {
    const gap = /** @type {[number, number]} */ ([from, to]);
    this._gaps.push(gap);
    this._record({ event: 'gap', from, to });
    const user = this.user || userOfToken(await this._token().catch(() => ''));
    try {
      const found = [];
      let before = to + 1;
      let unread = null;
      for (let page = 0; page < 10 && before > from; page++) {
        const limit = Math.min(1000, before - from);
        const q = new URLSearchParams({ unread: 'true', limit: String(limit), before_seq: String(before) });
        const resp = await fetch(`${this.url}/v1/users/${encodeURIComponent(user)}/notifications?${q}`, {
          cache: 'no-store', headers: { Authorization: `Bearer ${await this._token()}` },
        });
        if (!resp.ok) throw new Error(`inbox: HTTP ${resp.status}`);
        const body = await resp.json();
        unread = body.unread;
        /** @type {Array<{id: string, seq: number, topic: string, data: unknown, created_at: string}>} */
        const items = body.notifications || [];
        for (const n of items) if (n.seq >= from && n.seq <= to) found.push(n);
        if (items.length < limit && !body.truncated) break; // truncated: cut by bytes, more below
        before = Math.min(...items.map((n) => n.seq));
      }
      if (!this._gaps.includes(gap)) return; // a replay has covered it meanwhile
      found.sort((a, b) => a.seq - b.seq);
      for (const n of found) {
        if (this._seen.has(n.id)) continue;
        this._remember(n.id);
        if (!this.timings.firstNotification) this.timings.firstNotification = now();
        this._emit('notification', { type: 'notification', id: n.id, seq: n.seq, topic: n.topic, data: n.data,
          created_at: n.created_at, replayed: true, recovered: true });
      }
      this._queueAcks(found.map((n) => n.id));
      this._gaps = this._gaps.filter((g) => g !== gap);
      if (typeof unread === 'number') {
        this.unread = unread;
        this._emit('unread', unread);
      }
    } catch (err) {
      // The gap stays below the cursor: the next (re)connect replays it.
      this._emit('error', { code: 'gap_fill', message: String(err) });
    }
  }

  /**
   * @param {string} id
   */
  _queueAck(id) { this._queueAcks([id]); }

  /**
   * @param {string[]} ids
   */
  _queueAcks(ids) {
    const c = this._conn;
    // A poll acknowledges everything up to its cursor: no ack messages there.
    if (!c || c.transport === 'longpoll' || ids.length === 0) return;
    this._acks.push(...ids);
    if (this._timers.ack) return;
    this._timers.ack = setTimeout(() => {
      delete this._timers.ack;
      const batch = this._acks.splice(0, this._acks.length);
      const conn = this._conn;
      if (!conn) return;
      for (let i = 0; i < batch.length; i += 1000) {
        conn.send([{ type: 'ack', ids: batch.slice(i, i + 1000) }]).catch(() => {});
      }
    }, 25);
  }

  /**
   * @param {{ids: string[]}|{up_to_seq: number}} body
   * @returns {Promise<{ids: string[], unread: number}>}
   */
  async _read(body) {
    const token = await this._token();
    const user = this.user || userOfToken(token);
    const resp = await fetch(`${this.url}/v1/users/${encodeURIComponent(user)}/read`, {
      method: 'POST', cache: 'no-store',
      headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(`markRead: HTTP ${resp.status}`);
    const out = await resp.json();
    if (typeof out.unread === 'number' && out.unread !== this.unread) {
      this.unread = out.unread;
      this._emit('unread', out.unread);
    }
    this._scheduleUnreadCheck();
    return out;
  }

  /**
   * @param {string} session
   * @param {string} token
   */
  _kickSession(session, token) {
    fetch(`${this.url}/v1/sessions/${encodeURIComponent(session)}`, {
      method: 'DELETE', cache: 'no-store', keepalive: true, headers: { Authorization: `Bearer ${token}` },
    }).catch(() => {});
  }
}

/**
 * The `sub` of a JWT, without checking it (the server does).
 * @param {string} token
 * @returns {string}
 */
function userOfToken(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4))).sub || '';
  } catch {
    return '';
  }
}

/**
 * Connects to notifyd (socket.io-client style).
 * @param {string} url notifyd's base URL ('' for this page's origin)
 * @param {Options} options
 * @returns {NotifyClient}
 */
export function connect(url, options) {
  return new NotifyClient(url, options);
}

export default { connect, NotifyClient, TRANSPORTS };
