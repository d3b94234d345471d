package main

import (
	"bytes"
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
