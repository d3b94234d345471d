package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers"
)

const (
	uaChrome  = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
	uaFirefox = "Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0"
)

type negotiated struct {
	Order          []string `json:"order"`
	Learned        bool     `json:"learned"`
	Network        string   `json:"network"`
	Browser        string   `json:"browser"`
	PingIntervalMs int64    `json:"ping_interval_ms"`
	PingTimeoutMs  int64    `json:"ping_timeout_ms"`
}

// negotiateReq sends a /v1/negotiate request with a User-Agent and an
// optional X-Forwarded-For; it returns the status and the body.
func negotiateReq(t *testing.T, ts *testServer, method, token, ua, xff string, body string) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, ts.URL+"/v1/negotiate", rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("User-Agent", ua)
	if xff != "" {
		req.Header.Set("X-Forwarded-For", xff)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, raw
}

func getOrder(t *testing.T, ts *testServer, token, ua, xff string) negotiated {
	t.Helper()
	st, raw := negotiateReq(t, ts, "GET", token, ua, xff, "")
	if st != http.StatusOK {
		t.Fatalf("GET /v1/negotiate: %d %s", st, raw)
	}
	var n negotiated
	if err := json.Unmarshal(raw, &n); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	return n
}

// TestNegotiateLearnsOrder: outcomes reported from one network and browser
// family reorder the answer for that network and family only; X-Forwarded-For
// counts only from a trusted proxy.
func TestNegotiateLearnsOrder(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) {
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	})
	tok := ts.token(t, "alice")

	if st, _ := negotiateReq(t, ts, "GET", "", uaChrome, "", ""); st != http.StatusUnauthorized {
		t.Fatalf("no token: %d, want 401", st)
	}
	if st, _ := negotiateReq(t, ts, "POST", "", uaChrome, "", `{"transport":"sse","ok":true}`); st != http.StatusUnauthorized {
		t.Fatalf("POST without token: %d, want 401", st)
	}

	n := getOrder(t, ts, tok, uaChrome, "203.0.113.9")
	want := []string{"websocket", "sse", "longpoll"}
	if !slices.Equal(n.Order, want) || n.Learned || n.Network != "203.0.113.0/24" || n.Browser != "chrome" ||
		n.PingIntervalMs != 20000 || n.PingTimeoutMs != 60000 {
		t.Fatalf("fresh answer = %+v", n)
	}

	// Behind a proxy that blocks WebSocket and buffers streams.
	report := `[{"transport":"websocket","ok":false,"reason":"error"},{"transport":"sse","ok":false,"reason":"timeout"},{"transport":"longpoll","ok":true}]`
	if st, raw := negotiateReq(t, ts, "POST", tok, uaChrome, "203.0.113.77", report); st != http.StatusNoContent {
		t.Fatalf("report: %d %s", st, raw)
	}
	n = getOrder(t, ts, tok, uaChrome, "203.0.113.200")
	if want := []string{"longpoll", "websocket", "sse"}; !slices.Equal(n.Order, want) || !n.Learned {
		t.Fatalf("learned answer = %+v, want order %v", n, want)
	}
	// Another browser family, another network, or a spoofed X-Forwarded-For
	// through an untrusted hop: nothing learned.
	if n := getOrder(t, ts, tok, uaFirefox, "203.0.113.200"); n.Learned || n.Browser != "firefox" || n.Order[0] != "websocket" {
		t.Fatalf("firefox answer = %+v", n)
	}
	if n := getOrder(t, ts, tok, uaChrome, "198.51.100.1"); n.Learned || n.Order[0] != "websocket" {
		t.Fatalf("other network answer = %+v", n)
	}
	if n := getOrder(t, ts, tok, uaChrome, "203.0.113.5, 192.0.2.1"); n.Network != "192.0.2.0/24" || n.Learned {
		t.Fatalf("rightmost untrusted hop should count: %+v", n)
	}

	// A single outcome object; SSE now works there: it moves ahead of WebSocket, which last failed.
	if st, raw := negotiateReq(t, ts, "POST", tok, uaChrome, "203.0.113.1", `{"transport":"sse","ok":true,"reason":""}`); st != http.StatusNoContent {
		t.Fatalf("report: %d %s", st, raw)
	}
	if n := getOrder(t, ts, tok, uaChrome, "203.0.113.1"); !slices.Equal(n.Order, []string{"sse", "longpoll", "websocket"}) {
		t.Fatalf("after sse success: %+v", n)
	}
	// WebSocket works again later: the latest outcome wins.
	if st, _ := negotiateReq(t, ts, "POST", tok, uaChrome, "203.0.113.1", `{"transport":"websocket","ok":true}`); st != http.StatusNoContent {
		t.Fatalf("report: %d", st)
	}
	if n := getOrder(t, ts, tok, uaChrome, "203.0.113.1"); !slices.Equal(n.Order, want) {
		t.Fatalf("after websocket success: %+v", n)
	}

	for _, body := range []string{`{"transport":"carrier-pigeon","ok":true}`, `[]`, `nope`, `[{"transport":"sse"},{"transport":"sse"},{"transport":"sse"},{"transport":"sse"},{"transport":"sse"},{"transport":"sse"},{"transport":"sse"},{"transport":"sse"},{"transport":"sse"}]`} {
		if st, _ := negotiateReq(t, ts, "POST", tok, uaChrome, "", body); st != http.StatusBadRequest {
			t.Fatalf("body %s: %d, want 400", body, st)
		}
	}
}

// TestNegotiateIgnoresForwardedFromUntrustedPeer: without trusted proxies the
// peer address is the client, whatever X-Forwarded-For says.
func TestNegotiateIgnoresForwardedFromUntrustedPeer(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	n := getOrder(t, ts, ts.token(t, "bob"), uaChrome, "203.0.113.9")
	if n.Network != "127.0.0.0/24" {
		t.Fatalf("network = %q, want the peer's 127.0.0.0/24", n.Network)
	}
	if st, _ := negotiateReq(t, ts, "POST", ts.token(t, "bob"), uaChrome, "203.0.113.9", `{"transport":"websocket","ok":false,"reason":"timeout"}`); st != http.StatusNoContent {
		t.Fatalf("report: %d", st)
	}
	if n := getOrder(t, ts, ts.token(t, "bob"), uaChrome, ""); !slices.Equal(n.Order, []string{"sse", "longpoll", "websocket"}) {
		t.Fatalf("order = %v", n.Order)
	}
}

func TestNetworkPrefixAndBrowserFamily(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"192.0.2.77":               "192.0.2.0/24",
		"2001:db8:abcd:12::1":      "2001:db8:abcd::/48",
		"::ffff:198.51.100.3":      "198.51.100.0/24",
		"fe80::1%eth0":             "fe80::/48",
		"2001:db8:ffff:ffff::abcd": "2001:db8:ffff::/48",
	} {
		a := netip.MustParseAddr(in).Unmap()
		if got := handlers.NetworkPrefix(a).String(); got != want {
			t.Errorf("NetworkPrefix(%s) = %s, want %s", in, got, want)
		}
	}
	if got := handlers.NetworkPrefix(netip.Addr{}).String(); got != "0.0.0.0/0" {
		t.Errorf("NetworkPrefix(invalid) = %s", got)
	}
	for ua, want := range map[string]string{
		uaChrome:  "chrome",
		uaFirefox: "firefox",
		"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/140.0.0.0 Safari/537.36 Edg/140.0.0.0": "edge",
		"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.0 Safari/605.1.15":            "safari",
		"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/156.0.0.0 Safari/537.36":                 "chrome",
		"curl/8.0": "other",
	} {
		if got := handlers.BrowserFamily(ua); got != want {
			t.Errorf("BrowserFamily(%q) = %s, want %s", ua, got, want)
		}
	}
}

// deliverAndAck publishes one notification to user's live session c and
// acknowledges it as the browser client does.
func deliverAndAck(t *testing.T, ts *testServer, c transportClient, user string) {
	t.Helper()
	ts.publish(t, user, "negotiate.probe", map[string]any{"n": 1})
	m := c.expect(t, "notification")
	c.send(t, map[string]any{"type": "ack", "ids": []string{m.ID}})
}

// waitSeen waits until the server has recorded n sessions it saw deliver.
func waitSeen(t *testing.T, ts *testServer, n int64) {
	t.Helper()
	waitFor(t, 10*time.Second, "server observations", func() (bool, string) {
		got := ts.scalar(t, "SELECT count(*) FROM transport_observations WHERE source = 'server'")
		return got == n, fmt.Sprintf("%d recorded, want %d", got, n)
	})
}

// TestNegotiateOneUserCannotFlipOrder: one user's 500 reports that WebSocket
// fails neither outvote another user's single report nor override what the
// server saw other users' WebSocket sessions deliver, and past a small burst
// they are refused with 429 and Retry-After. Failed before the fix: the
// newest report won and every report was taken.
func TestNegotiateOneUserCannotFlipOrder(t *testing.T) {
	ts := startServer(t, func(c *Config) {
		c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	})
	want := []string{"websocket", "sse", "longpoll"}
	flood := func(network string) {
		t.Helper()
		tok := ts.token(t, "mallory")
		limited := 0
		for range 500 {
			st, _ := negotiateReq(t, ts, "POST", tok, uaChrome, network, `[{"transport":"websocket","ok":false,"reason":"timeout"},{"transport":"sse","ok":true}]`)
			switch st {
			case http.StatusNoContent:
			case http.StatusTooManyRequests:
				limited++
			default:
				t.Fatalf("report: %d", st)
			}
		}
		if limited < 490 {
			t.Fatalf("%d of 500 reports refused with 429, want all but a small burst", limited)
		}
	}

	// Reports only: alice saw WebSocket work once; mallory's flood is one vote against it.
	if st, _ := negotiateReq(t, ts, "POST", ts.token(t, "alice"), uaChrome, "198.51.100.7", `{"transport":"websocket","ok":true}`); st != http.StatusNoContent {
		t.Fatalf("alice's report: %d", st)
	}
	flood("198.51.100.8")
	if n := getOrder(t, ts, ts.token(t, "alice"), uaChrome, "198.51.100.9"); !slices.Equal(n.Order, want) {
		t.Fatalf("after one user's flood: order %v, want %v", n.Order, want)
	}
	req, _ := http.NewRequest("POST", ts.URL+"/v1/negotiate", strings.NewReader(`{"transport":"sse","ok":true}`))
	req.Header.Set("Authorization", "Bearer "+ts.token(t, "mallory"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("limited report: %d, Retry-After %q", resp.StatusCode, resp.Header.Get("Retry-After"))
	}

	// What the server saw: carol's and dave's WebSocket sessions delivered (the
	// sessions come from 127.0.0.1, which X-Forwarded-For leaves as 127.0.0.0/24).
	for _, u := range []string{"carol", "dave"} {
		deliverAndAck(t, ts, ts.liveWS(t, u), u)
	}
	waitSeen(t, ts, 2)
	for i := range 3 {
		u := fmt.Sprintf("sybil-%d", i)
		if st, _ := negotiateReq(t, ts, "POST", ts.token(t, u), "", "", `{"transport":"websocket","ok":false,"reason":"timeout"}`); st != http.StatusNoContent {
			t.Fatalf("%s's report: %d", u, st)
		}
	}
	if n := getOrder(t, ts, ts.token(t, "carol"), "", ""); !slices.Equal(n.Order, want) || !n.Learned || n.Network != "127.0.0.0/24" {
		t.Fatalf("reports against what the server saw: %+v, want order %v", n, want)
	}
}

// TestNegotiateLearnsFromDeliveredSessions: the order follows the transports
// the server saw distinct users' sessions reach hello and deliver over (the
// client acknowledged a notification), over a client's report. Failed before
// the fix: the server's own sessions taught it nothing.
func TestNegotiateLearnsFromDeliveredSessions(t *testing.T) {
	ts := startServer(t)
	if st, _ := negotiateReq(t, ts, "POST", ts.token(t, "zed"), "", "", `{"transport":"websocket","ok":false,"reason":"timeout"}`); st != http.StatusNoContent {
		t.Fatalf("report: %d", st)
	}
	if n := getOrder(t, ts, ts.token(t, "zed"), "", ""); !slices.Equal(n.Order, []string{"sse", "longpoll", "websocket"}) {
		t.Fatalf("after zed's report: %v", n.Order)
	}
	// An unacknowledged session teaches nothing.
	silent := ts.liveWS(t, "quiet")
	ts.publish(t, "quiet", "negotiate.probe", map[string]any{"n": 1})
	silent.expect(t, "notification")
	for _, u := range []string{"ann", "ben"} {
		deliverAndAck(t, ts, ts.liveWS(t, u), u)
	}
	waitSeen(t, ts, 2)
	if n := getOrder(t, ts, ts.token(t, "zed"), "", ""); !slices.Equal(n.Order, []string{"websocket", "sse", "longpoll"}) || !n.Learned {
		t.Fatalf("after two delivered WebSocket sessions: %+v", n)
	}

	// Another server, whose clients all arrive over SSE and long-poll: those go first.
	ts2 := startServer(t)
	for _, u := range []string{"cat", "dan"} {
		c := ts2.dialSSE(t, u, nil, nil)
		hello(t, c, "sse", u)
		c.expect(t, "synced")
		deliverAndAck(t, ts2, c, u)
	}
	p := ts2.dialPoll(t, "eve", url.Values{"wait": {"1"}})
	hello(t, p, "longpoll", "eve")
	p.expect(t, "synced")
	ts2.publish(t, "eve", "negotiate.probe", map[string]any{"n": 1})
	p.expect(t, "notification") // the next poll carries its cursor: the ack
	waitSeen(t, ts2, 3)
	if n := getOrder(t, ts2, ts2.token(t, "eve"), "", ""); !slices.Equal(n.Order, []string{"sse", "longpoll", "websocket"}) || !n.Learned {
		t.Fatalf("after delivered SSE and long-poll sessions: %+v", n)
	}
}
