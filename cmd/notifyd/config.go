package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/handlers/ratelimit"
	"github.com/notifyd/notifyd/store"
)

// Config is the server's configuration, read from the environment
// (PROTOCOL.md, Running; README, Configuration).
type Config struct {
	DatabaseURL        string
	Addr               string
	DebugAddr          string
	JWTSecret          string
	APIKey             string
	AllowedOrigins     []string
	PingInterval       time.Duration
	PingTimeout        time.Duration
	ReplayLimit        int
	MaxMessageBytes    int64
	MaxDataBytes       int
	MaxSessionsPerUser int
	MaxBatch           int
	QueueLimit         int
	ShutdownTimeout    time.Duration
	RetentionRead      time.Duration
	RetentionDelivery  time.Duration
	RetentionEvery     time.Duration
	RecordOff          bool // NOTIFY_RECORD=false: no delivery, receipt or session records
	Dev                bool
	LogLevel           string
	// TrustedProxies are the peers whose X-Forwarded-For is believed (NOTIFY_TRUSTED_PROXIES, CIDRs).
	TrustedProxies []netip.Prefix
	// TLSCertFile and TLSKeyFile (NOTIFY_TLS_CERT_FILE, NOTIFY_TLS_KEY_FILE), both or neither,
	// serve HTTPS with HTTP/2 on Addr; the pair is reloaded on SIGHUP and on change (tls.go).
	TLSCertFile, TLSKeyFile string

	// Connection and rate limits (limits.go). Zero values limit nothing.
	ReadTimeout        time.Duration   // NOTIFY_READ_TIMEOUT: an ordinary request's headers and body
	MaxConns           int             // NOTIFY_MAX_CONNS: connections open at once
	MaxConnsPerIP      int             // NOTIFY_MAX_CONNS_PER_IP: connections open at once from one address
	ConnectRatePerUser ratelimit.Limit // NOTIFY_CONNECT_RATE_PER_USER: new sessions of one user
	ConnectRatePerIP   ratelimit.Limit // NOTIFY_CONNECT_RATE_PER_IP: new sessions from one address
	devAddrFrom        string          // the NOTIFY_ADDR dev mode moved to loopback, for the log
	// ReplayMaxBytes bounds the notification data replayed on one connect
	// (NOTIFY_REPLAY_MAX_BYTES); InboxMaxBytes bounds one inbox page's
	// (NOTIFY_INBOX_MAX_BYTES). Each cut is reported to the client (PROTOCOL.md).
	ReplayMaxBytes int
	InboxMaxBytes  int
	// MaxTokenTTL is the longest lifetime a client token may have (NOTIFY_MAX_TOKEN_TTL, 24h).
	MaxTokenTTL time.Duration
	// Metrics says who may read /metrics (NOTIFY_METRICS): "api-key" (the default), "debug" or "public".
	Metrics string
	// NodeID names this node of the cluster (NOTIFY_NODE_ID); empty: Main.Start makes one of the
	// hostname and a random suffix (defaultNodeID), new for every process.
	NodeID string
	// NodeLease is how long the node's lease in Postgres lasts after each renewal (renewed every
	// fifth of it); a node that stops renewing is declared dead after about 1.2 times it.
	NodeLease time.Duration
	// DrainGrace is how long a node keeps serving after SIGTERM with /readyz answering 503,
	// before it ends its sessions; zero skips it. ShutdownTimeout runs after it.
	DrainGrace time.Duration

	// Ack and publish bounds (README, Security).
	AckRate              ratelimit.Limit // NOTIFY_ACK_RATE: ack ids one session may send
	PublishInflightBytes int             // NOTIFY_PUBLISH_MAX_INFLIGHT_BYTES: publish bodies read at once
}

// defaults holds the value of every setting the environment leaves unset; it is the one place
// they are defined. Where a package falls back to its own default for a zero option, the value
// here is that package's constant (store's replay limit and retention ages), or the package's
// constant is the sum of these (realtime.DefaultQueueLimit is QueueLimit + ReplayLimit, the
// frames a session may hold); TestConfigDefaultsAgree checks both.
var defaults = Config{
	DatabaseURL:        "postgres://localhost:5432/notifyd",
	Addr:               ":8080",
	PingInterval:       20 * time.Second,
	PingTimeout:        60 * time.Second,
	ReplayLimit:        store.DefaultReplayLimit,
	MaxMessageBytes:    64 << 10,
	MaxDataBytes:       64 << 10,
	MaxSessionsPerUser: 20,
	MaxBatch:           1000,
	QueueLimit:         256,
	ShutdownTimeout:    10 * time.Second,
	RetentionRead:      store.DefaultRetentionRead,
	RetentionDelivery:  store.DefaultRetentionDeliveries,
	RetentionEvery:     time.Hour,
	LogLevel:           "info",
	ReadTimeout:        30 * time.Second,
	MaxConns:           defaultMaxConns(),
	MaxConnsPerIP:      500,
	ConnectRatePerUser: mustLimit("30/1m,30"),
	ConnectRatePerIP:   mustLimit("10/1s,300"),
	ReplayMaxBytes:     4 << 20,
	InboxMaxBytes:      4 << 20,
	MaxTokenTTL:        DefaultMaxTokenTTL,
	Metrics:            metricsAPIKey,
	NodeLease:          store.DefaultNodeLease,
	DrainGrace:         5 * time.Second,
	// A client acks each notification once: a burst covers a whole replay, the rate far more
	// than live traffic brings.
	AckRate:              mustLimit("100/1s,1000"),
	PublishInflightBytes: 128 << 20,
}

// maxSessionFrames bounds QueueLimit + ReplayLimit, the frames one session may have queued
// (a replay and the live notifications behind it): past a million, a few slow sessions could
// hold gigabytes.
const maxSessionFrames = 1 << 20

// DefaultMaxTokenTTL is NOTIFY_MAX_TOKEN_TTL's default: a day, as long as
// `notifyd token` mints by default, so a leaked token is good for a day at most.
const DefaultMaxTokenTTL = 24 * time.Hour

// Who may read /metrics (NOTIFY_METRICS).
const (
	metricsAPIKey = "api-key" // on the main listener, with the API key as Bearer
	metricsDebug  = "debug"   // only on NOTIFY_DEBUG_ADDR, which must be set
	metricsPublic = "public"  // on the main listener, to anyone
)

// LoadConfig reads the configuration from getenv and reports every missing or
// malformed setting at once.
func LoadConfig(getenv func(string) string) (Config, error) {
	var errs []error
	str := func(name, def string) string {
		if v := strings.TrimSpace(getenv(name)); v != "" {
			return v
		}
		return def
	}
	dur := func(name string, def time.Duration) time.Duration {
		v := getenv(name)
		if v == "" {
			return def
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a positive Go duration such as 20s", name, v))
			return def
		}
		return d
	}
	// durOrZero is dur that also takes 0 (off).
	durOrZero := func(name string, def time.Duration) time.Duration {
		if v := strings.TrimSpace(getenv(name)); v == "0" || v == "0s" {
			return 0
		}
		return dur(name, def)
	}
	num := func(name string, def int) int {
		v := getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a positive integer", name, v))
			return def
		}
		return n
	}
	d := defaults
	c := Config{
		DatabaseURL:        str("DATABASE_URL", d.DatabaseURL),
		Addr:               str("NOTIFY_ADDR", d.Addr),
		DebugAddr:          str("NOTIFY_DEBUG_ADDR", d.DebugAddr),
		TLSCertFile:        str("NOTIFY_TLS_CERT_FILE", d.TLSCertFile),
		TLSKeyFile:         str("NOTIFY_TLS_KEY_FILE", d.TLSKeyFile),
		JWTSecret:          getenv("NOTIFY_JWT_SECRET"),
		APIKey:             getenv("NOTIFY_API_KEY"),
		PingInterval:       dur("NOTIFY_PING_INTERVAL", d.PingInterval),
		PingTimeout:        dur("NOTIFY_PING_TIMEOUT", d.PingTimeout),
		ReplayLimit:        num("NOTIFY_REPLAY_LIMIT", d.ReplayLimit),
		MaxMessageBytes:    int64(num("NOTIFY_MAX_MESSAGE_BYTES", int(d.MaxMessageBytes))),
		MaxDataBytes:       num("NOTIFY_MAX_DATA_BYTES", d.MaxDataBytes),
		MaxSessionsPerUser: num("NOTIFY_MAX_SESSIONS_PER_USER", d.MaxSessionsPerUser),
		MaxBatch:           num("NOTIFY_MAX_BATCH", d.MaxBatch),
		QueueLimit:         num("NOTIFY_QUEUE_LIMIT", d.QueueLimit),
		ShutdownTimeout:    dur("NOTIFY_SHUTDOWN_TIMEOUT", d.ShutdownTimeout),
		RetentionRead:      dur("NOTIFY_RETENTION_READ", d.RetentionRead),
		RetentionDelivery:  dur("NOTIFY_RETENTION_DELIVERIES", d.RetentionDelivery),
		RetentionEvery:     dur("NOTIFY_RETENTION_EVERY", d.RetentionEvery),
		LogLevel:           str("NOTIFY_LOG_LEVEL", d.LogLevel),
		NodeID:             str("NOTIFY_NODE_ID", d.NodeID),
		NodeLease:          dur("NOTIFY_NODE_LEASE", d.NodeLease),
		DrainGrace:         durOrZero("NOTIFY_DRAIN_GRACE", d.DrainGrace),
	}
	if c.NodeID != "" && !store.ValidNodeID(c.NodeID) {
		errs = append(errs, fmt.Errorf("NOTIFY_NODE_ID=%q: want 1 to 64 letters, digits, '.', '_' or '-'", c.NodeID))
	}
	c.ReplayMaxBytes = num("NOTIFY_REPLAY_MAX_BYTES", d.ReplayMaxBytes)
	c.InboxMaxBytes = num("NOTIFY_INBOX_MAX_BYTES", d.InboxMaxBytes)
	if v := getenv("NOTIFY_DEV"); v != "" {
		dev, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("NOTIFY_DEV=%q: want true or false", v))
		}
		c.Dev = dev
	}
	if v := getenv("NOTIFY_RECORD"); v != "" {
		record, err := strconv.ParseBool(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("NOTIFY_RECORD=%q: want true or false", v))
		}
		c.RecordOff = err == nil && !record
	}
	for _, o := range strings.Split(getenv("NOTIFY_ALLOWED_ORIGINS"), ",") {
		if o = strings.TrimSpace(o); o != "" {
			if o != "*" && !strings.HasPrefix(o, "http://") && !strings.HasPrefix(o, "https://") {
				errs = append(errs, fmt.Errorf("NOTIFY_ALLOWED_ORIGINS: %q is not an origin such as https://app.example.com", o))
			}
			c.AllowedOrigins = append(c.AllowedOrigins, o)
		}
	}
	for _, p := range strings.Split(getenv("NOTIFY_TRUSTED_PROXIES"), ",") {
		if p = strings.TrimSpace(p); p != "" {
			prefix, err := netip.ParsePrefix(p)
			if err != nil {
				errs = append(errs, fmt.Errorf("NOTIFY_TRUSTED_PROXIES: %q is not a CIDR such as 10.0.0.0/8", p))
			}
			c.TrustedProxies = append(c.TrustedProxies, prefix.Masked())
		}
	}
	c.MaxTokenTTL = dur("NOTIFY_MAX_TOKEN_TTL", d.MaxTokenTTL)
	c.Metrics = str("NOTIFY_METRICS", d.Metrics)
	switch c.Metrics {
	case metricsAPIKey, metricsPublic:
	case metricsDebug:
		if c.DebugAddr == "" {
			errs = append(errs, errors.New("NOTIFY_METRICS=debug needs NOTIFY_DEBUG_ADDR"))
		}
	default:
		errs = append(errs, fmt.Errorf("NOTIFY_METRICS=%q: want api-key, debug or public", c.Metrics))
	}
	errs = append(errs, c.checkRelations()...)
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("NOTIFY_LOG_LEVEL=%q: want debug, info, warn or error", c.LogLevel))
	}
	if c.Dev {
		c.fillDevSecrets()
	}
	if c.JWTSecret == "" {
		errs = append(errs, errors.New("NOTIFY_JWT_SECRET is required (or NOTIFY_DEV=1 for a development server)"))
	} else if len(c.JWTSecret) < 16 {
		errs = append(errs, errors.New("NOTIFY_JWT_SECRET must be at least 16 characters"))
	}
	if c.APIKey == "" {
		errs = append(errs, errors.New("NOTIFY_API_KEY is required (or NOTIFY_DEV=1 for a development server)"))
	} else if len(c.APIKey) < 16 {
		errs = append(errs, errors.New("NOTIFY_API_KEY must be at least 16 characters"))
	}
	errs = append(errs, loadLimits(getenv, &c)...)
	c.PublishInflightBytes = num("NOTIFY_PUBLISH_MAX_INFLIGHT_BYTES", d.PublishInflightBytes)
	c.AckRate = d.AckRate
	if v := getenv("NOTIFY_ACK_RATE"); v != "" {
		l, err := parseLimit(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("NOTIFY_ACK_RATE=%q: %w", v, err))
		}
		c.AckRate = l
	}
	return c, errors.Join(errs...)
}

// checkRelations reports the settings that are each valid but do not fit together.
func (c Config) checkRelations() []error {
	var errs []error
	if c.PingTimeout <= c.PingInterval {
		errs = append(errs, fmt.Errorf("NOTIFY_PING_TIMEOUT (%s) must be longer than NOTIFY_PING_INTERVAL (%s)", c.PingTimeout, c.PingInterval))
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		errs = append(errs, errors.New("NOTIFY_TLS_CERT_FILE and NOTIFY_TLS_KEY_FILE go together: set both (HTTPS) or neither (HTTP)"))
	}
	if int64(c.QueueLimit)+int64(c.ReplayLimit) > maxSessionFrames {
		errs = append(errs, fmt.Errorf("NOTIFY_QUEUE_LIMIT (%d) + NOTIFY_REPLAY_LIMIT (%d) must be at most %d: together they bound the frames one session holds",
			c.QueueLimit, c.ReplayLimit, maxSessionFrames))
	}
	return errs
}

// metricsAccess is who the API listener serves /metrics to for NOTIFY_METRICS
// (an empty setting is the default, the API key).
func metricsAccess(setting string) handlers.MetricsAccess {
	switch setting {
	case metricsPublic:
		return handlers.MetricsPublic
	case metricsDebug:
		return handlers.MetricsOff
	}
	return handlers.MetricsAPIKey
}

// defaultNodeID is the node id of a process started without NOTIFY_NODE_ID: the hostname (its
// characters a node id cannot hold made '-', cut to leave room) and 6 random hex digits, so
// that two processes on one host, or a restarted container, never share an id.
func defaultNodeID(hostname string) string {
	var b strings.Builder
	for _, r := range hostname {
		if b.Len() == 57 {
			break
		}
		if r < 128 && store.ValidNodeID(string(r)) {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	if b.Len() == 0 {
		b.WriteString("notifyd")
	}
	var suffix [3]byte
	_, _ = rand.Read(suffix[:])
	return b.String() + "-" + hex.EncodeToString(suffix[:])
}
