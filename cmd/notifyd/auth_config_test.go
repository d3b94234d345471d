package main

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestTokenCommandRefusesLongTTL: `notifyd token` refuses a -ttl longer than
// NOTIFY_MAX_TOKEN_TTL (the server would refuse the token). Failed before the
// fix: any lifetime was minted.
func TestTokenCommandRefusesLongTTL(t *testing.T) {
	t.Setenv("NOTIFY_JWT_SECRET", testSecret)
	var out bytes.Buffer
	if err := runToken([]string{"-user", "alice", "-ttl", "8760h"}, &out); err == nil || !strings.Contains(err.Error(), "NOTIFY_MAX_TOKEN_TTL") {
		t.Fatalf("-ttl 8760h with the default cap: err = %v, printed %q", err, out.String())
	}
	if err := runToken([]string{"-user", "alice", "-ttl", "24h"}, &out); err != nil || out.Len() == 0 {
		t.Fatalf("-ttl 24h: %v", err)
	}
	t.Setenv("NOTIFY_MAX_TOKEN_TTL", "1h")
	if err := runToken([]string{"-user", "alice", "-ttl", "2h"}, &out); err == nil {
		t.Fatal("-ttl 2h with NOTIFY_MAX_TOKEN_TTL=1h was minted")
	}
}

// TestConfigMetricsAndTokenTTL: NOTIFY_METRICS and NOTIFY_MAX_TOKEN_TTL
// defaults and checks.
func TestConfigMetricsAndTokenTTL(t *testing.T) {
	env := map[string]string{"NOTIFY_JWT_SECRET": testSecret, "NOTIFY_API_KEY": testAPIKey}
	get := func(name string) string { return env[name] }
	c, err := LoadConfig(get)
	if err != nil || c.Metrics != metricsAPIKey || c.MaxTokenTTL != 24*time.Hour {
		t.Fatalf("defaults: metrics %q, max token ttl %s, err %v", c.Metrics, c.MaxTokenTTL, err)
	}
	env["NOTIFY_METRICS"] = "debug"
	if _, err := LoadConfig(get); err == nil || !strings.Contains(err.Error(), "NOTIFY_DEBUG_ADDR") {
		t.Fatalf("NOTIFY_METRICS=debug without a debug listener: %v", err)
	}
	env["NOTIFY_DEBUG_ADDR"] = "127.0.0.1:0"
	if _, err := LoadConfig(get); err != nil {
		t.Fatalf("NOTIFY_METRICS=debug: %v", err)
	}
	env["NOTIFY_METRICS"] = "everyone"
	env["NOTIFY_MAX_TOKEN_TTL"] = "forever"
	_, err = LoadConfig(get)
	if err == nil || !strings.Contains(err.Error(), "NOTIFY_METRICS") || !strings.Contains(err.Error(), "NOTIFY_MAX_TOKEN_TTL") {
		t.Fatalf("bad settings: %v", err)
	}
}

// TestMetricsListeners: by default /metrics answers the API key only; with
// NOTIFY_METRICS=debug only the debug listener serves it. Failed before the
// fix: the main listener served it to anyone.
func TestMetricsListeners(t *testing.T) {
	get := func(url, bearer string) int {
		t.Helper()
		req, err := http.NewRequest("GET", url, nil)
		if err != nil {
			t.Fatal(err)
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	ts := startServer(t)
	if st := get(ts.URL+"/metrics", ""); st != http.StatusUnauthorized {
		t.Fatalf("default, anonymous: %d, want 401", st)
	}
	if st := get(ts.URL+"/metrics", testAPIKey); st != http.StatusOK {
		t.Fatalf("default, with the API key: %d, want 200", st)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0") // a free port for the debug listener
	if err != nil {
		t.Fatal(err)
	}
	debugAddr := ln.Addr().String()
	ln.Close()
	dbg := startServer(t, func(c *Config) { c.Metrics, c.DebugAddr = metricsDebug, debugAddr })
	if st := get(dbg.URL+"/metrics", testAPIKey); st != http.StatusNotFound {
		t.Fatalf("debug mode, main listener: %d, want 404", st)
	}
	waitFor(t, 5*time.Second, "the debug listener serves /metrics", func() (bool, string) {
		st := get("http://"+debugAddr+"/metrics", "")
		return st == http.StatusOK, fmt.Sprintf("status %d", st)
	})
}
