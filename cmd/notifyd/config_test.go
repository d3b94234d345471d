package main

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// env makes a getenv from pairs, with the two required secrets set unless overridden.
func env(kv ...string) func(string) string {
	m := map[string]string{"NOTIFY_JWT_SECRET": testSecret, "NOTIFY_API_KEY": testAPIKey}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

// An environment that sets only the secrets gives the defaults.
func TestConfigDefaults(t *testing.T) {
	c, err := LoadConfig(env())
	if err != nil {
		t.Fatal(err)
	}
	want := defaults
	want.JWTSecret, want.APIKey = testSecret, testAPIKey
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("config = %+v\nwant     %+v", c, want)
	}
}

// The defaults of the packages' own zero-value fallbacks are the server's.
func TestConfigDefaultsAgree(t *testing.T) {
	if defaults.ReplayLimit != store.DefaultReplayLimit {
		t.Errorf("replay limit %d, store's %d", defaults.ReplayLimit, store.DefaultReplayLimit)
	}
	if got := defaults.QueueLimit + defaults.ReplayLimit; got != realtime.DefaultQueueLimit {
		t.Errorf("queue limit + replay limit = %d, the hub's default queue limit %d", got, realtime.DefaultQueueLimit)
	}
	if defaults.RetentionRead != store.DefaultRetentionRead || defaults.RetentionDelivery != store.DefaultRetentionDeliveries {
		t.Errorf("retention %s/%s, store's %s/%s", defaults.RetentionRead, defaults.RetentionDelivery,
			store.DefaultRetentionRead, store.DefaultRetentionDeliveries)
	}
	if defaults.NodeLease != store.DefaultNodeLease {
		t.Errorf("node lease %s, store's %s", defaults.NodeLease, store.DefaultNodeLease)
	}
	// haproxy checks every 2 s by default, and a balancer takes one failed check or more.
	if defaults.DrainGrace < 3*time.Second {
		t.Errorf("drain grace %s: want more than a usual health check interval and its answer", defaults.DrainGrace)
	}
	if err := errorsOf(defaults.checkRelations()); err != "" {
		t.Errorf("the defaults do not fit together: %s", err)
	}
}

func errorsOf(errs []error) string {
	var b strings.Builder
	for _, e := range errs {
		b.WriteString(e.Error() + "; ")
	}
	return b.String()
}

func TestConfigLoad(t *testing.T) {
	tests := []struct {
		name string
		env  func(string) string
		want []string // substrings of the error; none means no error
		ok   func(Config) bool
	}{
		{name: "settings read", env: env("NOTIFY_PING_INTERVAL", "5s", "NOTIFY_PING_TIMEOUT", "6s", "NOTIFY_QUEUE_LIMIT", "10",
			"NOTIFY_REPLAY_LIMIT", "20", "NOTIFY_RECORD", "false", "NOTIFY_ALLOWED_ORIGINS", "https://a.example, *",
			"NOTIFY_TRUSTED_PROXIES", "10.1.2.3/8", "NOTIFY_LOG_LEVEL", "debug"),
			ok: func(c Config) bool {
				return c.PingInterval == 5*time.Second && c.PingTimeout == 6*time.Second && c.QueueLimit == 10 &&
					c.ReplayLimit == 20 && c.RecordOff && reflect.DeepEqual(c.AllowedOrigins, []string{"https://a.example", "*"}) &&
					len(c.TrustedProxies) == 1 && c.TrustedProxies[0].String() == "10.0.0.0/8" && c.LogLevel == "debug"
			}},
		{name: "node settings read", env: env("NOTIFY_NODE_ID", "web-1.eu", "NOTIFY_NODE_LEASE", "4s", "NOTIFY_DRAIN_GRACE", "250ms"),
			ok: func(c Config) bool {
				return c.NodeID == "web-1.eu" && c.NodeLease == 4*time.Second && c.DrainGrace == 250*time.Millisecond
			}},
		{name: "drain grace off", env: env("NOTIFY_DRAIN_GRACE", "0"), ok: func(c Config) bool { return c.DrainGrace == 0 }},
		{name: "bad node id", env: env("NOTIFY_NODE_ID", "web 1"), want: []string{`NOTIFY_NODE_ID="web 1": want 1 to 64`}},
		{name: "negative drain grace", env: env("NOTIFY_DRAIN_GRACE", "-1s"), want: []string{`NOTIFY_DRAIN_GRACE="-1s"`}},
		{name: "frames at the bound", env: env("NOTIFY_QUEUE_LIMIT", "1048000", "NOTIFY_REPLAY_LIMIT", "576"),
			ok: func(c Config) bool { return c.QueueLimit+c.ReplayLimit == maxSessionFrames }},
		{name: "dev makes secrets", env: env("NOTIFY_DEV", "1", "NOTIFY_JWT_SECRET", "", "NOTIFY_API_KEY", ""),
			ok: func(c Config) bool {
				return c.Dev && len(c.JWTSecret) == 64 && strings.HasPrefix(c.APIKey, "dev-") && len(c.APIKey) == 36
			}},
		{name: "dev keeps given secrets", env: env("NOTIFY_DEV", "true"),
			ok: func(c Config) bool { return c.Dev && c.JWTSecret == testSecret && c.APIKey == testAPIKey }},
		{name: "secrets missing", env: env("NOTIFY_JWT_SECRET", "", "NOTIFY_API_KEY", ""),
			want: []string{"NOTIFY_JWT_SECRET is required", "NOTIFY_API_KEY is required"}},
		{name: "secrets short", env: env("NOTIFY_JWT_SECRET", "short", "NOTIFY_API_KEY", "short"),
			want: []string{"NOTIFY_JWT_SECRET must be at least 16", "NOTIFY_API_KEY must be at least 16"}},
		{name: "bad duration", env: env("NOTIFY_PING_INTERVAL", "soon"), want: []string{`NOTIFY_PING_INTERVAL="soon": want a positive Go duration`}},
		{name: "zero duration", env: env("NOTIFY_SHUTDOWN_TIMEOUT", "0s"), want: []string{`NOTIFY_SHUTDOWN_TIMEOUT="0s"`}},
		{name: "bad integer", env: env("NOTIFY_MAX_BATCH", "many"), want: []string{`NOTIFY_MAX_BATCH="many": want a positive integer`}},
		{name: "negative integer", env: env("NOTIFY_REPLAY_LIMIT", "-1"), want: []string{`NOTIFY_REPLAY_LIMIT="-1"`}},
		{name: "bad bool", env: env("NOTIFY_DEV", "yes please", "NOTIFY_RECORD", "maybe"),
			want: []string{`NOTIFY_DEV="yes please": want true or false`, `NOTIFY_RECORD="maybe": want true or false`}},
		{name: "bad origin", env: env("NOTIFY_ALLOWED_ORIGINS", "app.example.com"), want: []string{`NOTIFY_ALLOWED_ORIGINS: "app.example.com" is not an origin`}},
		{name: "bad proxy", env: env("NOTIFY_TRUSTED_PROXIES", "10.0.0.1"), want: []string{`NOTIFY_TRUSTED_PROXIES: "10.0.0.1" is not a CIDR`}},
		{name: "bad log level", env: env("NOTIFY_LOG_LEVEL", "loud"), want: []string{`NOTIFY_LOG_LEVEL="loud"`}},
		{name: "ping timeout equal to interval", env: env("NOTIFY_PING_INTERVAL", "30s", "NOTIFY_PING_TIMEOUT", "30s"),
			want: []string{"NOTIFY_PING_TIMEOUT (30s) must be longer than NOTIFY_PING_INTERVAL (30s)"}},
		{name: "ping interval past the default timeout", env: env("NOTIFY_PING_INTERVAL", "2m"),
			want: []string{"NOTIFY_PING_TIMEOUT (1m0s) must be longer than NOTIFY_PING_INTERVAL (2m0s)"}},
		{name: "frames past the bound", env: env("NOTIFY_QUEUE_LIMIT", "1048000", "NOTIFY_REPLAY_LIMIT", "577"),
			want: []string{"NOTIFY_QUEUE_LIMIT (1048000) + NOTIFY_REPLAY_LIMIT (577) must be at most 1048576"}},
		{name: "every error at once", env: env("NOTIFY_MAX_BATCH", "x", "NOTIFY_PING_TIMEOUT", "1s", "NOTIFY_API_KEY", ""),
			want: []string{"NOTIFY_MAX_BATCH", "NOTIFY_PING_TIMEOUT (1s) must be longer", "NOTIFY_API_KEY is required"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := LoadConfig(tt.env)
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("error: %v", err)
				}
				if !tt.ok(c) {
					t.Fatalf("config = %+v", c)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error; config = %+v", c)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if n := len(strings.Split(err.Error(), "\n")); n != len(tt.want) {
				t.Errorf("%d errors, want %d: %v", n, len(tt.want), err)
			}
		})
	}
}

// A node id made from the hostname is valid whatever the hostname holds, and differs per process.
func TestDefaultNodeID(t *testing.T) {
	for _, host := range []string{"web-1", "ip-10-0-0-1.eu-west-1.compute.internal", "", "naïve host/1",
		strings.Repeat("h", 300)} {
		a, b := defaultNodeID(host), defaultNodeID(host)
		if !store.ValidNodeID(a) || !store.ValidNodeID(b) || a == b {
			t.Errorf("defaultNodeID(%q) = %q, %q: want two different valid ids", host, a, b)
		}
	}
	if id := defaultNodeID("web-1"); !strings.HasPrefix(id, "web-1-") || len(id) != len("web-1-")+6 {
		t.Errorf("defaultNodeID(web-1) = %q, want web-1-<6 hex digits>", id)
	}
}
