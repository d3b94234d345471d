package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers/ratelimit"
)

// rawRequest opens a TCP connection from local (an address of 127/8, or ""
// for any) to ts and writes head, a request without its body.
func rawRequest(t *testing.T, ts *testServer, local, head string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(local)}
	}
	conn, err := d.Dial("tcp", ts.Addr())
	if err != nil {
		t.Fatalf("dial from %s: %v", local, err)
	}
	t.Cleanup(func() { conn.Close() })
	if head != "" {
		if _, err := conn.Write([]byte(head)); err != nil {
			t.Fatalf("write request: %v", err)
		}
	}
	return conn
}

// readUntilClosed reads conn until the server closes it and returns what it
// read; it fails the test when the server keeps it open past guard.
func readUntilClosed(t *testing.T, conn net.Conn, guard time.Duration) []byte {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(guard))
	var got bytes.Buffer
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the server kept the connection open for %s (read so far: %q)", guard, got.String())
			}
			return got.Bytes()
		}
	}
}

// A client that writes into its SSE stream is disconnected and its session
// ends, instead of the server reading its bytes one system call at a time.
func TestSSEClientWritingIsDisconnected(t *testing.T) {
	ts := startServer(t)
	conn := rawRequest(t, ts, "", fmt.Sprintf("GET /v1/sse?token=%s HTTP/1.1\r\nHost: x\r\n\r\n", ts.token(t, "writer")))
	br := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	status, err := br.ReadString('\n')
	if err != nil || !strings.Contains(status, " 200 ") {
		t.Fatalf("SSE answer %q, %v; want 200", status, err)
	}
	waitFor(t, 10*time.Second, "the SSE session to be live", func() (bool, string) {
		n := ts.hub.Stats().Sessions
		return n == 1, fmt.Sprintf("%d sessions", n)
	})
	go func() {
		junk := bytes.Repeat([]byte("x"), 64<<10)
		for range 64 { // 4 MiB, unless the server hangs up first
			if _, err := conn.Write(junk); err != nil {
				return
			}
		}
	}()
	readUntilClosed(t, conn, 10*time.Second)
	waitFor(t, 10*time.Second, "the SSE session to end", func() (bool, string) {
		n := ts.hub.Stats().Sessions
		return n == 0, fmt.Sprintf("%d sessions", n)
	})
}

// status sends a request with Connection: close from local and returns the
// answer's status (0 when the connection is closed with no answer).
func status(t *testing.T, ts *testServer, local, method, path string) int {
	t.Helper()
	conn := rawRequest(t, ts, local, method+" "+path+" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// waitOpen waits until the server holds n connections.
func waitOpen(t *testing.T, ts *testServer, n int64) {
	t.Helper()
	waitFor(t, 10*time.Second, fmt.Sprintf("%d open connections", n), func() (bool, string) {
		got := ts.conns.Stats().Open
		return got == n, fmt.Sprintf("%d open", got)
	})
}

// Requests that declare a body and never send it are cut off by the read
// timeout; meanwhile the per-address cap refuses one address's extra
// connections (other clients' /healthz still answers) and the global cap
// refuses everything past it; once the slow clients are cut, /healthz
// answers again. Without the read timeout the slow connections stay open
// for good.
func TestSlowBodiesAreCutAndConnectionsCapped(t *testing.T) {
	ts := startServer(t, func(c *Config) {
		c.ReadTimeout = 500 * time.Millisecond
		c.MaxConns, c.MaxConnsPerIP = 8, 5
	})
	slowBody := "POST /v1/notifications HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
	var slow []net.Conn
	for range 5 {
		slow = append(slow, rawRequest(t, ts, "127.0.0.2", slowBody))
	}
	waitOpen(t, ts, 5)
	if got := status(t, ts, "127.0.0.2", "GET", "/healthz"); got != http.StatusTooManyRequests {
		t.Errorf("sixth connection from one address: %d, want 429", got)
	}
	if got := status(t, ts, "127.0.0.1", "GET", "/healthz"); got != http.StatusOK {
		t.Errorf("/healthz from another address while one is at its cap: %d, want 200", got)
	}
	waitOpen(t, ts, 5)
	for range 3 {
		slow = append(slow, rawRequest(t, ts, "127.0.0.3", slowBody))
	}
	waitOpen(t, ts, 8)
	if got := status(t, ts, "127.0.0.4", "GET", "/healthz"); got != http.StatusServiceUnavailable {
		t.Errorf("connection past the global cap: %d, want 503", got)
	}
	for i, c := range slow {
		readUntilClosed(t, c, 15*time.Second)
		t.Logf("slow connection %d closed by the server", i)
	}
	waitOpen(t, ts, 0)
	if got := status(t, ts, "127.0.0.2", "GET", "/healthz"); got != http.StatusOK {
		t.Errorf("/healthz once the slow clients were cut: %d, want 200", got)
	}
	st := ts.conns.Stats()
	if st.RefusedPerAddr != 1 || st.RefusedMax != 1 {
		t.Errorf("refusals %+v; want 1 per address and 1 past the cap", st)
	}
	// The scrape's own connection is the one open; the last /healthz
	// connection may take the server a moment to see closed.
	metrics := get(t, ts.URL+"/metrics")
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(metrics, "notifyd_connections_open 1\n") && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		metrics = get(t, ts.URL+"/metrics")
	}
	for _, line := range []string{`notifyd_connections_refused_total{limit="per_ip"} 1`, `notifyd_connections_refused_total{limit="max"} 1`, "notifyd_connections_open 1"} {
		if !strings.Contains(metrics, line) {
			t.Errorf("/metrics lacks %q", line)
		}
	}
}

// get returns the body of a GET on a connection of its own, made with the API key.
func get(t *testing.T, u string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey) // /metrics wants the API key
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// Streams outlive the read timeout: WebSocket, SSE and a waiting poll take
// their connections over and clear its deadlines, and still deliver after
// several timeouts have passed.
func TestStreamsOutliveReadTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	ts := startServer(t, func(c *Config) { c.ReadTimeout = timeout })
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "slowread-" + tr
			c := ts.dialTransport(t, tr, user, nil)
			hello(t, c, tr, user)
			c.expect(t, "synced")
			time.Sleep(4 * timeout) // past the timeout: a stream left with the deadline would be cut
			ts.publish(t, user, "late", map[string]any{"n": 1})
			if m := c.expect(t, "notification"); m.Topic != "late" {
				t.Fatalf("got %+v", m)
			}
		})
	}
}

// refusedConnect checks a 429 too_many_connects answer: JSON body, Retry-After.
func refusedConnect(t *testing.T, what string, resp *http.Response) {
	t.Helper()
	if resp == nil {
		t.Fatalf("%s: no answer", what)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusTooManyRequests || errorBodyCode(body) != "too_many_connects" {
		t.Fatalf("%s: %d %s; want 429 too_many_connects", what, resp.StatusCode, body)
	}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 || s > 60 {
		t.Errorf("%s: Retry-After %q; want 1 to 60 seconds", what, resp.Header.Get("Retry-After"))
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", what, ct)
	}
}

// A burst of connects of one user past the burst is refused 429 with
// Retry-After on every transport (WebSocket before the upgrade); other users
// are not held back, and the polls of a long-poll session that goes on are
// not connects.
func TestConnectRateLimitPerUser(t *testing.T) {
	ts := startServer(t, func(c *Config) {
		c.ConnectRatePerUser = ratelimit.Limit{Rate: 1.0 / 60, Burst: 3}
	})
	tok := ts.token(t, "storm")
	for i := range 3 {
		c, _, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {tok}}), nil)
		if err != nil {
			t.Fatalf("connect %d of a burst of 3: %v", i+1, err)
		}
		c.Close()
	}
	_, resp, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {tok}}), nil)
	if err == nil {
		t.Fatal("fourth WebSocket connect was upgraded; want 429")
	}
	refusedConnect(t, "WebSocket", resp)
	for _, path := range []string{"/v1/sse", "/v1/poll"} {
		req, _ := http.NewRequest(http.MethodGet, ts.URL+path, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		refusedConnect(t, path, resp)
	}
	ts.liveWS(t, "calm") // another user

	// One long-poll session polls on: one connect however many polls.
	polls := startServer(t, func(c *Config) { c.ConnectRatePerUser = ratelimit.Limit{Rate: 1.0 / 60, Burst: 1} })
	ptok := polls.token(t, "poller")
	reply := polls.poll(t, ptok, url.Values{})
	for range 5 {
		reply = polls.poll(t, ptok, url.Values{"session": {reply.Session}, "cursor": {strconv.FormatInt(reply.Cursor, 10)}, "wait": {"0"}})
	}
	if !strings.Contains(get(t, ts.URL+"/metrics"), `notifyd_connects_refused_total{limit="user"} 3`) {
		t.Error(`/metrics lacks notifyd_connects_refused_total{limit="user"} 3`)
	}
}

// Connects from one address past its burst are refused; another address is not held back.
func TestConnectRateLimitPerAddress(t *testing.T) {
	ts := startServer(t, func(c *Config) {
		c.ConnectRatePerIP = ratelimit.Limit{Rate: 1.0 / 60, Burst: 2}
	})
	sse := func(local, user string) int {
		conn := rawRequest(t, ts, local, fmt.Sprintf("GET /v1/sse?token=%s HTTP/1.1\r\nHost: x\r\n\r\n", ts.token(t, user)))
		defer conn.Close()
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("SSE from %s: %v", local, err)
		}
		if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
			t.Error("429 without Retry-After")
		}
		return resp.StatusCode
	}
	for i, user := range []string{"a", "b"} {
		if got := sse("127.0.0.2", user); got != http.StatusOK {
			t.Fatalf("connect %d from 127.0.0.2: %d", i+1, got)
		}
	}
	if got := sse("127.0.0.2", "c"); got != http.StatusTooManyRequests {
		t.Errorf("third connect from 127.0.0.2 (a new user): %d, want 429", got)
	}
	if got := sse("127.0.0.3", "c"); got != http.StatusOK {
		t.Errorf("connect from another address: %d, want 200", got)
	}
}
