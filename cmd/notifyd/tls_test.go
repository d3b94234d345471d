package main

// notifyd over TLS (NOTIFY_TLS_CERT_FILE, NOTIFY_TLS_KEY_FILE): HTTP/2 for
// SSE (served through r3labs/sse/v2, handlers/sse_h2.go) and long-poll,
// HTTP/1.1 for WebSocket on the same port, and the certificate reloaded
// without a restart. Every certificate is made here, self-signed.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"go.uber.org/goleak"
)

// testCert is a self-signed certificate for 127.0.0.1 and localhost.
type testCert struct {
	certPEM, keyPEM []byte
	cert            *x509.Certificate
}

// newTestCert makes a self-signed server certificate named cn.
func newTestCert(t testing.TB, cn string) testCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		// Its own issuer, so a client trusts it by putting it in RootCAs.
		IsCA: true, BasicConstraintsValid: true,
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:    []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return testCert{
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		cert:    cert,
	}
}

// write puts the pair in certFile and keyFile, each replaced in one rename
// (as a renewal tool does), so a reload never reads a half-written file.
func (c testCert) write(t testing.TB, certFile, keyFile string) {
	t.Helper()
	for _, f := range []struct {
		path string
		data []byte
	}{{certFile, c.certPEM}, {keyFile, c.keyPEM}} {
		tmp := f.path + ".tmp"
		if err := os.WriteFile(tmp, f.data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, f.path); err != nil {
			t.Fatal(err)
		}
	}
}

// tlsTestServer is a notifyd serving TLS with a test certificate, and an
// HTTP/2 client that trusts it.
type tlsTestServer struct {
	*testServer
	pool              *x509.CertPool
	certFile, keyFile string
	cert              testCert
}

// startTLSServer starts a server on TLS; its do, publish and the like go
// over the HTTP/2 client.
func startTLSServer(t testing.TB, edit ...func(*Config)) *tlsTestServer {
	t.Helper()
	dir := t.TempDir()
	s := &tlsTestServer{certFile: filepath.Join(dir, "cert.pem"), keyFile: filepath.Join(dir, "key.pem"),
		cert: newTestCert(t, "notifyd test 1"), pool: x509.NewCertPool()}
	s.cert.write(t, s.certFile, s.keyFile)
	s.pool.AddCert(s.cert.cert)
	useTLS := func(c *Config) { c.TLSCertFile, c.TLSKeyFile = s.certFile, s.keyFile }
	s.testServer = startServer(t, append([]func(*Config){useTLS}, edit...)...)
	s.URL = "https://" + s.Addr()
	s.client = h2Client(s.pool)
	t.Cleanup(s.client.CloseIdleConnections)
	return s
}

// h2Client speaks HTTP/2 over TLS to a server whose certificate is in pool.
func h2Client(pool *x509.CertPool) *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: pool},
		ForceAttemptHTTP2: true,
	}}
}

// dialSSEH2 opens an event stream as user over the HTTP/2 client; header
// adds request headers (Last-Event-ID). It fails unless the answer came
// over HTTP/2.
func (s *tlsTestServer) dialSSEH2(t testing.TB, user string, header http.Header) *sseClient {
	t.Helper()
	token := s.token(t, user)
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", s.sseURL(url.Values{"token": {token}}), nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := s.client.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("dial sse over h2: %v", err)
	}
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		t.Fatalf("dial sse over h2: status %d over %s: %s", resp.StatusCode, resp.Proto, raw)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	c := &sseClient{httpSession: newHTTPSession(s.testServer, token), resp: resp, cancel: cancel}
	go c.read()
	t.Cleanup(c.drop)
	return c
}

// TestTLSSSEOverHTTP2: two event streams share one HTTP/2 connection; each
// gets hello, synced, then exactly its user's notifications once, in seq
// order, every event with the cursor as its id. A reconnect with
// Last-Event-ID gets the replay above it, and a kick ends the stream after
// bye.
func TestTLSSSEOverHTTP2(t *testing.T) {
	s := startTLSServer(t)
	a := s.dialSSEH2(t, "h2-alice", http.Header{"Origin": {s.URL}})
	b := s.dialSSEH2(t, "h2-bob", nil)
	// What the middleware set for a browser, and the stream's own headers.
	h := a.resp.Header
	if h.Get("Access-Control-Allow-Origin") != s.URL || h.Get("Cache-Control") != "no-cache, no-transform" ||
		h.Get("X-Accel-Buffering") != "no" || h.Get("Connection") != "" {
		t.Fatalf("stream headers %v", h)
	}
	for _, c := range []*sseClient{a, b} {
		if h := c.expect(t, "hello"); h.Transport != "sse" {
			t.Fatalf("hello %+v", h)
		}
		c.expect(t, "synced")
	}
	var alice []int64
	for i := range 5 {
		alice = append(alice, s.publish(t, "h2-alice", "t", map[string]int{"n": i}).Seq)
		if i == 2 {
			s.publish(t, "h2-bob", "t", map[string]int{"n": i})
		}
	}
	for i, seq := range alice {
		m := a.expect(t, "notification")
		if m.Seq != seq || !jsonSame(m.Data, fmt.Sprintf(`{"n":%d}`, i)) || m.Replayed {
			t.Fatalf("notification %d = %+v, want seq %d", i, m, seq)
		}
	}
	if m := b.expect(t, "notification"); !jsonSame(m.Data, `{"n":2}`) {
		t.Fatalf("bob got %+v", m)
	}
	// Nothing twice: the next event after a marker is the marker.
	marker := s.publish(t, "h2-alice", "marker", nil)
	if m := a.expect(t, "notification"); m.Seq != marker.Seq || m.Topic != "marker" {
		t.Fatalf("after the five, got %+v, want the marker %d", m, marker.Seq)
	}
	// Every event names the cursor (the browser's Last-Event-ID), never an empty id.
	evs := a.eventsSeen()
	if evs[0].ID != "0" || evs[len(evs)-1].ID != strconv.FormatInt(marker.Seq, 10) {
		t.Fatalf("ids %q .. %q", evs[0].ID, evs[len(evs)-1].ID)
	}
	a.emu.Lock()
	retry, badType := a.retry, a.badType
	a.emu.Unlock()
	if retry == "" || badType != "" {
		t.Fatalf("retry %q, event names %q", retry, badType)
	}

	// Reconnect after the third: the replay above it, once, then synced.
	c := s.dialSSEH2(t, "h2-alice", http.Header{"Last-Event-ID": {strconv.FormatInt(alice[2], 10)}})
	c.expect(t, "hello")
	for _, seq := range append(alice[3:], marker.Seq) {
		if m := c.expect(t, "notification"); m.Seq != seq || !m.Replayed {
			t.Fatalf("replayed %+v, want seq %d", m, seq)
		}
	}
	c.expect(t, "synced")

	// A kick: bye, then the response ends cleanly.
	sid := c.sessionID()
	if st := s.do(t, "DELETE", "/v1/sessions/"+sid, testAPIKey, nil, nil); st != http.StatusNoContent {
		t.Fatalf("kick: %d", st)
	}
	if bye := c.expect(t, "bye"); bye.Reason != "kicked" {
		t.Fatalf("bye %+v", bye)
	}
	if err := c.waitClosed(t, 5*time.Second); !errors.Is(err, io.EOF) {
		t.Fatalf("stream ended with %v, want EOF", err)
	}
	// The other streams of the connection are untouched.
	next := s.publish(t, "h2-alice", "after", nil)
	if m := a.expect(t, "notification"); m.Seq != next.Seq {
		t.Fatalf("after the kick, got %+v", m)
	}
	if st := s.statsNow(t); st.ByTransport["sse"] != 2 {
		t.Fatalf("sse sessions %d, want 2", st.ByTransport["sse"])
	}
	// Both through the SSE library, none hijacked.
	if n, h := libraryStreams(), sseGoroutines(); n != 2 || h != 0 {
		t.Fatalf("%d streams through the library and %d hijacked goroutines, want 2 and 0", n, h)
	}
}

// TestTLSSSEHTTP2NoLeak: 50 streams served through the SSE library, ended
// by the client leaving or by a kick, leave no goroutine behind: the library
// leaks one per subscriber when used wrong. (A stalled stream's cut is
// checked in TestTLSSSEHTTP2StalledClientEvicted.)
func TestTLSSSEHTTP2NoLeak(t *testing.T) {
	s := startTLSServer(t)
	warm := s.dialSSEH2(t, "leak-h2", nil)
	warm.expect(t, "hello")
	warm.expect(t, "synced")
	warm.drop()
	eventually(t, 10*time.Second, "warm-up session gone", func() bool { return s.statsNow(t).Sessions == 0 })
	ignore := goleak.IgnoreCurrent()
	for i := range 50 {
		c := s.dialSSEH2(t, fmt.Sprintf("leak-h2-%d", i%5), nil)
		c.expect(t, "hello")
		c.expect(t, "synced")
		if i%2 == 0 {
			c.drop()
			continue
		}
		if st := s.do(t, "DELETE", "/v1/sessions/"+c.sessionID(), testAPIKey, nil, nil); st != http.StatusNoContent {
			t.Fatalf("kick: %d", st)
		}
		c.expect(t, "bye")
		_ = c.waitClosed(t, 5*time.Second)
	}
	eventually(t, 10*time.Second, "every session gone", func() bool { return s.statsNow(t).Sessions == 0 })
	var err error
	eventually(t, 10*time.Second, "no goroutine left", func() bool {
		err = goleak.Find(ignore)
		return err == nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTLSSSEHTTP2StalledClientEvicted: a client that stops reading its
// HTTP/2 stream is ended (client_close, as on HTTP/1.1) once one write has
// waited for the 10 s write timeout, and its stream is cut (the library's
// stuck write too): the connection's other streams go on.
func TestTLSSSEHTTP2StalledClientEvicted(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the 10 s write timeout")
	}
	s := startTLSServer(t, func(c *Config) { c.MaxDataBytes = 1 << 20 })
	live := s.dialSSEH2(t, "h2-live", nil)
	live.expect(t, "hello")
	live.expect(t, "synced")
	// A raw stream on the same connection that is never read after its header.
	token := s.token(t, "h2-stalled")
	req, err := http.NewRequest("GET", s.sseURL(url.Values{"token": {token}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("over %s", resp.Proto)
	}
	eventually(t, 5*time.Second, "stalled session live", func() bool { return len(s.sessionsOf(t, "h2-stalled")) == 1 })
	// 16 MB: past the client's 4 MB stream window and the library's buffers.
	pad := strings.Repeat("p", 800<<10)
	for range 20 {
		s.publish(t, "h2-stalled", "big", map[string]string{"pad": pad})
	}
	eventually(t, 20*time.Second, "the stalled session ended", func() bool { return len(s.sessionsOf(t, "h2-stalled")) == 0 })
	eventually(t, 5*time.Second, "its end recorded as client_close", func() bool {
		return s.scalar(t, `SELECT count(*) FROM session_history WHERE user_id = 'h2-stalled' AND end_reason = 'client_close'`) == 1
	})
	// The stream is cut: reading it ends with an error, not with more data forever.
	done := make(chan error, 1)
	go func() { _, err := io.Copy(io.Discard, resp.Body); done <- err }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the stalled stream was not cut")
	}
	// Of the library's goroutines only the live stream's are left.
	eventually(t, 5*time.Second, "the stalled stream's goroutines gone", func() bool {
		return libraryStreams() == 1 && goroutinesNaming("r3labs/sse/v2.(*Stream).run") == 1 &&
			goroutinesNaming("r3labs/sse/v2.(*Server).ServeHTTP.func1") == 1
	})
	next := s.publish(t, "h2-live", "still", nil)
	if m := live.expect(t, "notification"); m.Seq != next.Seq {
		t.Fatalf("live stream got %+v", m)
	}
}

// pollH2 makes one long-poll request over the HTTP/2 client and fails
// unless it is answered 200 over HTTP/2.
func (s *tlsTestServer) pollH2(t testing.TB, token string, q url.Values) pollReply {
	t.Helper()
	req, err := http.NewRequest("GET", s.URL+"/v1/poll?"+q.Encode(), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatalf("poll: %v", err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
		t.Fatalf("poll: %d over %s: %s", resp.StatusCode, resp.Proto, raw)
	}
	var out pollReply
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("poll answer %s: %v", raw, err)
	}
	return out
}

// TestTLSLongPollOverHTTP2: a poll waits on its HTTP/2 stream (it cannot
// take the connection) and is answered with what was published meanwhile;
// the next poll acknowledges it and gets nothing again.
func TestTLSLongPollOverHTTP2(t *testing.T) {
	s := startTLSServer(t)
	token := s.token(t, "h2-poller")
	first := s.pollH2(t, token, url.Values{})
	if len(first.Messages) != 2 || first.Messages[0].Type != "hello" || first.Messages[1].Type != "synced" {
		t.Fatalf("first poll %+v", first)
	}
	if first.Messages[0].Transport != "longpoll" {
		t.Fatalf("hello %+v", first.Messages[0])
	}
	q := url.Values{"session": {first.Session}, "cursor": {strconv.FormatInt(first.Cursor, 10)}, "wait": {"10"}}
	answered := make(chan pollReply, 1)
	go func() { answered <- s.pollH2(t, token, q) }()
	eventually(t, 5*time.Second, "the poll waiting", func() bool {
		select {
		case r := <-answered:
			t.Fatalf("answered before the publish: %+v", r)
		default:
		}
		return len(s.sessionsOf(t, "h2-poller")) == 1
	})
	// It waits in its handler, not parked on a connection taken over.
	eventually(t, 5*time.Second, "the poll waiting in its handler", func() bool {
		return goroutinesNaming("handlers.(*pollExchange).wait") == 1
	})
	if n := goroutinesNaming("handlers.(*pollTransport).park"); n != 0 {
		t.Fatalf("%d polls parked over HTTP/2", n)
	}
	p := s.publish(t, "h2-poller", "t", map[string]int{"n": 1})
	var got pollReply
	select {
	case got = <-answered:
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting poll was not answered")
	}
	if len(got.Messages) != 1 || got.Messages[0].Seq != p.Seq || got.Cursor != p.Seq {
		t.Fatalf("poll answer %+v, want seq %d", got, p.Seq)
	}
	q.Set("cursor", strconv.FormatInt(got.Cursor, 10))
	q.Set("wait", "0")
	if again := s.pollH2(t, token, q); len(again.Messages) != 0 {
		t.Fatalf("after the ack: %+v", again)
	}
}

// TestTLSWebSocketOverHTTP1: on the TLS port a WebSocket client gets
// HTTP/1.1 (the upgrade needs the connection) and its session works.
func TestTLSWebSocketOverHTTP1(t *testing.T) {
	s := startTLSServer(t)
	d := websocket.Dialer{TLSClientConfig: &tls.Config{RootCAs: s.pool, NextProtos: []string{"http/1.1"}},
		HandshakeTimeout: 5 * time.Second}
	conn, resp, err := d.Dial("wss://"+s.Addr()+"/v1/ws?token="+s.token(t, "h2-ws"), nil)
	if err != nil {
		t.Fatalf("dial wss: %v", err)
	}
	if resp.ProtoMajor != 1 {
		t.Fatalf("upgrade over %s", resp.Proto)
	}
	tc, ok := conn.NetConn().(*tls.Conn)
	if !ok {
		t.Fatalf("connection is %T, not TLS", conn.NetConn())
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "http/1.1" {
		t.Fatalf("ALPN %q", p)
	}
	c := newWSClient(t, conn)
	if h := c.expect(t, "hello"); h.Transport != "websocket" {
		t.Fatalf("hello %+v", h)
	}
	c.expect(t, "synced")
	p := s.publish(t, "h2-ws", "t", nil)
	if m := c.expect(t, "notification"); m.Seq != p.Seq {
		t.Fatalf("got %+v", m)
	}
	c.send(t, map[string]string{"type": "ping"})
	c.expect(t, "pong")

	// A client that offers h2 first is given it, on the same port.
	r, err := s.client.Get(s.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.ProtoMajor != 2 {
		t.Fatalf("healthz over %s", r.Proto)
	}
}

// servedCert is the common name of the certificate a new TLS connection to
// addr is shown.
func servedCert(t testing.TB, addr string, pool *x509.CertPool) string {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatalf("tls dial: %v", err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].Subject.CommonName
}

// TestTLSCertificateReload: new certificate files are served from the next
// handshake on, after a reload call, after SIGHUP, and once the watch sees
// the files change; a pair that does not load leaves the last good one in
// place.
func TestTLSCertificateReload(t *testing.T) {
	s := startTLSServer(t)
	second, third := newTestCert(t, "notifyd test 2"), newTestCert(t, "notifyd test 3")
	s.pool.AddCert(second.cert)
	s.pool.AddCert(third.cert)
	if cn := servedCert(t, s.Addr(), s.pool); cn != "notifyd test 1" {
		t.Fatalf("served %q", cn)
	}

	second.write(t, s.certFile, s.keyFile)
	if err := s.ReloadCertificate(); err != nil {
		t.Fatal(err)
	}
	if cn := servedCert(t, s.Addr(), s.pool); cn != "notifyd test 2" {
		t.Fatalf("after the reload served %q", cn)
	}

	// A broken pair (third's certificate with second's key) is refused.
	if err := os.WriteFile(s.certFile, third.certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.ReloadCertificate(); err == nil {
		t.Fatal("a mismatched pair loaded")
	}
	if cn := servedCert(t, s.Addr(), s.pool); cn != "notifyd test 2" {
		t.Fatalf("after a failed reload served %q", cn)
	}

	// SIGHUP. The test listens for it too, so the signal can never reach a
	// process without a handler.
	third.write(t, s.certFile, s.keyFile)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the third certificate served", func() bool {
		return servedCert(t, s.Addr(), s.pool) == "notifyd test 3"
	})

	// New files alone, no signal: the watch sees them change.
	fourth := newTestCert(t, "notifyd test 4")
	s.pool.AddCert(fourth.cert)
	fourth.write(t, s.certFile, s.keyFile)
	eventually(t, 3*certWatchEvery, "the fourth certificate served", func() bool {
		return servedCert(t, s.Addr(), s.pool) == "notifyd test 4"
	})
}

// TestTLSConfigBothOrNeither: one of the two TLS files alone stops the server at start.
func TestTLSConfigBothOrNeither(t *testing.T) {
	for _, kv := range [][2]string{{"NOTIFY_TLS_CERT_FILE", "/c.pem"}, {"NOTIFY_TLS_KEY_FILE", "/k.pem"}} {
		_, err := LoadConfig(env(kv[0], kv[1]))
		if err == nil || !strings.Contains(err.Error(), "NOTIFY_TLS_CERT_FILE and NOTIFY_TLS_KEY_FILE go together") {
			t.Errorf("%s alone: %v", kv[0], err)
		}
	}
	c, err := LoadConfig(env("NOTIFY_TLS_CERT_FILE", "/c.pem", "NOTIFY_TLS_KEY_FILE", "/k.pem"))
	if err != nil || c.TLSCertFile != "/c.pem" || c.TLSKeyFile != "/k.pem" {
		t.Fatalf("both: %+v, %v", c, err)
	}
	// A pair that cannot be read is an error at start, naming the files.
	if _, err := newCertReloader("/nonexistent/c.pem", "/nonexistent/k.pem", nil); err == nil || !strings.Contains(err.Error(), "/nonexistent/c.pem") {
		t.Fatalf("missing files: %v", err)
	}
}

// TestTLSShutdownOverHTTP2: on SIGTERM's drain an event stream and a
// waiting poll, both on HTTP/2 streams of one connection, get bye shutdown
// before the server closes.
func TestTLSShutdownOverHTTP2(t *testing.T) {
	s := startTLSServer(t)
	c := s.dialSSEH2(t, "h2-drain", nil)
	c.expect(t, "hello")
	c.expect(t, "synced")
	token := s.token(t, "h2-drain-poll")
	first := s.pollH2(t, token, url.Values{})
	answered := make(chan pollReply, 1)
	go func() {
		answered <- s.pollH2(t, token, url.Values{"session": {first.Session},
			"cursor": {strconv.FormatInt(first.Cursor, 10)}, "wait": {"20"}})
	}()
	time.Sleep(300 * time.Millisecond) // the poll is waiting
	closed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		closed <- s.Close(ctx)
	}()
	if bye := c.expect(t, "bye"); bye.Reason != "shutdown" {
		t.Fatalf("sse bye %+v", bye)
	}
	select {
	case r := <-answered:
		if n := len(r.Messages); n != 1 || r.Messages[0].Type != "bye" || r.Messages[0].Reason != "shutdown" {
			t.Fatalf("poll answer %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the waiting poll got no answer")
	}
	if err := <-closed; err != nil {
		t.Fatalf("close: %v", err)
	}
}

// libraryStreams counts the event streams this process serves through the
// SSE library (handlers/sse_h2.go), so a test can tell which path a stream took.
func libraryStreams() int { return goroutinesNaming("handlers.(*sseStreams).serve(") }

// goroutinesNaming counts the goroutines whose stack names fn.
func goroutinesNaming(fn string) int {
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 2)
	n := 0
	for _, g := range strings.Split(buf.String(), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// TestTLSStreamsOutliveReadTimeout: NOTIFY_READ_TIMEOUT bounds ordinary
// requests, not an SSE stream or a waiting poll on HTTP/2 (which take no
// connection over to clear it); the idle HTTP/2 stream gets its keep-alive
// comments (every ping interval, here 1 s).
func TestTLSStreamsOutliveReadTimeout(t *testing.T) {
	s := startTLSServer(t, func(c *Config) {
		c.ReadTimeout = time.Second
		c.PingInterval, c.PingTimeout = time.Second, 10*time.Second
	})
	c := s.dialSSEH2(t, "h2-long", nil)
	c.expect(t, "hello")
	c.expect(t, "synced")
	token := s.token(t, "h2-long")
	first := s.pollH2(t, token, url.Values{})
	answered := make(chan pollReply, 1)
	go func() {
		answered <- s.pollH2(t, token, url.Values{"session": {first.Session},
			"cursor": {strconv.FormatInt(first.Cursor, 10)}, "wait": {"5"}})
	}()
	time.Sleep(2500 * time.Millisecond)
	if n := c.comments.Load(); n < 1 {
		t.Fatalf("%d keep-alive comments in 2.5 s of an idle stream", n)
	}
	p := s.publish(t, "h2-long", "late", nil)
	if m := c.expect(t, "notification"); m.Seq != p.Seq {
		t.Fatalf("stream got %+v", m)
	}
	select {
	case r := <-answered:
		if len(r.Messages) != 1 || r.Messages[0].Seq != p.Seq {
			t.Fatalf("poll answer %+v", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the poll was not answered")
	}
}

// TestTLSHTTP1StreamsHijacked: a client that asks for HTTP/1.1 on the TLS
// port gets the lean paths: its SSE stream and its waiting poll take their
// (TLS) connection over, as without TLS, and deliver.
func TestTLSHTTP1StreamsHijacked(t *testing.T) {
	s := startTLSServer(t)
	h1 := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.pool},
		TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}} // no ALPN h2
	defer h1.CloseIdleConnections()
	token := s.token(t, "tls-h1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, "GET", s.sseURL(url.Values{"token": {token}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := h1.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 1 || !resp.Close {
		t.Fatalf("sse over TLS/1.1: %d %s close=%v", resp.StatusCode, resp.Proto, resp.Close)
	}
	c := &sseClient{httpSession: newHTTPSession(s.testServer, token), resp: resp, cancel: cancel}
	go c.read()
	c.expect(t, "hello")
	c.expect(t, "synced")
	if n, h := libraryStreams(), sseGoroutines(); n != 0 || h == 0 {
		t.Fatalf("%d streams through the library, %d hijacked goroutines: want 0 and some", n, h)
	}
	p := s.publish(t, "tls-h1", "t", nil)
	if m := c.expect(t, "notification"); m.Seq != p.Seq {
		t.Fatalf("got %+v", m)
	}

	ptoken := s.token(t, "tls-h1-poll")
	ts := &testServer{URL: s.URL}
	_, first, _, err := ts.pollOnceClient(context.Background(), h1, ptoken, url.Values{})
	if err != nil {
		t.Fatal(err)
	}
	answered := make(chan error, 1)
	var got pollReply
	go func() {
		q := url.Values{"session": {first.Session}, "cursor": {strconv.FormatInt(first.Cursor, 10)}, "wait": {"10"}}
		var err error
		_, got, _, err = ts.pollOnceClient(context.Background(), h1, ptoken, q)
		answered <- err
	}()
	// The waiting poll is parked on its own connection (poll.go's park).
	eventually(t, 5*time.Second, "the poll parked", func() bool {
		return goroutinesNaming("handlers.(*pollTransport).park") == 1
	})
	pp := s.publish(t, "tls-h1-poll", "t", nil)
	select {
	case err := <-answered:
		if err != nil || len(got.Messages) != 1 || got.Messages[0].Seq != pp.Seq {
			t.Fatalf("waited poll: %+v, %v", got, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting poll was not answered")
	}
}
