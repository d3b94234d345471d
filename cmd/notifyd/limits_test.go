package main

import (
	"strings"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/notifyd/notifyd/handlers/ratelimit"
)

func TestLimitsDefaults(t *testing.T) {
	c, err := LoadConfig(env())
	if err != nil {
		t.Fatal(err)
	}
	if c.ReadTimeout != 30*time.Second || c.MaxConnsPerIP != 500 {
		t.Errorf("read timeout %s, per-IP cap %d; want 30s, 500", c.ReadTimeout, c.MaxConnsPerIP)
	}
	if c.MaxConns <= 0 {
		t.Errorf("MaxConns %d; want a cap below the file limit", c.MaxConns)
	}
	if c.ConnectRatePerUser != (ratelimit.Limit{Rate: 0.5, Burst: 30}) || c.ConnectRatePerIP != (ratelimit.Limit{Rate: 10, Burst: 300}) {
		t.Errorf("rates %+v %+v", c.ConnectRatePerUser, c.ConnectRatePerIP)
	}
	c, err = LoadConfig(env("NOTIFY_MAX_CONNS", "0", "NOTIFY_MAX_CONNS_PER_IP", "0", "NOTIFY_READ_TIMEOUT", "0",
		"NOTIFY_CONNECT_RATE_PER_USER", "off", "NOTIFY_CONNECT_RATE_PER_IP", "5/1s"))
	if err != nil {
		t.Fatal(err)
	}
	if c.MaxConns != 0 || c.MaxConnsPerIP != 0 || c.ReadTimeout != 0 || !c.ConnectRatePerUser.Off() ||
		c.ConnectRatePerIP != (ratelimit.Limit{Rate: rate.Limit(5), Burst: 5}) {
		t.Errorf("0 and off: %+v", c)
	}
}

func TestLimitsMalformed(t *testing.T) {
	_, err := LoadConfig(env("NOTIFY_MAX_CONNS", "-1", "NOTIFY_READ_TIMEOUT", "soon",
		"NOTIFY_CONNECT_RATE_PER_USER", "30", "NOTIFY_CONNECT_RATE_PER_IP", "1/1s,0"))
	for _, name := range []string{"NOTIFY_MAX_CONNS=", "NOTIFY_READ_TIMEOUT=", "NOTIFY_CONNECT_RATE_PER_USER=", "NOTIFY_CONNECT_RATE_PER_IP="} {
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("error %v does not name %s", err, name)
		}
	}
}
