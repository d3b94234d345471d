// Types of notify.js, the browser client of notifyd.

export type Transport = 'websocket' | 'sse' | 'longpoll';
export type State = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';

export interface Options {
  /** The client JWT, or a function returning a fresh one (called on every (re)connect). */
  token: string | (() => string | Promise<string>);
  /** The ladder steps allowed, best first. Default ['websocket', 'sse', 'longpoll']. */
  transports?: Transport[];
  /** ms a step has to deliver `hello` before it is abandoned. Default 3000. */
  helloTimeout?: number;
  /** Ask GET /v1/negotiate for the learned order and report outcomes. Default true. */
  negotiate?: boolean;
  /** ms between probes for a better transport while on a fallback (0: never). Default 60000. */
  probeInterval?: number;
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
  /** Why: 'connected', 'upgrade from longpoll', 'bye shutdown', 'connection_lost', 'all transports failed', ... */
  reason: string;
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
  /** 'hello', 'timeout', 'connection_lost', 'stream_error', 'unauthorized', ... */
  reason: string;
  ms: number;
}

export interface EventMap {
  state: StateEvent;
  connect: { session: string; user: string; transport: Transport; hello: Record<string, unknown> };
  disconnect: { reason: string; transport: Transport };
  notification: Notification;
  read: ReadEvent;
  unread: number | null;
  synced: { cursor: number; unread: number; truncated: boolean };
  error: { code: string; message: string };
  attempt: AttemptEvent;
}

export declare const TRANSPORTS: Transport[];

export declare class NotifyClient {
  constructor(url: string, options: Options);
  readonly url: string;
  readonly state: State;
  readonly transport: Transport | null;
  readonly session: string | null;
  readonly user: string | null;
  readonly unread: number | null;
  readonly connected: boolean;
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
