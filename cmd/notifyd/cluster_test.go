package main

// Three nodes on one database behind a real haproxy, round-robin without stickiness
// (cluster_harness_test.go): delivery across nodes on every transport, a long-poll whose polls
// alternate between nodes, kill -9 of a node, a rolling restart under continuous publishing, and
// reads, kicks, resumes and the session cap across nodes (cluster_haproxy_control_test.go).

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
)

// TestHaproxyCluster runs every case behind haproxy on one build of the server.
func TestHaproxyCluster(t *testing.T) {
	requireHaproxy(t)
	bin := buildNotifyd(t)
	t.Run("delivery across nodes", func(t *testing.T) { testClusterDelivery(t, bin) })
	t.Run("long-poll alternating between nodes", func(t *testing.T) { testClusterLongPoll(t, bin) })
	t.Run("kill -9 of a node", func(t *testing.T) { testClusterKill(t, bin) })
	t.Run("rolling restart loses nothing", func(t *testing.T) { testClusterRollingRestart(t, bin) })
	t.Run("browser on long-poll", func(t *testing.T) { testClusterBrowserLongPoll(t, bin) })
	t.Run("reads, kicks and resumes across nodes", func(t *testing.T) { testClusterControl(t, bin) })
	t.Run("session cap across nodes", func(t *testing.T) { testClusterCap(t, bin) })
}

// publishOutcomes counts what a publisher saw.
type publishOutcomes struct {
	attempts, retried5xx, retriedConn atomic.Int64
}

// publishRetrying publishes one notification through haproxy with an idempotency key and
// retries, with the same key, on a 5xx or a request that got no answer, until a 2xx (201, or
// 200 for a key already used) or ctx ends.
func (c *cluster) publishRetrying(ctx context.Context, client *http.Client, user, topic, key string, o *publishOutcomes) (publishedNote, error) {
	for {
		var note publishedNote
		o.attempts.Add(1)
		st, err := apiPost(client, c.lb.URL, "/v1/notifications",
			map[string]any{"user_id": user, "topic": topic, "data": map[string]string{"key": key}, "idempotency_key": key}, &note)
		switch {
		case err != nil:
			o.retriedConn.Add(1)
		case st == http.StatusCreated || st == http.StatusOK:
			return note, nil
		case st >= 500:
			o.retried5xx.Add(1)
		default:
			return note, fmt.Errorf("publish %s: status %d", key, st)
		}
		select {
		case <-ctx.Done():
			return note, fmt.Errorf("publish %s: gave up: %w", key, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// publishN publishes n notifications for user through haproxy and returns them by id.
func (c *cluster) publishN(user, topic string, n int, into map[string]int64) {
	c.t.Helper()
	client := publishClient(c.t)
	var o publishOutcomes
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range n {
		note, err := c.publishRetrying(ctx, client, user, topic, fmt.Sprintf("%s-%s-%d", user, topic, i), &o)
		if err != nil {
			c.t.Fatal(err)
		}
		into[note.ID] = note.Seq
	}
}

// distinct is the set of non-empty names in nodes.
func distinct(nodes []string) []string {
	var out []string
	for _, n := range nodes {
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// testClusterDelivery: clients of one user on every transport, connected through haproxy, land
// on all three nodes; notifications published through haproxy (landing on every node too)
// reach each client exactly once, in seq order.
func testClusterDelivery(t *testing.T, bin string) {
	c := startCluster(t, bin, 3)
	var clients []*clusterClient
	var nodes []string
	for _, tr := range allTransports {
		for range 3 {
			cl := c.connect(tr, "cross")
			clients = append(clients, cl)
			_, _, n := cl.snapshot()
			nodes = append(nodes, n...)
		}
	}
	if got := distinct(nodes); len(got) != 3 {
		t.Fatalf("the clients' connections landed on %v, want all three nodes", got)
	}
	want := map[string]int64{}
	c.publishN("cross", "across", 30, want)
	for _, cl := range clients {
		eventually(t, 15*time.Second, cl.tr+" client holding all 30", func() bool { return cl.holds(idSet(want)) })
		cl.check(t, want, true)
	}
}

// idSet is the ids of want.
func idSet(want map[string]int64) map[string]bool {
	out := make(map[string]bool, len(want))
	for id := range want {
		out[id] = true
	}
	return out
}

// testClusterLongPoll: one long-poll client whose polls haproxy spreads over the three nodes
// sees one session: one hello, every notification exactly once in seq order, and presence
// lists it on one node only, once.
func testClusterLongPoll(t *testing.T, bin string) {
	c := startCluster(t, bin, 3)
	cl := c.connect("longpoll", "alternate")
	want := map[string]int64{}
	client := publishClient(t)
	var o publishOutcomes
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i := range 40 {
		note, err := c.publishRetrying(ctx, client, "alternate", "poll", fmt.Sprintf("alt-%d", i), &o)
		if err != nil {
			t.Fatal(err)
		}
		want[note.ID] = note.Seq
		time.Sleep(40 * time.Millisecond) // spread over many polls
	}
	eventually(t, 15*time.Second, "the long-poll client holding all 40", func() bool { return cl.holds(idSet(want)) })
	cl.check(t, want, true)
	_, hellos, nodes := cl.snapshot()
	if hellos != 1 {
		t.Errorf("%d hellos, want one session", hellos)
	}
	if got := distinct(nodes); len(got) != 3 {
		t.Errorf("the polls were answered by %v, want all three nodes", got)
	}
	t.Logf("%d polls over %v, %d hello", len(nodes), distinct(nodes), hellos)

	// Presence: every node lists the session once, under the same id (the one it has on the
	// node holding it now).
	eventually(t, 5*time.Second, "the session listed once, alike on every node", func() bool {
		var ids []string
		for _, n := range c.nodes {
			s := n.sessionsOf(t, "alternate")
			if len(s) != 1 {
				return false
			}
			ids = append(ids, s[0].ID)
		}
		return len(distinct(ids)) == 1
	})
	// Every copy left behind on another node was ended as moved, without a bye.
	conn := pgConn(t, c.dbURL)
	eventually(t, 5*time.Second, "the moved copies' history closed", func() bool {
		var open, moved int
		err := conn.QueryRow(context.Background(), `SELECT count(*) FILTER (WHERE ended_at IS NULL),
			count(*) FILTER (WHERE end_reason = 'moved') FROM session_history WHERE user_id = 'alternate'`).Scan(&open, &moved)
		return err == nil && open == 1 && moved >= 2
	})

	// Kicked on the node that holds it, by the id presence lists there (the client learns the
	// session's id of each node from that node's answer; a kick through any node is the control
	// channel's), the client gets bye kicked, and still no second hello.
	eventually(t, 10*time.Second, "a kick on the node holding the session", func() bool {
		for _, n := range c.nodes {
			for _, s := range n.sessionsOf(t, "alternate") {
				if n.do(t, "DELETE", "/v1/sessions/"+s.ID, testAPIKey, nil, nil) == http.StatusNoContent {
					return true
				}
			}
		}
		return false
	})
	kickedAt := time.Now()
	eventually(t, 10*time.Second, "bye kicked", cl.isKicked)
	t.Logf("bye kicked %s after the kick", time.Since(kickedAt).Round(time.Millisecond))
	if _, hellos, _ := cl.snapshot(); hellos != 1 {
		t.Errorf("%d hellos by the kick, want 1", hellos)
	}
	eventually(t, 10*time.Second, "no session left on any node", func() bool {
		total := 0
		for _, n := range c.nodes {
			total += len(n.sessionsOf(t, "alternate"))
		}
		return total == 0
	})
}

// testClusterKill: kill -9 of a node: its clients on every transport reconnect through haproxy
// to the others and, replaying from their cursors, miss nothing published before, during or
// after; its history rows are all closed, those of clients that did not resume elsewhere in
// time as node_lost.
func testClusterKill(t *testing.T, bin string) {
	c := startCluster(t, bin, 3)
	victim := c.names[1]
	// Connect until every transport has a client on the victim (round-robin spreads them).
	var clients []*clusterClient
	for _, tr := range allTransports {
		onVictim := false
		for i := 0; i < 6 && !onVictim; i++ {
			cl := c.connect(tr, "survivor")
			clients = append(clients, cl)
			_, _, nodes := cl.snapshot()
			onVictim = slices.Contains(nodes, victim)
		}
		if !onVictim && tr != "longpoll" { // a long-poll session moves with every poll anyway
			t.Fatalf("no %s client landed on %s", tr, victim)
		}
	}
	want := map[string]int64{}
	c.publishN("survivor", "before", 10, want)
	conn := pgConn(t, c.dbURL)
	eventually(t, 10*time.Second, "the victim's history rows", func() bool { return historyOf(t, conn, victim)["open"] > 0 })

	v := c.nodes[1]
	// A client straight to the victim that never reconnects: its row can only
	// be closed by a survivor, as node_lost. The others resume elsewhere, and a
	// resume within the victim's lease closes its old row as replaced.
	v.liveWS(t, "bystander")
	eventually(t, 10*time.Second, "the bystander's history row", func() bool {
		var n int
		err := conn.QueryRow(context.Background(), `SELECT count(*) FROM session_history WHERE user_id = 'bystander' AND ended_at IS NULL`).Scan(&n)
		return err == nil && n == 1
	})
	if err := v.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	v.waitExit(t, 10*time.Second)
	killed := time.Now()
	c.publishN("survivor", "during", 10, want) // haproxy has not seen it down yet: retry-on + redispatch
	c.waitInRotation(2)
	c.publishN("survivor", "after", 10, want)

	for _, cl := range clients {
		eventually(t, 20*time.Second, cl.tr+" client holding all 30", func() bool { return cl.holds(idSet(want)) })
		if dups := cl.check(t, want, false); dups > 0 {
			t.Logf("%s client: %d notifications again after its reconnect (dropped by id)", cl.tr, dups)
		}
	}
	waitFor(t, clusterPingTimeout+5*time.Second, "the victim's history closed as node_lost", func() (bool, string) {
		h := historyOf(t, conn, victim)
		return h["open"] == 0 && h[store.EndNodeLost] > 0, fmt.Sprint(h)
	})
	t.Logf("the victim's sessions closed as node_lost %s after kill -9: %v", time.Since(killed).Round(10*time.Millisecond), historyOf(t, conn, victim))
}

// testClusterRollingRestart: while publishers publish continuously through haproxy (idempotency
// keys, retried with the same key on a 5xx or no answer), each node in turn is drained with
// SIGTERM, waited for and started again. Every notification answered 2xx reaches every client
// exactly once after dedupe by id, with no seq gap, and every 5xx was one a retry made good.
func testClusterRollingRestart(t *testing.T, bin string) {
	c := startCluster(t, bin, 3)
	var clients []*clusterClient
	for _, tr := range allTransports {
		for range 2 {
			clients = append(clients, c.connect(tr, "rolling"))
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		mu      sync.Mutex
		want    = map[string]int64{}
		o       publishOutcomes
		failed  atomic.Int64
		wg      sync.WaitGroup
		publish = publishClient(t)
	)
	for p := range 3 {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				pctx, pcancel := context.WithTimeout(context.Background(), 30*time.Second)
				note, err := c.publishRetrying(pctx, publish, "rolling", "roll", fmt.Sprintf("p%d-%d", p, i), &o)
				pcancel()
				if err != nil {
					failed.Add(1)
					t.Error(err)
					return
				}
				mu.Lock()
				want[note.ID] = note.Seq
				mu.Unlock()
				time.Sleep(60 * time.Millisecond)
			}
		})
	}

	time.Sleep(2 * time.Second)
	for i := range c.nodes {
		n := c.nodes[i]
		if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := n.waitExit(t, 20*time.Second); code != 0 {
			t.Fatalf("%s exited %d after SIGTERM\n%s", c.names[i], code, n.out.String())
		}
		if c.nodes[i] = c.startNode(i); c.nodes[i] == nil {
			t.FailNow()
		}
		c.waitInRotation(3)
		time.Sleep(1500 * time.Millisecond)
	}
	time.Sleep(2 * time.Second)
	cancel()
	wg.Wait()
	if failed.Load() > 0 {
		t.FailNow()
	}

	mu.Lock()
	defer mu.Unlock()
	if len(want) < 100 {
		t.Fatalf("only %d notifications published during the restarts", len(want))
	}
	for _, cl := range clients {
		eventually(t, 20*time.Second, fmt.Sprintf("%s client holding all %d", cl.tr, len(want)), func() bool { return cl.holds(idSet(want)) })
		dups := cl.check(t, want, false)
		_, hellos, nodes := cl.snapshot()
		t.Logf("%s client: %d notifications, %d again after reconnects (dropped by id), %d hellos, %d connections over %v",
			cl.tr, len(want), dups, hellos, len(nodes), distinct(nodes))
	}
	// Publishers: every attempt that failed was retried until a 2xx; none was given up on.
	t.Logf("publishers: %d notifications answered 2xx in %d attempts; %d retried after a 5xx, %d after no answer",
		len(want), o.attempts.Load(), o.retried5xx.Load(), o.retriedConn.Load())
	conn := pgConn(t, c.dbURL)
	if n := countRows(t, conn, "user_id = 'rolling'"); n != int64(len(want)) {
		t.Errorf("%d rows stored for %d notifications answered 2xx (a retry stored one twice, or a 2xx lost one)", n, len(want))
	}
}

// testClusterBrowserLongPoll: the browser client (static/notify.js in Chromium) on long-poll
// through haproxy, its polls moving between the nodes, receives every notification exactly
// once, stays connected on one session, and follows the session's id as it moves. The nodes run
// in dev mode for the demo page's tokens (loopback only, the tests' secrets).
func testClusterBrowserLongPoll(t *testing.T, bin string) {
	requireE2E(t)
	e2eSlot(t)
	c := startCluster(t, bin, 3, "NOTIFY_DEV=true")
	b := startBrowser(t)
	b.launch("a", "")
	b.open("a", "p", demoURL(c.lb.URL, "brow", url.Values{"transports": {"longpoll"}, "pollWait": {"2"}, "helloTimeout": direct["helloTimeout"]}))
	waitTransport(t, b, "p", "longpoll", 20*time.Second)
	var want []string
	for range 3 {
		for _, n := range publishN(t, c.lb, "brow", 5) {
			want = append(want, n.ID)
		}
		time.Sleep(1500 * time.Millisecond) // polls come back empty in between and move
	}
	s := waitExactly(t, b, "p", want, 20*time.Second)
	if s.State != "connected" || s.Transport != "longpoll" {
		t.Fatalf("page: %s", s.brief())
	}
	connects := 0
	for _, e := range s.History {
		if e.Event == "state" && e.State == "connected" {
			connects++
		}
	}
	if connects != 1 {
		t.Errorf("the page connected %d times, want once: %s", connects, s.brief())
	}
	conn := pgConn(t, c.dbURL)
	var moved int
	if err := conn.QueryRow(context.Background(), `SELECT count(*) FROM session_history WHERE user_id = 'brow' AND end_reason = 'moved'`).Scan(&moved); err != nil || moved == 0 {
		t.Fatalf("the page's session never moved (%d, %v)", moved, err)
	}
	// The page names the session by its current id, the one presence lists.
	waitFor(t, 10*time.Second, "the page's session id = presence's", func() (bool, string) {
		s = b.demo("p")
		listed := c.lb.sessionsOf(t, "brow")
		return len(listed) == 1 && listed[0].ID == s.Session, fmt.Sprintf("page %q, presence %+v", s.Session, listed)
	})
	noConsoleErrors(t, b, "p")
	t.Logf("the page's session moved %d times, one connect, %d notifications", moved, len(want))
}
