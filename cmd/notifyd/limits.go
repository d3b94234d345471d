package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/time/rate"

	"github.com/notifyd/notifyd/handlers/ratelimit"
)

// fileReserve is what the default connection cap leaves of the file limit
// for Postgres, the debug listener and the rest.
const fileReserve = 1000

// loadLimits reads the connection and rate limits and, in dev mode, keeps
// the listen address on loopback; it returns what is malformed.
func loadLimits(getenv func(string) string, c *Config) []error {
	var errs []error
	c.ReadTimeout = defaults.ReadTimeout
	if v := getenv("NOTIFY_READ_TIMEOUT"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("NOTIFY_READ_TIMEOUT=%q: want a Go duration such as 30s (0 for none)", v))
		}
		c.ReadTimeout = d
	}
	count := func(name string, def int) int {
		v := getenv(name)
		if v == "" {
			return def
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			errs = append(errs, fmt.Errorf("%s=%q: want a whole number (0 for no cap)", name, v))
			return def
		}
		return n
	}
	c.MaxConns = count("NOTIFY_MAX_CONNS", defaults.MaxConns)
	c.MaxConnsPerIP = count("NOTIFY_MAX_CONNS_PER_IP", defaults.MaxConnsPerIP)
	limit := func(name string, def ratelimit.Limit) ratelimit.Limit {
		v := getenv(name)
		if v == "" {
			return def
		}
		l, err := parseLimit(v)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: %w", name, v, err))
		}
		return l
	}
	c.ConnectRatePerUser = limit("NOTIFY_CONNECT_RATE_PER_USER", defaults.ConnectRatePerUser)
	c.ConnectRatePerIP = limit("NOTIFY_CONNECT_RATE_PER_IP", defaults.ConnectRatePerIP)
	if c.Dev {
		addr, err := devAddr(c.Addr)
		if err != nil {
			errs = append(errs, err)
		} else if addr != c.Addr {
			c.devAddrFrom, c.Addr = c.Addr, addr
		}
	}
	return errs
}

// defaultMaxConns is the file limit less fileReserve (19,000 for a limit of
// 20,000), and never less than half the limit.
func defaultMaxConns() int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur == 0 || lim.Cur > 1<<24 {
		return 0
	}
	n := int(lim.Cur)
	return max(n-fileReserve, n/2)
}

// mustLimit is parseLimit for the defaults table's literals.
func mustLimit(v string) ratelimit.Limit {
	l, err := parseLimit(v)
	if err != nil {
		panic(err)
	}
	return l
}

// parseLimit reads "N/PERIOD,BURST" (30/1m,30 is 30 a minute, 30 at once;
// without BURST it is N) or "off" (no limit).
func parseLimit(v string) (ratelimit.Limit, error) {
	if v == "off" || v == "0" {
		return ratelimit.Limit{}, nil
	}
	bad := errors.New("want N/PERIOD,BURST such as 30/1m,30, or off")
	spec, burstText, hasBurst := strings.Cut(v, ",")
	nText, periodText, ok := strings.Cut(spec, "/")
	if !ok {
		return ratelimit.Limit{}, bad
	}
	n, err := strconv.Atoi(strings.TrimSpace(nText))
	if err != nil || n <= 0 {
		return ratelimit.Limit{}, bad
	}
	period, err := time.ParseDuration(strings.TrimSpace(periodText))
	if err != nil || period <= 0 {
		return ratelimit.Limit{}, bad
	}
	burst := n
	if hasBurst {
		if burst, err = strconv.Atoi(strings.TrimSpace(burstText)); err != nil || burst <= 0 {
			return ratelimit.Limit{}, bad
		}
	}
	return ratelimit.Limit{Rate: rate.Limit(float64(n) / period.Seconds()), Burst: burst}, nil
}

// devAddr keeps a dev server on loopback: a wildcard NOTIFY_ADDR (":8080",
// "0.0.0.0:8080", "[::]:8080") becomes 127.0.0.1 on its port; any other
// address that is not loopback is refused. A dev server mints tokens for any
// user and shows its API key to whoever asks.
func devAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("NOTIFY_ADDR=%q: want host:port", addr)
	}
	if host == "localhost" {
		return addr, nil
	}
	ip, err := netip.ParseAddr(host)
	switch {
	case host == "" || err == nil && ip.IsUnspecified():
		return net.JoinHostPort("127.0.0.1", port), nil
	case err == nil && ip.IsLoopback():
		return addr, nil
	}
	return "", fmt.Errorf("NOTIFY_ADDR=%q: NOTIFY_DEV=1 serves on loopback only (it mints tokens for any user); use 127.0.0.1:%s, or run without NOTIFY_DEV", addr, port)
}

// isLoopback reports whether a is a loopback address.
func isLoopback(a net.Addr) bool {
	tcp, ok := a.(*net.TCPAddr)
	return ok && tcp.IP.IsLoopback()
}

// exemptProxies is the connection cap's exemption: peers inside trusted
// carry many clients, and are capped only by the global cap.
func exemptProxies(trusted []netip.Prefix) func(netip.Addr) bool {
	if len(trusted) == 0 {
		return nil
	}
	return func(a netip.Addr) bool {
		for _, p := range trusted {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}
}
