// Command notifyd is the notification server. `notifyd` serves (configured by
// the environment, see README); `notifyd token -user U` prints a client token;
// `notifyd report [--since 24h] [--format table|csv|json]` prints the delivery report.
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
		case "serve":
			args = args[1:]
		}
	}
	if len(args) > 0 {
		return fmt.Errorf("unknown command %q (want serve, token or report)", args[0])
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
	st, err := store.Open(ctx, cfg.DatabaseURL, store.Options{})
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

	dispatcher := realtime.NewDispatcher(m.hub, storeSource{st}, log, cfg.ReplayLimit)
	metrics.RegisterDispatch(dispatcher)
	// Rows published through the API are delivered from memory when their
	// commit signal comes, without reading them back.
	st.SetPublishHook(publishHook(dispatcher))
	ready := make(chan struct{})
	listener := st.NewListener(log)
	m.goBackground(func() {
		_ = listener.Run(bg, func() { close(ready) },
			func(cs []store.Change) { dispatcher.Changes(toRanges(cs)) },
			dispatcher.CatchUp)
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
	m.goBackground(func() { m.hub.Run(bg) })
	m.goBackground(func() { m.recorder.Run(bg) })
	m.startRetention(ctx, bg)

	static := m.Static
	if static == nil {
		static = staticFS()
	}
	handler := handlers.New(handlers.Options{
		Hub: m.hub, Store: st, Recorder: receiptRecorder(m.recorder, cfg.RecordOff), Log: log, Metrics: metrics, Dev: cfg.Dev, Static: static,
		Auth: handlers.NewAuth(cfg.JWTSecret, cfg.APIKey, cfg.AllowedOrigins),
		Limits: handlers.Limits{MaxMessageBytes: cfg.MaxMessageBytes, MaxDataBytes: cfg.MaxDataBytes,
			MaxBatch: cfg.MaxBatch, ReplayLimit: cfg.ReplayLimit},
		Negotiate: handlers.NewNegotiator(st.Pool(), cfg.TrustedProxies),
		Draining:  m.draining.Load,
	})
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		cancel()
		m.abortNode()
		st.Close()
		return fmt.Errorf("listen on %s: %w", cfg.Addr, err)
	}
	m.ln = ln
	// No WriteTimeout: it would cut streams. Per-request deadlines are set by
	// the handlers that need them.
	m.srv = &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 120 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	go func() { _ = m.srv.Serve(ln) }()
	if cfg.DebugAddr != "" {
		m.startDebug(cfg.DebugAddr)
	}
	log.Info("notifyd listening", "addr", ln.Addr().String(), "dev", cfg.Dev)
	return nil
}

func (m *Main) goBackground(fn func()) {
	m.background.Add(1)
	go func() {
		defer m.background.Done()
		fn()
	}()
}

// startDebug serves pprof on its own listener (off unless NOTIFY_DEBUG_ADDR is set).
func (m *Main) startDebug(addr string) {
	mux := http.NewServeMux()
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
