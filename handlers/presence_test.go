package handlers

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// countingPresence is the real store.Presence, counting the cap's queries.
type countingPresence struct {
	*store.Presence
	counts atomic.Int64
}

func (c *countingPresence) CountElsewhere(ctx context.Context, user, except string) (int, error) {
	c.counts.Add(1)
	return c.Presence.CountElsewhere(ctx, user, except)
}

// The cluster part of the session cap costs at most one query per connect, and none without a
// cap, without another live node, or when this node's sessions alone reach the cap; when it
// runs it counts the user's open sessions on other live nodes, not the resumed one.
func TestSessionsElsewhereQueries(t *testing.T) {
	s := storetest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	self, err := s.NewNode(store.NodeOptions{ID: "self", Lease: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := self.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = self.Stop(context.Background()) })
	p := &countingPresence{Presence: self.Presence()}
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second, MaxSessionsPerUser: 2}, realtime.Hooks{})
	a := &API{Options: Options{Hub: hub, Presence: p, Log: slog.New(slog.DiscardHandler)}}
	connect := func(user, resume string) connectRequest {
		return connectRequest{id: Identity{User: user}, resume: resume}
	}

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 10s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("the node alone", func() bool { return !p.OthersLive() })
	if n := a.sessionsElsewhere(ctx, connect("ann", "")); n != 0 || p.counts.Load() != 0 {
		t.Fatalf("alone: %d elsewhere, %d queries; want 0 and none", n, p.counts.Load())
	}

	peer, err := s.NewNode(store.NodeOptions{ID: "peer", Lease: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := peer.Register(ctx); err != nil {
		t.Fatal(err)
	}
	for _, sid := range []string{"on-peer", "resumed"} {
		if _, err := s.Pool().Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id)
			VALUES ($1, $2, 'ann', 'websocket', now(), 'peer')`, uuid.NewString(), sid); err != nil {
			t.Fatal(err)
		}
	}
	waitFor("the peer seen", p.OthersLive)
	if n := a.sessionsElsewhere(ctx, connect("ann", "")); n != 2 || p.counts.Load() != 1 {
		t.Fatalf("with a peer: %d elsewhere, %d queries; want 2 and one", n, p.counts.Load())
	}
	if n := a.sessionsElsewhere(ctx, connect("ann", "resumed")); n != 1 || p.counts.Load() != 2 {
		t.Fatalf("resuming: %d elsewhere, %d queries; want 1 and one more", n, p.counts.Load())
	}

	for range 2 {
		if err := hub.Register(hub.NewSession(realtime.SessionInfo{User: "bo", Transport: realtime.SSE}, 0), ""); err != nil {
			t.Fatal(err)
		}
	}
	if n := a.sessionsElsewhere(ctx, connect("bo", "")); n != 0 || p.counts.Load() != 2 {
		t.Fatalf("at the cap here: %d elsewhere, %d queries; want 0 and no more", n, p.counts.Load())
	}

	noCap := &API{Options: Options{Hub: realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{}),
		Presence: p, Log: slog.New(slog.DiscardHandler)}}
	if n := noCap.sessionsElsewhere(ctx, connect("ann", "")); n != 0 || p.counts.Load() != 2 {
		t.Fatalf("no cap: %d elsewhere, %d queries; want 0 and no more", n, p.counts.Load())
	}
}

// BenchmarkSessionsElsewhere is the cluster part of the session cap as a connect runs it: with
// no other live node (no query), with the user at the cap here (no query), and with a live
// peer (one count of the user's open rows elsewhere, on a small table; see store's
// BenchmarkCountElsewhere for 100,000 open sessions).
func BenchmarkSessionsElsewhere(b *testing.B) {
	s := storetest.New(b)
	ctx := context.Background()
	self, err := s.NewNode(store.NodeOptions{ID: "self", Lease: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	if err := self.Start(ctx); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = self.Stop(context.Background()) })
	p := self.Presence()
	waitUntil := func(cond func() bool) {
		for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				b.Fatal("the node loop did not look within 10s")
			}
		}
	}
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second, MaxSessionsPerUser: 2}, realtime.Hooks{})
	for range 2 {
		if err := hub.Register(hub.NewSession(realtime.SessionInfo{User: "full", Transport: realtime.SSE}, 0), ""); err != nil {
			b.Fatal(err)
		}
	}
	a := &API{Options: Options{Hub: hub, Presence: p, Log: slog.New(slog.DiscardHandler)}}
	run := func(user string) func(b *testing.B) {
		return func(b *testing.B) {
			cr := connectRequest{id: Identity{User: user}}
			for b.Loop() {
				a.sessionsElsewhere(ctx, cr)
			}
		}
	}
	waitUntil(func() bool { return !p.OthersLive() })
	b.Run("alone", run("ann"))
	peer, err := s.NewNode(store.NodeOptions{ID: "peer", Lease: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := peer.Register(ctx); err != nil {
		b.Fatal(err)
	}
	waitUntil(p.OthersLive)
	b.Run("at_cap_here", run("full"))
	b.Run("peer_query", run("ann"))
}
