// Package handlers is notifyd's HTTP surface: the chi router, one file per
// transport (ws.go, sse.go, poll.go), the publisher and operator API, auth and
// the mapping of errors to HTTP. Sessions, presence and sweeping live in
// handlers/realtime and know nothing of HTTP.
package handlers

import (
	"context"
	"io/fs"
	"log/slog"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// Store is what the handlers need of the database.
type Store interface {
	Publish(ctx context.Context, ns []store.NewNotification) ([]store.Published, error)
	PublishOne(ctx context.Context, n store.NewNotification) (store.Published, error)
	Replay(ctx context.Context, user string, after int64, limit, maxBytes int) ([]store.Notification, int64, bool, error)
	MarkRead(ctx context.Context, user string, ids []string, upToSeq int64) ([]string, int64, error)
	Inbox(ctx context.Context, q store.InboxQuery, each func(store.Notification) error) (int64, bool, error)
	Ping(ctx context.Context) error
}

// Recorder takes delivery receipts; it never blocks.
type Recorder interface {
	Acked(a store.Ack)
}

// Limits bound what clients and publishers may send.
type Limits struct {
	// MaxMessageBytes bounds one client message (64 KiB).
	MaxMessageBytes int64
	// MaxDataBytes bounds a notification's data (64 KiB).
	MaxDataBytes int
	// MaxBatch bounds a publish batch or fan-out (1,000).
	MaxBatch int
	// ReplayLimit bounds the notifications replayed on one connect (1,000).
	ReplayLimit int
	// ReplayMaxBytes bounds the notification data replayed on one connect (4 MiB).
	ReplayMaxBytes int
	// InboxMaxBytes bounds the notification data of one inbox page (4 MiB).
	InboxMaxBytes int
	// AckRate bounds the ack ids one session may send (AdmitAcks); zero limits nothing.
	AckRate realtime.AckLimit
	// PublishInflightBytes bounds the bytes of publish bodies read at once (publishBudget);
	// zero bounds nothing.
	PublishInflightBytes int64
}

// Options are what New needs.
type Options struct {
	Hub      *realtime.Hub
	Store    Store
	Recorder Recorder
	Auth     *Auth
	Log      *slog.Logger
	Metrics  *Metrics
	Limits   Limits
	// Static is served at / (the browser client, demo page and dashboard); may be nil.
	Static fs.FS
	// Dev turns on GET /v1/dev/token, which mints tokens for anyone: never in production.
	Dev bool
	// ConnectLimits rate-limit new sessions per user and address; nil limits none.
	ConnectLimits *ConnectLimits
	// Negotiate serves GET/POST /v1/negotiate (learned transport order); nil leaves them out.
	Negotiate *Negotiator
	// MetricsAccess says who may read GET /metrics here (the API key by default).
	MetricsAccess MetricsAccess
	// Draining reports that the node is draining: /readyz answers 503 while everything else is
	// served as before (the grace after SIGTERM); nil never drains.
	Draining func() bool
	// Presence adds the other nodes' sessions to presence, stats and the per-user session cap;
	// nil serves this node's alone.
	Presence Presence
	// Control reaches sessions held by other nodes (kick, resume, messages); nil
	// knows only this node's.
	Control Control
	// Moves carries long-poll sessions between the nodes of a cluster (pollmove.go); nil: a
	// poll naming a session this node does not hold opens a new one.
	Moves *Moves
	// Acks receives the acks other nodes forward for this node's sessions (control.go); nil
	// drops them.
	Acks *Acks
}

// MetricsAccess says who may read GET /metrics on the API listener.
type MetricsAccess int

const (
	// MetricsAPIKey serves /metrics to the API key given as Bearer (the zero value).
	MetricsAPIKey MetricsAccess = iota
	// MetricsPublic serves /metrics to anyone.
	MetricsPublic
	// MetricsOff leaves /metrics out of the router (the debug listener serves it).
	MetricsOff
)

// API holds the dependencies of every handler.
type API struct {
	Options
	// publishBudget bounds the publish bodies in flight (Limits.PublishInflightBytes).
	publishBudget *publishBudget
	// sseStreams serves event streams that cannot be hijacked (HTTP/2).
	sseStreams *sseStreams
}

// New returns the router with every endpoint of PROTOCOL.md.
func New(opt Options) http.Handler {
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	a := &API{Options: opt, publishBudget: &publishBudget{max: opt.Limits.PublishInflightBytes}}
	a.sseStreams = newSSEStreams(a)
	if opt.Metrics != nil {
		opt.Metrics.RegisterPublishBudget(a.publishBudget.used.Load)
	}
	if opt.Acks != nil {
		opt.Acks.attach(a)
	}
	r := chi.NewRouter()
	r.Use(middleware.Recoverer, a.logRequests, noSniff, opt.Auth.Origins)

	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	r.Get("/readyz", a.readyz)
	if opt.Metrics != nil {
		switch opt.MetricsAccess {
		case MetricsAPIKey:
			r.Handle("/metrics", a.publisherOnly(opt.Metrics.Handler()))
		case MetricsPublic:
			r.Handle("/metrics", opt.Metrics.Handler())
		}
	}

	r.Route("/v1", func(r chi.Router) {
		// Streaming transports: no timeout or throttling middleware on them.
		r.Get("/ws", a.serveWS)
		r.Get("/sse", a.serveSSE)
		r.Get("/poll", a.newPoll().serve)
		r.Post("/sessions/{session}/messages", a.postMessages)

		r.Group(func(r chi.Router) {
			r.Use(middleware.NoCache)
			r.Post("/notifications", a.publish)
			r.Get("/users/{user}/notifications", a.inbox)
			r.Post("/users/{user}/read", a.markRead)
			r.Get("/users/{user}/sessions", a.userSessions)
			r.Delete("/sessions/{session}", a.kick)
			r.Get("/stats", a.stats)
			if opt.Dev {
				r.Get("/dev/token", a.devToken)
			}
			if opt.Negotiate != nil {
				r.Get("/negotiate", a.negotiate)
				r.Post("/negotiate", a.reportNegotiate)
			}
		})
	})
	if opt.Static != nil {
		r.Handle("/*", pageHeaders(http.FileServerFS(opt.Static)))
	}
	return r
}

func (a *API) readyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if a.Hub.Closing() || (a.Draining != nil && a.Draining()) {
		writeError(w, errShuttingDown)
		return
	}
	if err := a.Store.Ping(ctx); err != nil {
		a.Log.Warn("readyz: database unreachable", "err", err)
		writeError(w, errUnavailable)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

// publisherOnly serves next to the API key only (401 otherwise).
func (a *API) publisherOnly(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.Auth.Publisher(r) {
			writeError(w, errUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// pageCSP is the Content-Security-Policy of the static pages: scripts,
// styles and connections from this origin only (their scripts are files, never
// inline; style attributes are allowed), and no framing by any page, which
// stops clickjacking of the dashboard.
const pageCSP = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; " +
	"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// pageHeaders adds the security headers of the static pages.
func pageHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", pageCSP)
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("X-Frame-Options", "DENY")
		next.ServeHTTP(w, r)
	})
}

// logRequests logs each request once it ends, without its query string (which
// may carry a token).
func (a *API) logRequests(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.Log.Enabled(r.Context(), slog.LevelDebug) {
			next.ServeHTTP(w, r) // the wrapper and the clock are for the log line alone
			return
		}
		start := time.Now()
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		next.ServeHTTP(ww, r)
		a.Log.LogAttrs(r.Context(), slog.LevelDebug, "http",
			slog.String("method", r.Method), slog.String("path", r.URL.Path),
			slog.Int("status", ww.Status()), slog.Duration("took", time.Since(start)),
			slog.String("remote", r.RemoteAddr))
	})
}
