package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/store/storetest"
)

const (
	testSecret = "test-secret-0123456789abcdef"
	testAPIKey = "test-api-key-0123456789abcdef"
)

// testServer is a whole notifyd on 127.0.0.1:0 in its own Postgres schema.
type testServer struct {
	*Main
	URL   string
	DBURL string
	auth  *handlers.Auth
	// client sends do's requests; nil is http.DefaultClient (a TLS server's tests set their own).
	client *http.Client
}

// testConfig is the configuration tests start from.
func testConfig(dbURL string) Config {
	return Config{
		DatabaseURL: dbURL, Addr: "127.0.0.1:0", JWTSecret: testSecret, APIKey: testAPIKey,
		PingInterval: 20 * time.Second, PingTimeout: 60 * time.Second, ReplayLimit: 1000,
		MaxMessageBytes: 64 << 10, MaxDataBytes: 64 << 10, MaxSessionsPerUser: 20, MaxBatch: 1000,
		QueueLimit: 256, ShutdownTimeout: 5 * time.Second, LogLevel: "warn",
		// Small pools: tests run in parallel, several nodes each, on one Postgres
		// (100 connections by default).
		DBMaxConns: 6,
	}
}

// startServer starts a server; edit adjusts its configuration.
func startServer(t testing.TB, edit ...func(*Config)) *testServer {
	t.Helper()
	return startServerOn(t, storetest.URL(t), edit...)
}

// startServerOn starts a server on an existing database URL (restarts).
func startServerOn(t testing.TB, dbURL string, edit ...func(*Config)) *testServer {
	t.Helper()
	cfg := testConfig(dbURL)
	for _, e := range edit {
		e(&cfg)
	}
	m := &Main{Config: cfg, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if testing.Verbose() {
		m.Log = slog.New(slog.NewTextHandler(&testWriter{t: t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Start(ctx); err != nil {
		t.Fatalf("start server: %v", err)
	}
	ts := &testServer{Main: m, URL: "http://" + m.Addr(), DBURL: dbURL, auth: handlers.NewAuth(testSecret, testAPIKey, nil)}
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { ts.stop(t) }) })
	return ts
}

func (ts *testServer) stop(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := ts.Close(ctx); err != nil {
		t.Logf("server close: %v", err)
	}
}

type testWriter struct{ t testing.TB }

func (w *testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// token mints a client token for user.
func (ts *testServer) token(t testing.TB, user string) string {
	t.Helper()
	tok, err := ts.auth.NewToken(user, "test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// do sends a request with a bearer credential and decodes a JSON answer into
// out (when not nil); it returns the status.
func (ts *testServer) do(t testing.TB, method, path, bearer string, body any, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, ts.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	req.Header.Set("Content-Type", "application/json")
	client := http.DefaultClient
	if ts.client != nil {
		client = ts.client
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, raw, err)
		}
	}
	return resp.StatusCode
}

// publishedNote is the API's answer to a publish.
type publishedNote struct {
	ID        string `json:"id"`
	UserID    string `json:"user_id"`
	Seq       int64  `json:"seq"`
	CreatedAt string `json:"created_at"`
}

// publish stores one notification through the API and fails the test unless it is 201.
func (ts *testServer) publish(t testing.TB, user, topic string, data any) publishedNote {
	t.Helper()
	var p publishedNote
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"user_id": user, "topic": topic, "data": data}, &p); st != http.StatusCreated {
		t.Fatalf("publish: status %d", st)
	}
	return p
}

// msg is one server message as a client sees it.
type msg struct {
	Type      string          `json:"type"`
	Session   string          `json:"session"`
	User      string          `json:"user"`
	Transport string          `json:"transport"`
	ID        string          `json:"id"`
	Seq       int64           `json:"seq"`
	Topic     string          `json:"topic"`
	Data      json.RawMessage `json:"data"`
	Replayed  bool            `json:"replayed"`
	Cursor    int64           `json:"cursor"`
	Unread    int64           `json:"unread"`
	Truncated bool            `json:"truncated"`
	IDs       []string        `json:"ids"`
	Reason    string          `json:"reason"`
	RetryMs   int64           `json:"retry_ms"`
	Code      string          `json:"code"`
	Message   string          `json:"message"`
	// ServerTime is set on hello and pong.
	ServerTime string `json:"server_time"`
}

// wsClient is a real WebSocket client of the server.
type wsClient struct {
	conn *websocket.Conn
	in   chan msg
	// closeErr is the read error that ended the connection (a *websocket.CloseError for a close frame).
	closeErr error
	done     chan struct{}
}

// wsURL builds /v1/ws with the given query values.
func (ts *testServer) wsURL(q url.Values) string {
	return "ws" + strings.TrimPrefix(ts.URL, "http") + "/v1/ws?" + q.Encode()
}

// liveWS dials a WebSocket session for user and reads its hello and synced:
// its next message is live.
func (ts *testServer) liveWS(t testing.TB, user string) *wsClient {
	t.Helper()
	c := ts.dialWS(t, user, nil)
	c.expect(t, "hello")
	c.expect(t, "synced")
	return c
}

// dialWS connects as user; extra adds query parameters (cursor, session).
func (ts *testServer) dialWS(t testing.TB, user string, extra url.Values) *wsClient {
	t.Helper()
	q := url.Values{"token": {ts.token(t, user)}}
	for k, v := range extra {
		q[k] = v
	}
	conn, resp, err := websocket.DefaultDialer.Dial(ts.wsURL(q), nil)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial ws: %v (status %d)", err, status)
	}
	return newWSClient(t, conn)
}

// newWSClient reads the server's messages of conn into the client's channel
// until the connection ends; conn is closed at the end of the test.
func newWSClient(t testing.TB, conn *websocket.Conn) *wsClient {
	c := &wsClient{conn: conn, in: make(chan msg, 4096), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer close(c.in)
		for {
			_, data, err := conn.ReadMessage()
			if err != nil {
				c.closeErr = err
				return
			}
			var m msg
			if err := json.Unmarshal(data, &m); err != nil {
				c.closeErr = err
				return
			}
			c.in <- m
		}
	}()
	t.Cleanup(func() { _ = conn.Close() })
	return c
}

// next returns the next message, failing the test after timeout.
func (c *wsClient) next(t testing.TB, timeout time.Duration) msg {
	t.Helper()
	return nextFrom(t, c.in, c.ended, timeout)
}

// nextPastCount returns the next message other than the `read` the server sends after a
// listener catch-up: no ids, and received unread (every row received so far; none was read).
func (c *wsClient) nextPastCount(t testing.TB, timeout time.Duration, received int64) msg {
	t.Helper()
	m := c.next(t, timeout)
	for m.Type == "read" && len(m.IDs) == 0 && m.Unread == received {
		m = c.next(t, timeout)
	}
	return m
}

// expect returns the next message and fails unless it has type typ.
func (c *wsClient) expect(t testing.TB, typ string) msg {
	t.Helper()
	return expectFrom(t, c.in, c.ended, typ)
}

// ended is why the connection ended; read it once c.in is closed.
func (c *wsClient) ended() error { return c.closeErr }

// nextFrom returns the next message of a test client's stream, failing the
// test after timeout or when the stream has ended (ended says why).
func nextFrom(t testing.TB, in <-chan msg, ended func() error, timeout time.Duration) msg {
	t.Helper()
	select {
	case m, ok := <-in:
		if !ok {
			t.Fatalf("session ended: %v", ended())
		}
		return m
	case <-time.After(timeout):
		t.Fatalf("no message within %s", timeout)
	}
	return msg{}
}

// expectFrom returns the next message and fails unless it has type typ.
func expectFrom(t testing.TB, in <-chan msg, ended func() error, typ string) msg {
	t.Helper()
	m := nextFrom(t, in, ended, 5*time.Second)
	if m.Type != typ {
		t.Fatalf("got %+v, want a %s message", m, typ)
	}
	return m
}

// waitClosedFrom drains a test client's stream until it ends and returns why.
func waitClosedFrom(t testing.TB, in <-chan msg, ended func() error, timeout time.Duration) error {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case _, ok := <-in:
			if !ok {
				return ended()
			}
		case <-deadline:
			t.Fatalf("session still open after %s", timeout)
		}
	}
}

// send writes one client message.
func (c *wsClient) send(t testing.TB, v any) {
	t.Helper()
	if err := c.conn.WriteJSON(v); err != nil {
		t.Fatalf("ws send: %v", err)
	}
}

// waitClosed waits for the server to end the connection and returns its close error.
func (c *wsClient) waitClosed(t testing.TB, timeout time.Duration) error {
	t.Helper()
	return waitClosedFrom(t, c.in, c.ended, timeout)
}

// forEach calls fn(0) .. fn(n-1) from workers goroutines and returns the
// first error (naming its i); the workers stop at the first error each meets.
func forEach(n, workers int, fn func(i int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					errs <- fmt.Errorf("session %d: %w", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	return <-errs
}
