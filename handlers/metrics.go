package handlers

import (
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/notifyd/notifyd/handlers/connlimit"
	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// Metrics is notifyd's Prometheus registry and the few figures /v1/stats adds. Every metric is
// registered in this file: NewMetrics registers the hub's and the delivery ones, RegisterStore,
// RegisterDispatch, RegisterNode, RegisterLimits and RegisterPublishBudget those of the store,
// the recorder, the dispatcher, the node, the connection and connect limits and the publish
// bodies in flight.
type Metrics struct {
	Registry  *prometheus.Registry
	published prometheus.Counter
	delivered *prometheus.CounterVec
	latency   *prometheus.HistogramVec
	ended     *prometheus.CounterVec
	refused   *prometheus.CounterVec // acks and publishes refused before they cost anything, by kind
	recent    latencyRing
	// byTransport holds each transport's children of delivered and latency, looked up once:
	// WithLabelValues hashes its labels and takes the vector's lock on every call, and Written
	// runs for every write to a client.
	byTransport map[realtime.Transport]transportMetrics
	// node and draining are set by RegisterNode.
	node     string
	draining func() bool
}

// transportMetrics are one transport's children of Metrics' vectors.
type transportMetrics struct {
	latency        prometheus.Observer
	live, replayed prometheus.Counter
}

// NewMetrics registers notifyd's metrics, reading presence from hub.
func NewMetrics(hub *realtime.Hub) *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := &Metrics{Registry: reg,
		published: prometheus.NewCounter(prometheus.CounterOpts{Name: "notifyd_published_total",
			Help: "Notifications committed through the publish API."}),
		delivered: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "notifyd_deliveries_total",
			Help: "Notifications written to a client, by transport and whether replayed."}, []string{"transport", "replayed"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "notifyd_delivery_latency_seconds",
			Help:    "From commit (created_at) to the write of a live notification to its client.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10}}, []string{"transport"}),
		ended: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "notifyd_sessions_ended_total",
			Help: "Sessions ended, by reason."}, []string{"reason"}),
	}
	m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "notifyd_refused_total",
		Help: "Client acks dropped (ack_unknown: never sent to the session or acked already; ack_rate: past NOTIFY_ACK_RATE) and publishes refused (publish_busy: NOTIFY_PUBLISH_MAX_INFLIGHT_BYTES in flight)."},
		[]string{"reason"})
	for _, reason := range []string{"ack_unknown", "ack_rate", "publish_busy"} {
		m.refused.WithLabelValues(reason) // shown from the start, at 0
	}
	reg.MustRegister(m.published, m.delivered, m.latency, m.ended, m.refused)
	m.byTransport = make(map[realtime.Transport]transportMetrics, len(realtime.Transports))
	for _, tr := range realtime.Transports {
		m.byTransport[tr] = m.children(tr)
	}
	for _, tr := range realtime.Transports {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "notifyd_sessions",
			Help: "Live sessions by transport.", ConstLabels: prometheus.Labels{"transport": string(tr)}},
			func() float64 { return float64(hub.Stats().ByTransport[tr]) }))
	}
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "notifyd_users_online", Help: "Users with a live session."},
		func() float64 { return float64(hub.Stats().Users) }))
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_evictions_total",
		Help: "Sessions evicted by the heartbeat sweeper."}, func() float64 { return float64(hub.Stats().Evictions) }))
	return m
}

// StoreStats is what RegisterStore reads of the store: its publish and replay counters, and
// its group commits as they happen.
type StoreStats interface {
	Stats() store.Stats
	SetGroupObserver(store.GroupObserver)
}

// RecorderStats is what RegisterStore reads of the delivery recorder.
type RecorderStats interface {
	Dropped() uint64
	Recorded() uint64
	Unmatched() uint64
}

// DispatchStats is what RegisterDispatch reads of the dispatcher.
type DispatchStats interface {
	Stats() realtime.DispatchStats
}

// groupBuckets are the bounds of the group-commit time histograms, in seconds: fine where a
// group of a healthy database takes (a few ms), so that their percentiles can be read off.
var groupBuckets = []float64{.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .25, .5, 1, 2.5}

// groupMetrics observe the store's group commits (store.GroupObserver).
type groupMetrics struct {
	wait, took, rows prometheus.Histogram
}

func (g *groupMetrics) Queued(wait time.Duration) { g.wait.Observe(wait.Seconds()) }

func (g *groupMetrics) Stored(rows int, took time.Duration) {
	g.took.Observe(took.Seconds())
	g.rows.Observe(float64(rows))
}

// RegisterStore exposes the store's publish and replay counters and the recorder's, and
// observes the store's group commits: how long calls wait for their group, how long a group
// takes and how many rows it holds.
func (m *Metrics) RegisterStore(st StoreStats, rec RecorderStats) {
	g := &groupMetrics{
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "notifyd_publish_queue_wait_seconds",
			Help:    "How long a publish call waited in the group-commit queue before its group started (behind the groups before it).",
			Buckets: groupBuckets}),
		took: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "notifyd_publish_group_seconds",
			Help:    "How long storing one group-commit transaction took: its statement and commit (a retry call by call included).",
			Buckets: groupBuckets}),
		rows: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "notifyd_publish_group_rows",
			Help:    "Rows in one group-commit transaction.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000}}),
	}
	m.Registry.MustRegister(g.wait, g.took, g.rows)
	st.SetGroupObserver(g)
	m.Registry.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_publish_statements_total",
			Help: "Publish statements run (one transaction each, retries included)."},
			func() float64 { return float64(st.Stats().PublishStatements) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_publish_single_total",
			Help: "Single-notification publish requests queued for group commit."},
			func() float64 { return float64(st.Stats().PublishOneCalls) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_publish_groups_total",
			Help: "Group-commit transactions of API publishes, single and batched (under single publishes alone, single_total / groups_total is the mean group size)."},
			func() float64 { return float64(st.Stats().PublishGroups) }),
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

// RegisterPublishBudget exposes the publish body bytes in flight, as inflight
// reads them, beside their bound (NOTIFY_PUBLISH_MAX_INFLIGHT_BYTES).
func (m *Metrics) RegisterPublishBudget(inflight func() int64) {
	m.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "notifyd_publish_inflight_bytes",
		Help: "Bytes of publish bodies admitted and not yet answered (bounded by NOTIFY_PUBLISH_MAX_INFLIGHT_BYTES)."},
		func() float64 { return float64(inflight()) }))
}

// RegisterDispatch exposes where dispatched notifications were read from.
func (m *Metrics) RegisterDispatch(d DispatchStats) {
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

// RegisterNode exposes the node's identity (notifyd_node_info{node="..."} 1, and "node" in
// /v1/stats) and whether it is draining (notifyd_draining, "draining" in /v1/stats). Call it
// before the server serves.
func (m *Metrics) RegisterNode(id string, draining func() bool) {
	m.node, m.draining = id, draining
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "notifyd_node_info",
			Help: "Always 1; its node label is this node's id (NOTIFY_NODE_ID).", ConstLabels: prometheus.Labels{"node": id}},
			func() float64 { return 1 }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "notifyd_draining",
			Help: "1 while the node drains after SIGTERM (/readyz answers 503), else 0."},
			func() float64 {
				if draining() {
					return 1
				}
				return 0
			}),
	)
}

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// Written counts frames a transport wrote, and the latency of live ones.
func (m *Metrics) Written(s *realtime.Session, frames []realtime.Frame) {
	now := time.Now()
	var live, replayed int
	tm, ok := m.byTransport[s.Transport]
	if !ok {
		tm = m.children(s.Transport)
	}
	for i := range frames {
		f := &frames[i]
		if f.Type != realtime.TypeNotification {
			continue
		}
		if f.Replayed {
			replayed++
			continue
		}
		live++
		d := now.Sub(f.CreatedAt)
		tm.latency.Observe(d.Seconds())
		m.recent.add(d)
	}
	if live > 0 {
		tm.live.Add(float64(live))
	}
	if replayed > 0 {
		tm.replayed.Add(float64(replayed))
	}
}

// children looks up tr's children of the delivered and latency vectors.
func (m *Metrics) children(tr realtime.Transport) transportMetrics {
	return transportMetrics{latency: m.latency.WithLabelValues(string(tr)),
		live:     m.delivered.WithLabelValues(string(tr), "false"),
		replayed: m.delivered.WithLabelValues(string(tr), "true")}
}

// acksRefused counts the acks dropped past the session's ack rate (limited)
// and those of ids it was not sent or had acked (unknown). m may be nil.
func (m *Metrics) acksRefused(limited, unknown int) {
	if m == nil {
		return
	}
	if limited > 0 {
		m.refused.WithLabelValues("ack_rate").Add(float64(limited))
	}
	if unknown > 0 {
		m.refused.WithLabelValues("ack_unknown").Add(float64(unknown))
	}
}

// publishBusy counts a publish refused because the publish bodies in flight
// reached their bound. m may be nil.
func (m *Metrics) publishBusy() {
	if m != nil {
		m.refused.WithLabelValues("publish_busy").Inc()
	}
}

// Ended counts a session's end.
func (m *Metrics) Ended(reason realtime.Reason) { m.ended.WithLabelValues(string(reason)).Inc() }

func (m *Metrics) statsExtra() map[string]any {
	p50, p95, p99 := m.recent.percentiles()
	out := map[string]any{
		"latency_ms": map[string]float64{"p50": p50, "p95": p95, "p99": p99},
	}
	if m.draining != nil {
		out["node"], out["draining"] = m.node, m.draining()
	}
	return out
}

// latencyRing keeps the last few thousand live delivery latencies for the
// dashboard's percentiles.
type latencyRing struct {
	mu   sync.Mutex
	buf  [4096]time.Duration
	n, i int
}

func (r *latencyRing) add(d time.Duration) {
	r.mu.Lock()
	r.buf[r.i] = d
	r.i = (r.i + 1) % len(r.buf)
	if r.n < len(r.buf) {
		r.n++
	}
	r.mu.Unlock()
}

func (r *latencyRing) percentiles() (p50, p95, p99 float64) {
	r.mu.Lock()
	xs := slices.Clone(r.buf[:r.n])
	r.mu.Unlock()
	if len(xs) == 0 {
		return 0, 0, 0
	}
	slices.Sort(xs)
	at := func(q float64) float64 {
		return float64(xs[int(q*float64(len(xs)-1))].Microseconds()) / 1000
	}
	return at(.50), at(.95), at(.99)
}

const connRefusedHelp = "Connections refused at accept, by the cap that refused them: max (NOTIFY_MAX_CONNS) or per_ip (NOTIFY_MAX_CONNS_PER_IP)."

// RegisterLimits exports the listener's connection caps and the connect rate limits' counts.
func (m *Metrics) RegisterLimits(ln *connlimit.Listener, cl *ConnectLimits) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "notifyd_connections_open",
			Help: "TCP connections open on the main listener (streams included)."},
			func() float64 { return float64(ln.Stats().Open) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_connections_refused_total",
			Help: connRefusedHelp, ConstLabels: prometheus.Labels{"limit": "max"}},
			func() float64 { return float64(ln.Stats().RefusedMax) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_connections_refused_total",
			Help: connRefusedHelp, ConstLabels: prometheus.Labels{"limit": "per_ip"}},
			func() float64 { return float64(ln.Stats().RefusedPerAddr) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_accept_errors_total",
			Help: "Failed accepts (out of file descriptors and the like), each followed by a pause."},
			func() float64 { return float64(ln.Stats().AcceptErrors) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_connects_refused_total",
			Help: "Connects answered 429 too_many_connects, by the rate limit that refused them.", ConstLabels: prometheus.Labels{"limit": "user"}},
			func() float64 { u, _ := cl.Refused(); return float64(u) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "notifyd_connects_refused_total",
			Help: "Connects answered 429 too_many_connects, by the rate limit that refused them.", ConstLabels: prometheus.Labels{"limit": "ip"}},
			func() float64 { _, a := cl.Refused(); return float64(a) }),
	)
}
