package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/store/storetest"
)

// startNodes starts n whole notifyd nodes in this process (node-0, node-1, …) on one
// Postgres schema, as several processes behind a load balancer share one
// database.
func startNodes(t *testing.T, n int) []*testServer {
	t.Helper()
	dbURL := storetest.URL(t)
	nodes := make([]*testServer, n)
	for i := range nodes {
		nodes[i] = startServerOn(t, dbURL, func(c *Config) { c.NodeID = fmt.Sprintf("node-%d", i) })
	}
	return nodes
}

// waitRecorded waits until the session's open history row is written (the
// recorder writes it within its flush interval): only then can another node
// find the session.
func (ts *testServer) waitRecorded(t *testing.T, session string) {
	t.Helper()
	eventually(t, 10*time.Second, "session "+session+" recorded", func() bool {
		return ts.scalar(t, `SELECT count(*) FROM session_history WHERE session_id = $1 AND ended_at IS NULL`, session) == 1
	})
}

// expectRead reads the next message of c and fails unless it is a read of
// exactly ids with this unread count.
func expectRead(t *testing.T, c transportClient, ids []string, unread int64) {
	t.Helper()
	m := c.expect(t, "read")
	if fmt.Sprint(m.IDs) != fmt.Sprint(ids) || m.Unread != unread {
		t.Fatalf("read = ids %v unread %d, want ids %v unread %d", m.IDs, m.Unread, ids, unread)
	}
}

// TestClusterReadReachesEveryNode: a read through node A (the API, a
// session's read message) and an application's plain SQL UPDATE of read_at
// reach the user's devices on all three nodes, over every transport, as one
// `read` each with the authoritative unread count, in commit order.
func TestClusterReadReachesEveryNode(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, 3)
	a, b := nodes[0], nodes[1]
	const user = "cluster-reader"
	// One WebSocket on A (it sends a read itself), a device of every transport on B.
	onA := a.dialTransport(t, "websocket", user, nil)
	hello(t, onA, "websocket", user)
	onA.expect(t, "synced")
	devices := []transportClient{onA}
	for _, tr := range allTransports {
		c := b.dialTransport(t, tr, user, nil)
		hello(t, c, tr, user)
		c.expect(t, "synced")
		devices = append(devices, c)
	}
	devices = append(devices, nodes[2].liveWS(t, user))
	var ps []publishedNote
	for i := range 4 {
		ps = append(ps, nodes[i%3].publish(t, user, "t", nil))
	}
	for _, c := range devices {
		for _, p := range ps {
			if m := c.expect(t, "notification"); m.ID != p.ID {
				t.Fatalf("notification %+v, want %s", m, p.ID)
			}
		}
	}

	// The API through A.
	var res struct {
		IDs    []string `json:"ids"`
		Unread int64    `json:"unread"`
	}
	if st := a.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{ps[0].ID}}, &res); st != http.StatusOK || res.Unread != 3 {
		t.Fatalf("read through A: %d %+v", st, res)
	}
	for _, c := range devices {
		expectRead(t, c, []string{ps[0].ID}, 3)
	}

	// A session's own read message, on A.
	onA.send(t, map[string]any{"type": "read", "up_to_seq": ps[1].Seq})
	for _, c := range devices {
		expectRead(t, c, []string{ps[1].ID}, 2)
	}

	// The application's own SQL, on neither node.
	conn := pgConn(t, a.DBURL)
	if _, err := conn.Exec(shortCtx(t), `UPDATE notifications SET read_at = now() WHERE user_id = $1 AND seq >= $2`, user, ps[2].Seq); err != nil {
		t.Fatal(err)
	}
	for _, c := range devices {
		expectRead(t, c, []string{ps[2].ID, ps[3].ID}, 0)
	}

	// No read twice: the next message of every device is the next notification.
	next := b.publish(t, user, "after", nil)
	for _, c := range devices {
		if m := c.expect(t, "notification"); m.ID != next.ID {
			t.Fatalf("after the reads: %+v, want notification %s", m, next.ID)
		}
	}
}

// TestClusterReadOrder: reads and publishes through two nodes at once: every
// device sees the reads in commit order, so the last count it gets is the
// true one.
func TestClusterReadOrder(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, 2)
	const user = "cluster-order"
	var devices []*wsClient
	for _, n := range nodes {
		devices = append(devices, n.liveWS(t, user))
	}
	var ps []publishedNote
	for i := range 20 {
		ps = append(ps, nodes[i%2].publish(t, user, "t", nil))
	}
	errs := make(chan error, len(ps))
	for i, p := range ps {
		go func() {
			var res struct{ Unread int64 }
			st := nodes[i%2].do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{p.ID}}, &res)
			if st != http.StatusOK {
				errs <- fmt.Errorf("read %d: %d", i, st)
				return
			}
			errs <- nil
		}()
	}
	for range ps {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range devices {
		for range ps {
			c.expect(t, "notification")
		}
		for i := range ps {
			// Commit order: each count is one less than the one before.
			if m := c.expect(t, "read"); m.Unread != int64(len(ps)-1-i) || len(m.IDs) != 1 {
				t.Fatalf("read %d: %+v", i, m)
			}
		}
	}
}

// TestClusterKick: a kick through node B ends a session that lives on node
// A, over every transport: `bye kicked`, WebSocket close 4002, gone from A's
// presence; another user's token and unknown ids answer 404.
func TestClusterKick(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, 2)
	a, b := nodes[0], nodes[1]
	for _, tr := range allTransports {
		for _, as := range []string{"api key", "own token"} {
			t.Run(tr+"/"+as, func(t *testing.T) {
				user := "ckick-" + tr + "-" + as[:3]
				c := a.dialTransport(t, tr, user, nil)
				h := hello(t, c, tr, user)
				c.expect(t, "synced")
				a.waitRecorded(t, h.Session)
				if st := b.do(t, "DELETE", "/v1/sessions/"+h.Session, b.token(t, "mallory"), nil, nil); st != http.StatusNotFound {
					t.Fatalf("kick with another user's token: %d", st)
				}
				cred := testAPIKey
				if as == "own token" {
					cred = b.token(t, user)
				}
				if st := b.do(t, "DELETE", "/v1/sessions/"+h.Session, cred, nil, nil); st != http.StatusNoContent {
					t.Fatalf("kick through B: %d", st)
				}
				if bye := c.expect(t, "bye"); bye.Reason != "kicked" || bye.RetryMs <= 0 {
					t.Fatalf("bye = %+v", bye)
				}
				err := c.waitClosed(t, 5*time.Second)
				if tr == "websocket" {
					var ce *websocket.CloseError
					if !errors.As(err, &ce) || ce.Code != 4002 {
						t.Fatalf("closed with %v, want 4002", err)
					}
				}
				// A ends the session on its listener's goroutine: the bye may reach the
				// client a moment before the session leaves A's presence.
				eventually(t, 10*time.Second, "the session gone from A", func() bool { return len(a.sessionsOf(t, user)) == 0 })
				// Once A has recorded the end, the session is unknown everywhere.
				eventually(t, 10*time.Second, "second kick answers 404", func() bool {
					return b.do(t, "DELETE", "/v1/sessions/"+h.Session, testAPIKey, nil, nil) == http.StatusNotFound
				})
			})
		}
	}
	if st := b.do(t, "DELETE", "/v1/sessions/no-such-session", testAPIKey, nil, nil); st != http.StatusNotFound {
		t.Fatalf("kick of an unknown session: %d", st)
	}
}

// TestClusterResume: session= on node B resumes a session that lives on
// node A, over every pair of transports: the old transport gets `bye
// replaced` (WebSocket close 4001), the new session has an id of B (hello
// says it) and gets the replay above its cursor, and the device is counted
// once: by the nodes' presence and by the open history rows. A long-poll
// session polled on B is not resumed but moves there (one session, no second
// hello): TestPollMovesBetweenNodes and TestHaproxyCluster cover that pair.
func TestClusterResume(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, 2)
	a, b := nodes[0], nodes[1]
	for _, from := range allTransports {
		for _, to := range allTransports {
			if from == "longpoll" && to == "longpoll" {
				continue
			}
			t.Run(from+"_to_"+to, func(t *testing.T) {
				user := "cres-" + from + "-" + to
				old := a.dialTransport(t, from, user, nil)
				h := hello(t, old, from, user)
				old.expect(t, "synced")
				n1 := a.publish(t, user, "t", nil)
				old.expect(t, "notification")
				n2 := a.publish(t, user, "t", nil)
				old.expect(t, "notification")
				a.waitRecorded(t, h.Session)

				c := b.dialTransport(t, to, user, url.Values{"session": {h.Session}, "cursor": {fmt.Sprint(n1.Seq)}})
				hb := hello(t, c, to, user)
				if hb.Session == h.Session {
					t.Fatalf("resumed on B under A's id %q", hb.Session)
				}
				if m := c.expect(t, "notification"); m.ID != n2.ID || !m.Replayed {
					t.Fatalf("replay after resume: %+v", m)
				}
				c.expect(t, "synced")
				for {
					m := old.next(t, 5*time.Second)
					if m.Type == "bye" {
						if m.Reason != "replaced" {
							t.Fatalf("bye = %+v", m)
						}
						break
					}
				}
				err := old.waitClosed(t, 5*time.Second)
				if from == "websocket" {
					var ce *websocket.CloseError
					if !errors.As(err, &ce) || ce.Code != 4001 {
						t.Fatalf("old websocket closed with %v, want 4001", err)
					}
				}
				// A lists the whole cluster's sessions (B's new one among them once
				// recorded): the replaced one must be gone from them.
				eventually(t, 10*time.Second, "the replaced session gone from A", func() bool {
					for _, s := range a.sessionsOf(t, user) {
						if s.ID == h.Session {
							return false
						}
					}
					return true
				})
				if s := b.sessionsOf(t, user); len(s) != 1 || s[0].ID != hb.Session || s[0].Transport != to {
					t.Fatalf("sessions on B after the resume: %+v", s)
				}
				if n := a.scalar(t, `SELECT count(*) FROM session_history WHERE session_id = $1 AND ended_at IS NULL`, h.Session); n != 0 {
					t.Fatalf("%d open history rows of the replaced session", n)
				}
				b.waitRecorded(t, hb.Session)
				if n := a.scalar(t, `SELECT count(*) FROM session_history WHERE user_id = $1 AND ended_at IS NULL`, user); n != 1 {
					t.Fatalf("%d open history rows of the user, want 1", n)
				}
				n3 := a.publish(t, user, "t", nil)
				if m := c.expect(t, "notification"); m.ID != n3.ID || m.Replayed {
					t.Fatalf("live after resume: %+v", m)
				}
				// Another user never ends it.
				m := a.dialTransport(t, to, "mallory-"+from+"-"+to, url.Values{"session": {hb.Session}})
				if hm := m.expect(t, "hello"); hm.Session == hb.Session {
					t.Fatal("another user took over the session")
				}
				if s := b.sessionsOf(t, user); len(s) != 1 {
					t.Fatalf("sessions on B after a takeover attempt: %+v", s)
				}
			})
		}
	}
}

// TestClusterMessages: POST /v1/sessions/{id}/messages through node B for a
// session on node A: ping answers pong and refreshes the session on A, ack
// is recorded, read reaches the device; another user's token and unknown
// ids answer 404.
func TestClusterMessages(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, 2)
	a, b := nodes[0], nodes[1]
	const user = "cluster-messages"
	c := a.dialTransport(t, "sse", user, nil)
	h := hello(t, c, "sse", user)
	c.expect(t, "synced")
	p := a.publish(t, user, "t", nil)
	c.expect(t, "notification")
	a.waitRecorded(t, h.Session)
	tok := b.token(t, user)
	post := func(v any) (int, []msg, string) {
		body, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return b.postMessages(t, tok, h.Session, body)
	}

	s, ok := a.hub.Session(h.Session)
	if !ok {
		t.Fatal("session not on A")
	}
	before := s.LastSeen()
	st, replies, code := post(map[string]any{"type": "ping"})
	if st != http.StatusOK || len(replies) != 1 || replies[0].Type != "pong" {
		t.Fatalf("ping through B: %d %s %+v", st, code, replies)
	}
	eventually(t, 10*time.Second, "the ping through B refreshes the session on A", func() bool {
		return s.LastSeen().After(before)
	})

	if st, _, code := post(map[string]any{"type": "ack", "ids": []string{p.ID}}); st != http.StatusOK {
		t.Fatalf("ack through B: %d %s", st, code)
	}
	eventually(t, 10*time.Second, "the ack through B recorded", func() bool {
		return a.scalar(t, `SELECT count(*) FROM deliveries WHERE session_id = $1 AND notification_id = $2 AND acked_at IS NOT NULL`,
			h.Session, p.ID) == 1
	})

	if st, _, code := post(map[string]any{"type": "read", "ids": []string{p.ID}}); st != http.StatusOK {
		t.Fatalf("read through B: %d %s", st, code)
	}
	expectRead(t, c, []string{p.ID}, 0)

	// Batches work too.
	if st, replies, _ := post([]map[string]any{{"type": "ping"}, {"type": "ping"}}); st != http.StatusOK || len(replies) != 2 {
		t.Fatalf("batch through B: %d %+v", st, replies)
	}
	if st, _, code := b.postMessages(t, b.token(t, "mallory"), h.Session, []byte(`{"type":"ping"}`)); st != http.StatusNotFound || code != "unknown_session" {
		t.Fatalf("another user's token: %d %s", st, code)
	}
	if st, _, _ := b.postMessages(t, tok, "no-such-session", []byte(`{"type":"ping"}`)); st != http.StatusNotFound {
		t.Fatalf("unknown session: %d", st)
	}
	if st, _, _ := post(map[string]any{"type": "nonsense"}); st != http.StatusBadRequest {
		t.Fatalf("bad message through B: %d", st)
	}
}

// TestClusterRemoteAcks: acks posted through node B for a session on node A
// are judged by A, as a local ack is: an id A sent the session is recorded
// once, and random ids (900 of them, more than one control payload holds) and
// a second ack of the same id are refused and counted on A, never recorded;
// B judges and counts nothing. It failed before acks were forwarded: B queued
// every id straight to its recorder, and A counted no refusal.
func TestClusterRemoteAcks(t *testing.T) {
	t.Parallel()
	nodes := startNodes(t, 2)
	a, b := nodes[0], nodes[1]
	const user = "cluster-remote-acks"
	c := a.dialTransport(t, "sse", user, nil)
	h := hello(t, c, "sse", user)
	c.expect(t, "synced")
	p := a.publish(t, user, "t", nil)
	c.expect(t, "notification")
	a.waitRecorded(t, h.Session)
	tok := b.token(t, user)
	ack := func(ids []string) {
		t.Helper()
		body, err := json.Marshal(map[string]any{"type": "ack", "ids": ids})
		if err != nil {
			t.Fatal(err)
		}
		if st, _, code := b.postMessages(t, tok, h.Session, body); st != http.StatusOK {
			t.Fatalf("ack through B: %d %s", st, code)
		}
	}
	ack([]string{p.ID})
	var random []string
	for range 900 {
		random = append(random, uuid.NewString())
	}
	ack(append(random, p.ID))

	const unknown = `notifyd_refused_total{reason="ack_unknown"}`
	eventually(t, 10*time.Second, "A refuses the 901 acks of ids it did not send or had acked", func() bool {
		return metricValue(t, a, unknown) == 901
	})
	eventually(t, 10*time.Second, "the ack of the id A sent recorded", func() bool {
		return a.scalar(t, `SELECT count(*) FROM deliveries WHERE session_id = $1 AND notification_id = $2 AND acked_at IS NOT NULL`,
			h.Session, p.ID) == 1
	})
	if n := a.scalar(t, `SELECT count(*) FROM deliveries WHERE session_id = $1`, h.Session); n != 1 {
		t.Fatalf("%d delivery rows of the session, want 1", n)
	}
	if v := metricValue(t, a, `notifyd_refused_total{reason="ack_rate"}`); v != 0 {
		t.Fatalf("%v acks refused for rate on A, want 0", v)
	}
	if v := metricValue(t, b, unknown); v != 0 {
		t.Fatalf("B refused %v acks itself, want 0: the node holding the session judges them", v)
	}
}

// BenchmarkClusterRead: a read through the API of node A until a device on
// node B has its `read` (the trigger, the NOTIFY, A's wait for its own
// NOTIFY, B's dispatcher). The publishes it reads are made outside the timer.
func BenchmarkClusterRead(b *testing.B) {
	dbURL := storetest.URL(b)
	a := startServerOn(b, dbURL, func(c *Config) { c.NodeID = "bench-a" })
	nb := startServerOn(b, dbURL, func(c *Config) { c.NodeID = "bench-b" })
	const user = "bench-reader"
	dev := nb.liveWS(b, user)
	for b.Loop() {
		b.StopTimer()
		p := a.publish(b, user, "t", nil)
		dev.expect(b, "notification")
		b.StartTimer()
		if st := a.do(b, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{p.ID}}, nil); st != http.StatusOK {
			b.Fatalf("read: %d", st)
		}
		if m := dev.expect(b, "read"); len(m.IDs) != 1 || m.IDs[0] != p.ID {
			b.Fatalf("read = %+v", m)
		}
	}
}
