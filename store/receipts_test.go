package store_test

import (
	"context"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// An ack that reaches the Recorder before the delivery it acknowledges (the client answers
// while the transport is still reporting what it wrote) is applied, in the same chunk or in the
// next one; an ack for something never delivered is counted as unmatched, not lost silently.
func TestRecorderAckBeforeDelivery(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ps := publishN(t, s, "u", 4)
	r := store.NewRecorder(s, testLog(), store.RecorderOptions{FlushEvery: time.Hour, MaxBatch: 2})
	pub := time.Now().Add(-time.Second).Truncate(time.Microsecond)
	// Chunks of two records: [ack0, deliv0] [ack1, ack3] [deliv1, deliv2] [ack2]
	r.Acked(store.Ack{NotificationID: ps[0].ID, SessionID: "s"})
	r.Delivered(store.Delivery{NotificationID: ps[0].ID, UserID: "u", Seq: 1, SessionID: "s", Device: "phone", Transport: "sse", PublishedAt: pub})
	r.Acked(store.Ack{NotificationID: ps[1].ID, SessionID: "s"})
	r.Acked(store.Ack{NotificationID: ps[3].ID, SessionID: "s"}) // never delivered
	r.Delivered(store.Delivery{NotificationID: ps[1].ID, UserID: "u", Seq: 2, SessionID: "s", Device: "phone", Transport: "sse", PublishedAt: pub})
	r.Delivered(store.Delivery{NotificationID: ps[2].ID, UserID: "u", Seq: 3, SessionID: "s", Device: "phone", Transport: "sse"})
	r.Acked(store.Ack{NotificationID: ps[2].ID, SessionID: "s"})
	if err := r.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE acked_at IS NOT NULL AND acked_at >= delivered_at - interval '1 second'"); n != 3 {
		t.Fatalf("%d deliveries acked, want 3", n)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE device = 'phone' AND published_at = $1", pub); n != 2 {
		t.Fatalf("%d deliveries with device and published_at, want 2", n)
	}
	if r.Unmatched() != 1 || r.Dropped() != 0 || r.Recorded() != 6 {
		t.Fatalf("unmatched %d dropped %d recorded %d, want 1 0 6", r.Unmatched(), r.Dropped(), r.Recorded())
	}
}

// An ack names the notification it acknowledges: one without a notification id is an invalid
// record, dropped and counted, and marks nothing acked.
func TestRecorderAckWithoutID(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ps := publishN(t, s, "u", 2)
	r := store.NewRecorder(s, testLog(), store.RecorderOptions{FlushEvery: time.Hour})
	for _, p := range ps {
		r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "u", Seq: p.Seq, SessionID: "lp", Transport: "longpoll"})
	}
	r.Acked(store.Ack{SessionID: "lp"})
	if err := r.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries WHERE acked_at IS NOT NULL"); n != 0 {
		t.Fatalf("%d deliveries acked by an ack without an id, want 0", n)
	}
	if r.Dropped() != 1 || r.Recorded() != 2 || r.Unmatched() != 0 {
		t.Fatalf("dropped %d recorded %d unmatched %d, want 1 2 0", r.Dropped(), r.Recorded(), r.Unmatched())
	}
}

// A delivery dated outside the partitions made ahead gets its partition made by the Recorder.
func TestRecorderMakesMissingPartition(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	p := publishN(t, s, "u", 1)[0]
	r := store.NewRecorder(s, testLog(), store.RecorderOptions{FlushEvery: time.Hour})
	old := time.Now().AddDate(0, 0, -20)
	r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "u", Seq: 1, SessionID: "s", Transport: "websocket", At: old})
	r.Delivered(store.Delivery{NotificationID: p.ID, UserID: "u", Seq: 1, SessionID: "t", Transport: "websocket"})
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := count(t, s, "SELECT count(*) FROM deliveries"); n != 2 || r.Dropped() != 0 {
		t.Fatalf("%d deliveries, %d dropped", n, r.Dropped())
	}
	name := "deliveries_" + old.UTC().Format("20060102")
	if n := count(t, s, "SELECT count(*) FROM pg_class WHERE relname = $1 AND relnamespace = current_schema()::regnamespace", name); n != 1 {
		t.Fatalf("partition %s not made", name)
	}
}
