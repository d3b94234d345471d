package main

// The contract suite, written once and run over every transport (WebSocket,
// SSE, long-poll), then what only SSE or only long-poll have.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/handlers"
)

// eventually polls cond every 20ms until it holds, failing after timeout.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// scalar runs a query returning one integer directly in the test's schema.
func (ts *testServer) scalar(t testing.TB, query string, args ...any) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, ts.DBURL)
	if err != nil {
		t.Fatalf("connect to postgres: %v", err)
	}
	defer conn.Close(context.Background())
	var n int64
	if err := conn.QueryRow(ctx, query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

type sessionItem struct {
	ID        string `json:"id"`
	User      string `json:"user"`
	Transport string `json:"transport"`
}

// sessionsOf lists a user's live sessions through the operator API.
func (ts *testServer) sessionsOf(t testing.TB, user string) []sessionItem {
	t.Helper()
	var out struct {
		Sessions []sessionItem `json:"sessions"`
	}
	if st := ts.do(t, "GET", "/v1/users/"+user+"/sessions", testAPIKey, nil, &out); st != http.StatusOK {
		t.Fatalf("sessions of %s: %d", user, st)
	}
	return out.Sessions
}

type statsView struct {
	Sessions    int64            `json:"sessions"`
	Users       int64            `json:"users"`
	ByTransport map[string]int64 `json:"by_transport"`
	Evictions   int64            `json:"evictions"`
	Deliveries  int64            `json:"deliveries"`
}

func (ts *testServer) statsNow(t testing.TB) statsView {
	t.Helper()
	var st statsView
	if code := ts.do(t, "GET", "/v1/stats", testAPIKey, nil, &st); code != http.StatusOK {
		t.Fatalf("stats: %d", code)
	}
	return st
}

// hello reads hello and checks it names the transport.
func hello(t testing.TB, c transportClient, tr, user string) msg {
	t.Helper()
	h := c.expect(t, "hello")
	if h.Session == "" || h.User != user || h.Transport != tr || h.ServerTime == "" || h.RetryMs != 0 {
		t.Fatalf("hello = %+v, want transport %s user %s", h, tr, user)
	}
	return h
}

func TestTransportsHelloAndDelivery(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "del-" + tr
			old := ts.publish(t, user, "order.created", map[string]any{"n": 1})
			ts.publish(t, "other-"+tr, "order.created", map[string]any{"n": 99})

			c := ts.dialTransport(t, tr, user, nil)
			h := hello(t, c, tr, user)
			if h.Message != "" || h.Seq != 0 {
				t.Fatalf("hello = %+v", h)
			}
			rep := c.expect(t, "notification")
			if rep.ID != old.ID || rep.Seq != 1 || !rep.Replayed || rep.Topic != "order.created" || !jsonSame(rep.Data, `{"n":1}`) {
				t.Fatalf("replayed = %+v", rep)
			}
			if s := c.expect(t, "synced"); s.Cursor != 1 || s.Unread != 1 || s.Truncated {
				t.Fatalf("synced = %+v", s)
			}

			live := ts.publish(t, user, "order.shipped", map[string]any{"n": 2})
			if got := c.expect(t, "notification"); got.ID != live.ID || got.Seq != 2 || got.Replayed {
				t.Fatalf("live = %+v, want %+v", got, live)
			}

			c.send(t, map[string]any{"type": "ping"})
			if pong := c.expect(t, "pong"); pong.ServerTime == "" {
				t.Fatalf("pong = %+v", pong)
			}
			// One message or an array, on every transport.
			c.send(t, []map[string]any{{"type": "ack", "ids": []string{live.ID, old.ID}}, {"type": "ping"}})
			c.expect(t, "pong")
			c.send(t, map[string]any{"type": "read", "ids": []string{old.ID}})
			if rd := c.expect(t, "read"); len(rd.IDs) != 1 || rd.IDs[0] != old.ID || rd.Unread != 1 {
				t.Fatalf("read = %+v", rd)
			}
			c.send(t, map[string]any{"type": "read", "up_to_seq": 2})
			if rd := c.expect(t, "read"); rd.Unread != 0 || len(rd.IDs) != 1 || rd.IDs[0] != live.ID {
				t.Fatalf("read up_to_seq = %+v", rd)
			}

			// The same delivery records and session history as every transport.
			eventually(t, 5*time.Second, "deliveries recorded and acked", func() bool {
				return ts.scalar(t, `SELECT count(*) FROM deliveries WHERE user_id = $1 AND transport = $2 AND acked_at IS NOT NULL`, user, tr) == 2
			})
			if n := ts.scalar(t, `SELECT count(*) FROM deliveries WHERE user_id = $1 AND transport = $2 AND replayed AND seq = 1`, user, tr); n != 1 {
				t.Fatalf("replayed delivery rows: %d", n)
			}
			if n := ts.scalar(t, `SELECT count(*) FROM session_history WHERE user_id = $1 AND transport = $2 AND session_id = $3`, user, tr, h.Session); n != 1 {
				t.Fatalf("session_history rows: %d", n)
			}
		})
	}
}

// jsonSame compares JSON values regardless of spacing.
func jsonSame(raw json.RawMessage, want string) bool {
	var a, b any
	return json.Unmarshal(raw, &a) == nil && json.Unmarshal([]byte(want), &b) == nil && jsonString(a) == jsonString(b)
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestTransportsBadMessages(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.MaxMessageBytes = 1024 })
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "bad-" + tr
			c := ts.dialTransport(t, tr, user, nil)
			hello(t, c, tr, user)
			c.expect(t, "synced")
			big := `{"type":"ack","ids":["` + strings.Repeat("a", 2000) + `"]}`
			switch tr {
			case "websocket":
				ws := c.(*wsClient)
				ws.send(t, map[string]any{"type": "nope"})
				if e := ws.expect(t, "error"); e.Code != "unknown_type" {
					t.Fatalf("error = %+v", e)
				}
				// Over the limit: the connection is closed with 1009.
				if err := ws.conn.WriteMessage(websocket.TextMessage, []byte(big)); err != nil {
					t.Fatal(err)
				}
				closeCode(t, ws, websocket.CloseMessageTooBig)
			default:
				hs := httpSideOf(c)
				for body, want := range map[string]string{`{"type":"nope"}`: "unknown_type", `{not json`: "bad_message", `[]`: "bad_message"} {
					if st, _, code := hs.post(t, []byte(body)); st != http.StatusBadRequest || code != want {
						t.Fatalf("POST %s: %d %s, want 400 %s", body, st, code, want)
					}
				}
				// Over the limit: 413, and the session carries on.
				if st, _, code := hs.post(t, []byte(big)); st != http.StatusRequestEntityTooLarge || code != "too_large" {
					t.Fatalf("POST too big: %d %s", st, code)
				}
				c.send(t, map[string]any{"type": "ping"})
				c.expect(t, "pong")
				n := ts.publish(t, user, "still.here", nil)
				if got := c.expect(t, "notification"); got.ID != n.ID {
					t.Fatalf("after a refused message: %+v", got)
				}
			}
		})
	}
}

// httpSideOf returns the POST side of an SSE or long-poll client.
func httpSideOf(c transportClient) *httpSession {
	switch c := c.(type) {
	case *sseClient:
		return &c.httpSession
	case *pollClient:
		return &c.httpSession
	}
	panic("not an HTTP transport")
}

func TestTransportsReplay(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "rep-" + tr
			var notes []publishedNote
			for i := range 3 {
				notes = append(notes, ts.publish(t, user, "t", map[string]any{"i": i}))
			}
			c := ts.dialTransport(t, tr, user, nil)
			hello(t, c, tr, user)
			for i := range 3 {
				if m := c.expect(t, "notification"); m.Seq != int64(i+1) || !m.Replayed {
					t.Fatalf("replayed %d = %+v", i, m)
				}
			}
			c.expect(t, "synced")
			c.drop()
			for i := 3; i < 5; i++ {
				notes = append(notes, ts.publish(t, user, "t", map[string]any{"i": i}))
			}
			// Read ones are not replayed.
			if st := ts.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{notes[3].ID}}, nil); st != http.StatusOK {
				t.Fatalf("read: %d", st)
			}

			// With a cursor: only what is above it.
			c = ts.dialTransport(t, tr, user, url.Values{"cursor": {"3"}})
			hello(t, c, tr, user)
			if m := c.expect(t, "notification"); m.Seq != 5 || !m.Replayed || m.ID != notes[4].ID {
				t.Fatalf("replay after cursor 3 = %+v", m)
			}
			if s := c.expect(t, "synced"); s.Cursor != 5 || s.Unread != 4 {
				t.Fatalf("synced = %+v", s)
			}
			c.drop()

			// With none: every unread one.
			c = ts.dialTransport(t, tr, user, nil)
			hello(t, c, tr, user)
			var got []int64
			for {
				m := c.next(t, 5*time.Second)
				if m.Type == "synced" {
					if m.Cursor != 5 || m.Unread != 4 {
						t.Fatalf("synced = %+v", m)
					}
					break
				}
				got = append(got, m.Seq)
			}
			if !slices.Equal(got, []int64{1, 2, 3, 5}) {
				t.Fatalf("replay without cursor: %v", got)
			}
			// A cursor beyond everything replays nothing and keeps the cursor.
			c.drop()
			c = ts.dialTransport(t, tr, user, url.Values{"cursor": {"9"}})
			hello(t, c, tr, user)
			if s := c.expect(t, "synced"); s.Cursor != 9 {
				t.Fatalf("synced = %+v", s)
			}
		})
	}
}

// TestTransportsReplayRacingPublishes connects while notifications are being
// published: every seq arrives exactly once, in order, replayed ones before
// synced and live ones after.
func TestTransportsReplayRacingPublishes(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const total = 60
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "race-" + tr
			started := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range total {
					if i == 10 {
						close(started)
					}
					var p publishedNote
					if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"user_id": user, "topic": "race", "data": map[string]int{"i": i}}, &p); st != http.StatusCreated {
						t.Errorf("publish: %d", st)
						return
					}
				}
			}()
			<-started
			c := ts.dialTransport(t, tr, user, nil)
			hello(t, c, tr, user)
			var seqs []int64
			synced := false
			for len(seqs) < total {
				m := c.next(t, 10*time.Second)
				switch m.Type {
				case "synced":
					if synced {
						t.Fatal("synced twice")
					}
					synced = true
					if m.Cursor != int64(len(seqs)) {
						t.Fatalf("synced.cursor %d after %d notifications", m.Cursor, len(seqs))
					}
				case "notification":
					if m.Replayed == synced {
						t.Fatalf("seq %d replayed=%v, synced seen=%v", m.Seq, m.Replayed, synced)
					}
					seqs = append(seqs, m.Seq)
				default:
					t.Fatalf("unexpected %+v", m)
				}
			}
			wg.Wait()
			for i, s := range seqs {
				if s != int64(i+1) {
					t.Fatalf("seqs %v: want 1..%d, each once, in order", seqs, total)
				}
			}
			if !synced {
				t.Fatal("no synced")
			}
		})
	}
}

// TestTransportsEviction: a client that says nothing is evicted within one
// second after the ping timeout on every transport, and is told why where the
// transport can carry it; a client that keeps pinging (or polling) stays. It
// times the eviction, so it does not run in parallel with other tests.
func TestTransportsEviction(t *testing.T) {
	const timeout = 1500 * time.Millisecond
	ts := startServer(t, func(c *Config) { c.PingInterval = 500 * time.Millisecond; c.PingTimeout = timeout })
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "evict-" + tr
			// One live session that keeps signs of life coming.
			live := ts.dialTransport(t, tr, "alive-"+tr, url.Values{"wait": {"1"}})
			hello(t, live, tr, "alive-"+tr)
			stopPings := make(chan struct{})
			defer close(stopPings)
			if tr == "sse" {
				go func() {
					tick := time.NewTicker(400 * time.Millisecond)
					defer tick.Stop()
					for {
						select {
						case <-stopPings:
							return
						case <-tick.C:
							hs := httpSideOf(live)
							b, _ := json.Marshal(map[string]string{"type": "ping"})
							_, _, _ = ts.postMessages(t, hs.token, hs.sessionID(), b)
						}
					}
				}()
			}

			start := time.Now()
			var silent transportClient
			var pollSession, pollToken string
			switch tr {
			case "websocket":
				silent = ts.dialWSSilent(t, user)
			case "sse":
				silent = ts.dialSSE(t, user, nil, nil)
			case "longpoll":
				pollToken = ts.token(t, user)
				pollSession = ts.poll(t, pollToken, url.Values{}).Session
			}
			var gone time.Duration
			eventually(t, timeout+3*time.Second, "eviction", func() bool {
				if len(ts.sessionsOf(t, user)) == 0 {
					gone = time.Since(start)
					return true
				}
				return false
			})
			if gone < timeout || gone > timeout+time.Second+500*time.Millisecond {
				t.Fatalf("evicted after %s, want within [%s, %s] (+ slack)", gone, timeout, timeout+time.Second)
			}
			var bye msg
			switch tr {
			case "longpoll":
				// The next poll learns why.
				reply := ts.poll(t, pollToken, url.Values{"session": {pollSession}, "wait": {"0"}})
				if n := len(reply.Messages); n == 0 || reply.Session != pollSession {
					t.Fatalf("poll after eviction: %+v", reply)
				}
				bye = reply.Messages[len(reply.Messages)-1]
			default:
				for {
					m := silent.next(t, 5*time.Second)
					if m.Type == "bye" {
						bye = m
						break
					}
				}
				err := silent.waitClosed(t, 5*time.Second)
				if tr == "websocket" {
					var ce *websocket.CloseError
					if !errors.As(err, &ce) || ce.Code != 4000 {
						t.Fatalf("closed with %v, want 4000", err)
					}
				} else if !errors.Is(err, io.EOF) {
					t.Fatalf("stream ended with %v, want a clean end", err)
				}
			}
			if bye.Type != "bye" || bye.Reason != "heartbeat_timeout" || bye.RetryMs <= 0 {
				t.Fatalf("bye = %+v", bye)
			}
			if s := ts.sessionsOf(t, "alive-"+tr); len(s) != 1 || s[0].Transport != tr {
				t.Fatalf("the pinging %s session was evicted: %+v", tr, s)
			}
		})
	}
	if st := ts.statsNow(t); st.Evictions != 3 {
		t.Fatalf("evictions = %d, want 3", st.Evictions)
	}
}

// TestTransportsKick: DELETE /v1/sessions/{id} says bye kicked and ends the
// session on every transport.
func TestTransportsKick(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "kick-" + tr
			c := ts.dialTransport(t, tr, user, nil)
			h := hello(t, c, tr, user)
			c.expect(t, "synced")
			if st := ts.do(t, "DELETE", "/v1/sessions/"+h.Session, testAPIKey, nil, nil); st != http.StatusNoContent {
				t.Fatalf("kick: %d", st)
			}
			if bye := c.expect(t, "bye"); bye.Reason != "kicked" || bye.RetryMs <= 0 {
				t.Fatalf("bye = %+v", bye)
			}
			err := c.waitClosed(t, 5*time.Second)
			switch tr {
			case "websocket":
				var ce *websocket.CloseError
				if !errors.As(err, &ce) || ce.Code != 4002 {
					t.Fatalf("closed with %v, want 4002", err)
				}
			case "sse":
				if !errors.Is(err, io.EOF) {
					t.Fatalf("stream ended with %v", err)
				}
			case "longpoll":
				if !errors.Is(err, errByeReceived) {
					t.Fatalf("poll loop ended with %v", err)
				}
			}
			if s := ts.sessionsOf(t, user); len(s) != 0 {
				t.Fatalf("sessions after kick: %+v", s)
			}
			if st := ts.do(t, "DELETE", "/v1/sessions/"+h.Session, testAPIKey, nil, nil); st != http.StatusNotFound {
				t.Fatalf("second kick: %d", st)
			}
		})
	}
	// A long-poll session kicked between two polls: the next poll carries the bye.
	t.Run("longpoll between polls", func(t *testing.T) {
		tok := ts.token(t, "kick-idle")
		first := ts.poll(t, tok, url.Values{})
		if st := ts.do(t, "DELETE", "/v1/sessions/"+first.Session, testAPIKey, nil, nil); st != http.StatusNoContent {
			t.Fatalf("kick: %d", st)
		}
		reply := ts.poll(t, tok, url.Values{"session": {first.Session}, "cursor": {"0"}})
		if len(reply.Messages) != 1 || reply.Messages[0].Type != "bye" || reply.Messages[0].Reason != "kicked" {
			t.Fatalf("poll after kick: %+v", reply)
		}
		// The one after is a new session.
		again := ts.poll(t, tok, url.Values{"session": {first.Session}, "cursor": {"0"}})
		if again.Session == first.Session || len(again.Messages) == 0 || again.Messages[0].Type != "hello" {
			t.Fatalf("poll after bye: %+v", again)
		}
	})
}

// TestTransportsResume: session= moves a session between any two transports:
// the old connection is told `replaced`, the id is kept, the replay follows,
// and presence counts the device once.
func TestTransportsResume(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	for _, from := range allTransports {
		for _, to := range allTransports {
			t.Run(from+"_to_"+to, func(t *testing.T) {
				user := "res-" + from + "-" + to
				a := ts.dialTransport(t, from, user, nil)
				h := hello(t, a, from, user)
				a.expect(t, "synced")
				n1 := ts.publish(t, user, "t", nil)
				if m := a.expect(t, "notification"); m.ID != n1.ID {
					t.Fatalf("live on %s: %+v", from, m)
				}
				n2 := ts.publish(t, user, "t", nil)
				a.expect(t, "notification")

				// The client holds seq 1 only (say the second was lost with the connection).
				cursor, want := "1", []string{n2.ID}
				lpToLP := from == "longpoll" && to == "longpoll"
				if lpToLP {
					// Long-poll to long-poll is a reloaded page: the old poll loop
					// is gone. A poll whose cursor is not behind what the session
					// already acknowledged continues the session; one behind (the
					// old loop acknowledged seq 1 at least) is a client that lost
					// its place, and resumes.
					a.drop()
					a.waitClosed(t, 5*time.Second)
					// A poll it sent just before is still reaching the server:
					// let it arrive (and end) before the page comes back.
					time.Sleep(300 * time.Millisecond)
					cursor, want = "0", []string{n1.ID, n2.ID}
				}
				b := ts.dialTransport(t, to, user, url.Values{"session": {h.Session}, "cursor": {cursor}})
				if hb := hello(t, b, to, user); hb.Session != h.Session {
					t.Fatalf("resumed id %q, want %q", hb.Session, h.Session)
				}
				for _, id := range want {
					if m := b.expect(t, "notification"); m.ID != id || !m.Replayed {
						t.Fatalf("replay after resume: %+v, want %s", m, id)
					}
				}
				b.expect(t, "synced")
				for !lpToLP {
					m := a.next(t, 5*time.Second)
					if m.Type == "bye" {
						if m.Reason != "replaced" {
							t.Fatalf("bye = %+v", m)
						}
						break
					}
				}
				err := a.waitClosed(t, 5*time.Second)
				if from == "websocket" {
					var ce *websocket.CloseError
					if !errors.As(err, &ce) || ce.Code != 4001 {
						t.Fatalf("old websocket closed with %v, want 4001", err)
					}
				}
				s := ts.sessionsOf(t, user)
				if len(s) != 1 || s[0].ID != h.Session || s[0].Transport != to {
					t.Fatalf("sessions after resume: %+v", s)
				}
				// The resumed session works.
				n3 := ts.publish(t, user, "t", nil)
				if m := b.expect(t, "notification"); m.ID != n3.ID || m.Replayed {
					t.Fatalf("live after resume: %+v", m)
				}
				// Another user never takes it over.
				m := ts.dialTransport(t, to, "mallory-"+from+"-"+to, url.Values{"session": {h.Session}})
				if hm := m.expect(t, "hello"); hm.Session == h.Session {
					t.Fatal("another user took over the session")
				}
				if s := ts.sessionsOf(t, user); len(s) != 1 || s[0].Transport != to {
					t.Fatalf("sessions after takeover attempt: %+v", s)
				}
			})
		}
	}
}

// TestTransportsPresence: one user with a tab on each transport is three
// sessions, one user, one per transport.
func TestTransportsPresence(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	var clients []transportClient
	for _, tr := range allTransports {
		c := ts.dialTransport(t, tr, "tabs", nil)
		hello(t, c, tr, "tabs")
		c.expect(t, "synced")
		clients = append(clients, c)
	}
	s := ts.sessionsOf(t, "tabs")
	var got []string
	for _, x := range s {
		got = append(got, x.Transport)
	}
	slices.Sort(got)
	if !slices.Equal(got, []string{"longpoll", "sse", "websocket"}) {
		t.Fatalf("sessions: %+v", s)
	}
	st := ts.statsNow(t)
	if st.Sessions != 3 || st.Users != 1 || st.ByTransport["websocket"] != 1 || st.ByTransport["sse"] != 1 || st.ByTransport["longpoll"] != 1 {
		t.Fatalf("stats: %+v", st)
	}
	// One publish reaches all three; one read is told to all three.
	n := ts.publish(t, "tabs", "t", nil)
	for _, c := range clients {
		if m := c.expect(t, "notification"); m.ID != n.ID {
			t.Fatalf("notification: %+v", m)
		}
	}
	if code := ts.do(t, "POST", "/v1/users/tabs/read", testAPIKey, map[string]any{"ids": []string{n.ID}}, nil); code != http.StatusOK {
		t.Fatalf("read: %d", code)
	}
	for _, c := range clients {
		if m := c.expect(t, "read"); m.Unread != 0 || len(m.IDs) != 1 {
			t.Fatalf("read: %+v", m)
		}
	}
	// Shutdown tells every transport (the long-poll client has its next poll
	// waiting by now).
	time.Sleep(200 * time.Millisecond)
	ts.stop(t)
	for i, c := range clients {
		for {
			m := c.next(t, 5*time.Second)
			if m.Type == "bye" {
				if m.Reason != "shutdown" || m.RetryMs < 1000 {
					t.Fatalf("%s: bye = %+v", allTransports[i], m)
				}
				break
			}
		}
	}
}

// refusal makes a connection attempt on tr that the server must refuse and
// returns its status and error code.
func (ts *testServer) refusal(t testing.TB, tr string, q url.Values, header http.Header) (int, string) {
	t.Helper()
	var resp *http.Response
	switch tr {
	case "websocket":
		conn, r, err := websocket.DefaultDialer.Dial(ts.wsURL(q), header)
		if err == nil {
			conn.Close()
			t.Fatalf("dial %v succeeded", q)
		}
		if r == nil {
			t.Fatalf("dial: %v", err)
		}
		resp = r
	default:
		path := "/v1/sse?"
		if tr == "longpoll" {
			path = "/v1/poll?"
		}
		req, err := http.NewRequest("GET", ts.URL+path+q.Encode(), nil)
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range header {
			req.Header[k] = v
		}
		if resp, err = http.DefaultClient.Do(req); err != nil {
			t.Fatal(err)
		}
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != http.StatusOK && !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("%s refusal %d with Content-Type %q, want a JSON body", tr, resp.StatusCode, ct)
	}
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, errorBodyCode(raw)
}

func TestTransportsRefusals(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.MaxSessionsPerUser = 2 })
	expired, _ := ts.auth.NewToken("alice", "", -time.Minute)
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			good := ts.token(t, "alice-"+tr)
			for name, tc := range map[string]struct {
				q      url.Values
				header http.Header
				status int
				code   string
			}{
				"no token":      {url.Values{}, nil, 401, "unauthorized"},
				"bad token":     {url.Values{"token": {"abc.def.ghi"}}, nil, 401, "unauthorized"},
				"expired token": {url.Values{"token": {expired}}, nil, 401, "unauthorized"},
				"other secret":  {url.Values{"token": {otherSecretToken(t)}}, nil, 401, "unauthorized"},
				"bad cursor":    {url.Values{"token": {good}, "cursor": {"x"}}, nil, 400, "bad_cursor"},
				"negative":      {url.Values{"token": {good}, "cursor": {"-1"}}, nil, 400, "bad_cursor"},
				"bad origin":    {url.Values{"token": {good}}, http.Header{"Origin": {"https://evil.example"}}, 403, "origin_not_allowed"},
			} {
				t.Run(name, func(t *testing.T) {
					if st, code := ts.refusal(t, tr, tc.q, tc.header); st != tc.status || code != tc.code {
						t.Fatalf("status %d %q, want %d %q", st, code, tc.status, tc.code)
					}
				})
			}
			t.Run("too many sessions", func(t *testing.T) {
				user := "many-" + tr
				for range 2 {
					c := ts.dialTransport(t, tr, user, nil)
					hello(t, c, tr, user)
				}
				if st, code := ts.refusal(t, tr, url.Values{"token": {ts.token(t, user)}}, nil); st != 429 || code != "too_many_sessions" {
					t.Fatalf("third session: %d %s", st, code)
				}
			})
		})
	}
	t.Run("messages endpoint", func(t *testing.T) {
		c := ts.dialTransport(t, "sse", "owner", nil)
		h := hello(t, c, "sse", "owner")
		ping := []byte(`{"type":"ping"}`)
		for name, tc := range map[string]struct {
			token, session string
			status         int
		}{
			"no token":   {"", h.Session, 401},
			"bad token":  {"abc.def.ghi", h.Session, 401},
			"expired":    {expired, h.Session, 401},
			"other user": {ts.token(t, "intruder"), h.Session, 404}, // answered as an unknown session
			"unknown":    {ts.token(t, "owner"), "no-such-session", 404},
			"the owner":  {ts.token(t, "owner"), h.Session, 200},
		} {
			if st, _, _ := ts.postMessages(t, tc.token, tc.session, ping); st != tc.status {
				t.Fatalf("%s: %d, want %d", name, st, tc.status)
			}
		}
	})
}

// otherSecretToken is a well-formed token signed with the wrong secret.
func otherSecretToken(t testing.TB) string {
	t.Helper()
	tok, err := handlers.NewAuth("another-secret-0123456789", "", nil).NewToken("alice", "", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// --- SSE only ---

func TestSSEWire(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.PingInterval = 300 * time.Millisecond; c.PingTimeout = 5 * time.Second })
	ts.publish(t, "wire", "t", map[string]any{"text": "line one\nline two"})
	resp, err := http.Get(ts.sseURL(url.Values{"token": {ts.token(t, "wire")}, "cursor": {"0"}}))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	h := resp.Header
	if h.Get("Content-Type") != "text/event-stream" || h.Get("Cache-Control") != "no-cache, no-transform" || h.Get("X-Accel-Buffering") != "no" {
		t.Fatalf("headers: %v", h)
	}

	c := ts.dialSSE(t, "wire", url.Values{"cursor": {"0"}}, nil)
	hello(t, c, "sse", "wire")
	if m := c.expect(t, "notification"); m.Seq != 1 || !jsonSame(m.Data, `{"text":"line one\nline two"}`) {
		t.Fatalf("notification: %+v", m)
	}
	c.expect(t, "synced")
	n := ts.publish(t, "wire", "t", nil)
	c.expect(t, "notification")
	c.send(t, map[string]any{"type": "ping"}) // the pong comes back in the POST answer
	c.expect(t, "pong")
	if code := ts.do(t, "POST", "/v1/users/wire/read", testAPIKey, map[string]any{"ids": []string{n.ID}}, nil); code != http.StatusOK {
		t.Fatalf("read: %d", code)
	}
	c.expect(t, "read")
	evs := c.eventsSeen()
	// Every event carries the cursor as id: hello 0, notifications their seq, the rest the cursor.
	want := []sseEvent{{Event: "hello", ID: "0"}, {Event: "notification", ID: "1"}, {Event: "synced", ID: "1"}, {Event: "notification", ID: "2"}, {Event: "read", ID: "2"}}
	if len(evs) != len(want) {
		t.Fatalf("events: %+v", evs)
	}
	for i := range want {
		if evs[i].Event != want[i].Event || evs[i].ID != want[i].ID {
			t.Fatalf("event %d = %+v, want %+v", i, evs[i], want[i])
		}
	}
	c.emu.Lock()
	retry, bad := c.retry, c.badType
	c.emu.Unlock()
	if retry != "1000" || bad != "" {
		t.Fatalf("retry %q (want 1000), event name mismatch %q", retry, bad)
	}
	// Comment keep-alives every ping interval (at most 15s).
	before := c.comments.Load()
	eventually(t, 3*time.Second, "two keep-alive comments", func() bool { return c.comments.Load() >= before+2 })

	// Last-Event-ID overrides cursor; a bad one is refused like a bad cursor.
	c.drop()
	d := ts.dialSSE(t, "wire", url.Values{"cursor": {"0"}}, http.Header{"Last-Event-ID": {"1"}})
	hello(t, d, "sse", "wire")
	if s := d.expect(t, "synced"); s.Cursor != 1 {
		t.Fatalf("after Last-Event-ID 1: synced = %+v", s) // seq 2 is read: nothing to replay
	}
	if st, code := ts.refusal(t, "sse", url.Values{"token": {ts.token(t, "wire")}}, http.Header{"Last-Event-ID": {"abc"}}); st != 400 || code != "bad_cursor" {
		t.Fatalf("bad Last-Event-ID: %d %s", st, code)
	}
}

// TestSSEOwnStream: a replay to one device is never sent to another device
// of the same user (each session has its own stream).
func TestSSEOwnStream(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	for range 3 {
		ts.publish(t, "two", "t", nil)
	}
	a := ts.dialSSE(t, "two", url.Values{"cursor": {"2"}}, nil)
	hello(t, a, "sse", "two")
	a.expect(t, "notification")
	a.expect(t, "synced")
	b := ts.dialSSE(t, "two", nil, nil)
	hello(t, b, "sse", "two")
	for range 3 {
		b.expect(t, "notification")
	}
	b.expect(t, "synced")
	n := ts.publish(t, "two", "t", nil)
	if m := a.expect(t, "notification"); m.ID != n.ID || m.Replayed {
		t.Fatalf("a got %+v, want only the live one", m)
	}
	b.expect(t, "notification")
}

// --- long-poll only ---

func TestPollNeverLoses(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	tok := ts.token(t, "lossy")
	first := ts.poll(t, tok, url.Values{})
	if len(first.Messages) != 2 || first.Messages[0].Type != "hello" || first.Messages[1].Type != "synced" || first.Cursor != 0 {
		t.Fatalf("first poll: %+v", first)
	}
	sid := first.Session
	n1 := ts.publish(t, "lossy", "t", nil)
	n2 := ts.publish(t, "lossy", "t", nil)
	// Every answer is lost: polling again with the old cursor sends what was
	// sent before again, then anything new, with nothing twice.
	for deadline := time.Now().Add(5 * time.Second); ; {
		got := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"0"}, "wait": {"5"}})
		if len(got.Messages) == 0 || got.Messages[0].ID != n1.ID {
			t.Fatalf("poll: %+v", got)
		}
		if got.Cursor == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("seq 2 not delivered: %+v", got)
		}
	}
	again := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"0"}, "wait": {"5"}})
	if len(again.Messages) != 2 || again.Messages[0].ID != n1.ID || again.Messages[1].ID != n2.ID || again.Cursor != 2 {
		t.Fatalf("resent: %+v", again)
	}
	// Half acknowledged: only the second comes again.
	half := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"1"}, "wait": {"5"}})
	if len(half.Messages) != 1 || half.Messages[0].ID != n2.ID {
		t.Fatalf("after cursor 1: %+v", half)
	}
	// All acknowledged: nothing comes at wait, and the acks are recorded.
	start := time.Now()
	empty := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"2"}, "wait": {"1"}})
	if len(empty.Messages) != 0 || empty.Cursor != 2 || time.Since(start) < time.Second {
		t.Fatalf("after cursor 2: %+v in %s", empty, time.Since(start))
	}
	eventually(t, 5*time.Second, "acks recorded", func() bool {
		return ts.scalar(t, `SELECT count(*) FROM deliveries WHERE session_id = $1 AND acked_at IS NOT NULL`, sid) == 2
	})
	// Each notification was recorded as delivered once.
	if st := ts.statsNow(t); st.Deliveries != 2 {
		t.Fatalf("deliveries = %d, want 2 (resends are not new deliveries)", st.Deliveries)
	}
}

// TestPollWaitAndBatch times the poll's waits, so it does not run in parallel
// with other tests.
func TestPollWaitAndBatch(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.PingInterval = 500 * time.Millisecond; c.PingTimeout = 1500 * time.Millisecond })
	tok := ts.token(t, "waiter")
	for _, bad := range []string{"x", "-1", "61", "1.5"} {
		if st, code := ts.refusal(t, "longpoll", url.Values{"token": {tok}, "wait": {bad}}, nil); st != 400 || code != "bad_wait" {
			t.Fatalf("wait=%s: %d %s", bad, st, code)
		}
	}
	_, first, header, err := ts.pollOnce(context.Background(), tok, url.Values{"wait": {"30"}})
	if err != nil {
		t.Fatal(err)
	}
	if header.Get("Cache-Control") != "no-store" || header.Get("X-Accel-Buffering") != "no" {
		t.Fatalf("headers: %v", header)
	}
	sid := first.Session
	q := func(wait string) url.Values {
		return url.Values{"session": {sid}, "cursor": {"0"}, "wait": {wait}}
	}
	// wait=0 answers at once.
	start := time.Now()
	if r := ts.poll(t, tok, q("0")); len(r.Messages) != 0 || time.Since(start) > time.Second {
		t.Fatalf("wait=0: %+v after %s", r, time.Since(start))
	}
	// A poll that waits longer than the ping timeout keeps the session alive.
	start = time.Now()
	if r := ts.poll(t, tok, q("3")); len(r.Messages) != 0 || time.Since(start) < 3*time.Second {
		t.Fatalf("wait=3: %+v after %s", r, time.Since(start))
	}
	if s := ts.sessionsOf(t, "waiter"); len(s) != 1 {
		t.Fatalf("a session with a poll waiting was evicted: %+v", s)
	}
	// A burst comes back in one answer, as soon as it is there.
	type result struct {
		r   pollReply
		err error
	}
	done := make(chan result, 1)
	go func() {
		_, r, _, err := ts.pollOnce(context.Background(), tok, q("20"))
		done <- result{r, err}
	}()
	time.Sleep(200 * time.Millisecond)
	var notes []map[string]any
	for i := range 5 {
		notes = append(notes, map[string]any{"user_id": "waiter", "topic": "burst", "data": map[string]int{"i": i}})
	}
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"notifications": notes}, nil); st != http.StatusCreated {
		t.Fatalf("batch publish: %d", st)
	}
	select {
	case res := <-done:
		if res.err != nil || len(res.r.Messages) != 5 || res.r.Cursor != 5 {
			t.Fatalf("burst: %+v %v", res.r, res.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting poll did not return with the burst")
	}
}

// TestPollNewConnectionTakesOver: a poll that comes while another poll of the
// same session waits is a new connection of the device (its client gave up on
// the first): the waiting poll returns at once with bye replaced, the new one
// gets hello with the same id and the replay, and presence counts one.
func TestPollNewConnectionTakesOver(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	tok := ts.token(t, "twice")
	sid := ts.poll(t, tok, url.Values{}).Session
	old := ts.publish(t, "twice", "t", nil)
	got := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"0"}, "wait": {"5"}})
	if len(got.Messages) != 1 || got.Messages[0].ID != old.ID || got.Cursor != 1 {
		t.Fatalf("poll: %+v", got)
	}
	q := url.Values{"session": {sid}, "cursor": {"1"}, "wait": {"20"}}
	type result struct {
		r    pollReply
		took time.Duration
	}
	older := make(chan result, 1)
	go func() {
		start := time.Now()
		_, r, _, _ := ts.pollOnce(context.Background(), tok, q)
		older <- result{r, time.Since(start)}
	}()
	time.Sleep(300 * time.Millisecond)
	// The client gave up on that poll and starts over with its cursor 0.
	newer := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"0"}, "wait": {"20"}})
	if len(newer.Messages) != 3 || newer.Session != sid || newer.Messages[0].Type != "hello" || newer.Messages[0].Session != sid ||
		newer.Messages[1].ID != old.ID || !newer.Messages[1].Replayed || newer.Messages[2].Type != "synced" {
		t.Fatalf("newer poll: %+v", newer)
	}
	select {
	case res := <-older:
		if len(res.r.Messages) != 1 || res.r.Messages[0].Type != "bye" || res.r.Messages[0].Reason != "replaced" || res.took > 5*time.Second {
			t.Fatalf("older poll: %+v after %s", res.r, res.took)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the older poll did not return when a newer one came")
	}
	if s := ts.sessionsOf(t, "twice"); len(s) != 1 || s[0].ID != sid {
		t.Fatalf("sessions: %+v", s)
	}
	// The new connection's loop continues as usual.
	n := ts.publish(t, "twice", "t", nil)
	next := ts.poll(t, tok, url.Values{"session": {sid}, "cursor": {"1"}, "wait": {"5"}})
	if len(next.Messages) != 1 || next.Messages[0].ID != n.ID || next.Messages[0].Replayed {
		t.Fatalf("continuation: %+v", next)
	}
}

// TestSSEStalledClientIsCut: a client that stops reading while its stream is
// full is ended (a slow consumer: its queue overflows while the library's
// handler is stuck writing to it), and the server cuts the stream at once:
// none of the SSE library's goroutines or ours stay behind, though the client
// keeps its connection open.
// Not parallel: sseGoroutines counts the SSE goroutines of the whole process.
func TestSSEStalledClientIsCut(t *testing.T) {
	ts := startServer(t, func(c *Config) { c.QueueLimit = 4; c.ReplayLimit = 4; c.MaxDataBytes = 1 << 20 })
	// A tiny receive buffer, so the server's writes block soon.
	dialer := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		}); err != nil {
			return err
		}
		return serr
	}}
	conn, err := dialer.Dial("tcp", strings.TrimPrefix(ts.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := fmt.Fprintf(conn, "GET /v1/sse?token=%s HTTP/1.1\r\nHost: notifyd\r\n\r\n", ts.token(t, "stalled")); err != nil {
		t.Fatal(err)
	}
	// Read the header and hello, then never read again.
	br := bufio.NewReader(conn)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "event: hello") {
			break
		}
	}
	eventually(t, 5*time.Second, "sse goroutines running", func() bool { return sseGoroutines() > 0 })
	// Big notifications fill the socket buffers (the server's send buffer
	// grows to 4 MB), then small ones fill the window and the queue.
	for range 6 {
		ts.publish(t, "stalled", "big", map[string]string{"pad": strings.Repeat("p", 900<<10)})
	}
	ended := false
	for round := 0; round < 300 && !ended; round++ {
		ts.publish(t, "stalled", "small", nil)
		ended = len(ts.sessionsOf(t, "stalled")) == 0
	}
	if !ended {
		t.Fatal("the stalled SSE session is still live")
	}
	// Cut at once (bye gets 1s), long before a write deadline would end it.
	eventually(t, 5*time.Second, "the stalled stream's goroutines gone", func() bool { return sseGoroutines() == 0 })
	eventually(t, 5*time.Second, "the session's end recorded", func() bool {
		return ts.scalar(t, `SELECT count(*) FROM session_history WHERE user_id = 'stalled' AND end_reason = 'slow_consumer'`) == 1
	})
}

// sseGoroutines counts goroutines of our SSE transport.
func sseGoroutines() int {
	var buf bytes.Buffer
	_ = pprof.Lookup("goroutine").WriteTo(&buf, 2)
	n := 0
	for _, g := range strings.Split(buf.String(), "\n\n") {
		// The stream's writer and keep-alive, and the goroutine that waits
		// for the client to leave (the only hijacked connection here).
		if strings.Contains(g, "handlers.(*sseConn)") || strings.Contains(g, "handlers.onClose") {
			n++
		}
	}
	return n
}

// TestHijackedAnswersKeepCORS: an SSE stream, and a poll answered after it
// waited, are written on the bare connection taken from net/http. They still
// carry what the middleware set for a cross-origin browser, and say that the
// connection closes after them; a poll answered at once keeps it open.
func TestHijackedAnswersKeepCORS(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	token := ts.token(t, "cors")
	get := func(what, u string) (*http.Response, []byte) {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, u, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Origin", ts.URL)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body []byte
		if resp.Header.Get("Content-Type") == "text/event-stream" {
			line, _ := bufio.NewReader(resp.Body).ReadString('\n')
			body = []byte(line)
		} else if body, err = io.ReadAll(resp.Body); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Access-Control-Allow-Origin") != ts.URL {
			t.Fatalf("%s: %d %v", what, resp.StatusCode, resp.Header)
		}
		return resp, body
	}

	resp, first := get("SSE", ts.sseURL(url.Values{"token": {token}}))
	if !resp.Close || len(first) == 0 {
		t.Fatalf("SSE: Close=%v, first line %q", resp.Close, first)
	}

	poll := ts.URL + "/v1/poll?" + url.Values{"token": {token}, "wait": {"0"}}.Encode()
	resp, body := get("opening poll", poll)
	var opened struct {
		Session string `json:"session"`
		Cursor  int64  `json:"cursor"`
	}
	if err := json.Unmarshal(body, &opened); err != nil || opened.Session == "" || resp.Close {
		t.Fatalf("opening poll: Close=%v, %s (%v)", resp.Close, body, err)
	}
	waited := ts.URL + "/v1/poll?" + url.Values{"token": {token}, "session": {opened.Session},
		"cursor": {strconv.FormatInt(opened.Cursor, 10)}, "wait": {"1"}}.Encode()
	start := time.Now()
	resp, body = get("waited poll", waited)
	var reply struct {
		Session  string            `json:"session"`
		Messages []json.RawMessage `json:"messages"`
	}
	if err := json.Unmarshal(body, &reply); err != nil || reply.Session != opened.Session || len(reply.Messages) != 0 {
		t.Fatalf("waited poll: %s (%v)", body, err)
	}
	if !resp.Close || time.Since(start) < 900*time.Millisecond || resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatalf("waited poll: Close=%v after %v, headers %v", resp.Close, time.Since(start), resp.Header)
	}
}
