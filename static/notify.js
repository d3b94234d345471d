// notify.js: the browser client of notifyd (an ES module, no build step).
//
//   import notify from '/notify.js';
//   const n = notify.connect('https://notify.example.com', { token });
//   n.on('notification', (msg) => show(msg));
//   n.on('state', ({ state, transport, reason }) => badge(state, transport));
//
// It tries WebSocket, then SSE, then long-poll (or the order GET /v1/negotiate
// learned for this network and browser); a step that does not deliver `hello`
// within helloTimeout is abandoned. Below the top of its ladder it probes the
// better transports soon after `synced`, then less often while they fail
// (probeDelays), and moves up when one works. Reconnects use exponential
// backoff with full jitter and honour `bye.retry_ms`; the cursor and the
// session are sent on reconnect; duplicates are dropped by id; live seq gaps
// are filled from the inbox API. The tabs of a browser share one connection
// (TabShare). States and reasons are closed sets (REASONS). Types: notify.d.ts
// beside this file.

// The types are notify.d.ts's (a module path ending in .js resolves to the .d.ts beside it).
/** @typedef {import('./notify.js').Transport} Transport */
/** @typedef {import('./notify.js').State} State */
/** @typedef {import('./notify.js').Reason} Reason */
/** @typedef {import('./notify.js').EndReason} EndReason */
/** @typedef {import('./notify.js').Options} Options */
/** @typedef {import('./notify.js').Notification} Notification */
/** @typedef {import('./notify.js').EventMap} EventMap */
/** @typedef {import('./notify.js').NotifyClient} NotifyClientAPI */

/** The ladder, best first. */
export const TRANSPORTS = /** @type {Transport[]} */ (['websocket', 'sse', 'longpoll']);

/** @type {Record<number, EndReason>} */
const CLOSE_REASONS = { 1012: 'shutdown', 4000: 'heartbeat_timeout', 4001: 'replaced', 4002: 'kicked', 4003: 'slow_consumer', 1011: 'server_error', 1009: 'message_too_big', 1008: 'policy' };
/** The `bye` reasons of PROTOCOL.md; any other ends the connection as `closed`. */
const BYE_REASONS = /** @type {EndReason[]} */ (['shutdown', 'kicked', 'replaced', 'heartbeat_timeout', 'slow_consumer']);

/**
 * The default probe schedule, ms: the first probe for a better transport
 * soon after `synced`, then each next one while they keep failing (the last
 * repeats).
 */
export const PROBE_DELAYS = [1500, 30000, 120000, 600000];

/**
 * The wait before probe number step (0: the first after synced) of a
 * schedule, with ±20% jitter so that many clients of one network do not probe
 * at once.
 * @param {number[]} delays
 * @param {number} step
 * @param {() => number} [rand] a number in [0, 1)
 * @returns {number}
 */
export function probeDelay(delays, step, rand = Math.random) {
  if (delays.length === 0) return -1;
  const base = delays[Math.min(Math.max(0, step), delays.length - 1)];
  return Math.round(base * (0.8 + 0.4 * rand()));
}
/** @type {Record<Reason, string>} the human text of each reason (a state event's message says more where it can) */
export const REASONS = {
  connect: 'connecting', retry: 'retrying after a backoff', online: 'the browser is online again', takeover: 'this tab took over the shared connection',
  connected: 'connected', reconnected: 'reconnected', upgrade: 'moved up to a better transport', shared: 'following the tab that holds the connection',
  shutdown: 'the server is restarting', heartbeat_timeout: 'the server missed our heartbeats', replaced: 'another connection took this session over',
  kicked: 'the session was ended by the server', slow_consumer: 'the connection fell too far behind', server_error: 'server error',
  message_too_big: 'a message was too big', policy: 'refused by the server', connection_lost: 'the connection was lost',
  closed: 'the connection was closed', stream_error: 'the event stream failed', http_error: 'the server answered with an HTTP error',
  poll_timeout: 'a poll got no answer in time', network_error: 'network error', unknown_session: 'the server does not know this session',
  ping_timeout: 'no pong in time', unauthorized: 'the token was refused', token: 'getting a token failed',
  unreachable: 'notifyd cannot be reached', all_transports_failed: 'every transport failed', client: 'closed by the application',
};
const SEEN_LIMIT = 10000;
const HISTORY_LIMIT = 300;

const now = () => (typeof performance !== 'undefined' ? performance.now() : Date.now());

/**
 * One connection over one transport. The client owns it; `role` says what it
 * is for: an `attempt` of the ladder, a `probe` for a better transport, the
 * `primary` that carries the session, or `dead` (everything it still receives
 * is ignored).
 */
/**
 * Why a connection ended: reason is the code, detail the specifics
 * (`http_502`, `closed_4005`, `bye shutdown`), for messages and reports.
 * @typedef {{reason: EndReason, detail?: string, retryMs?: number, status?: number, bye?: boolean}} EndInfo
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
    /** @type {((ok: boolean, reason: EndReason|'hello'|'timeout'|'error', detail?: string) => void)|null} the attempt's outcome, while it is one */
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

  /** @param {EndInfo} info */
  end(info) {
    if (this.ended) return;
    this.ended = true;
    this.teardown();
    if (this.role !== 'dead') this.client._onEnd(this, info);
  }

  /**
   * Takes a long-poll answer's session id: a session that moved to the node
   * that answered (a cluster without sticky sessions) is the same session
   * under that node's id, for its messages and for a later resume.
   * @param {string} id
   */
  renamed(id) {
    if (!this.session || id === this.session) return;
    this.session = id;
    if (this.client._conn === this) this.client.session = id;
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
    ws.onclose = (e) => this.end(CLOSE_REASONS[e.code] ? { reason: CLOSE_REASONS[e.code] }
      : e.code === 1006 ? { reason: 'connection_lost' } : { reason: 'closed', detail: `closed_${e.code}` });
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
          this.end({ reason: resp.status === 401 ? 'unauthorized' : 'http_error',
            detail: code && resp.status !== 401 ? `http_${resp.status} ${code}` : `http_${resp.status}`, status: resp.status });
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
      // An answer with hello is a new session, which hello announces.
      const hello = (body.messages || []).some((/** @type {any} */ m) => m && m.type === 'hello');
      if (body.session && !hello) {
        if (!this.session && this.resume && this.role === 'attempt') {
          // A node that did not hold the resumed session took it over without hello (it moved
          // there): this answer continues that session, under the id it has on that node.
          this.deliver({ type: 'hello', session: body.session, user: this.client.user, transport: 'longpoll', moved: true });
        }
        this.renamed(body.session);
      }
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

/** ms between a leading tab's heartbeats, and the silence after which a following tab takes the lead. */
const SHARE_BEAT = 1000;
const SHARE_SILENCE = 3000;

/**
 * One connection per browser profile, server and user, shared by the tabs.
 * The tab that holds the Web Lock named for them leads: its client connects
 * and posts every server message and state change, and a heartbeat each
 * second, on a BroadcastChannel of the same name. The others follow: they run
 * those messages through their own client (each keeps its own seen ids,
 * cursor and unread count) and queue for the lock. A closed tab's lock is
 * released by the browser, so the next tab in the queue leads at once and
 * connects with its own cursor (and the shared session); a freezing tab
 * gives the lead up itself (the `freeze` event), and a leader that falls
 * silent (frozen without that event, or hung) has its lock stolen after
 * SHARE_SILENCE; it steps down when it runs again.
 * Invariant: only a tab whose lock callback is running has a connection.
 */
class TabShare {
  /** Whether this browser has what sharing needs. */
  static supported() {
    return typeof document !== 'undefined' && typeof BroadcastChannel === 'function' &&
      typeof navigator !== 'undefined' && !!navigator.locks && typeof navigator.locks.request === 'function';
  }

  /**
   * @param {NotifyClient} client
   * @param {string} name the lock's and the channel's name
   */
  constructor(client, name) {
    this.client = client;
    this.name = name;
    this.id = Math.random().toString(36).slice(2);
    this.leader = false;
    /** Whether this tab has followed another one (its lead is then a takeover). */
    this.followed = false;
    this.left = false;
    /** @type {(() => void)|null} releases the lock while this tab leads */
    this.release = null;
    this.abort = new AbortController();
    this.heard = Date.now();
    /** The number of the latest lock request, and of the one that holds the lock (0: none). */
    this.requests = 0;
    this.holding = 0;
    /** @type {ReturnType<typeof setInterval>|null} the heartbeat (leading) or the watch on the leader (following) */
    this.timer = null;
    this.ch = new BroadcastChannel(name);
    this.ch.onmessage = (e) => {
      const m = e.data;
      if (this.left || !m) return;
      if (this.leader) {
        // A leader whose lock was stolen while it was silent may still post for a moment (until the
        // rejection of its request reaches it): what it posts repeats what the new leader posts.
        if (m.t === 'join') this.client._shareState();
        return;
      }
      if (m.t === 'join') return;
      this.heard = Date.now();
      if (m.t !== 'beat') this.client._onShared(m);
    };
  }

  /** Leads at once when no tab does, else follows. */
  start() { this.request({ ifAvailable: true }); }

  /**
   * @param {LockOptions} opts
   */
  request(opts) {
    const n = ++this.requests;
    navigator.locks.request(this.name, opts, (lock) => {
      if (this.left) return undefined;
      if (!lock) {
        this.follow();
        return undefined;
      }
      return new Promise((resolve) => {
        this.holding = n;
        this.release = () => { this.release = null; resolve(undefined); };
        this.lead();
      });
    }).catch(() => {
      // Aborted (this tab left the queue, or steals), or stolen from this tab while it led.
      if (this.leader && this.holding === n) this.stepDown();
    });
  }

  follow() {
    this.followed = true;
    this.heard = Date.now();
    this.client._follow();
    this.post({ t: 'join' });
    this.request({ signal: this.abort.signal });
    let tick = Date.now();
    this.setTimer(() => {
      const at = Date.now();
      const late = at - tick > 2 * SHARE_BEAT;
      tick = at;
      // A tab whose own timer ran late is throttled (hidden) or was frozen itself: the leader's
      // silence may be the same throttling, so only a tab that runs on time steals.
      if (late) {
        this.heard = at;
        return;
      }
      const silence = SHARE_SILENCE + Math.random() * SHARE_BEAT / 2; // so that the followers do not all steal at once
      if (at - this.heard > silence) this.steal();
    });
  }

  lead() {
    this.leader = true;
    this.setTimer(() => this.post({ t: 'beat', from: this.id }));
    this.post({ t: 'beat', from: this.id });
    this.client._lead(this.followed);
  }

  /** Takes the lock from a leader that has fallen silent. */
  steal() {
    if (this.left || this.leader) return;
    this.abort.abort(); // out of the queue
    this.abort = new AbortController();
    this.heard = Date.now();
    this.request({ steal: true });
  }

  /** Another tab leads: drops the connection, follows again. */
  stepDown() {
    if (this.left) return;
    this.leader = false;
    this.holding = 0;
    if (this.release) this.release();
    this.client._steppedDown();
    this.follow();
  }

  /**
   * @param {() => void} fn
   */
  setTimer(fn) {
    if (this.timer) clearInterval(this.timer);
    this.timer = setInterval(fn, SHARE_BEAT);
  }

  /**
   * @param {object} m
   */
  post(m) {
    if (this.left) return;
    try { this.ch.postMessage(m); } catch { /* a message that does not clone is not shared */ }
  }

  /** Stops leading or following (the next tab in the queue leads). */
  leave() {
    if (this.left) return;
    this.left = true;
    if (this.timer) clearInterval(this.timer);
    this.abort.abort();
    if (this.release) this.release();
    this.leader = false;
    this.ch.close();
  }
}

/** The events a leading tab passes on as they are (the others follow from the server's messages). */
const SHARED_EVENTS = new Set(['connect', 'disconnect', 'attempt', 'error']);

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
      transports: TRANSPORTS, helloTimeout: 3000, negotiate: true, probeDelays: PROBE_DELAYS, share: true,
      backoffBase: 500, backoffMax: 30000, pollWait: 25, pongTimeout: 10000, cursor: 0, autoConnect: true,
      ...options,
    };
    this.opts.transports = this.opts.transports.filter((t) => TRANSPORTS.includes(t));
    // probeInterval (a fixed interval; 0: never) replaces the schedule.
    if (typeof this.opts.probeInterval === 'number') {
      this.opts.probeDelays = this.opts.probeInterval > 0 ? [this.opts.probeInterval] : [];
    }
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
    /** the cursor as of the last replay or catch-up: what came after it may not be whole */
    this._syncBase = this._maxSeq;
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
    /** Probes of the current transport that failed in a row (the index into probeDelays). */
    this._probeStep = 0;
    /** @type {Transport|null} the transport _probeStep counts for */
    this._probeFrom = null;
    /** Whether the primary's probe timer was set (once it is synced). */
    this._probeArmed = false;
    /** @type {Record<string, ReturnType<typeof setTimeout>>} the pending timers and intervals, by name */
    this._timers = {};
    /** @type {string[]} ids waiting to be acknowledged */
    this._acks = [];
    this._localReads = new Set();
    this._localAll = 0;
    this._liveCount = 0;
    this._wantOpen = false;
    /** @type {TabShare|null} the shared connection's lock and channel, while sharing */
    this._share = null;
    /** @type {Reason} the reason of the latest state (for the tabs that join) */
    this._lastReason = 'connect';
    this._lastMessage = '';
    this._frozen = false;
    this._onFreeze = () => this._freeze();
    this._onResume = () => this._resume();
    this._onOnline = () => {
      this._probeStep = 0; // another network: better transports may work there
      if (this.state === 'reconnecting') this._reconnectNow('online');
    };
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
    if (this.opts.share && TabShare.supported()) {
      document.addEventListener('freeze', this._onFreeze);
      document.addEventListener('resume', this._onResume);
      this._startShare();
    } else {
      this._runLadder('connect');
    }
    return this;
  }

  /** True while this tab follows another tab's connection (sharing on). */
  get follower() { return !!this._share && !this._share.leader; }

  /** Closes the session for good (until open()). */
  close() {
    this._wantOpen = false;
    this._pass++;
    for (const k of Object.keys(this._timers)) this._clear(k);
    if (typeof window !== 'undefined') window.removeEventListener('online', this._onOnline);
    if (typeof document !== 'undefined') {
      document.removeEventListener('freeze', this._onFreeze);
      document.removeEventListener('resume', this._onResume);
    }
    if (this._probe) { this._probe.close(); this._probe = null; }
    if (this._attemptConn) { this._attemptConn.close(); this._attemptConn = null; }
    const c = this._conn;
    this._conn = null;
    if (c) {
      c.close();
      if (c.transport === 'longpoll' && c.session) this._kickSession(c.session, c.token);
    }
    const share = this._share;
    this._share = null;
    if (share && share.leader) {
      // The next tab takes over with a session of its own (this one is gone).
      this.session = null;
      share.post({ t: 'state', state: 'closed', transport: null, reason: 'client', message: REASONS.client, session: null, user: this.user });
    }
    if (share) share.leave();
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
    if (this._share && this._share.leader && SHARED_EVENTS.has(event)) this._share.post({ t: 'ev', name: event, arg });
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
   * @param {Reason} reason
   * @param {string} [message] the human text (default: REASONS[reason])
   * @param {{delay?: number}} [extra]
   *
   * Every call is kept in the history; a `state` event fires only when the
   * state or the transport changes.
   */
  _setState(state, transport, reason, message, extra) {
    const previous = { state: this.state, transport: this.transport };
    this.state = state;
    this.transport = transport;
    const msg = message || REASONS[reason] || reason;
    this._lastReason = reason;
    this._lastMessage = msg;
    this._record({ event: 'state', state, transport, reason, message: msg, ...extra });
    if (this._share && this._share.leader) {
      this._shareState(extra);
      // Closed for good: the tabs that follow close too (close() hands over instead).
      if (state === 'closed') this._leaveShare();
    }
    if (previous.state === state && previous.transport === transport) return;
    this._emit('state', { state, transport, reason, message: msg, previous, ...extra });
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

  // ---- sharing one connection between tabs --------------------------------------

  /** Joins (or starts) the shared connection of this server and user. */
  async _startShare() {
    const pass = this._pass;
    this._setState('connecting', null, 'connect');
    let token;
    try {
      token = await this._token();
    } catch (err) {
      this._emit('error', { code: 'token', message: String(err) });
      if (this._wantOpen && pass === this._pass) this._scheduleReconnect(null, 'token', `getting a token failed: ${err}`);
      return;
    }
    if (!this._wantOpen || pass !== this._pass) return;
    const user = userOfToken(token);
    if (!user) {
      this._runLadder('connect'); // no user to name the shared connection by: a connection of its own
      return;
    }
    this.user = this.user || user;
    this._share = new TabShare(this, `notifyd ${this.url} ${user}`);
    this._record({ event: 'share', role: 'join' });
    this._share.start();
  }

  /** Called by TabShare: this tab holds the lock and connects. @param {boolean} takeover */
  _lead(takeover) {
    this._record({ event: 'share', role: 'lead', takeover });
    this._clear('reconnect');
    this._pass++;
    this._runLadder(takeover ? 'takeover' : 'connect');
  }

  /** Called by TabShare: another tab leads; this one catches up from the inbox. */
  _follow() {
    this._record({ event: 'share', role: 'follow' });
    // A tab that was never synced may already hold notifications the leader
    // passed on (its cursor moved past what it never got): catch up from its
    // last synced cursor; repeats are dropped by id.
    const from = this._synced ? this.cursor : this._syncBase;
    this._synced = false;
    this._setState(this.state === 'idle' || this.state === 'closed' ? 'connecting' : this.state, this.transport, 'shared');
    this._syncInbox(this._pass, from);
  }

  /**
   * Posts this tab's state to the others (while it leads).
   * @param {{delay?: number}} [extra]
   */
  _shareState(extra) {
    if (!this._share || !this._share.leader) return;
    this._share.post({ t: 'state', state: this.state, transport: this.transport, reason: this._lastReason, message: this._lastMessage,
      session: this.session, user: this.user, delay: extra && extra.delay, negotiated: this._negotiateOK });
  }

  _leaveShare() {
    const share = this._share;
    this._share = null;
    if (share) share.leave();
  }

  /**
   * A message from the leading tab.
   * @param {any} m
   */
  _onShared(m) {
    if (!this._wantOpen) return;
    switch (m.t) {
      case 'state': {
        if (m.user) this.user = m.user;
        this.session = m.session;
        if (m.transport) this._lastGood = m.transport; // a takeover starts on what works
        if (m.negotiated) this._negotiateOK = true; // and reports to the same endpoint
        if (m.state === 'closed') {
          if (m.reason === 'client') return; // that tab closed: the next one takes over
          this._wantOpen = false;
          this._leaveShare();
        }
        this._setState(m.state, m.transport, m.reason, m.message, typeof m.delay === 'number' ? { delay: m.delay } : undefined);
        break;
      }
      case 'msg': {
        const sm = m.m;
        if (!sm) return;
        if (sm.type === 'notification') this._onNotification(sm);
        // The leader's synced says its own replay is whole; this tab is whole only once it has
        // caught up itself (a tab that joined during that replay heard only its end).
        else if (sm.type === 'synced') { if (this._synced) this._onSynced(sm); }
        else if (sm.type === 'read') this._onRead(sm);
        break;
      }
      case 'ev':
        if (SHARED_EVENTS.has(m.name)) this._emit(m.name, m.arg);
        break;
      default: break;
    }
  }

  /**
   * A follower's catch-up: the unread notifications above its cursor from the
   * inbox (a fresh connection's replay, without a connection), then `synced`.
   * What the leader passes on meanwhile is dropped by id where it repeats.
   * @param {number} pass
   * @param {number} from the cursor to catch up from
   */
  async _syncInbox(pass, from) {
    try {
      const { found, unread } = await this._inbox(from + 1, 0);
      if (!this.follower || pass !== this._pass) return;
      this._emitFetched(found, false);
      this._synced = true;
      for (const n of found) if (n.seq > this._maxSeq) this._maxSeq = n.seq;
      this._syncBase = this.cursor;
      this._record({ event: 'share', role: 'caught_up', from, found: found.length });
      if (typeof unread === 'number') this.unread = unread;
      this._emit('synced', { cursor: this.cursor, unread: this.unread ?? 0, truncated: false });
      this._emit('unread', this.unread);
    } catch (err) {
      this._emit('error', { code: 'inbox_sync', message: String(err) });
      if (this.follower && pass === this._pass) {
        this._timers.sync = setTimeout(() => { delete this._timers.sync; if (this.follower) this._syncInbox(pass, from); }, 1000);
      }
    }
  }

  /** Drops this tab's connections without ending the session (another tab carries it on). */
  _dropConns() {
    this._pass++;
    for (const k of Object.keys(this._timers)) this._clear(k);
    if (this._probe) { this._probe.close(); this._probe = null; }
    if (this._attemptConn) { this._attemptConn.close(); this._attemptConn = null; }
    if (this._conn) { this._conn.close(); this._conn = null; }
  }

  /** Called by TabShare: another tab took the lead from this one. */
  _steppedDown() {
    this._record({ event: 'share', role: 'step_down' });
    this._dropConns();
  }

  /** The page froze (or went into the back/forward cache): the next tab leads. */
  _freeze() {
    if (!this._share || !this._wantOpen) return;
    this._record({ event: 'share', role: 'freeze' });
    this._dropConns();
    this._leaveShare();
    this._frozen = true;
  }

  _resume() {
    if (!this._frozen || !this._wantOpen) return;
    this._frozen = false;
    this._pass++;
    this._startShare();
  }

  // ---- the ladder ------------------------------------------------------------

  /**
   * One pass down the ladder; on failure, schedules the next pass.
   * @param {'connect'|'retry'|'online'|'takeover'} reason
   */
  async _runLadder(reason) {
    const pass = this._pass;
    const live = () => this._wantOpen && pass === this._pass;
    this._setState(this.timings.hello || this._lastGood ? 'reconnecting' : 'connecting', null, reason);
    let token;
    try {
      token = await this._token();
    } catch (err) {
      this._emit('error', { code: 'token', message: String(err) });
      if (live()) this._scheduleReconnect(null, 'token', `getting a token failed: ${err}`);
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
      outcomes.push({ transport, ok: false, reason: res.detail || res.reason });
      if (res.reason === 'unauthorized') {
        this._unauthorized();
        return;
      }
      // A step that failed because notifyd (or the way to it) is down says
      // nothing about the transport: back off instead of falling further.
      if (!(await this._reachable())) {
        if (live()) this._scheduleReconnect(null, 'unreachable', `unreachable (${transport}: ${res.detail || res.reason})`);
        return;
      }
    }
    if (live()) this._scheduleReconnect(null, 'all_transports_failed', `all transports failed (${outcomes.map((o) => `${o.transport}: ${o.reason}`).join(', ')})`);
  }

  /**
   * Opens one transport and waits for its hello (or failure, or helloTimeout).
   * On hello the connection is promoted synchronously, so the messages after
   * hello in the same batch already go to the new primary.
   * @param {Transport} transport
   * @param {string} token
   * @param {string|null} session the session to resume
   * @param {'attempt'|'probe'} role
   * @returns {Promise<{ok: boolean, reason: EndReason|'hello'|'timeout'|'error', detail?: string, conn?: Conn}>}
   */
  _attempt(transport, token, session, role) {
    return new Promise((resolve) => {
      const conn = new CONN[transport](this, transport, { token, cursor: this.cursor, session, role });
      const timer = setTimeout(() => done(false, 'timeout'), this.opts.helloTimeout);
      let settled = false;
      /** @param {boolean} ok @param {EndReason|'hello'|'timeout'|'error'} reason @param {string} [detail] */
      const done = (ok, reason, detail) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        const ms = Math.round(now() - conn.startedAt);
        this._record({ event: 'attempt', transport, role, ok, reason, detail, ms });
        this._emit('attempt', { transport, probe: role === 'probe', ok, reason, detail, ms });
        if (!ok) conn.close();
        if (this._attemptConn === conn) this._attemptConn = null;
        resolve({ ok, reason, detail, conn });
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
   * @param {Reason} reason
   * @param {string} [message]
   */
  _scheduleReconnect(retryMs, reason, message) {
    this._clear('reconnect');
    let delay;
    if (typeof retryMs === 'number' && retryMs >= 0) {
      delay = retryMs;
    } else {
      const bound = Math.min(this.opts.backoffMax, this.opts.backoffBase * 2 ** this._failures);
      delay = Math.round(Math.random() * bound);
      this._failures++;
    }
    this._setState('reconnecting', null, reason, message, { delay });
    const pass = ++this._pass;
    this._timers.reconnect = setTimeout(() => {
      delete this._timers.reconnect;
      if (this._wantOpen && pass === this._pass) this._runLadder('retry');
    }, delay);
  }

  /**
   * @param {'online'} reason
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

  /**
   * Sets the timer of the next probe for a better transport, by the schedule
   * (opts.probeDelays) at the current step: the first soon after synced, later
   * ones further apart while they keep failing.
   */
  _scheduleProbe() {
    this._clear('probe');
    if (this._better().length === 0) return;
    const delay = probeDelay(this.opts.probeDelays || [], this._probeStep);
    if (delay < 0) return;
    this._record({ event: 'probe_scheduled', step: this._probeStep, delay });
    this._timers.probe = setTimeout(() => { delete this._timers.probe; this._runProbe(); }, delay);
  }

  /**
   * Tries the transports above the current one, best first, each as a new
   * session with the current cursor: a probe that never says hello costs the
   * live session nothing. The first that says hello takes over; its replay
   * starts above the cursor and duplicates are dropped by id, so nothing is
   * lost or shown twice. The round's outcomes go to POST /v1/negotiate in one
   * report; a round where all failed moves the schedule one step on.
   */
  async _runProbe() {
    const primary = this._conn;
    if (!primary || this._probe) return;
    let token;
    try { token = await this._token(); } catch { this._scheduleProbe(); return; }
    /** @type {Array<{transport: Transport, ok: boolean, reason: string}>} */
    const outcomes = [];
    for (const transport of this._better()) {
      if (this._conn !== primary || !this._wantOpen) break;
      const res = await this._attempt(transport, token, null, 'probe');
      this._probe = null;
      if (res.ok) {
        outcomes.push({ transport, ok: true, reason: 'probe' });
        break;
      }
      outcomes.push({ transport, ok: false, reason: `probe_${res.detail || res.reason}` });
    }
    this._report(token, outcomes);
    if (this._conn === primary && this._wantOpen) {
      this._probeStep++;
      this._scheduleProbe();
    }
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
    /** @type {Reason} */
    const why = conn.role === 'probe' ? 'upgrade' : (this._lastGood ? 'reconnected' : 'connected');
    const message = conn.role === 'probe' ? `upgrade from ${old ? old.transport : 'none'}` : undefined;
    if (old && old !== conn) {
      old.close();
      // A long-poll session has no connection whose end the server would see.
      if (old.transport === 'longpoll' && old.session && old.session !== hello.session) this._kickSession(old.session, old.token);
    }
    conn.role = 'primary';
    this._conn = conn;
    this._clearConnTimers();
    // The probe schedule restarts on an upgrade or on another transport; a
    // reconnect onto the same fallback keeps its step.
    if (why === 'upgrade' || this._probeFrom !== conn.transport) this._probeStep = 0;
    this._probeFrom = conn.transport;
    this._probeArmed = false;
    this.session = hello.session;
    this.user = hello.user || this.user;
    // A long-poll session that moved to another node goes on from the cursor
    // with no synced of its own: it stays synced if it was.
    const moved = hello.moved === true;
    if (!moved) this._synced = false;
    this._failures = 0;
    this._lastGood = conn.transport;
    if (hello.ping_interval_ms > 0) this.pingInterval = hello.ping_interval_ms;
    if (hello.ping_timeout_ms > 0) this.pingTimeout = hello.ping_timeout_ms;
    if (!this.timings.hello) this.timings.hello = now();
    if (conn.settle) conn.settle(true, 'hello');
    this._setState('connected', conn.transport, why, message);
    this._emit('connect', { session: hello.session, user: hello.user, transport: conn.transport, hello });
    if (conn.transport !== 'longpoll') {
      this._timers.ping = setInterval(() => this._ping(conn), this.pingInterval);
    }
    // Probing waits for synced, which a moved session does not get.
    if (moved) {
      this._probeArmed = true;
      this._scheduleProbe();
    }
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
    if (this._share && this._share.leader && (m.type === 'notification' || m.type === 'synced' || m.type === 'read')) {
      this._share.post({ t: 'msg', m });
    }
    switch (m.type) {
      case 'notification': this._onNotification(m); break;
      case 'synced':
        this._onSynced(m);
        // Probing waits for the replay: the first notifications come first.
        if (!this._probeArmed) {
          this._probeArmed = true;
          this._scheduleProbe();
        }
        break;
      case 'pong': this._clear('pong'); break;
      case 'read': this._onRead(m); break;
      case 'bye':
        conn.end({ reason: BYE_REASONS.includes(m.reason) ? m.reason : 'closed', detail: `bye ${m.reason || ''}`.trim(),
          retryMs: typeof m.retry_ms === 'number' ? m.retry_ms : undefined, bye: true });
        break;
      case 'error': this._emit('error', { code: m.code, message: m.message }); break;
      default: break;
    }
  }

  /**
   * conn ended (failed, closed by the server or the network).
   * @param {Conn} conn
   * @param {EndInfo} info
   */
  _onEnd(conn, info) {
    if (conn.role === 'attempt' || conn.role === 'probe') {
      if (conn.settle) conn.settle(false, info.reason, info.detail);
      return;
    }
    if (conn !== this._conn) return;
    this._conn = null;
    this._clearConnTimers();
    if (this._probe) { this._probe.close(); this._probe = null; }
    this._emit('disconnect', { reason: info.reason, message: info.detail || REASONS[info.reason], transport: conn.transport });
    if (info.reason === 'kicked') {
      this._wantOpen = false;
      this.session = null;
      this._setState('closed', null, 'kicked');
      return;
    }
    if (info.reason === 'replaced') this.session = null; // someone else resumed it: do not fight over it
    this._scheduleReconnect(info.retryMs ?? null, info.reason, info.detail);
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
    this._syncBase = this.cursor;
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
    try {
      const { found, unread } = await this._inbox(from, to);
      if (!this._gaps.includes(gap)) return; // a replay has covered it meanwhile
      this._emitFetched(found, true);
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
   * The unread notifications with seq in [from, to] (to 0: no bound) from the
   * inbox, oldest first, in pages (at most 10 of 1000).
   * @param {number} from
   * @param {number} to
   * @returns {Promise<{found: Array<{id: string, seq: number, topic: string, data: unknown, created_at: string}>, unread: number|null}>}
   */
  async _inbox(from, to) {
    const token = await this._token();
    const user = this.user || userOfToken(token);
    const found = [];
    let before = to > 0 ? to + 1 : 0;
    let unread = null;
    for (let page = 0; page < 10 && (before === 0 || before > from); page++) {
      const limit = before > 0 ? Math.min(1000, before - from) : 1000;
      const q = new URLSearchParams({ unread: 'true', limit: String(limit) });
      if (before > 0) q.set('before_seq', String(before));
      const resp = await fetch(`${this.url}/v1/users/${encodeURIComponent(user)}/notifications?${q}`, {
        cache: 'no-store', headers: { Authorization: `Bearer ${await this._token()}` },
      });
      if (!resp.ok) throw new Error(`inbox: HTTP ${resp.status}`);
      const body = await resp.json();
      unread = body.unread;
      /** @type {Array<{id: string, seq: number, topic: string, data: unknown, created_at: string}>} */
      const items = body.notifications || [];
      for (const n of items) if (n.seq >= from && (to === 0 || n.seq <= to)) found.push(n);
      if (items.length === 0 || (items.length < limit && !body.truncated)) break; // truncated: cut by bytes, more below
      before = Math.min(...items.map((n) => n.seq));
    }
    found.sort((a, b) => a.seq - b.seq);
    return { found, unread };
  }

  /**
   * Emits notifications fetched from the inbox (replayed; recovered when they
   * fill a live gap), each id once.
   * @param {Array<{id: string, seq: number, topic: string, data: unknown, created_at: string}>} found
   * @param {boolean} recovered
   */
  _emitFetched(found, recovered) {
    for (const n of found) {
      if (this._seen.has(n.id)) continue;
      this._remember(n.id);
      if (!this.timings.firstNotification) this.timings.firstNotification = now();
      /** @type {Notification} */
      const m = { type: 'notification', id: n.id, seq: n.seq, topic: n.topic, data: n.data, created_at: n.created_at, replayed: true };
      if (recovered) m.recovered = true;
      this._emit('notification', m);
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
