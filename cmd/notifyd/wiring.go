package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/static"
	"github.com/notifyd/notifyd/store"
)

// storeSource lets the dispatcher read notifications from the store.
type storeSource struct{ st *store.Store }

func (s storeSource) Fetch(ctx context.Context, rs []realtime.Range) ([]realtime.Notification, error) {
	ranges := make([]store.SeqRange, len(rs))
	for i, r := range rs {
		ranges[i] = store.SeqRange{UserID: r.User, From: r.From, To: r.To}
	}
	ns, err := s.st.Fetch(ctx, ranges)
	return fromStore(ns), err
}

func (s storeSource) After(ctx context.Context, cursors map[string]int64, limit int) ([]realtime.Notification, error) {
	ns, err := s.st.After(ctx, cursors, limit)
	return fromStore(ns), err
}

func fromStore(ns []store.Notification) []realtime.Notification {
	out := make([]realtime.Notification, len(ns))
	for i := range ns {
		out[i] = handlers.FromStore(ns[i])
	}
	return out
}

func toRanges(cs []store.Change) []realtime.Range {
	out := make([]realtime.Range, len(cs))
	for i, c := range cs {
		out[i] = realtime.Range{User: c.UserID, From: c.From, To: c.To}
	}
	return out
}

func sessionStart(s *realtime.Session) store.SessionStart {
	return store.SessionStart{RowID: s.ConnID, SessionID: s.ID, UserID: s.User, Device: s.Device,
		Transport: string(s.Transport), RemoteAddr: s.RemoteAddr, UserAgent: s.UserAgent, ConnectedAt: s.ConnectedAt}
}

// recordDeliveries hands every notification a transport wrote to the recorder.
func recordDeliveries(rec *store.Recorder, s *realtime.Session, frames []realtime.Frame) {
	now := time.Now()
	for i := range frames {
		f := &frames[i]
		if f.Type == realtime.TypeNotification {
			rec.Delivered(store.Delivery{NotificationID: f.ID, UserID: s.User, Seq: f.Seq, SessionID: s.ID, Device: s.Device,
				Transport: string(s.Transport), Replayed: f.Replayed, PublishedAt: f.CreatedAt, At: now})
		}
	}
}

// registerStoreMetrics exposes the recorder's counters.
func registerStoreMetrics(m *handlers.Metrics, st *store.Store, rec *store.Recorder) {
	m.Registry.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_publish_statements_total",
			Help: "Publish statements run (one transaction each, retries included)."},
			func() float64 { return float64(st.Stats().PublishStatements) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_publish_single_total",
			Help: "Single-notification publish requests queued for group commit."},
			func() float64 { return float64(st.Stats().PublishOneCalls) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_publish_groups_total",
			Help: "Group-commit transactions of single-notification publishes (single_total / groups_total is the mean group size)."},
			func() float64 { return float64(st.Stats().PublishOneGroups) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_replay_statements_total",
			Help: "Statements that served connect replays (concurrent connects share one)."},
			func() float64 { return float64(st.Stats().ReplayStatements) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_receipts_dropped_total",
			Help: "Delivery records and receipts dropped because the recorder's buffer was full or Postgres failed."},
			func() float64 { return float64(rec.Dropped()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_receipts_recorded_total",
			Help: "Delivery records and receipts written to Postgres."},
			func() float64 { return float64(rec.Recorded()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_receipts_unmatched_total",
			Help: "Acks that matched no recorded delivery of their session (never sent there, or its record was dropped)."},
			func() float64 { return float64(rec.Unmatched()) }),
	)
}

// publishHook hands what this node publishes to the dispatcher (see
// realtime.Dispatcher.Expect). Repeats of an idempotency key were delivered
// when first stored, and rows that expire are left to the store's filtering.
func publishHook(d *realtime.Dispatcher) store.PublishHook {
	return func(users []string) func([]store.NewNotification, []store.Published) {
		committed := d.Expect(users)
		return func(ns []store.NewNotification, res []store.Published) {
			out := make([]realtime.Notification, 0, len(res))
			for i, p := range res {
				if p.Duplicate || ns[i].ExpiresAt != nil {
					continue
				}
				out = append(out, realtime.Notification{ID: p.ID, User: ns[i].UserID, Seq: p.Seq,
					Topic: ns[i].Topic, Data: ns[i].Data, CreatedAt: p.CreatedAt})
			}
			committed(out)
		}
	}
}

// registerDispatchMetrics exports where dispatched notifications were read from.
func registerDispatchMetrics(m *handlers.Metrics, d *realtime.Dispatcher) {
	for _, src := range []string{"memory", "db"} {
		m.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_dispatched_total",
			Help:        "Live notifications dispatched, by where their rows were read: this node's own publishes in memory, or Postgres.",
			ConstLabels: prometheus.Labels{"source": src}},
			func() float64 {
				st := d.Stats()
				if src == "memory" {
					return float64(st.FromMemory)
				}
				return float64(st.FromDB)
			}))
	}
}

func staticFS() fs.FS { return static.FS }

// printDevBanner tells a developer how to try the server.
func (m *Main) printDevBanner(w io.Writer) {
	auth := handlers.NewAuth(m.Config.JWTSecret, m.Config.APIKey, nil).WithMaxTokenTTL(m.Config.MaxTokenTTL)
	tok, err := auth.NewToken("dev", "cli", 24*time.Hour)
	if err != nil {
		return
	}
	base := "http://" + m.Addr()
	if host, port := splitHostPort(m.Addr()); host == "::" || host == "0.0.0.0" || host == "" {
		base = "http://localhost:" + port
	}
	fmt.Fprintf(w, `
notifyd is running in dev mode on %[1]s
  demo page:   %[1]s/
  dashboard:   %[1]s/dashboard.html
  client token (user "dev", 24h): %[2]s
  API key:     %[3]s
  connect:     websocat '%[4]s/v1/ws?token=%[2]s'
  publish:     curl -s -H 'Authorization: Bearer %[3]s' -H 'Content-Type: application/json' \
                 -d '{"user_id":"dev","topic":"hello","data":{"text":"hi"}}' %[1]s/v1/notifications

`, base, tok, m.Config.APIKey, "ws"+base[4:])
}

// runToken prints a client token signed with NOTIFY_JWT_SECRET.
func runToken(args []string, w io.Writer) error {
	fl := flag.NewFlagSet("token", flag.ContinueOnError)
	user := fl.String("user", "", "user id (the token's sub)")
	device := fl.String("device", "", "device name (optional)")
	ttl := fl.Duration("ttl", 24*time.Hour, "lifetime")
	if err := fl.Parse(args); err != nil {
		return err
	}
	secret := os.Getenv("NOTIFY_JWT_SECRET")
	if secret == "" {
		return fmt.Errorf("NOTIFY_JWT_SECRET is not set")
	}
	if !handlers.ValidUser(*user) {
		return fmt.Errorf("-user must be 1-128 characters of [A-Za-z0-9._:@-]")
	}
	if maxTTL, err := tokenTTLCap(os.Getenv("NOTIFY_MAX_TOKEN_TTL")); err != nil {
		return err
	} else if *ttl > maxTTL {
		return fmt.Errorf("-ttl %s is longer than NOTIFY_MAX_TOKEN_TTL (%s): the server would refuse the token", *ttl, maxTTL)
	}
	tok, err := handlers.NewAuth(secret, "", nil).NewToken(*user, *device, *ttl)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, tok)
	return err
}

// tokenTTLCap reads NOTIFY_MAX_TOKEN_TTL as LoadConfig does.
func tokenTTLCap(v string) (time.Duration, error) {
	if v == "" {
		return DefaultMaxTokenTTL, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("NOTIFY_MAX_TOKEN_TTL=%q: want a positive Go duration such as 24h", v)
	}
	return d, nil
}

func splitHostPort(addr string) (host, port string) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", addr
	}
	return host, port
}
