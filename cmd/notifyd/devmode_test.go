package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store/storetest"
)

// Dev mode, which mints tokens for anyone, listens on loopback only: a
// wildcard address is moved to 127.0.0.1, any other address is refused.
func TestDevModeLoopbackOnly(t *testing.T) {
	for addr, want := range map[string]string{":8080": "127.0.0.1:8080", "0.0.0.0:9000": "127.0.0.1:9000", "[::]:9000": "127.0.0.1:9000",
		"127.0.0.1:8080": "127.0.0.1:8080", "localhost:8080": "localhost:8080", "[::1]:8080": "[::1]:8080"} {
		c, err := LoadConfig(env("NOTIFY_DEV", "1", "NOTIFY_ADDR", addr))
		if err != nil || c.Addr != want {
			t.Errorf("NOTIFY_ADDR=%s in dev mode: %q, %v; want %s", addr, c.Addr, err, want)
		}
	}
	for _, addr := range []string{"10.0.0.5:8080", "example.com:8080"} {
		if _, err := LoadConfig(env("NOTIFY_DEV", "1", "NOTIFY_ADDR", addr)); err == nil || !strings.Contains(err.Error(), "loopback only") {
			t.Errorf("NOTIFY_ADDR=%s in dev mode: %v; want refused", addr, err)
		}
	}
	if c, err := LoadConfig(env("NOTIFY_ADDR", ":8080")); err != nil || c.Addr != ":8080" {
		t.Errorf("production keeps NOTIFY_ADDR: %q, %v", c.Addr, err)
	}
	// A Main given a wildcard address in dev mode does not start.
	cfg := testConfig(storetest.URL(t))
	cfg.Dev, cfg.Addr = true, "0.0.0.0:0"
	m := &Main{Config: cfg, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Start(ctx); err == nil {
		_ = m.Close(ctx)
		t.Fatal("a dev server started on 0.0.0.0")
	} else if !strings.Contains(err.Error(), "loopback only") {
		t.Errorf("dev server on 0.0.0.0: %v", err)
	}
}

// A DNS-rebinding page (its own domain pointed at this server) is refused:
// with no allow-list, Origin matching Host is not enough for a host name.
// The server's own page, by its address, is accepted.
func TestDNSRebindingOriginRefused(t *testing.T) {
	ts := startServer(t)
	tok := ts.token(t, "victim")
	for _, c := range []struct {
		host string
		want int
	}{{"evil.example:" + strings.Split(ts.Addr(), ":")[1], http.StatusForbidden}, {ts.Addr(), http.StatusOK}} {
		req, _ := http.NewRequest(http.MethodGet, ts.URL+"/v1/poll?wait=0", nil)
		req.Host = c.host
		req.Header.Set("Origin", "http://"+c.host)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("Host and Origin %s: %d, want %d", c.host, resp.StatusCode, c.want)
		}
	}
}
