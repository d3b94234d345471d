package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// TestWebSocketContract walks one WebSocket session through the contract:
// hello, replay, synced, live delivery, ping, ack, read, and the errors.
func TestWebSocketContract(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	old := ts.publish(t, "alice", "order.created", map[string]any{"n": 1})
	ts.publish(t, "bob", "order.created", map[string]any{"n": 99})

	c := ts.dialWS(t, "alice", nil)
	hello := c.expect(t, "hello")
	if hello.Session == "" || hello.User != "alice" || hello.Transport != "websocket" || hello.ServerTime == "" {
		t.Fatalf("hello = %+v", hello)
	}
	rep := c.expect(t, "notification")
	if rep.ID != old.ID || rep.Seq != 1 || !rep.Replayed || rep.Topic != "order.created" || string(rep.Data) != `{"n": 1}` && string(rep.Data) != `{"n":1}` {
		t.Fatalf("replayed = %+v", rep)
	}
	synced := c.expect(t, "synced")
	if synced.Cursor != 1 || synced.Unread != 1 || synced.Truncated {
		t.Fatalf("synced = %+v", synced)
	}

	live := ts.publish(t, "alice", "order.shipped", map[string]any{"n": 2})
	got := c.expect(t, "notification")
	if got.ID != live.ID || got.Seq != 2 || got.Replayed {
		t.Fatalf("live = %+v, want %+v", got, live)
	}

	c.send(t, map[string]any{"type": "ping"})
	if pong := c.expect(t, "pong"); pong.ServerTime == "" {
		t.Fatalf("pong = %+v", pong)
	}
	c.send(t, map[string]any{"type": "ack", "ids": []string{live.ID}})
	c.send(t, map[string]any{"type": "read", "ids": []string{old.ID}})
	rd := c.expect(t, "read")
	if len(rd.IDs) != 1 || rd.IDs[0] != old.ID || rd.Unread != 1 {
		t.Fatalf("read = %+v", rd)
	}
	c.send(t, map[string]any{"type": "read", "up_to_seq": 2})
	if rd := c.expect(t, "read"); rd.Unread != 0 || len(rd.IDs) != 1 || rd.IDs[0] != live.ID {
		t.Fatalf("read up_to_seq = %+v", rd)
	}

	c.send(t, map[string]any{"type": "nope"})
	if e := c.expect(t, "error"); e.Code != "unknown_type" {
		t.Fatalf("error = %+v", e)
	}
	if err := c.conn.WriteMessage(websocket.TextMessage, []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	if e := c.expect(t, "error"); e.Code != "bad_message" {
		t.Fatalf("error = %+v", e)
	}
	// The connection survives bad messages.
	c.send(t, map[string]any{"type": "ping"})
	c.expect(t, "pong")
}

func TestWebSocketRefusals(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.MaxSessionsPerUser = 2; c.MaxMessageBytes = 1024 })
	dial := func(q url.Values, header http.Header) (int, string) {
		_, resp, err := websocket.DefaultDialer.Dial(ts.wsURL(q), header)
		if err == nil {
			t.Fatalf("dial %v succeeded", q)
		}
		if resp == nil {
			t.Fatalf("dial: %v", err)
		}
		defer resp.Body.Close()
		var body struct {
			Error struct{ Code string } `json:"error"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&body)
		return resp.StatusCode, body.Error.Code
	}
	expired, _ := ts.auth.NewToken("alice", "", -time.Minute)
	for name, tc := range map[string]struct {
		q      url.Values
		header http.Header
		status int
	}{
		"no token":      {url.Values{}, nil, 401},
		"bad token":     {url.Values{"token": {"abc.def.ghi"}}, nil, 401},
		"expired token": {url.Values{"token": {expired}}, nil, 401},
		"bad cursor":    {url.Values{"token": {ts.token(t, "alice")}, "cursor": {"x"}}, nil, 400},
		"bad origin":    {url.Values{"token": {ts.token(t, "alice")}}, http.Header{"Origin": {"https://evil.example"}}, 403},
	} {
		t.Run(name, func(t *testing.T) {
			if st, _ := dial(tc.q, tc.header); st != tc.status {
				t.Fatalf("status %d, want %d", st, tc.status)
			}
		})
	}

	t.Run("too many sessions", func(t *testing.T) {
		a := ts.dialWS(t, "carol", nil)
		a.expect(t, "hello")
		b := ts.dialWS(t, "carol", nil)
		b.expect(t, "hello")
		if st, code := dial(url.Values{"token": {ts.token(t, "carol")}}, nil); st != 429 || code != "too_many_sessions" {
			t.Fatalf("third session: %d %s", st, code)
		}
	})

	t.Run("message too big", func(t *testing.T) {
		c := ts.liveWS(t, "dave")
		big := `{"type":"ack","ids":["` + strings.Repeat("a", 2000) + `"]}`
		if err := c.conn.WriteMessage(websocket.TextMessage, []byte(big)); err != nil {
			t.Fatal(err)
		}
		err := c.waitClosed(t, 5*time.Second)
		var ce *websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != websocket.CloseMessageTooBig {
			t.Fatalf("closed with %v, want 1009", err)
		}
	})
}

func TestKickAndResume(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	a := ts.dialWS(t, "erin", nil)
	hello := a.expect(t, "hello")
	a.expect(t, "synced")

	var sessions struct {
		Sessions []struct{ ID, Transport string } `json:"sessions"`
	}
	if st := ts.do(t, "GET", "/v1/users/erin/sessions", testAPIKey, nil, &sessions); st != 200 || len(sessions.Sessions) != 1 || sessions.Sessions[0].ID != hello.Session {
		t.Fatalf("sessions: %d %+v", st, sessions)
	}

	// Resume: the old connection is told it was replaced; the id is kept; presence counts one.
	b := ts.dialWS(t, "erin", url.Values{"session": {hello.Session}, "cursor": {"0"}})
	if h := b.expect(t, "hello"); h.Session != hello.Session {
		t.Fatalf("resumed session id %q, want %q", h.Session, hello.Session)
	}
	if bye := a.expect(t, "bye"); bye.Reason != "replaced" {
		t.Fatalf("bye = %+v", bye)
	}
	closeCode(t, a, 4001)
	b.expect(t, "synced")
	if st := ts.do(t, "GET", "/v1/users/erin/sessions", testAPIKey, nil, &sessions); st != 200 || len(sessions.Sessions) != 1 {
		t.Fatalf("after resume: %d %+v", st, sessions)
	}

	// Another user's session id is never taken over.
	c := ts.dialWS(t, "mallory", url.Values{"session": {hello.Session}})
	if h := c.expect(t, "hello"); h.Session == hello.Session {
		t.Fatal("mallory took over erin's session")
	}

	// Kick.
	if st := ts.do(t, "DELETE", "/v1/sessions/"+hello.Session, testAPIKey, nil, nil); st != http.StatusNoContent {
		t.Fatalf("kick: %d", st)
	}
	if bye := b.expect(t, "bye"); bye.Reason != "kicked" || bye.RetryMs <= 0 {
		t.Fatalf("bye = %+v", bye)
	}
	closeCode(t, b, 4002)
	if st := ts.do(t, "DELETE", "/v1/sessions/"+hello.Session, testAPIKey, nil, nil); st != http.StatusNotFound {
		t.Fatalf("second kick: %d", st)
	}
	var stats struct {
		Sessions    int64            `json:"sessions"`
		Users       int64            `json:"users"`
		ByTransport map[string]int64 `json:"by_transport"`
	}
	if st := ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &stats); st != 200 || stats.Sessions != 1 || stats.Users != 1 || stats.ByTransport["websocket"] != 1 {
		t.Fatalf("stats: %d %+v", st, stats)
	}
}

// closeCode waits for the connection's close frame and checks its code.
func closeCode(t *testing.T, c *wsClient, want int) {
	t.Helper()
	err := c.waitClosed(t, 5*time.Second)
	var ce *websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != want {
		t.Fatalf("closed with %v, want close code %d", err, want)
	}
}

// TestHeartbeatEviction times the eviction, so it does not run in parallel
// with other tests.
func TestHeartbeatEviction(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.PingInterval = 500 * time.Millisecond; c.PingTimeout = 1500 * time.Millisecond })
	// A client that never answers: pong frames are not sent because nobody reads.
	q := url.Values{"token": {ts.token(t, "frank")}}
	conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(q), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetPingHandler(func(string) error { return nil }) // swallow pings: no pong, no sign of life
	start := time.Now()
	var bye msg
	for {
		_, data, err := conn.ReadMessage()
		if err != nil {
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != 4000 {
				t.Fatalf("closed with %v, want 4000", err)
			}
			break
		}
		var m msg
		_ = json.Unmarshal(data, &m)
		if m.Type == "bye" {
			bye = m
		}
	}
	took := time.Since(start)
	if bye.Reason != "heartbeat_timeout" {
		t.Fatalf("bye = %+v", bye)
	}
	if took < 1500*time.Millisecond || took > 2500*time.Millisecond+500*time.Millisecond {
		t.Fatalf("evicted after %s, want within [1.5s, 2.5s] (+ slack)", took)
	}
	// The sweep counts its evictions after it has ended the sessions, so the
	// count may trail the close the client saw.
	var stats struct{ Evictions int64 }
	eventually(t, 5*time.Second, "the eviction counted", func() bool {
		ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &stats)
		return stats.Evictions != 0
	})
	if stats.Evictions != 1 {
		t.Fatalf("evictions = %d", stats.Evictions)
	}
}

// A client that sends nothing but answers ping frames (a browser tab frozen
// by its browser) is pinged after one and a half intervals of silence and
// stays present past the ping timeout; a client that pings on time is never
// pinged. Its pongs race a 1.2 s timeout, so it does not run in parallel
// with other tests.
func TestPingFramesKeepSilentClient(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.PingInterval = 400 * time.Millisecond; c.PingTimeout = 1200 * time.Millisecond })
	dial := func(user string) (*websocket.Conn, *atomic.Int64) {
		conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {ts.token(t, user)}}), nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		var pings atomic.Int64
		conn.SetPingHandler(func(data string) error {
			pings.Add(1)
			return conn.WriteControl(websocket.PongMessage, []byte(data), time.Now().Add(time.Second))
		})
		return conn, &pings
	}
	silent, silentPings := dial("silent")
	talker, talkerPings := dial("talker")
	read := func(conn *websocket.Conn, errs chan<- error) {
		for {
			if _, _, err := conn.ReadMessage(); err != nil {
				errs <- err
				return
			}
		}
	}
	errs := make(chan error, 2)
	go read(silent, errs)
	go read(talker, errs)
	deadline := time.Now().Add(3 * time.Second) // 2.5 ping timeouts
	for time.Now().Before(deadline) {
		if err := talker.WriteMessage(websocket.TextMessage, []byte(`{"type":"ping"}`)); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-errs:
			t.Fatalf("a connection ended: %v", err)
		case <-time.After(200 * time.Millisecond):
		}
	}
	var users struct {
		Sessions int64 `json:"sessions"`
	}
	ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &users)
	if users.Sessions != 2 {
		t.Fatalf("%d sessions online, want both", users.Sessions)
	}
	// Silent for 3 s: pinged after 0.6 s, then every 0.4 s.
	if n := silentPings.Load(); n < 3 {
		t.Fatalf("silent client got %d ping frames, want at least 3", n)
	}
	if n := talkerPings.Load(); n != 0 {
		t.Fatalf("client that pings got %d ping frames, want none", n)
	}
}

// An idle WebSocket session keeps one goroutine on a 2 KiB stack, also while
// it answers pings: the server answers a lone ping on that goroutine without
// growing its stack (idle memory per session rests on it), and anything
// else on a goroutine of its own. Measured as the stack memory the server
// gains while 300 sessions answer pings, after a first round has grown the
// test clients' own stacks. The process's stack memory is the measure, so
// it does not run in parallel with other tests.
func TestIdleWebSocketStackStaysSmall(t *testing.T) {
	ts := startServer(t)
	const n = 300
	clients := make([]*wsClient, n)
	for i := range clients {
		clients[i] = ts.liveWS(t, fmt.Sprintf("stack%d", i))
	}
	round := func(ping string) {
		for _, c := range clients {
			if err := c.conn.WriteMessage(websocket.TextMessage, []byte(ping)); err != nil {
				t.Fatal(err)
			}
		}
		for _, c := range clients {
			c.expect(t, "pong")
		}
	}
	round(`{"type": "ping"}`) // not the usual bytes: read and answered off the idle goroutine
	time.Sleep(100 * time.Millisecond)
	stack := func() int64 {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return int64(ms.StackInuse)
	}
	before := stack()
	for range 3 {
		round(`{"type":"ping"}`)
	}
	grew := float64(stack()-before) / n
	if grew > 1024 {
		t.Fatalf("stacks grew by %.0f bytes per idle session while answering pings, want none", grew)
	}
	var stats struct{ Sessions int64 }
	ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &stats)
	if stats.Sessions != n {
		t.Fatalf("%d sessions after the pings, want %d", stats.Sessions, n)
	}
}

// Pings answered on the idle goroutine and notifications written by the
// session's writer share one socket: with both at once, every pong and every
// notification arrives whole, and the notifications in seq order.
func TestPingsDuringDeliveries(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	c := ts.liveWS(t, "busy")
	const n = 150
	pinged := make(chan error, 1)
	go func() {
		for range n {
			if err := c.conn.WriteMessage(websocket.TextMessage, []byte(`{"type":"ping"}`)); err != nil {
				pinged <- err
				return
			}
			time.Sleep(time.Millisecond)
		}
		pinged <- nil
	}()
	for i := range n {
		ts.publish(t, "busy", "t", map[string]int{"i": i})
	}
	if err := <-pinged; err != nil {
		t.Fatal(err)
	}
	pongs, seq := 0, int64(0)
	for pongs < n || seq < n {
		switch m := c.next(t, 10*time.Second); m.Type {
		case "pong":
			pongs++
		case "notification":
			if m.Seq != seq+1 {
				t.Fatalf("notification seq %d after %d", m.Seq, seq)
			}
			seq = m.Seq
		default:
			t.Fatalf("unexpected %s", m.Type)
		}
	}
}

// A replay larger than one write's chunk (64 KiB) reaches the client whole
// and in order.
func TestLargeReplayOverWebSocket(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const n = 500
	var items []map[string]any
	for range n {
		items = append(items, map[string]any{"user_id": "big", "topic": "bulk", "data": map[string]string{"pad": strings.Repeat("p", 300)}})
	}
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"notifications": items}, nil); st != http.StatusCreated {
		t.Fatalf("publish: %d", st)
	}
	c := ts.dialWS(t, "big", nil)
	c.expect(t, "hello")
	for i := range n {
		if m := c.expect(t, "notification"); m.Seq != int64(i+1) || !m.Replayed {
			t.Fatalf("replayed %+v, want seq %d", m, i+1)
		}
	}
	c.expect(t, "synced")
}

// With a ping timeout shorter than one and a half intervals, the server's
// ping frame comes early enough for a silent client's pong to keep it. Its
// pongs race a 1.2 s timeout, so it does not run in parallel with other tests.
func TestPingFramesBeforeShortTimeout(t *testing.T) {
	// A ping at 1.5 intervals (1.5 s) would come after the timeout (1.2 s).
	ts := startServer(t, func(c *Config) { c.PingInterval = time.Second; c.PingTimeout = 1200 * time.Millisecond })
	conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {ts.token(t, "frozen")}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ended := make(chan error, 1)
	go func() {
		for {
			if _, _, err := conn.ReadMessage(); err != nil { // answers ping frames with pongs
				ended <- err
				return
			}
		}
	}()
	select {
	case err := <-ended:
		t.Fatalf("the silent client was dropped: %v", err)
	case <-time.After(3 * time.Second): // two and a half ping timeouts
	}
}
