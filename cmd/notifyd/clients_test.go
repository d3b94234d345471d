package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// The transports every contract test runs over.
var allTransports = []string{"websocket", "sse", "longpoll"}

// transportClient is a client of one session over any transport, with the
// shape of wsClient: server messages arrive in order through next/expect;
// send delivers a client message (over the socket, or by POST for SSE and
// long-poll, whose answers are then read like server messages).
type transportClient interface {
	next(t testing.TB, timeout time.Duration) msg
	expect(t testing.TB, typ string) msg
	send(t testing.TB, v any)
	waitClosed(t testing.TB, timeout time.Duration) error
	// drop goes away without a word, as a closed tab or a lost network does.
	drop()
}

var (
	_ transportClient = (*wsClient)(nil)
	_ transportClient = (*sseClient)(nil)
	_ transportClient = (*pollClient)(nil)
)

// dialTransport opens a session of user over tr ("websocket", "sse",
// "longpoll"); extra adds query parameters (cursor, session).
func (ts *testServer) dialTransport(t testing.TB, tr, user string, extra url.Values) transportClient {
	t.Helper()
	switch tr {
	case "websocket":
		return ts.dialWS(t, user, extra)
	case "sse":
		return ts.dialSSE(t, user, extra, nil)
	case "longpoll":
		return ts.dialPoll(t, user, extra)
	}
	t.Fatalf("unknown transport %q", tr)
	return nil
}

// drop closes the connection without a close frame.
func (c *wsClient) drop() { _ = c.conn.Close() }

// dialWSSilent connects a WebSocket client that never answers pings, so the
// server hears nothing from it after the handshake.
func (ts *testServer) dialWSSilent(t testing.TB, user string) *wsClient {
	t.Helper()
	conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {ts.token(t, user)}}), nil)
	if err != nil {
		t.Fatalf("dial ws: %v", err)
	}
	conn.SetPingHandler(func(string) error { return nil })
	return newWSClient(t, conn)
}

// httpStatusError is how an SSE or long-poll client ends on an HTTP error.
type httpStatusError struct {
	Status int
	Code   string
}

func (e *httpStatusError) Error() string { return fmt.Sprintf("HTTP %d %s", e.Status, e.Code) }

// errByeReceived ends a long-poll client that was sent bye.
var errByeReceived = errors.New("bye received")

// httpSession is what the SSE and long-poll clients share: the message
// stream and the POST upstream.
type httpSession struct {
	ts    *testServer
	token string

	mu       sync.Mutex
	in       chan msg
	closed   bool
	closeErr error
	session  string
	done     chan struct{}
}

func newHTTPSession(ts *testServer, token string) httpSession {
	return httpSession{ts: ts, token: token, in: make(chan msg, 8192), done: make(chan struct{})}
}

// push queues a message for the test; dropped once the client has ended.
func (c *httpSession) push(m msg) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m.Type == "hello" {
		c.session = m.Session
	}
	if !c.closed {
		c.in <- m
	}
}

// end closes the message stream with err as the reason.
func (c *httpSession) end(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	c.closeErr = err
	close(c.in)
	close(c.done)
}

func (c *httpSession) sessionID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.session
}

func (c *httpSession) err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closeErr
}

// next returns the next message, failing the test after timeout.
func (c *httpSession) next(t testing.TB, timeout time.Duration) msg {
	t.Helper()
	return nextFrom(t, c.in, c.err, timeout)
}

// expect returns the next message and fails unless it has type typ.
func (c *httpSession) expect(t testing.TB, typ string) msg {
	t.Helper()
	return expectFrom(t, c.in, c.err, typ)
}

// waitClosed waits for the session to end and returns why.
func (c *httpSession) waitClosed(t testing.TB, timeout time.Duration) error {
	t.Helper()
	return waitClosedFrom(t, c.in, c.err, timeout)
}

// send posts one client message (or an array) to the session and reads the
// answers (pong, error) like server messages.
func (c *httpSession) send(t testing.TB, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	status, replies, code := c.post(t, b)
	if status != http.StatusOK {
		t.Fatalf("POST messages: %d %s", status, code)
	}
	for _, m := range replies {
		c.push(m)
	}
}

// post sends a raw body to POST /v1/sessions/{session}/messages.
func (c *httpSession) post(t testing.TB, body []byte) (status int, replies []msg, code string) {
	t.Helper()
	return c.ts.postMessages(t, c.token, c.sessionID(), body)
}

// postMessages sends body to a session's message endpoint with token.
func (ts *testServer) postMessages(t testing.TB, token, session string, body []byte) (status int, replies []msg, code string) {
	t.Helper()
	req, err := http.NewRequest("POST", ts.URL+"/v1/sessions/"+url.PathEscape(session)+"/messages", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST messages: %v", err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, nil, errorBodyCode(raw)
	}
	var out struct {
		Messages []msg `json:"messages"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("POST messages: %s: %v", raw, err)
	}
	return resp.StatusCode, out.Messages, ""
}

// errorBodyCode reads the code of a JSON error body.
func errorBodyCode(raw []byte) string {
	var body struct {
		Error struct{ Code string } `json:"error"`
	}
	_ = json.Unmarshal(raw, &body)
	return body.Error.Code
}

// sseEvent is one event as it came over the wire.
type sseEvent struct {
	Event, ID, Data string
}

// sseClient reads a text/event-stream with a plain parser, so tests see the
// wire: event names, ids, retry and comment lines.
type sseClient struct {
	httpSession
	resp   *http.Response
	cancel context.CancelFunc

	comments atomic.Int64
	emu      sync.Mutex
	events   []sseEvent
	retry    string
	badType  string // an event whose name is not its message type
}

// sseURL builds /v1/sse with the given query values.
func (ts *testServer) sseURL(q url.Values) string { return ts.URL + "/v1/sse?" + q.Encode() }

// dialSSE opens an event stream as user; extra adds query parameters and
// header request headers (Last-Event-ID).
func (ts *testServer) dialSSE(t testing.TB, user string, extra url.Values, header http.Header) *sseClient {
	t.Helper()
	token := ts.token(t, user)
	q := url.Values{"token": {token}}
	for k, v := range extra {
		q[k] = v
	}
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", ts.sseURL(q), nil)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/event-stream")
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("dial sse: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		cancel()
		t.Fatalf("dial sse: status %d %s", resp.StatusCode, raw)
	}
	c := &sseClient{httpSession: newHTTPSession(ts, token), resp: resp, cancel: cancel}
	go c.read()
	t.Cleanup(c.drop)
	return c
}

// drop closes the stream.
func (c *sseClient) drop() { c.cancel() }

// eventsSeen returns the events read so far.
func (c *sseClient) eventsSeen() []sseEvent {
	c.emu.Lock()
	defer c.emu.Unlock()
	return append([]sseEvent(nil), c.events...)
}

func (c *sseClient) read() {
	defer c.resp.Body.Close()
	br := bufio.NewReader(c.resp.Body)
	var event, id string
	var data []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			c.end(err)
			return
		}
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "":
			if len(data) > 0 {
				c.dispatch(sseEvent{Event: event, ID: id, Data: strings.Join(data, "\n")})
			}
			event, id, data = "", "", nil
		case strings.HasPrefix(line, ":"):
			c.comments.Add(1)
		default:
			field, value, _ := strings.Cut(line, ":")
			value = strings.TrimPrefix(value, " ")
			switch field {
			case "event":
				event = value
			case "data":
				data = append(data, value)
			case "id":
				id = value
			case "retry":
				c.emu.Lock()
				c.retry = value
				c.emu.Unlock()
			}
		}
	}
}

func (c *sseClient) dispatch(ev sseEvent) {
	var m msg
	if err := json.Unmarshal([]byte(ev.Data), &m); err != nil {
		c.end(fmt.Errorf("bad event data %q: %w", ev.Data, err))
		return
	}
	c.emu.Lock()
	c.events = append(c.events, ev)
	if ev.Event != m.Type && c.badType == "" {
		c.badType = ev.Event + " != " + m.Type
	}
	c.emu.Unlock()
	c.push(m)
}

// pollReply is GET /v1/poll's answer.
type pollReply struct {
	Session  string `json:"session"`
	Cursor   int64  `json:"cursor"`
	Messages []msg  `json:"messages"`
}

// pollOnce makes one long-poll request with token; q carries session,
// cursor and wait.
func (ts *testServer) pollOnce(ctx context.Context, token string, q url.Values) (int, pollReply, http.Header, error) {
	return ts.pollOnceClient(ctx, http.DefaultClient, token, q)
}

// pollOnceClient is pollOnce over client.
func (ts *testServer) pollOnceClient(ctx context.Context, client *http.Client, token string, q url.Values) (int, pollReply, http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", ts.URL+"/v1/poll?"+q.Encode(), nil)
	if err != nil {
		return 0, pollReply{}, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := client.Do(req)
	if err != nil {
		return 0, pollReply{}, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, pollReply{}, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, pollReply{}, resp.Header, &httpStatusError{Status: resp.StatusCode, Code: errorBodyCode(raw)}
	}
	var out pollReply
	if err := json.Unmarshal(raw, &out); err != nil {
		return resp.StatusCode, out, resp.Header, fmt.Errorf("poll answer %s: %w", raw, err)
	}
	return resp.StatusCode, out, resp.Header, nil
}

// poll makes one long-poll request and fails the test unless it is 200.
func (ts *testServer) poll(t testing.TB, token string, q url.Values) pollReply {
	t.Helper()
	_, reply, _, err := ts.pollOnce(context.Background(), token, q)
	if err != nil {
		t.Fatalf("poll %v: %v", q, err)
	}
	return reply
}

// pollClient polls in a loop like a browser would: each request carries the
// session and the cursor of the last answer, so it acknowledges everything
// before. It stops after bye, an HTTP error, or drop.
type pollClient struct {
	httpSession
	cancel context.CancelFunc
	cursor atomic.Int64
	polls  atomic.Int64
}

// dialPoll starts a long-poll client as user; extra adds query parameters
// to the first poll (cursor, session, wait).
func (ts *testServer) dialPoll(t testing.TB, user string, extra url.Values) *pollClient {
	t.Helper()
	token := ts.token(t, user)
	ctx, cancel := context.WithCancel(context.Background())
	c := &pollClient{httpSession: newHTTPSession(ts, token), cancel: cancel}
	q := url.Values{}
	for k, v := range extra {
		q[k] = v
	}
	go c.loop(ctx, q)
	t.Cleanup(c.drop)
	return c
}

// drop stops polling (the session is swept at its timeout).
func (c *pollClient) drop() { c.cancel() }

func (c *pollClient) loop(ctx context.Context, q url.Values) {
	wait := "25"
	if w := q.Get("wait"); w != "" {
		wait = w
	}
	for {
		_, reply, _, err := c.ts.pollOnce(ctx, c.token, q)
		if err != nil {
			c.end(err)
			return
		}
		c.polls.Add(1)
		c.cursor.Store(reply.Cursor)
		bye := false
		for _, m := range reply.Messages {
			c.push(m)
			bye = bye || m.Type == "bye"
		}
		if bye {
			c.end(errByeReceived)
			return
		}
		q = url.Values{"session": {reply.Session}, "cursor": {strconv.FormatInt(reply.Cursor, 10)}, "wait": {wait}}
	}
}
