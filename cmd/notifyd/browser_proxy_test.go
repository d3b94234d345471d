package main

// Browser end-to-end tests through real proxies (see browser_test.go).

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestBrowserNginxBuffering: an nginx that drops the Upgrade and buffers
// responses (ignoring X-Accel-Buffering): WebSocket fails, the SSE stream
// never shows hello (even its headers are held back), so the client must end
// on long-poll. Probes for better transports fail there without disturbing
// delivery. A second browser behind the same proxy goes straight to long-poll
// (GET /v1/negotiate learned it).
func TestBrowserNginxBuffering(t *testing.T) {
	t.Parallel()
	requireE2E(t, sbin("nginx"))
	e2eSlot(t)
	ts := e2eServer(t)
	ng, _ := startNginx(t, ts.Addr(), false, true)
	base := "http://" + ng.addr()
	pre := publishN(t, ts, "bob", 2)

	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p", demoURL(base, "bob", url.Values{"probeInterval": {"2500"}}))
	s := waitConnected(t, b, "p", 20*time.Second)
	if s.Transport != "longpoll" {
		t.Fatalf("connected over %s, want longpoll; %s", s.Transport, s.brief())
	}
	// WebSocket fails at once (nginx answers the upgrade-less request with notifyd's 400);
	// SSE fails only by the hello timer: the buffered stream shows nothing, not even headers.
	if got := attempts(s, "attempt"); len(got) != 3 || !strings.HasPrefix(got[0], "websocket:") || got[0] == "websocket:ok" ||
		got[1] != "sse:timeout" || got[2] != "longpoll:ok" {
		t.Errorf("attempts = %v, want websocket failed, sse:timeout, longpoll:ok", got)
	}
	// Live notifications while the client probes (and fails) to move up.
	var live []publishedNote
	for i := 0; i < 10; i++ {
		live = append(live, ts.publish(t, "bob", "e2e.live", map[string]any{"i": i}))
		time.Sleep(400 * time.Millisecond)
	}
	s = waitExactly(t, b, "p", ids(append(pre, live...)...), 15*time.Second)
	logTiming(t, "nginx", s)
	if s.Transport != "longpoll" {
		t.Errorf("ended on %s, want longpoll", s.Transport)
	}
	if probes := attempts(s, "probe"); len(probes) == 0 || slices.Contains(probes, "sse:ok") || slices.Contains(probes, "websocket:ok") {
		t.Errorf("probes = %v, want at least one, all failed", probes)
	}

	// The next browser behind this proxy: the learned order puts long-poll first.
	pre2 := publishN(t, ts, "bob2", 1)
	b.launch("b", "")
	b.open("b", "p2", demoURL(base, "bob2", nil))
	s2 := waitConnected(t, b, "p2", 15*time.Second)
	if got := attempts(s2, "attempt"); !slices.Equal(got, []string{"longpoll:ok"}) {
		t.Errorf("second browser attempts = %v, want long-poll at once", got)
	}
	s2 = waitExactly(t, b, "p2", ids(pre2...), 10*time.Second)
	logTiming(t, "nginx-learned", s2)
}

// TestBrowserSquid: a forward proxy that refuses CONNECT to ports other than
// 443, which is how Chromium carries ws:// through a proxy: the client ends
// on SSE. squid's access.log shows that the page and the CONNECT went through it.
func TestBrowserSquid(t *testing.T) {
	t.Parallel()
	requireE2E(t, sbin("squid"))
	e2eSlot(t)
	ts := e2eServer(t)
	sq := startSquid(t)
	pre := publishN(t, ts, "carol", 2)

	b := startBrowser(t)
	b.launch("a", "http://"+sq.addr())
	b.open("a", "p", demoURL(ts.URL, "carol", nil))
	s := waitConnected(t, b, "p", 20*time.Second)
	if s.Transport != "sse" {
		t.Fatalf("connected over %s, want sse; %s", s.Transport, s.brief())
	}
	if got := attempts(s, "attempt"); len(got) != 2 || !strings.HasPrefix(got[0], "websocket:") || got[1] != "sse:ok" {
		t.Errorf("attempts = %v, want websocket failed, then sse", got)
	}
	live := publishN(t, ts, "carol", 3)
	s = waitExactly(t, b, "p", ids(append(pre, live...)...), 10*time.Second)
	logTiming(t, "squid", s)

	// squid logs URLs without their query (so no token either).
	host := strings.TrimPrefix(ts.URL, "http://")
	waitFor(t, 10*time.Second, "squid's access.log shows the page and the refused CONNECT", func() (bool, string) {
		l := sq.log("access.log")
		return strings.Contains(l, "TCP_MISS/200 GET "+ts.URL+"/?") && strings.Contains(l, "TCP_DENIED/403 CONNECT "+host) &&
			!strings.Contains(l, "token="), l
	})
}

// TestBrowserProxyRestart: the proxy (squid, client on SSE) is stopped while
// the stream runs and started again; notifications published meanwhile are
// replayed after the reconnect, nothing lost and nothing shown twice.
func TestBrowserProxyRestart(t *testing.T) {
	t.Parallel()
	requireE2E(t, sbin("squid"))
	e2eSlot(t)
	ts := e2eServer(t)
	sq := startSquid(t)
	pre := publishN(t, ts, "dora", 1)

	b := startBrowser(t)
	b.launch("a", "http://"+sq.addr())
	// The reconnect can race squid's restart and land on long-poll (the
	// ladder's next rung); a short probe interval brings it back up to SSE.
	b.open("a", "p", demoURL(ts.URL, "dora", url.Values{"probeInterval": {"3000"}}))
	s := waitConnected(t, b, "p", 20*time.Second)
	if s.Transport != "sse" {
		t.Fatalf("connected over %s, want sse; %s", s.Transport, s.brief())
	}
	before := publishN(t, ts, "dora", 2)
	waitExactly(t, b, "p", ids(append(pre, before...)...), 10*time.Second)
	session := s.Session

	sq.stop()
	waitFor(t, 10*time.Second, "client notices the proxy is gone", func() (bool, string) {
		s = b.demo("p")
		return s.State != "connected", s.brief()
	})
	during := publishN(t, ts, "dora", 3)
	sq.start()
	s = waitTransport(t, b, "p", "sse", 20*time.Second)
	after := publishN(t, ts, "dora", 2)
	s = waitExactly(t, b, "p", ids(slices.Concat(pre, before, during, after)...), 15*time.Second)
	if s.Session != session {
		t.Logf("session %s resumed as %s", session, s.Session)
	}
	for _, r := range s.Received {
		if slices.Contains(ids(during...), r.ID) && !r.Replayed {
			t.Errorf("notification %d published while the proxy was down arrived live, want replayed", r.Seq)
		}
	}
}

// TestBrowserProbeUpgrade: behind an nginx that does not pass the Upgrade the
// client runs on SSE; once nginx is reloaded with WebSocket forwarding, a
// probe moves the client up to WebSocket while notifications keep coming:
// none lost, none twice, and the old SSE session ends.
func TestBrowserProbeUpgrade(t *testing.T) {
	t.Parallel()
	requireE2E(t, sbin("nginx"))
	e2eSlot(t)
	ts := e2eServer(t)
	ng, rewrite := startNginx(t, ts.Addr(), false, false)
	base := "http://" + ng.addr()

	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p", demoURL(base, "hugo", url.Values{"probeInterval": {"1500"}}))
	s := waitConnected(t, b, "p", 15*time.Second)
	if s.Transport != "sse" {
		t.Fatalf("connected over %s, want sse; %s", s.Transport, s.brief())
	}

	var (
		mu   sync.Mutex
		sent []string
		wg   sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 30; i++ {
			var p publishedNote
			if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"user_id": "hugo", "topic": "e2e.stream", "data": map[string]any{"i": i}}, &p); st != http.StatusCreated {
				t.Errorf("publish: %d", st)
				return
			}
			mu.Lock()
			sent = append(sent, p.ID)
			mu.Unlock()
			time.Sleep(150 * time.Millisecond)
		}
	}()
	time.Sleep(500 * time.Millisecond)
	rewrite(true, false)
	ng.signal(syscall.SIGHUP)
	s = waitTransport(t, b, "p", "websocket", 15*time.Second)
	wg.Wait()
	s = waitExactly(t, b, "p", sent, 10*time.Second)
	upgraded := false
	for _, e := range s.History {
		upgraded = upgraded || (e.Event == "state" && e.Reason == "upgrade" && e.Message == "upgrade from sse")
	}
	if !upgraded {
		t.Errorf("no upgrade from sse in the history: %s", s.brief())
	}
	waitFor(t, 10*time.Second, "one live session left, on websocket", func() (bool, string) {
		var out struct {
			Sessions []struct {
				Transport string `json:"transport"`
			} `json:"sessions"`
		}
		ts.do(t, "GET", "/v1/users/hugo/sessions", testAPIKey, nil, &out)
		return len(out.Sessions) == 1 && out.Sessions[0].Transport == "websocket", fmt.Sprintf("%+v", out.Sessions)
	})
}

// startSilentUpgradeProxy is a TCP proxy in front of backend that answers
// every WebSocket upgrade itself with 101 and then never sends a byte (a
// middlebox that accepts the upgrade and goes silent); any other request is
// piped to backend unchanged.
func startSilentUpgradeProxy(t *testing.T, backend string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	handle := func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		if strings.EqualFold(req.Header.Get("Upgrade"), "websocket") {
			sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
			fmt.Fprintf(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
				base64.StdEncoding.EncodeToString(sum[:]))
			_, _ = io.Copy(io.Discard, c)
			return
		}
		up, err := net.Dial("tcp", backend)
		if err != nil {
			return
		}
		track(up)
		defer up.Close()
		if err := req.Write(up); err != nil {
			return
		}
		go func() { _, _ = io.Copy(up, br) }()
		_, _ = io.Copy(c, up)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			track(c)
			go handle(c)
		}
	}()
	return ln.Addr().String()
}

// TestBrowserSilentUpgrade: a middlebox accepts the WebSocket upgrade and then
// stays silent; the hello timer abandons WebSocket and the client ends on SSE.
func TestBrowserSilentUpgrade(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	e2eSlot(t)
	ts := e2eServer(t)
	base := "http://" + startSilentUpgradeProxy(t, ts.Addr())
	pre := publishN(t, ts, "ivan", 1)

	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p", demoURL(base, "ivan", nil))
	s := waitConnected(t, b, "p", 20*time.Second)
	if s.Transport != "sse" {
		t.Fatalf("connected over %s, want sse; %s", s.Transport, s.brief())
	}
	if got := attempts(s, "attempt"); !slices.Equal(got, []string{"websocket:timeout", "sse:ok"}) {
		t.Errorf("attempts = %v, want websocket:timeout then sse:ok", got)
	}
	live := publishN(t, ts, "ivan", 2)
	s = waitExactly(t, b, "p", ids(append(pre, live...)...), 10*time.Second)
	logTiming(t, "silent-upgrade", s)
}
