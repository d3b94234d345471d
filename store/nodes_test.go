package store_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

func newNode(t *testing.T, s *store.Store, id string, lease time.Duration) *store.Node {
	t.Helper()
	n, err := s.NewNode(store.NodeOptions{ID: id, Addr: "127.0.0.1:1", Lease: lease, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// openSession inserts an open session_history row of node and returns its id.
func openSession(t *testing.T, s *store.Store, node string, connected time.Time) string {
	t.Helper()
	id := uuid.NewString()
	if _, err := s.Pool().Exec(testCtx(t), `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id)
		VALUES ($1::uuid, $1::text, 'u', 'websocket', $2, nullif($3, ''))`, id, connected, node); err != nil {
		t.Fatal(err)
	}
	return id
}

// sessionEnd is a session_history row's end reason ("" while open) and end.
func sessionEnd(t *testing.T, s *store.Store, id string) (string, *time.Time) {
	t.Helper()
	var reason *string
	var ended *time.Time
	if err := s.Pool().QueryRow(testCtx(t), `SELECT end_reason, ended_at FROM session_history WHERE id = $1`, id).Scan(&reason, &ended); err != nil {
		t.Fatal(err)
	}
	if reason == nil {
		return "", ended
	}
	return *reason, ended
}

func nodeRows(t *testing.T, s *store.Store) map[string]bool {
	t.Helper()
	rows, err := s.Pool().Query(testCtx(t), `SELECT node_id, draining FROM nodes WHERE lease_until > now()`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]bool{}
	for rows.Next() {
		var id string
		var draining bool
		if err := rows.Scan(&id, &draining); err != nil {
			t.Fatal(err)
		}
		out[id] = draining
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// lapse ends node's lease now, as if it had stopped renewing a lease ago.
func lapse(t *testing.T, s *store.Store, node string) time.Time {
	t.Helper()
	var renewed time.Time
	if err := s.Pool().QueryRow(testCtx(t), `UPDATE nodes SET renewed_at = now() - interval '1 minute',
		lease_until = now() - interval '1 second' WHERE node_id = $1 RETURNING renewed_at`, node).Scan(&renewed); err != nil {
		t.Fatal(err)
	}
	return renewed
}

func TestValidNodeID(t *testing.T) {
	for id, want := range map[string]bool{
		"web-1": true, "ip-10-0-0-1.eu-west-1.compute.internal-4f2a": true, "a_b": true, "N": true,
		"": false, "a b": false, "a/b": false, "née": false, `a"b`: false, string(make([]byte, 65)): false,
		"0123456789012345678901234567890123456789012345678901234567890123": true,
	} {
		if got := store.ValidNodeID(id); got != want {
			t.Errorf("ValidNodeID(%q) = %v, want %v", id, got, want)
		}
	}
	if _, err := storetest.New(t).NewNode(store.NodeOptions{ID: "no spaces"}); err == nil {
		t.Error("NewNode accepted an invalid id")
	}
}

// Two nodes on one schema each hold a lease; drain marks one, Stop removes it and closes its
// leftover open rows as shutdown, leaving the other node's rows open.
func TestNodeLeaseDrainStop(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	a, b := newNode(t, s, "node-a", time.Minute), newNode(t, s, "node-b", time.Minute)
	for _, n := range []*store.Node{a, b} {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _ = b.Stop(context.Background()) })
	if got := nodeRows(t, s); len(got) != 2 || got["node-a"] || got["node-b"] {
		t.Fatalf("nodes with a lease = %v, want node-a and node-b, not draining", got)
	}
	leftA := openSession(t, s, "node-a", time.Now().Add(-time.Minute))
	openB := openSession(t, s, "node-b", time.Now().Add(-time.Minute))

	if err := a.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if got := nodeRows(t, s); !got["node-a"] || got["node-b"] {
		t.Fatalf("after drain of node-a: %v", got)
	}
	if err := a.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if got := nodeRows(t, s); len(got) != 1 || got["node-b"] {
		t.Fatalf("after stop of node-a: %v, want node-b only", got)
	}
	if r, _ := sessionEnd(t, s, leftA); r != "shutdown" {
		t.Errorf("node-a's leftover row: end reason %q, want shutdown", r)
	}
	if r, _ := sessionEnd(t, s, openB); r != "" {
		t.Errorf("node-b's row closed as %q by node-a's stop", r)
	}
}

// A node whose lease lapsed is dead: one surviving node closes its open rows as node_lost (at
// the node's last renewal) and deletes its row; closed rows and other nodes' rows stay as they
// are, and report_sessions counts node_lost.
func TestReapDeadNode(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	dead, live := newNode(t, s, "dead", time.Minute), newNode(t, s, "live", time.Minute)
	for _, n := range []*store.Node{dead, live} {
		if _, err := n.Register(ctx); err != nil {
			t.Fatal(err)
		}
	}
	connected := time.Now().Add(-time.Hour).Truncate(time.Microsecond)
	lostRows := []string{openSession(t, s, "dead", connected), openSession(t, s, "dead", connected)}
	ended := openSession(t, s, "dead", connected)
	if _, err := s.Pool().Exec(ctx, `UPDATE session_history SET ended_at = now(), end_reason = 'client_close' WHERE id = $1`, ended); err != nil {
		t.Fatal(err)
	}
	liveRow := openSession(t, s, "live", connected)
	unowned := openSession(t, s, "", connected)

	if lost, err := live.ReapDead(ctx); err != nil || len(lost) != 0 {
		t.Fatalf("reap with every lease running = %v, %v; want nothing", lost, err)
	}
	renewed := lapse(t, s, "dead")
	lost, err := live.ReapDead(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(lost) != 1 || lost[0].Node != "dead" || lost[0].Sessions != 2 || !lost[0].LastRenewed.Equal(renewed) {
		t.Fatalf("reap = %+v, want node dead with 2 sessions, last renewed %s", lost, renewed)
	}
	for _, id := range lostRows {
		if r, at := sessionEnd(t, s, id); r != store.EndNodeLost || at == nil || !at.Equal(renewed) {
			t.Errorf("dead node's row: %q at %v, want node_lost at %s", r, at, renewed)
		}
	}
	if r, _ := sessionEnd(t, s, ended); r != "client_close" {
		t.Errorf("ended row rewritten to %q", r)
	}
	for _, id := range []string{liveRow, unowned} {
		if r, _ := sessionEnd(t, s, id); r != "" {
			t.Errorf("row %s of another node closed as %q", id, r)
		}
	}
	var rows int
	if err := s.Pool().QueryRow(ctx, `SELECT count(*) FROM nodes WHERE node_id = 'dead'`).Scan(&rows); err != nil || rows != 0 {
		t.Fatalf("dead node's row still there (%d, %v)", rows, err)
	}
	if lost, err := live.ReapDead(ctx); err != nil || len(lost) != 0 {
		t.Fatalf("second reap = %v, %v; want nothing", lost, err)
	}
	var nodeLost int64
	if err := s.Pool().QueryRow(ctx, `SELECT sum(node_lost)::bigint FROM report_sessions($1)`, connected.Add(-time.Minute)).Scan(&nodeLost); err != nil || nodeLost != 2 {
		t.Fatalf("report_sessions node_lost = %d, %v; want 2", nodeLost, err)
	}
	// A node never reaps itself, even with its own lease lapsed.
	lapse(t, s, "live")
	if lost, err := live.ReapDead(ctx); err != nil || len(lost) != 0 {
		t.Fatalf("reap of its own lapsed lease = %v, %v; want nothing", lost, err)
	}
}

// Several survivors reaping at once: exactly one of them handles each dead node.
func TestReapDeadExactlyOnce(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	var deads []string
	for _, id := range []string{"d1", "d2", "d3"} {
		if _, err := newNode(t, s, id, time.Minute).Register(ctx); err != nil {
			t.Fatal(err)
		}
		for range 20 {
			openSession(t, s, id, time.Now().Add(-time.Minute))
		}
		lapse(t, s, id)
		deads = append(deads, id)
	}
	var survivors []*store.Node
	for _, id := range []string{"s1", "s2", "s3", "s4"} {
		n := newNode(t, s, id, time.Minute)
		if _, err := n.Register(ctx); err != nil {
			t.Fatal(err)
		}
		survivors = append(survivors, n)
	}
	var mu sync.Mutex
	handled := map[string]int{}
	var sessions int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for _, n := range survivors {
		wg.Go(func() {
			<-start
			lost, err := n.ReapDead(ctx)
			if err != nil {
				t.Error(err)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, l := range lost {
				handled[l.Node]++
				sessions += l.Sessions
			}
		})
	}
	close(start)
	wg.Wait()
	for _, id := range deads {
		if handled[id] != 1 {
			t.Errorf("dead node %s handled %d times, want once", id, handled[id])
		}
	}
	if sessions != 60 {
		t.Errorf("%d sessions closed, want 60", sessions)
	}
}

// A running node renews its lease; when its row disappears (declared dead while it could not
// renew) it writes it again on its next renewal.
func TestNodeRenewsAndComesBack(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	n := newNode(t, s, "renewing", 500*time.Millisecond)
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n.Stop(context.Background()) })
	var first time.Time
	if err := s.Pool().QueryRow(ctx, `SELECT lease_until FROM nodes WHERE node_id = 'renewing'`).Scan(&first); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the lease to be renewed", func() bool {
		var until time.Time
		return s.Pool().QueryRow(ctx, `SELECT lease_until FROM nodes WHERE node_id = 'renewing'`).Scan(&until) == nil && until.After(first)
	})
	if _, err := s.Pool().Exec(ctx, `DELETE FROM nodes WHERE node_id = 'renewing'`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the node's row to come back", func() bool { _, ok := nodeRows(t, s)["renewing"]; return ok })
}

// Register under the id of a node whose lease still runs takes its row over and says so.
func TestRegisterTakesOver(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	if took, err := newNode(t, s, "same", time.Minute).Register(ctx); err != nil || took {
		t.Fatalf("first register: took over %v, %v", took, err)
	}
	if took, err := newNode(t, s, "same", time.Minute).Register(ctx); err != nil || !took {
		t.Fatalf("second register: took over %v, %v; want true", took, err)
	}
	lapse(t, s, "same")
	if took, err := newNode(t, s, "same", time.Minute).Register(ctx); err != nil || took {
		t.Fatalf("register after the lease lapsed: took over %v, %v; want false", took, err)
	}
}

// The recorder writes its node id into the session rows it starts.
func TestRecorderWritesNodeID(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	rec := store.NewRecorder(s, testLog(), store.RecorderOptions{NodeID: "rec-node"})
	id := uuid.NewString()
	rec.SessionStarted(store.SessionStart{RowID: id, SessionID: "s", UserID: "u", Transport: "sse"})
	if err := rec.Close(ctx); err != nil {
		t.Fatal(err)
	}
	var node *string
	if err := s.Pool().QueryRow(ctx, `SELECT node_id FROM session_history WHERE id = $1`, id).Scan(&node); err != nil {
		t.Fatal(err)
	}
	if node == nil || *node != "rec-node" {
		t.Fatalf("node_id = %v, want rec-node", node)
	}
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// BenchmarkReapDead: the loop's look for dead nodes, every RenewEvery on every node, with
// 200,000 open session rows of 20 live nodes: with none dead it reads only the nodes table;
// a dead node's 10,000 open rows are found through session_history_node_open.
func BenchmarkReapDead(b *testing.B) {
	s := storetest.New(b)
	ctx := context.Background()
	var live []*store.Node
	for i := range 20 {
		n, err := s.NewNode(store.NodeOptions{ID: fmt.Sprintf("live-%d", i), Lease: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := n.Register(ctx); err != nil {
			b.Fatal(err)
		}
		live = append(live, n)
	}
	if _, err := s.Pool().Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id)
		SELECT gen_random_uuid(), 's' || g, 'u' || g, 'websocket', now() - interval '1 hour', 'live-' || (g % 20)
		FROM generate_series(1, 200000) g; ANALYZE session_history`); err != nil {
		b.Fatal(err)
	}
	b.Run("none dead", func(b *testing.B) {
		for b.Loop() {
			if lost, err := live[0].ReapDead(ctx); err != nil || len(lost) != 0 {
				b.Fatal(lost, err)
			}
		}
	})
	b.Run("one dead with 10k sessions", func(b *testing.B) {
		dead, err := s.NewNode(store.NodeOptions{ID: "dead", Lease: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			if _, err := dead.Register(ctx); err != nil {
				b.Fatal(err)
			}
			if _, err := s.Pool().Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id)
				SELECT gen_random_uuid(), 'd' || g, 'u' || g, 'sse', now() - interval '1 hour', 'dead' FROM generate_series(1, 10000) g;
				UPDATE nodes SET lease_until = now() - interval '1 second' WHERE node_id = 'dead'`); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if lost, err := live[0].ReapDead(ctx); err != nil || len(lost) != 1 || lost[0].Sessions != 10000 {
				b.Fatal(lost, err)
			}
		}
	})
}
