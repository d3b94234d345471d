package store_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// userSession inserts an open session_history row of user on node, with session id sid, and
// returns its row id.
func userSession(t testing.TB, s *store.Store, node, user, sid, transport string, connected time.Time) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := s.Pool().Exec(context.Background(), `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id)
		VALUES ($1::uuid, $2, $3, $4, $5, $6)`, id, sid, user, transport, connected, node); err != nil {
		t.Fatal(err)
	}
	return id
}

// registered returns node id registered in the nodes table (a running lease, no loop).
func registered(t *testing.T, s *store.Store, id string) *store.Node {
	t.Helper()
	n := newNode(t, s, id, time.Minute)
	if _, err := n.Register(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	return n
}

// The cluster's presence seen from one node: the open rows of the other live nodes, each
// session id once; this node's rows, a dead node's and ended rows never count.
func TestPresenceOtherLiveNodes(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	self := registered(t, s, "self")
	registered(t, s, "other")
	registered(t, s, "third")
	registered(t, s, "idle")
	registered(t, s, "dead")
	lapse(t, s, "dead")
	p := self.Presence()
	if p.Node() != "self" {
		t.Fatalf("Node() = %q", p.Node())
	}
	now := time.Now()
	userSession(t, s, "self", "uma", "s-self", "websocket", now)
	userSession(t, s, "other", "uma", "s-1", "websocket", now.Add(-3*time.Minute))
	userSession(t, s, "other", "uma", "s-2", "sse", now.Add(-2*time.Minute))
	// s-2 resumed on third: its old row on other is not closed yet; the newer row wins.
	userSession(t, s, "third", "uma", "s-2", "longpoll", now.Add(-time.Minute))
	userSession(t, s, "dead", "uma", "s-dead", "websocket", now)
	ended := userSession(t, s, "other", "uma", "s-ended", "websocket", now)
	if _, err := s.Pool().Exec(ctx, `UPDATE session_history SET ended_at = now(), end_reason = 'client_close' WHERE id = $1`, ended); err != nil {
		t.Fatal(err)
	}
	userSession(t, s, "other", "vic", "s-vic", "websocket", now)
	userSession(t, s, "self", "wes", "s-wes-here", "websocket", now)
	userSession(t, s, "third", "wes", "s-wes-there", "sse", now)

	for except, want := range map[string]int{"": 2, "s-1": 1, "s-2": 1, "s-self": 2, "s-dead": 2} {
		if n, err := p.CountElsewhere(ctx, "uma", except); err != nil || n != want {
			t.Errorf("CountElsewhere(uma, except %q) = %d, %v; want %d", except, n, err, want)
		}
	}
	if n, err := p.CountElsewhere(ctx, "nobody", ""); err != nil || n != 0 {
		t.Errorf("CountElsewhere(nobody) = %d, %v", n, err)
	}
	// Concurrent calls share statements; each still gets its own user's count.
	want := map[string]int{"uma": 2, "vic": 1, "wes": 1, "nobody": 0}
	var wg sync.WaitGroup
	for i := range 200 {
		user := []string{"uma", "vic", "wes", "nobody"}[i%4]
		wg.Go(func() {
			if n, err := p.CountElsewhere(ctx, user, ""); err != nil || n != want[user] {
				t.Errorf("concurrent CountElsewhere(%s) = %d, %v; want %d", user, n, err, want[user])
			}
		})
	}
	wg.Wait()

	list, err := p.UserSessions(ctx, "uma")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range list {
		got = append(got, fmt.Sprintf("%s@%s/%s", r.ID, r.Node, r.Transport))
		if r.User != "uma" || r.LastSeenAt != nil || r.ConnectedAt.IsZero() {
			t.Errorf("row %+v", r)
		}
	}
	if want := "[s-2@third/longpoll s-1@other/websocket]"; fmt.Sprint(got) != want {
		t.Errorf("UserSessions(uma) = %v, want %s", got, want)
	}

	recent, err := p.Recent(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(recent) != 2 || recent[0].ConnectedAt.Before(recent[1].ConnectedAt) {
		t.Errorf("Recent(2) = %+v, want the 2 newest, newest first", recent)
	}
	for _, r := range recent {
		if r.Node == "self" || r.Node == "dead" {
			t.Errorf("Recent lists %+v", r)
		}
	}

	st, err := p.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var nodes []string
	for _, n := range st.Nodes {
		nodes = append(nodes, fmt.Sprintf("%s:%d/%d ws%d sse%d lp%d", n.Node, n.Sessions, n.Users,
			n.ByTransport["websocket"], n.ByTransport["sse"], n.ByTransport["longpoll"]))
	}
	// other: s-1, s-2 (its open row), s-vic; third: s-2, s-wes-there; idle: none.
	if want := "[idle:0/0 ws0 sse0 lp0 other:3/2 ws2 sse1 lp0 third:2/2 ws0 sse1 lp1]"; fmt.Sprint(nodes) != want {
		t.Errorf("Stats nodes = %v, want %s", nodes, want)
	}
	// Users elsewhere: uma, vic, wes; uma and wes have rows here too.
	if st.RemoteUsers != 3 || st.SharedUsers != 2 {
		t.Errorf("Stats users: remote %d shared %d, want 3 and 2", st.RemoteUsers, st.SharedUsers)
	}
}

// OthersLive follows the nodes table from the node's loop: true before the first look, false
// for a node alone, true once another node holds a lease, false again once that lease lapsed.
func TestPresenceOthersLive(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	a := newNode(t, s, "alone", time.Second) // loop every 200 ms
	p := a.Presence()
	if !p.OthersLive() {
		t.Fatal("OthersLive false before the loop looked")
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Stop(context.Background()) })
	waitUntil(t, "OthersLive false for a node alone", func() bool { return !p.OthersLive() })
	registered(t, s, "peer")
	waitUntil(t, "OthersLive true with a peer", p.OthersLive)
	lapse(t, s, "peer")
	waitUntil(t, "OthersLive false once the peer's lease lapsed", func() bool { return !p.OthersLive() })
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// presenceBenchData fills s with 10 live nodes (the first returned) and 500,000 session-history
// rows of 10,000 users spread over them: 100,000 open, 400,000 ended (40 per user).
func presenceBenchData(b *testing.B, s *store.Store) (*store.Node, int) {
	ctx := testCtx(b)
	var self *store.Node
	for i := range 10 {
		n, err := s.NewNode(store.NodeOptions{ID: fmt.Sprintf("node-%d", i), Lease: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := n.Register(ctx); err != nil {
			b.Fatal(err)
		}
		if i == 0 {
			self = n
		}
	}
	const users = 10000
	if _, err := s.Pool().Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id, ended_at, end_reason)
		SELECT gen_random_uuid(), 's' || g, 'user-' || (g % $1), (ARRAY['websocket', 'sse', 'longpoll'])[1 + g % 3],
		       now() - interval '1 day', 'node-' || (g % 10),
		       CASE WHEN g >= 100000 THEN now() END, CASE WHEN g >= 100000 THEN 'client_close' END
		FROM generate_series(0, 499999) g`, users); err != nil {
		b.Fatal(err)
	}
	for _, q := range []string{`VACUUM ANALYZE session_history`, `ANALYZE nodes`} {
		if _, err := s.Pool().Exec(ctx, q); err != nil {
			b.Fatal(err)
		}
	}
	return self, users
}

// BenchmarkCountElsewhere is the cluster part of the session cap on a connect's path: one count
// of a user's open rows on other live nodes (presenceBenchData), with the partial index
// session_history_user_open and without it (the index on user and connect time that the
// history already has); plain-query is the same count as one plain statement, which a lone call
// would send if it were not shared.
func BenchmarkCountElsewhere(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	self, users := presenceBenchData(b, s)
	p := self.Presence()
	run := func(b *testing.B) {
		i := 0
		for b.Loop() {
			if _, err := p.CountElsewhere(ctx, fmt.Sprintf("user-%d", i%users), ""); err != nil {
				b.Fatal(err)
			}
			i++
		}
	}
	b.Run("index=user_open", run)
	b.Run("plain-query", func(b *testing.B) { // the statement one lone call would send unshared
		i := 0
		for b.Loop() {
			var n int
			if err := s.Pool().QueryRow(ctx, `SELECT count(DISTINCT s.session_id)::int
				FROM session_history s JOIN nodes n ON n.node_id = s.node_id
				WHERE s.user_id = $1 AND s.ended_at IS NULL AND s.node_id <> $2 AND s.session_id <> ''
				  AND n.lease_until > now()`, fmt.Sprintf("user-%d", i%users), self.ID()).Scan(&n); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	if _, err := s.Pool().Exec(ctx, `DROP INDEX session_history_user_open`); err != nil {
		b.Fatal(err)
	}
	b.Run("index=user_connected", run)
}

// BenchmarkCountElsewhereConcurrent is CountElsewhere under a connect storm: 64 callers at
// once, sharing statements, beside the same count sent as one query per call. ns/op is wall
// time per count over all callers.
func BenchmarkCountElsewhereConcurrent(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	self, users := presenceBenchData(b, s)
	p := self.Presence()
	var next atomic.Int64
	user := func() string { return fmt.Sprintf("user-%d", next.Add(1)%int64(users)) }
	storm := func(b *testing.B, count func(user string) error) {
		b.SetParallelism(32) // 64 callers on 2 cores
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := count(user()); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.Run("shared", func(b *testing.B) {
		storm(b, func(u string) error { _, err := p.CountElsewhere(ctx, u, ""); return err })
	})
	b.Run("one-query-each", func(b *testing.B) {
		storm(b, func(u string) error {
			var n int
			return s.Pool().QueryRow(ctx, `SELECT count(DISTINCT s.session_id)::int
				FROM session_history s JOIN nodes n ON n.node_id = s.node_id
				WHERE s.user_id = $1 AND s.ended_at IS NULL AND s.node_id <> $2 AND s.session_id <> ''
				  AND n.lease_until > now()`, u, self.ID()).Scan(&n)
		})
	})
}

// BenchmarkPresenceStats is one read of the cluster's stats for /v1/stats (the per-node counts
// and the distinct users over 100,000 open sessions of 10 nodes, presenceBenchData), past the
// one-second reuse; and a user's session list.
func BenchmarkPresenceStats(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	self, users := presenceBenchData(b, s)
	b.Run("stats", func(b *testing.B) {
		for b.Loop() {
			// A fresh Presence each time: no reuse of the last answer.
			st, err := self.Presence().Stats(ctx)
			if err != nil || len(st.Nodes) != 9 {
				b.Fatalf("stats: %d nodes, %v", len(st.Nodes), err)
			}
		}
	})
	b.Run("user_sessions", func(b *testing.B) {
		p := self.Presence()
		i := 0
		for b.Loop() {
			if _, err := p.UserSessions(ctx, fmt.Sprintf("user-%d", i%users)); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}
