package store_test

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

func count(t *testing.T, s *store.Store, sql string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := s.Pool().QueryRow(testCtx(t), sql, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return n
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestRecorderRecords(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ps := publishN(t, s, "u", 20)
	r := store.NewRecorder(s, testLog(), store.RecorderOptions{FlushEvery: 20 * time.Millisecond, MaxBatch: 7})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)

	row := uuid.Must(uuid.NewV7()).String()
	connected := time.Now().Add(-time.Minute).Truncate(time.Microsecond)
	r.SessionStarted(store.SessionStart{RowID: row, SessionID: "s1", UserID: "u", Device: "phone", Transport: "websocket",
		RemoteAddr: "10.0.0.1", UserAgent: "ua\x00bad", ConnectedAt: connected})
	for i, p := range ps {
		r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "u", Seq: p.Seq, SessionID: "s1", Transport: "websocket", Replayed: i < 5})
		if i%2 == 0 {
			r.Acked(store.Ack{NotificationID: p.ID, SessionID: "s1"}) // same flush or a later one
		}
	}
	r.Delivered(store.Delivery{NotificationID: ps[0].ID, UserID: "u", Seq: 1, SessionID: "s1", Transport: "websocket"}) // repeat: ignored
	r.Acked(store.Ack{NotificationID: "garbage", SessionID: "s1"})                                                      // invalid: dropped
	seen := time.Now().Truncate(time.Microsecond)
	r.SessionEnded(store.SessionEnd{RowID: row, LastSeen: seen, Reason: "heartbeat_timeout"})

	eventually(t, "records", func() bool { return r.Recorded()+r.Dropped() == 1+20+10+1+1+1 })
	if r.Dropped() != 1 {
		t.Fatalf("dropped %d, want 1", r.Dropped())
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE session_id = 's1' AND user_id = 'u'"); n != 20 {
		t.Fatalf("%d deliveries", n)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE acked_at IS NOT NULL AND seq % 2 = 1"); n != 10 {
		t.Fatalf("%d acked", n)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE acked_at IS NOT NULL"); n != 10 {
		t.Fatalf("%d acked in total", n)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE replayed"); n != 5 {
		t.Fatalf("%d replayed", n)
	}
	if n := count(t, s, `SELECT count(*) FROM session_history WHERE id = $1 AND session_id = 's1' AND device = 'phone'
		AND transport = 'websocket' AND remote_addr = '10.0.0.1' AND user_agent = 'uabad' AND connected_at = $2
		AND last_seen_at = $3 AND ended_at IS NOT NULL AND end_reason = 'heartbeat_timeout'`, row, connected, seen); n != 1 {
		t.Fatal("session_history row not as recorded")
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.Delivered(store.Delivery{NotificationID: ps[0].ID, SessionID: "late"})
	if r.Dropped() != 2 {
		t.Fatalf("record after Close: dropped %d", r.Dropped())
	}
}

func TestRecorderCloseFlushes(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ps := publishN(t, s, "u", 50)
	for _, mode := range []string{"running", "ctx-ended", "never-ran"} {
		t.Run(mode, func(t *testing.T) {
			r := store.NewRecorder(s, testLog(), store.RecorderOptions{FlushEvery: time.Hour})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ran := make(chan struct{})
			if mode != "never-ran" {
				go func() { r.Run(ctx); close(ran) }()
			}
			if mode == "ctx-ended" {
				cancel()
				<-ran
			}
			for _, p := range ps {
				r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "u", Seq: p.Seq, SessionID: mode, Transport: "sse"})
			}
			if err := r.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if n := count(t, s, "SELECT count(*) FROM deliveries WHERE session_id = $1", mode); n != 50 || r.Recorded() != 50 {
				t.Fatalf("%d rows, %d recorded after Close", n, r.Recorded())
			}
			if mode == "running" {
				<-ran
			}
			r.Run(context.Background()) // after Close: returns at once
		})
	}
}

// countingHandler counts warnings.
type countingHandler struct {
	slog.Handler
	warns atomic.Int64
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *countingHandler) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level == slog.LevelWarn {
		h.warns.Add(1)
	}
	return nil
}

func TestRecorderFullBufferDrops(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	p := publishN(t, s, "u", 1)[0]
	h := &countingHandler{Handler: slog.DiscardHandler}
	r := store.NewRecorder(s, slog.New(h), store.RecorderOptions{Buffer: 10, FlushEvery: time.Hour})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 250 {
				r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "u", Seq: 1, SessionID: uuid.NewString(), Transport: "longpoll"})
				_ = g + i
			}
		}()
	}
	wg.Wait() // nothing is running: never blocks
	if r.Dropped() != 990 {
		t.Fatalf("dropped %d, want 990", r.Dropped())
	}
	if w := h.warns.Load(); w != 1 {
		t.Fatalf("%d warnings, want 1 per 10s", w)
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r.Recorded() != 10 || count(t, s, "SELECT count(*) FROM deliveries") != 10 {
		t.Fatalf("recorded %d", r.Recorded())
	}
}

func TestRecorderFailedFlushDrops(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	h := &countingHandler{Handler: slog.DiscardHandler}
	r := store.NewRecorder(s, slog.New(h), store.RecorderOptions{FlushEvery: time.Hour})
	if _, err := s.Pool().Exec(testCtx(t), "DROP TABLE deliveries CASCADE"); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		r.Delivered(store.Delivery{NotificationID: uuid.NewString(), UserID: "u", Seq: 1, SessionID: "s", Transport: "sse"})
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if r.Dropped() != 3 || r.Recorded() != 0 {
		t.Fatalf("dropped %d recorded %d", r.Dropped(), r.Recorded())
	}
}

// TestRecorderAcksCannotCrowdOutDeliveries: with the ack queue full, deliveries
// and session rows still find room, and every one of them is written. It failed
// before: acks and deliveries shared one bound, so the 20 deliveries queued after
// a flood of acks were dropped.
func TestRecorderAcksCannotCrowdOutDeliveries(t *testing.T) {
	s := storetest.New(t)
	ps := publishN(t, s, "victim", 20)
	r := store.NewRecorder(s, testLog(), store.RecorderOptions{Buffer: 100, AckBuffer: 50, FlushEvery: time.Hour})
	for range 1000 {
		r.Acked(store.Ack{NotificationID: uuid.NewString(), SessionID: "flood"})
	}
	if r.Dropped() != 950 {
		t.Fatalf("dropped %d acks, want 950 (the ack queue holds 50)", r.Dropped())
	}
	row := uuid.Must(uuid.NewV7()).String()
	r.SessionStarted(store.SessionStart{RowID: row, SessionID: "v1", UserID: "victim", Transport: "websocket"})
	for _, p := range ps {
		r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "victim", Seq: p.Seq, SessionID: "v1", Transport: "websocket"})
	}
	if r.Dropped() != 950 {
		t.Fatalf("dropped %d, want 950: a delivery or session row was dropped behind the acks", r.Dropped())
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE user_id = 'victim'"); n != 20 {
		t.Fatalf("%d of 20 deliveries recorded", n)
	}
	if n := count(t, s, "SELECT count(*) FROM session_history WHERE user_id = 'victim'"); n != 1 {
		t.Fatalf("%d session rows recorded, want 1", n)
	}
}
