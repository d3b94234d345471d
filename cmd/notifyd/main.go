// Command notifyd is the notification server. `notifyd` serves (configured by
// the environment, see README); `notifyd token -user U` prints a client token;
// `notifyd report [--since 24h] [--format table|csv|json]` prints the delivery report;
// `notifyd tail -user U [-cursor N] [-url URL]` prints what one user receives, live.
package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/handlers/connlimit"
	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "notifyd:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) > 0 {
		switch args[0] {
		case "token":
			return runToken(args[1:], os.Stdout)
		case "report":
			return runReport(ctx, args[1:], os.Getenv, os.Stdout)
		case "tail":
			return runTail(ctx, args[1:], os.Getenv, os.Stdout)
		case "serve":
			args = args[1:]
		}
	}
	if len(args) > 0 {
		return fmt.Errorf("unknown command %q (want serve, token, report or tail)", args[0])
	}
	cfg, err := LoadConfig(os.Getenv)
	if err != nil {
		return fmt.Errorf("configuration:\n%w", err)
	}
	m := &Main{Config: cfg, Log: newLogger(cfg)}
	if err := m.Start(ctx); err != nil {
		return err
	}
	if cfg.Dev {
		m.printDevBanner(os.Stdout)
	}
	<-ctx.Done()
	// A second SIGTERM or SIGINT cuts the grace short.
	again := make(chan os.Signal, 1)
	signal.Notify(again, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(again)
	m.Drain(cfg.DrainGrace)
	select {
	case <-time.After(cfg.DrainGrace):
	case <-again:
		m.Log.Info("second signal: the drain grace is cut short")
	}
	m.Log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	return m.Close(sctx)
}

func newLogger(cfg Config) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Dev {
		return slog.New(slog.NewTextHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts))
}

// Main is the whole server, startable on ":0" by tests.
type Main struct {
	Config Config
	Log    *slog.Logger
	// Static overrides the embedded static files (tests); nil uses them.
	Static fs.FS

	store      *store.Store
	node       *store.Node
	draining   atomic.Bool
	recorder   *store.Recorder
	hub        *realtime.Hub
	srv        *http.Server
	debugSrv   *http.Server
	ln         net.Listener
	conns      *connlimit.Listener // ln, with the connection caps
	certs      *certReloader       // the TLS certificate; nil when serving plain HTTP
	cancel     context.CancelFunc
	background sync.WaitGroup
}

// Start connects to Postgres (creating the database if missing), applies the
// migrations, registers the node (its lease, then the close of its own leftover
// session history), starts listening for commits, the sweeper, the recorder and
// the HTTP server. It returns once the server accepts connections. The node id
// (Config.NodeID, made when empty) is on every log line of m.Log from here on.
func (m *Main) Start(ctx context.Context) error {
	if m.Config.NodeID == "" {
		host, _ := os.Hostname()
		m.Config.NodeID = defaultNodeID(host)
	}
	m.Log = m.Log.With("node", m.Config.NodeID)
	cfg, log := m.Config, m.Log
	if err := store.EnsureDatabase(ctx, cfg.DatabaseURL); err != nil {
		return fmt.Errorf("database: %w", err)
	}
	st, err := store.Open(ctx, cfg.DatabaseURL, store.Options{MaxConns: int32(cfg.DBMaxConns)})
	if err != nil {
		return fmt.Errorf("database: %w", err)
	}
	m.store = st
	if err := st.Migrate(ctx); err != nil {
		st.Close()
		return fmt.Errorf("migrations: %w", err)
	}
	// The lease first: from here on no other node takes this node's rows for a dead node's.
	node, err := st.NewNode(store.NodeOptions{ID: cfg.NodeID, Addr: cfg.Addr, Lease: cfg.NodeLease, Log: log})
	if err == nil {
		err = node.Start(ctx)
	}
	if err != nil {
		st.Close()
		return fmt.Errorf("node: %w", err)
	}
	m.node = node
	if n, err := st.EndStaleSessions(ctx, cfg.NodeID, "restart"); err != nil {
		log.Warn("could not close the history of sessions left by an earlier run", "err", err)
	} else if n > 0 {
		log.Info("closed the history of sessions left by an earlier run", "sessions", n)
	}

	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	m.cancel = cancel
	m.recorder = store.NewRecorder(st, log, store.RecorderOptions{NodeID: cfg.NodeID})
	var metrics *handlers.Metrics
	m.hub = realtime.NewHub(realtime.Config{
		PingInterval: cfg.PingInterval, PingTimeout: cfg.PingTimeout,
		MaxSessionsPerUser: cfg.MaxSessionsPerUser, QueueLimit: cfg.QueueLimit + cfg.ReplayLimit,
	}, realtime.Hooks{
		Started: func(s *realtime.Session) {
			if !cfg.RecordOff {
				m.recorder.SessionStarted(sessionStart(s))
			}
		},
		Ended: func(s *realtime.Session, reason realtime.Reason) {
			if !cfg.RecordOff {
				m.recorder.SessionEnded(store.SessionEnd{RowID: s.ConnID, LastSeen: s.LastSeen(), EndedAt: time.Now(), Reason: string(reason)})
			}
			metrics.Ended(reason)
		},
		Written: func(s *realtime.Session, frames []realtime.Frame) {
			if !cfg.RecordOff {
				recordDeliveries(m.recorder, s, frames)
			}
			metrics.Written(s, frames)
		},
	})
	metrics = handlers.NewMetrics(m.hub)
	metrics.RegisterStore(st, m.recorder)
	metrics.RegisterNode(cfg.NodeID, m.draining.Load)

	// The publish path: a publish (handlers/publish.go) stores its rows
	// (store/publish.go), telling the dispatcher before and after through the
	// publish hook; the commit's NOTIFY reaches the listener
	// (store/listener.go), whose ranges the dispatcher
	// (handlers/realtime/dispatch.go) serves from those rows in memory, or
	// reads back from the store, and hands to the hub.
	dispatcher := realtime.NewDispatcher(m.hub, st, log, cfg.ReplayLimit)
	metrics.RegisterDispatch(dispatcher)
	st.SetPublishHook(dispatcher.Expect)
	ready := make(chan struct{})
	listener := st.NewListener(log)
	// Control across nodes (store/control.go, handlers/realtime/control.go):
	// reads (the read trigger's NOTIFYs), kicks, replaces and touches of the
	// control channel are applied to this node's sessions; reads go through
	// the dispatcher's queue to keep their commit order. Long-poll moves
	// (handlers/pollmove.go) travel on the same channel and go to the
	// long-poll transport; acks posted through another node go to the
	// handlers, which admit them as local acks (handlers/control.go).
	control := st.NewControl(log)
	moves := &handlers.Moves{Send: control.Move}
	acks := &handlers.Acks{}
	applier := realtime.NewControl(m.hub, dispatcher, st, log)
	applier.OnMove = moves.Received
	applier.OnAck = acks.Received
	listener.OnControl = applier.Apply
	m.goBackground(func() {
		_ = listener.Run(bg, func() { close(ready) }, dispatcher.Changes, dispatcher.CatchUp)
	})
	select {
	case <-ready:
	case <-time.After(15 * time.Second):
		cancel()
		m.abortNode()
		st.Close()
		return errors.New("database: LISTEN did not start within 15s")
	case <-ctx.Done():
		cancel()
		m.abortNode()
		st.Close()
		return ctx.Err()
	}
	m.goBackground(func() { dispatcher.Run(bg) })
	m.goBackground(func() { control.Run(bg) })
	m.goBackground(func() { m.hub.Run(bg) })
	m.goBackground(func() { m.recorder.Run(bg) })
	m.startRetention(ctx, bg)

	static := m.Static
	if static == nil {
		static = staticFS()
	}
	// Cluster-wide presence reads the other nodes' session history, which only recording writes.
	var presence handlers.Presence
	if !cfg.RecordOff {
		presence = node.Presence()
	}
	connectLimits := handlers.NewConnectLimits(cfg.ConnectRatePerUser, cfg.ConnectRatePerIP, cfg.TrustedProxies)
	handler := handlers.New(handlers.Options{
		Hub: m.hub, Store: st, Recorder: receiptRecorder(m.recorder, cfg.RecordOff), Log: log, Metrics: metrics, Dev: cfg.Dev, Static: static,
		Auth: handlers.NewAuth(cfg.JWTSecret, cfg.APIKey, cfg.AllowedOrigins).WithMaxTokenTTL(cfg.MaxTokenTTL),
		Limits: handlers.Limits{MaxMessageBytes: cfg.MaxMessageBytes, MaxDataBytes: cfg.MaxDataBytes,
			MaxBatch: cfg.MaxBatch, ReplayLimit: cfg.ReplayLimit,
			ReplayMaxBytes: cfg.ReplayMaxBytes, InboxMaxBytes: cfg.InboxMaxBytes,
			PublishInflightBytes: int64(cfg.PublishInflightBytes),
			AckRate:              realtime.AckLimit{Rate: cfg.AckRate.Rate, Burst: cfg.AckRate.Burst}},
		Negotiate:     handlers.NewNegotiator(st, cfg.TrustedProxies, log),
		ConnectLimits: connectLimits,
		MetricsAccess: metricsAccess(cfg.Metrics),
		Draining:      m.draining.Load,
		Presence:      presence,
		Control:       control,
		Moves:         moves,
		Acks:          acks,
	})
	if cfg.TLSCertFile != "" {
		if m.certs, err = newCertReloader(cfg.TLSCertFile, cfg.TLSKeyFile, log); err != nil {
			cancel()
			st.Close()
			return err
		}
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		cancel()
		m.abortNode()
		st.Close()
		return fmt.Errorf("listen on %s: %w", cfg.Addr, err)
	}
	if cfg.Dev && !isLoopback(ln.Addr()) {
		ln.Close()
		cancel()
		st.Close()
		return fmt.Errorf("dev mode serves on loopback only, not %s (it mints tokens for any user)", ln.Addr())
	}
	conns := connlimit.Wrap(ln, connlimit.Options{Max: cfg.MaxConns, PerAddr: cfg.MaxConnsPerIP,
		Exempt: exemptProxies(cfg.TrustedProxies), Log: log})
	metrics.RegisterLimits(conns, connectLimits)
	m.ln, m.conns = conns, conns
	// ReadTimeout bounds an ordinary request's headers and body (a client
	// that declares a body and never sends it is cut off). Streams take the
	// connection over and clear its deadlines (hijack; gorilla's Upgrade). No
	// WriteTimeout: it would cut streams; their writes carry deadlines of
	// their own.
	headerTimeout := 10 * time.Second
	if cfg.ReadTimeout > 0 {
		headerTimeout = min(headerTimeout, cfg.ReadTimeout)
	}
	m.srv = &http.Server{Handler: handler, ReadHeaderTimeout: headerTimeout, ReadTimeout: cfg.ReadTimeout,
		IdleTimeout: 120 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	if m.certs != nil {
		// TLS goes on top of the connection caps, so a refused connection
		// costs no handshake; ALPN picks HTTP/2 or HTTP/1.1 (tls.go).
		m.srv.TLSConfig = tlsConfig(m.certs)
		m.goBackground(func() { m.certs.watch(bg) })
		go func() { _ = m.srv.ServeTLS(conns, "", "") }()
	} else {
		go func() { _ = m.srv.Serve(conns) }()
	}
	if cfg.DebugAddr != "" {
		var debugMetrics http.Handler
		if cfg.Metrics == metricsDebug {
			debugMetrics = metrics.Handler()
		}
		m.startDebug(cfg.DebugAddr, debugMetrics)
	}
	log.Info("notifyd listening", "addr", ln.Addr().String(), "tls", m.certs != nil, "dev", cfg.Dev,
		"max_conns", cfg.MaxConns, "max_conns_per_ip", cfg.MaxConnsPerIP, "read_timeout", cfg.ReadTimeout)
	if cfg.Dev {
		log.Warn("DEV MODE: anyone who can reach this server gets tokens for any user (/v1/dev/token) and the API key; it listens on loopback only",
			"addr", ln.Addr().String(), "moved_from", cfg.devAddrFrom)
	}
	if len(cfg.AllowedOrigins) == 0 {
		log.Warn("NOTIFY_ALLOWED_ORIGINS is empty: browsers are accepted only from pages served by this server under an IP address or localhost; list your pages' origins")
	}
	return nil
}

func (m *Main) goBackground(fn func()) {
	m.background.Add(1)
	go func() {
		defer m.background.Done()
		fn()
	}()
}

// startDebug serves pprof, and /metrics when metrics is not nil, on its own
// listener (off unless NOTIFY_DEBUG_ADDR is set).
func (m *Main) startDebug(addr string, metrics http.Handler) {
	mux := http.NewServeMux()
	if metrics != nil {
		mux.Handle("/metrics", metrics)
	}
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	m.debugSrv = &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := m.debugSrv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.Log.Error("debug listener", "err", err)
		}
	}()
}

// receiptRecorder is what the handlers record acks with: none when recording is off.
func receiptRecorder(rec *store.Recorder, off bool) handlers.Recorder {
	if off {
		return nil
	}
	return rec
}

// startRetention makes sure today's delivery partitions exist, then runs a retention pass now
// and every Config.RetentionEvery until the server closes.
func (m *Main) startRetention(ctx, bg context.Context) {
	cfg := m.Config
	now := time.Now()
	if _, err := m.store.EnsureDeliveryPartitions(ctx, now.AddDate(0, 0, -1), now.AddDate(0, 0, store.DefaultPartitionsAhead)); err != nil {
		m.Log.Warn("could not make the delivery partitions ahead; the recorder makes them on demand", "err", err)
	}
	every := cfg.RetentionEvery
	if every <= 0 {
		every = defaults.RetentionEvery
	}
	opt := store.RetentionOptions{ReadAge: cfg.RetentionRead, DeliveryAge: cfg.RetentionDelivery}
	m.goBackground(func() { m.store.RunRetention(bg, every, opt, m.Log) })
}

// abortNode stops the node of a Start that failed (its row goes, like on a clean stop).
func (m *Main) abortNode() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := m.node.Stop(ctx); err != nil {
		m.Log.Warn("could not remove the node's row; it goes once its lease lapses", "err", err)
	}
}

// Drain begins a shutdown that load balancers see: /readyz answers 503 and the node's row is
// marked draining, while every other request (new connects and publishes included) is served
// as before. Close ends the drain; run waits Config.DrainGrace between the two, so that health
// checks notice before the listener closes.
func (m *Main) Drain(grace time.Duration) {
	if m.draining.Swap(true) {
		return
	}
	m.Log.Info("draining: /readyz answers 503, still serving", "grace", grace)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := m.node.Drain(ctx); err != nil {
		m.Log.Warn("could not mark the node draining", "err", err)
	}
}

// NodeID is the node's id (NOTIFY_NODE_ID, or the one Start made).
func (m *Main) NodeID() string { return m.Config.NodeID }

// Addr is the address the server listens on.
func (m *Main) Addr() string { return m.ln.Addr().String() }

// Close drains the server: new connections are refused, every session gets
// `bye shutdown`, in-flight requests (publishes) finish, queued publishes and
// delivery records are flushed, the node's row is removed, then the database
// is closed.
func (m *Main) Close(ctx context.Context) error {
	var errs []error
	if err := m.hub.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("sessions: %w", err))
	}
	if err := m.srv.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("http: %w", err))
	}
	if m.debugSrv != nil {
		_ = m.debugSrv.Close()
	}
	m.cancel()
	m.background.Wait()
	if err := m.recorder.Close(ctx); err != nil {
		errs = append(errs, fmt.Errorf("recorder: %w", err))
	}
	if err := m.node.Stop(ctx); err != nil {
		errs = append(errs, fmt.Errorf("node: %w", err))
	}
	m.store.Close()
	return errors.Join(errs...)
}
