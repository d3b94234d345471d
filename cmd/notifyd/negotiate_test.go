package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"

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
