// Types of notify.js, the browser client of notifyd.

export type Transport = 'websocket' | 'sse' | 'longpoll';
/**
 * The client's state:
 * - `idle`: made with autoConnect false, open() not called yet;
 * - `connecting`: the first pass down the ladder (or, in a tab that follows, waiting for the leading tab);
 * - `connected`: a transport carries the session (in a following tab: the leading tab's);
 * - `reconnecting`: the connection ended; the next pass runs after `delay` ms;
 * - `closed`: close() was called, or the server ended the session for good (kicked, unauthorized).
 */
export type State = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

/**
 * Why a connection ended (a `disconnect`'s reason, a failed attempt's, and
 * the reason of the `reconnecting` state it leads to):
 * the server's `bye` reasons and WebSocket close codes (PROTOCOL.md) `shutdown`, `heartbeat_timeout`,
 * `replaced`, `kicked`, `slow_consumer`, `server_error` (1011), `message_too_big` (1009), `policy` (1008),
 * `closed` (any other close code or bye reason; the message has it); and what the client saw:
 * `connection_lost` (WebSocket 1006), `stream_error` (the EventSource failed), `http_error` (a poll's
 * non-2xx answer other than 401), `unauthorized` (401), `poll_timeout`, `network_error`,
 * `unknown_session` (404 on the messages endpoint), `ping_timeout` (no pong in time).
 */
export type EndReason =
  | 'shutdown' | 'heartbeat_timeout' | 'replaced' | 'kicked' | 'slow_consumer' | 'server_error' | 'message_too_big'
  | 'policy' | 'closed' | 'connection_lost' | 'stream_error' | 'http_error' | 'unauthorized' | 'poll_timeout'
  | 'network_error' | 'unknown_session' | 'ping_timeout';

/**
 * A state event's reason, a closed set an application can branch on (REASONS has each one's text):
 * - `connecting`/`reconnecting` start: `connect` (open()), `retry` (the backoff ran out), `online` (the
 *   browser's online event), `takeover` (this tab took over the shared connection of a tab that closed or froze);
 * - `connected`: `connected` (first time), `reconnected`, `upgrade` (a probe moved it to a better transport);
 * - `reconnecting` after a failure: an EndReason, or `unreachable` (notifyd does not answer GET /readyz),
 *   `all_transports_failed`, `token` (the token function failed), `unauthorized` (with a token function);
 * - `closed`: `client` (close()), `kicked`, `unauthorized` (a fixed token was refused);
 * - `shared`: a tab that follows another tab's connection joined it.
 */
export type Reason =
  | 'connect' | 'retry' | 'online' | 'takeover'
  | 'connected' | 'reconnected' | 'upgrade' | 'shared'
  | EndReason
  | 'unreachable' | 'all_transports_failed' | 'token' | 'client';

/** Why a ladder step or a probe ended: `hello` (it worked), `timeout` (no hello within helloTimeout), `error` (it could not start), or an EndReason. */
export type AttemptReason = 'hello' | 'timeout' | 'error' | EndReason;

export interface Options {
  /** The client JWT, or a function returning a fresh one (called on every (re)connect). */
  token: string | (() => string | Promise<string>);
  /** The ladder steps allowed, best first. Default ['websocket', 'sse', 'longpoll']. */
  transports?: Transport[];
  /** ms a step has to deliver `hello` before it is abandoned. Default 3000. */
  helloTimeout?: number;
  /** Ask GET /v1/negotiate for the learned order and report outcomes. Default true. */
  negotiate?: boolean;
  /**
   * The probe schedule while below the top of the ladder, ms: the first probe for the better
   * transports this long after `synced`, each next one after the next delay while they keep
   * failing (the last repeats), each ±20% jitter. Default [1500, 30000, 120000, 600000] (PROBE_DELAYS).
   */
  probeDelays?: number[];
  /** A fixed interval between probes instead of probeDelays (0: never probe). */
  probeInterval?: number;
  /**
   * Share one connection between the tabs of this browser profile for this server and user
   * (Web Locks and BroadcastChannel): one tab connects, the others follow it. Default true;
   * without those APIs each tab connects on its own.
   */
  share?: boolean;
  /** Reconnect delay bound of the first retry, ms (full jitter, doubling). Default 500. */
  backoffBase?: number;
  /** Largest reconnect delay bound, ms. Default 30000. */
  backoffMax?: number;
  /** Seconds a long-poll waits on the server. Default 25. */
  pollWait?: number;
  /** ms to wait for a pong before the connection counts as dead. Default 10000. */
  pongTimeout?: number;
  /** The highest seq the app already holds (replay starts above it). Default 0. */
  cursor?: number;
  /** Connect at once. Default true. */
  autoConnect?: boolean;
}

export interface Notification {
  type: 'notification';
  id: string;
  seq: number;
  topic: string;
  data: unknown;
  created_at: string;
  /** Sent from the backlog on (re)connect. */
  replayed: boolean;
  /** Fetched from the inbox after a live seq gap. */
  recovered?: boolean;
}

export interface StateEvent {
  state: State;
  transport: Transport | null;
  /** Why, as a code to branch on. */
  reason: Reason;
  /** The human text: 'upgrade from longpoll', 'bye shutdown', 'http_502', ... */
  message: string;
  previous: { state: State; transport: Transport | null };
  /** On 'reconnecting': ms until the next try. */
  delay?: number;
}

export interface ReadEvent {
  ids: string[];
  unread: number;
  /** True when this client asked for it; false when another device (or the API) marked them read. */
  local: boolean;
}

export interface AttemptEvent {
  transport: Transport;
  probe: boolean;
  ok: boolean;
  reason: AttemptReason;
  /** The specifics where there are some: 'http_400', 'closed_4005', 'bye replaced'. */
  detail?: string;
  ms: number;
}

export interface EventMap {
  state: StateEvent;
  connect: { session: string; user: string; transport: Transport; hello: Record<string, unknown> };
  disconnect: { reason: EndReason; message: string; transport: Transport };
  notification: Notification;
  read: ReadEvent;
  unread: number | null;
  synced: { cursor: number; unread: number; truncated: boolean };
  error: { code: string; message: string };
  attempt: AttemptEvent;
}

export declare const TRANSPORTS: Transport[];
/** The default probe schedule (Options.probeDelays). */
export declare const PROBE_DELAYS: number[];
/** The human text of each reason. */
export declare const REASONS: Record<Reason, string>;
/** The wait before probe number step (0: the first after synced) of a schedule, with ±20% jitter; -1 for an empty schedule. */
export declare function probeDelay(delays: number[], step: number, rand?: () => number): number;

export declare class NotifyClient {
  constructor(url: string, options: Options);
  readonly url: string;
  readonly state: State;
  readonly transport: Transport | null;
  readonly session: string | null;
  readonly user: string | null;
  readonly unread: number | null;
  readonly connected: boolean;
  /** True while this tab follows the connection another tab of this browser holds. */
  readonly follower: boolean;
  /** The highest seq held with nothing missing below it. */
  readonly cursor: number;
  /** ms since the page's time origin (performance.now()). */
  readonly timings: { start: number; hello: number; firstNotification: number };
  readonly history: Array<Record<string, unknown>>;
  on<K extends keyof EventMap>(event: K, fn: (arg: EventMap[K]) => void): this;
  off<K extends keyof EventMap>(event: K, fn?: (arg: EventMap[K]) => void): this;
  once<K extends keyof EventMap>(event: K, fn: (arg: EventMap[K]) => void): this;
  open(): this;
  close(): this;
  disconnect(): this;
  markRead(ids: string[]): Promise<{ ids: string[]; unread: number }>;
  markAllRead(): Promise<{ ids: string[]; unread: number }>;
}

export declare function connect(url: string, options: Options): NotifyClient;

declare const notify: { connect: typeof connect; NotifyClient: typeof NotifyClient; TRANSPORTS: Transport[] };
export default notify;
