package main

// Reads, kicks, resumes and the per-user session cap across the nodes of a cluster behind
// haproxy (cluster_harness_test.go), over every transport, with the node of each connection
// read from haproxy's X-Served-By and checked against presence's `node`.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// lbSession is one item of GET /v1/users/{user}/sessions in a cluster.
type lbSession struct {
	ID        string `json:"id"`
	Transport string `json:"transport"`
	Device    string `json:"device"`
	Node      string `json:"node"`
}

// presence lists user's sessions through haproxy (whichever node answers lists the cluster's).
func (c *cluster) presence(t testing.TB, user string) []lbSession {
	t.Helper()
	var out struct {
		Sessions []lbSession `json:"sessions"`
	}
	if st := c.lb.do(t, "GET", "/v1/users/"+user+"/sessions", testAPIKey, nil, &out); st != http.StatusOK {
		t.Fatalf("sessions of %s through haproxy: %d", user, st)
	}
	return out.Sessions
}

// lbDo sends a request through haproxy with the API key and returns its status and the node
// that answered it.
func (c *cluster) lbDo(t testing.TB, method, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, c.lb.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("X-Served-By")
}

// dialOn opens a WebSocket or SSE session of user through haproxy and returns it with the node
// that serves it.
func (c *cluster) dialOn(t testing.TB, tr, user string, extra url.Values) (transportClient, string) {
	t.Helper()
	switch tr {
	case "websocket":
		q := url.Values{"token": {c.lb.token(t, user)}}
		for k, v := range extra {
			q[k] = v
		}
		conn, resp, err := websocket.DefaultDialer.Dial(c.lb.wsURL(q), nil)
		if err != nil {
			t.Fatalf("dial ws through haproxy: %v", err)
		}
		return newWSClient(t, conn), resp.Header.Get("X-Served-By")
	case "sse":
		s := c.lb.dialSSE(t, user, extra, nil)
		c.keepPinging(t, s)
		return s, s.resp.Header.Get("X-Served-By")
	}
	t.Fatalf("dialOn: transport %q", tr)
	return nil, ""
}

// keepPinging sends the SSE session a ping every second, through haproxy (whichever node takes
// it refreshes the session on its node), as a client does every ping interval: the nodes'
// ping timeout is 3 s. The pongs are not read.
func (c *cluster) keepPinging(t testing.TB, s *sseClient) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-s.done:
				return
			case <-tick.C:
			}
			id := s.sessionID()
			if id == "" {
				continue
			}
			req, err := http.NewRequestWithContext(ctx, "POST", c.lb.URL+"/v1/sessions/"+url.PathEscape(id)+"/messages", strings.NewReader(`{"type":"ping"}`))
			if err != nil {
				return
			}
			req.Header.Set("Authorization", "Bearer "+s.token)
			req.Header.Set("Content-Type", "application/json")
			if resp, err := http.DefaultClient.Do(req); err == nil {
				resp.Body.Close()
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// openRows counts the open session-history rows matching where (args from $1).
func (c *cluster) openRows(t testing.TB, where string, args ...any) int64 {
	t.Helper()
	return c.lb.scalar(t, `SELECT count(*) FROM session_history WHERE ended_at IS NULL AND `+where, args...)
}

// lbPoll is a long-poll device behind haproxy: every poll may land on another node, which moves
// the session there. Its token names its own device, so its history rows can be told apart
// from the user's other devices'. It polls with wait=25 until bye, an error or drop.
type lbPoll struct {
	c      *cluster
	tok    string
	device string
	in     chan msg
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	closeErr error
	session  string    // the session of the last answer
	sentAt   time.Time // when the outstanding poll was sent
	waiting  bool      // a poll is outstanding
	nodes    []string  // the node of each answer
}

var _ transportClient = (*lbPoll)(nil)

// dialPollLB starts a long-poll device of user through haproxy.
func (c *cluster) dialPollLB(t testing.TB, user, device string) *lbPoll {
	t.Helper()
	tok, err := c.lb.auth.NewToken(user, device, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &lbPoll{c: c, tok: tok, device: device, in: make(chan msg, 1024), cancel: cancel, done: make(chan struct{})}
	go p.loop(ctx)
	t.Cleanup(p.drop)
	return p
}

func (p *lbPoll) loop(ctx context.Context) {
	var err error
	defer func() {
		p.mu.Lock()
		p.closeErr = err
		p.waiting = false
		p.mu.Unlock()
		close(p.in)
		close(p.done)
	}()
	q := url.Values{}
	for {
		p.mu.Lock()
		p.sentAt, p.waiting = time.Now(), true
		p.mu.Unlock()
		var reply pollReply
		var hdr http.Header
		if _, reply, hdr, err = p.c.lb.pollOnce(ctx, p.tok, q); err != nil {
			return
		}
		p.mu.Lock()
		p.waiting = false
		p.session = reply.Session
		p.nodes = append(p.nodes, hdr.Get("X-Served-By"))
		p.mu.Unlock()
		bye := false
		for _, m := range reply.Messages {
			p.in <- m
			bye = bye || m.Type == "bye"
		}
		if bye {
			err = errByeReceived
			return
		}
		q = url.Values{"session": {reply.Session}, "cursor": {strconv.FormatInt(reply.Cursor, 10)}, "wait": {"25"}}
	}
}

func (p *lbPoll) ended() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.closeErr
}

func (p *lbPoll) next(t testing.TB, timeout time.Duration) msg {
	t.Helper()
	return nextFrom(t, p.in, p.ended, timeout)
}

func (p *lbPoll) expect(t testing.TB, typ string) msg {
	t.Helper()
	return expectFrom(t, p.in, p.ended, typ)
}

func (p *lbPoll) send(t testing.TB, v any) { t.Fatal("lbPoll: send is not used") }

func (p *lbPoll) waitClosed(t testing.TB, timeout time.Duration) error {
	t.Helper()
	return waitClosedFrom(t, p.in, p.ended, timeout)
}

func (p *lbPoll) drop() {
	p.cancel()
	<-p.done
}

// current is the session id of the last answer and the nodes the answers came from.
func (p *lbPoll) current() (string, []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.session, append([]string(nil), p.nodes...)
}

// waitParked waits until every device's poll waits on a node that holds its session alone: a
// poll outstanding for a second (a move happens before the poll waits, in milliseconds) and one
// open history row of the device (a move opens the new row and closes the old one within the
// recorder's flush, 200 ms). A `read` committed before then can meet the session in the middle
// of a move: the old node ends its copy as moved with the `read` still queued, and the move
// carries only notifications (their replay) and an owed bye, so that device never gets it.
func (c *cluster) waitParked(t testing.TB, user string, polls ...*lbPoll) {
	t.Helper()
	eventually(t, 15*time.Second, "long-poll devices parked on their nodes", func() bool {
		for _, p := range polls {
			p.mu.Lock()
			parked := p.waiting && time.Since(p.sentAt) > time.Second
			p.mu.Unlock()
			if !parked || c.openRows(t, "user_id = $1 AND device = $2", user, p.device) != 1 {
				return false
			}
		}
		return true
	})
}

// expectNotes reads the next len(want) messages of cl and fails unless they are the
// notifications want, in order.
func expectNotes(t testing.TB, cl transportClient, what string, want ...publishedNote) {
	t.Helper()
	for _, p := range want {
		if m := cl.next(t, 5*time.Second); m.Type != "notification" || m.ID != p.ID || m.Seq != p.Seq {
			t.Fatalf("%s: %+v, want notification %s (seq %d)", what, m, p.ID, p.Seq)
		}
	}
}

// expectReadMsg reads the next message of cl and fails unless it is a read of exactly ids with
// this unread count.
func expectReadMsg(t testing.TB, cl transportClient, what string, ids []string, unread int64) {
	t.Helper()
	m := cl.next(t, 5*time.Second)
	if m.Type != "read" || !slices.Equal(m.IDs, ids) || m.Unread != unread {
		t.Fatalf("%s: %+v, want read of ids %v unread %d", what, m, ids, unread)
	}
}

// testClusterControl runs the cases of a session's state across nodes on one cluster.
func testClusterControl(t *testing.T, bin string) {
	c := startCluster(t, bin, 3)
	t.Run("reads reach devices on every node", func(t *testing.T) { testClusterReads(t, c) })
	t.Run("kicks through any node", func(t *testing.T) { testClusterKicks(t, c) })
	t.Run("resume on another node", func(t *testing.T) { testClusterResumeLB(t, c) })
	t.Run("read between two long-polls on two nodes", func(t *testing.T) { testClusterReadBetweenPolls(t, c) })
}

// testClusterReads: devices of one user on every transport, the WebSocket and SSE ones on all
// three nodes (by X-Served-By, which presence's `node` confirms), the long-poll ones moving
// with their polls. A read through the API via haproxy and a plain SQL UPDATE straight to
// Postgres each reach every device as one `read` with the ids newly read and the unread count
// (an UPDATE back to unread as a `read` with no ids); no read comes twice.
func testClusterReads(t *testing.T, c *cluster) {
	const user = "lb-reader"
	type device struct {
		name string
		cl   transportClient
	}
	var devices []device
	nodeOf := map[string]string{} // session id -> the node haproxy sent its connect to
	for _, tr := range []string{"websocket", "sse"} {
		var on []string
		for i := 0; i < 6 && len(distinct(on)) < 3; i++ {
			cl, node := c.dialOn(t, tr, user, nil)
			h := hello(t, cl, tr, user)
			cl.expect(t, "synced")
			nodeOf[h.Session] = node
			on = append(on, node)
			devices = append(devices, device{fmt.Sprintf("%s on %s", tr, node), cl})
		}
		if got := distinct(on); len(got) != 3 {
			t.Fatalf("%s devices landed on %v, want all three nodes", tr, got)
		}
	}
	var polls []*lbPoll
	for i := range 3 {
		p := c.dialPollLB(t, user, fmt.Sprintf("lp-%d", i))
		hello(t, p, "longpoll", user)
		p.expect(t, "synced")
		polls = append(polls, p)
		devices = append(devices, device{fmt.Sprintf("long-poll %d", i), p})
	}
	eventually(t, 10*time.Second, "every device recorded", func() bool {
		return c.openRows(t, "user_id = $1", user) == int64(len(devices))
	})
	// A node's sessions drop out of the others' presence while its lease (2 s here) is
	// overdue, as it can be for a moment on a loaded machine: wait for all of them.
	var listed []lbSession
	eventually(t, 10*time.Second, "presence lists every device", func() bool {
		listed = c.presence(t, user)
		found := 0
		for _, s := range listed {
			if _, ok := nodeOf[s.ID]; ok {
				found++
			}
		}
		return found == len(nodeOf)
	})
	for _, s := range listed {
		if want, ok := nodeOf[s.ID]; ok && s.Node != want {
			t.Errorf("presence lists %s session %s on %q, haproxy sent it to %q", s.Transport, s.ID, s.Node, want)
		}
	}

	var ps []publishedNote
	for range 4 {
		ps = append(ps, c.lb.publish(t, user, "read-me", nil))
	}
	for _, d := range devices {
		expectNotes(t, d.cl, d.name, ps...)
	}

	// The API, through whichever node haproxy picks.
	c.waitParked(t, user, polls...)
	var res struct {
		IDs    []string `json:"ids"`
		Unread int64    `json:"unread"`
	}
	if st := c.lb.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{ps[0].ID}}, &res); st != http.StatusOK ||
		!slices.Equal(res.IDs, []string{ps[0].ID}) || res.Unread != 3 {
		t.Fatalf("read through haproxy: %d %+v", st, res)
	}
	for _, d := range devices {
		expectReadMsg(t, d.cl, d.name+", read by the API", []string{ps[0].ID}, 3)
	}

	// The application's own SQL, on no node.
	c.waitParked(t, user, polls...)
	conn := pgConn(t, c.dbURL)
	if _, err := conn.Exec(context.Background(), `UPDATE notifications SET read_at = now() WHERE user_id = $1 AND seq >= $2`, user, ps[2].Seq); err != nil {
		t.Fatal(err)
	}
	for _, d := range devices {
		expectReadMsg(t, d.cl, d.name+", read by SQL", []string{ps[2].ID, ps[3].ID}, 1)
	}
	// And marked unread again by SQL: a read with no ids and the new count.
	c.waitParked(t, user, polls...)
	if _, err := conn.Exec(context.Background(), `UPDATE notifications SET read_at = NULL WHERE user_id = $1 AND seq = $2`, user, ps[3].Seq); err != nil {
		t.Fatal(err)
	}
	for _, d := range devices {
		expectReadMsg(t, d.cl, d.name+", unread by SQL", nil, 2)
	}

	// No read twice: the next message of every device is the next notification.
	c.waitParked(t, user, polls...)
	next := c.lb.publish(t, user, "after", nil)
	for _, d := range devices {
		expectNotes(t, d.cl, d.name+", after the reads", next)
	}
	for i, p := range polls {
		_, nodes := p.current()
		t.Logf("long-poll %d: answers from %v", i, nodes)
	}
}

// testClusterKicks: DELETE /v1/sessions/{id} through haproxy, answered by another node than the
// one holding the session, ends it on every transport with `bye kicked` (WebSocket close 4002);
// the session leaves presence and a second kick answers 404.
func testClusterKicks(t *testing.T, c *cluster) {
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "lb-kick-" + tr
			for attempt := 0; ; attempt++ {
				var cl transportClient
				var id, holder string
				if tr == "longpoll" {
					p := c.dialPollLB(t, user, fmt.Sprintf("kick-%d", attempt))
					hello(t, p, tr, user)
					p.expect(t, "synced")
					c.waitParked(t, user, p)
					cl = p
					// The poll may have moved the session: kick it by the id and node presence lists.
					var listed []lbSession
					eventually(t, 10*time.Second, "the long-poll session listed once", func() bool {
						listed = c.presence(t, user)
						return len(listed) == 1
					})
					id, holder = listed[0].ID, listed[0].Node
				} else {
					var h msg
					cl, holder = c.dialOn(t, tr, user, nil)
					h = hello(t, cl, tr, user)
					cl.expect(t, "synced")
					id = h.Session
					eventually(t, 10*time.Second, "the session recorded", func() bool {
						return c.openRows(t, "session_id = $1", id) == 1
					})
				}
				st, by := c.lbDo(t, "DELETE", "/v1/sessions/"+id)
				if st != http.StatusNoContent {
					t.Fatalf("kick of %s (on %s) through %s: %d", id, holder, by, st)
				}
				if bye := cl.expect(t, "bye"); bye.Reason != "kicked" || bye.RetryMs <= 0 {
					t.Fatalf("bye = %+v", bye)
				}
				err := cl.waitClosed(t, 5*time.Second)
				if tr == "websocket" {
					var ce *websocket.CloseError
					if !errors.As(err, &ce) || ce.Code != 4002 {
						t.Fatalf("closed with %v, want 4002", err)
					}
				}
				eventually(t, 10*time.Second, "the session gone from presence", func() bool { return len(c.presence(t, user)) == 0 })
				eventually(t, 10*time.Second, "a second kick answers 404", func() bool {
					st, _ := c.lbDo(t, "DELETE", "/v1/sessions/"+id)
					return st == http.StatusNotFound
				})
				if by != holder {
					t.Logf("%s session on %s kicked through %s", tr, holder, by)
					return
				}
				// haproxy sent the kick to the session's own node: again, for one across nodes.
				if attempt == 3 {
					t.Fatalf("every kick landed on the session's own node")
				}
			}
		})
	}
}

// testClusterResumeLB: a WebSocket or SSE client reconnecting through haproxy with session=
// and cursor= lands on another node: the old connection gets `bye replaced` (WebSocket close
// 4001) and nothing else, the new one says hello with a new id, replays exactly what is above
// its cursor, then synced, then live ones; presence through haproxy lists the device once, on
// the new node.
func testClusterResumeLB(t *testing.T, c *cluster) {
	for _, from := range []string{"websocket", "sse"} {
		for _, to := range []string{"websocket", "sse"} {
			t.Run(from+"_to_"+to, func(t *testing.T) {
				user := "lb-resume-" + from + "-" + to
				old, oldNode := c.dialOn(t, from, user, nil)
				h := hello(t, old, from, user)
				old.expect(t, "synced")
				n1 := c.lb.publish(t, user, "t", nil)
				n2 := c.lb.publish(t, user, "t", nil)
				n3 := c.lb.publish(t, user, "t", nil)
				expectNotes(t, old, "old", n1, n2, n3)
				oldTr, oldID := from, h.Session
				for attempt := 0; ; attempt++ {
					eventually(t, 10*time.Second, "the session recorded", func() bool {
						return c.openRows(t, "session_id = $1", oldID) == 1
					})
					// The client got n1 only, as far as it knows.
					nw, node := c.dialOn(t, to, user, url.Values{"session": {oldID}, "cursor": {strconv.FormatInt(n1.Seq, 10)}})
					hb := hello(t, nw, to, user)
					for _, want := range []publishedNote{n2, n3} {
						if m := nw.expect(t, "notification"); m.ID != want.ID || !m.Replayed {
							t.Fatalf("replay after the resume on %s: %+v, want %s replayed", node, m, want.ID)
						}
					}
					nw.expect(t, "synced")
					if bye := old.expect(t, "bye"); bye.Reason != "replaced" {
						t.Fatalf("old %s on %s: %+v, want bye replaced", oldTr, oldNode, bye)
					}
					err := old.waitClosed(t, 5*time.Second)
					if oldTr == "websocket" {
						var ce *websocket.CloseError
						if !errors.As(err, &ce) || ce.Code != 4001 {
							t.Fatalf("old websocket closed with %v, want 4001", err)
						}
					}
					if node != oldNode {
						if hb.Session == oldID {
							t.Fatalf("resumed on %s under the id %q of %s", node, oldID, oldNode)
						}
						t.Logf("resumed from %s on %s on %s", from, oldNode, node)
						waitFor(t, 10*time.Second, "the device listed once, on the new node", func() (bool, string) {
							s := c.presence(t, user)
							return len(s) == 1 && s[0].ID == hb.Session && s[0].Node == node && s[0].Transport == to, fmt.Sprintf("%+v", s)
						})
						eventually(t, 10*time.Second, "one open history row", func() bool {
							return c.openRows(t, "user_id = $1", user) == 1 && c.openRows(t, "session_id = $1", hb.Session) == 1
						})
						n4 := c.lb.publish(t, user, "t", nil)
						if m := nw.expect(t, "notification"); m.ID != n4.ID || m.Replayed {
							t.Fatalf("live after the resume: %+v, want %s", m, n4.ID)
						}
						return
					}
					// haproxy sent the resume to the same node: again from there, for one across nodes.
					if attempt == 3 {
						t.Fatalf("every resume landed on the session's own node %s", oldNode)
					}
					old, oldTr, oldID = nw, to, hb.Session
				}
			})
		}
	}
}

// refusedOn makes a connect of user on tr through haproxy that must be refused and returns its
// status, error code and the node that answered.
func (c *cluster) refusedOn(t testing.TB, tr, user string) (int, string, string) {
	t.Helper()
	q := url.Values{"token": {c.lb.token(t, user)}}
	var resp *http.Response
	switch tr {
	case "websocket":
		conn, r, err := websocket.DefaultDialer.Dial(c.lb.wsURL(q), nil)
		if err == nil {
			conn.Close()
			t.Fatalf("a websocket past the cap was let in (on %s)", r.Header.Get("X-Served-By"))
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
		var err error
		if resp, err = http.Get(c.lb.URL + path + q.Encode()); err != nil {
			t.Fatal(err)
		}
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, errorBodyCode(raw), resp.Header.Get("X-Served-By")
}

// testClusterCap: with NOTIFY_MAX_SESSIONS_PER_USER=2 on every node, a user holding two
// sessions on two nodes (one each, WebSocket and SSE; long-poll sessions wherever their polls
// took them) is refused a third connect through haproxy with 429 too_many_sessions, whichever
// node takes it: the nodes holding one each, and the node holding none.
func testClusterCap(t *testing.T, bin string) {
	c := startCluster(t, bin, 3, "NOTIFY_MAX_SESSIONS_PER_USER=2")
	// A node counts the others' sessions once its lease loop has seen them
	// live (README: the cap's race window); wait until every node has.
	for _, n := range c.nodes {
		eventually(t, 10*time.Second, "every node seeing the other two", func() bool {
			var st struct {
				Nodes []struct{ Node string } `json:"nodes"`
			}
			return n.do(t, "GET", "/v1/stats", testAPIKey, nil, &st) == http.StatusOK && len(st.Nodes) == 3
		})
	}
	for _, tr := range allTransports {
		t.Run(tr, func(t *testing.T) {
			user := "lb-cap-" + tr
			if tr == "longpoll" {
				var polls []*lbPoll
				for i := range 2 {
					p := c.dialPollLB(t, user, fmt.Sprintf("cap-%d", i))
					hello(t, p, tr, user)
					p.expect(t, "synced")
					polls = append(polls, p)
					// Parked, its move (if any) done: a connect meanwhile may count the
					// device on both nodes of the move.
					c.waitParked(t, user, polls...)
				}
			} else {
				var holders []string
				for len(holders) < 2 {
					cl, node := c.dialOn(t, tr, user, nil)
					h := hello(t, cl, tr, user)
					cl.expect(t, "synced")
					if slices.Contains(holders, node) {
						// Both on one node: go away and connect again, for two nodes.
						cl.drop()
						eventually(t, 10*time.Second, "the dropped session ended", func() bool {
							return c.openRows(t, "session_id = $1", h.Session) == 0 && len(c.presence(t, user)) == len(holders)
						})
						continue
					}
					holders = append(holders, node)
					eventually(t, 10*time.Second, "the session recorded", func() bool {
						return c.openRows(t, "session_id = $1", h.Session) == 1
					})
				}
				t.Logf("%s sessions on %v", tr, holders)
			}
			var listed []string
			for _, s := range c.presence(t, user) {
				listed = append(listed, s.Node)
			}
			if len(listed) != 2 {
				t.Fatalf("presence lists sessions on %v, want two", listed)
			}
			var refusedBy []string
			for i := 0; i < 9 && len(distinct(refusedBy)) < 3; i++ {
				st, code, by := c.refusedOn(t, tr, user)
				if st != http.StatusTooManyRequests || code != "too_many_sessions" {
					t.Fatalf("third %s session through %s (sessions on %v): %d %q, want 429 too_many_sessions", tr, by, listed, st, code)
				}
				refusedBy = append(refusedBy, by)
			}
			if got := distinct(refusedBy); len(got) != 3 {
				t.Fatalf("refused by %v, want every node", got)
			}
			if n := len(c.presence(t, user)); n != 2 {
				t.Fatalf("%d sessions after the refusals, want 2", n)
			}
		})
	}
}

// testClusterReadBetweenPolls: a `read` committed while a long-poll device has no poll waiting
// is queued on the node holding its session, as on one node, and must come in the answer of
// the device's next poll, wherever haproxy sends that poll. A WebSocket device straight on the
// holding node shows the read has reached that node before the next poll is sent. The case is
// repeated until a next poll lands on another node (a move).
func testClusterReadBetweenPolls(t *testing.T, c *cluster) {
	const user = "lb-read-between"
	tok, err := c.lb.auth.NewToken(user, "between", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	poll := func(q url.Values) (pollReply, string) {
		t.Helper()
		_, r, hdr, err := c.lb.pollOnce(ctx, tok, q)
		if err != nil {
			t.Fatalf("poll %v: %v", q, err)
		}
		return r, hdr.Get("X-Served-By")
	}
	witness := map[string]*wsClient{} // a device straight on each node
	for i, n := range c.nodes {
		witness[c.names[i]] = n.liveWS(t, user)
	}
	r, node := poll(url.Values{})
	if len(r.Messages) == 0 || r.Messages[0].Type != "hello" {
		t.Fatalf("first poll on %s: %+v", node, r.Messages)
	}
	for attempt := 0; ; attempt++ {
		p := c.lb.publish(t, user, "between", nil)
		for _, w := range witness {
			expectNotes(t, w, "witness", p)
		}
		// Poll until the notification came; the session ends up on the node of the last answer.
		for got := false; !got; {
			r, node = poll(url.Values{"session": {r.Session}, "cursor": {strconv.FormatInt(r.Cursor, 10)}, "wait": {"5"}})
			for _, m := range r.Messages {
				got = got || (m.Type == "notification" && m.ID == p.ID)
			}
		}
		eventually(t, 10*time.Second, "the session recorded on "+node, func() bool {
			return c.openRows(t, "user_id = $1 AND device = 'between'", user) == 1 &&
				c.openRows(t, "session_id = $1", r.Session) == 1
		})
		holder := node
		if st := c.lb.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{p.ID}}, nil); st != http.StatusOK {
			t.Fatalf("read: %d", st)
		}
		for name, w := range witness {
			expectReadMsg(t, w, "witness on "+name, []string{p.ID}, 0)
		}
		// The next poll, wherever it lands, answers with the read queued on holder.
		r, node = poll(url.Values{"session": {r.Session}, "cursor": {strconv.FormatInt(r.Cursor, 10)}, "wait": {"2"}})
		var reads []msg
		for _, m := range r.Messages {
			if m.Type == "read" {
				reads = append(reads, m)
			}
		}
		if len(reads) != 1 || !slices.Equal(reads[0].IDs, []string{p.ID}) || reads[0].Unread != 0 {
			t.Fatalf("poll on %s after a read queued on %s: %+v, want one read of %s unread 0", node, holder, r.Messages, p.ID)
		}
		if node != holder {
			t.Logf("the read queued on %s came with the poll on %s", holder, node)
			return
		}
		if attempt == 5 {
			t.Fatalf("every next poll landed on the holding node %s", holder)
		}
	}
}
