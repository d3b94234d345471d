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
	// MaxTokenTTL is the longest lifetime a client token may have (NOTIFY_MAX_TOKEN_TTL, 24h).
	MaxTokenTTL time.Duration
	// Metrics says who may read /metrics (NOTIFY_METRICS): "api-key" (the default), "debug" or "public".
	Metrics string
}

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
	c := Config{
		DatabaseURL:        str("DATABASE_URL", "postgres://localhost:5432/notifyd"),
		Addr:               str("NOTIFY_ADDR", ":8080"),
		DebugAddr:          str("NOTIFY_DEBUG_ADDR", ""),
		JWTSecret:          getenv("NOTIFY_JWT_SECRET"),
		APIKey:             getenv("NOTIFY_API_KEY"),
		PingInterval:       dur("NOTIFY_PING_INTERVAL", 20*time.Second),
		PingTimeout:        dur("NOTIFY_PING_TIMEOUT", 60*time.Second),
		ReplayLimit:        num("NOTIFY_REPLAY_LIMIT", 1000),
		MaxMessageBytes:    int64(num("NOTIFY_MAX_MESSAGE_BYTES", 64<<10)),
		MaxDataBytes:       num("NOTIFY_MAX_DATA_BYTES", 64<<10),
		MaxSessionsPerUser: num("NOTIFY_MAX_SESSIONS_PER_USER", 20),
		MaxBatch:           num("NOTIFY_MAX_BATCH", 1000),
		QueueLimit:         num("NOTIFY_QUEUE_LIMIT", 256),
		ShutdownTimeout:    dur("NOTIFY_SHUTDOWN_TIMEOUT", 10*time.Second),
		RetentionRead:      dur("NOTIFY_RETENTION_READ", 30*24*time.Hour),
		RetentionDelivery:  dur("NOTIFY_RETENTION_DELIVERIES", 30*24*time.Hour),
		RetentionEvery:     dur("NOTIFY_RETENTION_EVERY", time.Hour),
		LogLevel:           str("NOTIFY_LOG_LEVEL", "info"),
	}
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
	c.MaxTokenTTL = dur("NOTIFY_MAX_TOKEN_TTL", DefaultMaxTokenTTL)
	c.Metrics = str("NOTIFY_METRICS", metricsAPIKey)
	switch c.Metrics {
	case metricsAPIKey, metricsPublic:
	case metricsDebug:
		if c.DebugAddr == "" {
			errs = append(errs, errors.New("NOTIFY_METRICS=debug needs NOTIFY_DEBUG_ADDR"))
		}
	default:
		errs = append(errs, fmt.Errorf("NOTIFY_METRICS=%q: want api-key, debug or public", c.Metrics))
	}
	if c.PingTimeout <= c.PingInterval {
		errs = append(errs, fmt.Errorf("NOTIFY_PING_TIMEOUT (%s) must be longer than NOTIFY_PING_INTERVAL (%s)", c.PingTimeout, c.PingInterval))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("NOTIFY_LOG_LEVEL=%q: want debug, info, warn or error", c.LogLevel))
	}
	if c.Dev {
		if c.JWTSecret == "" {
			c.JWTSecret = randomHex(32)
		}
		if c.APIKey == "" {
			c.APIKey = "dev-" + randomHex(16)
		}
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
	return c, errors.Join(errs...)
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

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
