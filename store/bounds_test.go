package store_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// collectInbox reads one inbox page into memory (copying each row's data out
// of the driver's buffer).
func collectInbox(ctx context.Context, s *store.Store, q store.InboxQuery) ([]store.Notification, int64, bool, error) {
	var ns []store.Notification
	unread, truncated, err := s.Inbox(ctx, q, func(n store.Notification) error {
		n.Data = slices.Clone(n.Data)
		ns = append(ns, n)
		return nil
	})
	return ns, unread, truncated, err
}

// publishSized stores count notifications for user whose data is a string of
// size(i) bytes (i from 0), and returns each one's data length as Postgres
// renders it (what the byte bounds count), by seq.
func publishSized(t *testing.T, s *store.Store, user string, count int, size func(i int) int) map[int64]int {
	t.Helper()
	ns := make([]store.NewNotification, count)
	for i := range ns {
		ns[i] = store.NewNotification{UserID: user, Topic: "t", Data: []byte(fmt.Sprintf(`{"p":%q}`, strings.Repeat("x", size(i))))}
	}
	mustPublish(t, s, ns...)
	all, _, truncated, err := s.Replay(testCtx(t), user, 0, 1<<20, 1<<40)
	if err != nil || truncated || len(all) != count {
		t.Fatalf("full replay: %d rows, truncated %v, %v", len(all), truncated, err)
	}
	lens := make(map[int64]int, count)
	for _, n := range all {
		lens[n.Seq] = len(n.Data)
	}
	return lens
}

// checkByteCut fails unless got (in order) is a byte-bounded prefix of want:
// the first row always, then rows while their lengths add up to at most
// maxBytes, and truncated exactly when want has more.
func checkByteCut(t *testing.T, what string, got, want []int64, lens map[int64]int, maxBytes int, truncated bool) {
	t.Helper()
	n, sum := 0, 0
	for n < len(want) && (n == 0 || sum+lens[want[n]] <= maxBytes) {
		sum += lens[want[n]]
		n++
	}
	if !slices.Equal(got, want[:n]) || truncated != (n < len(want)) {
		t.Fatalf("%s: got %v truncated %v; want %v truncated %v", what, got, truncated, want[:n], n < len(want))
	}
}

// TestReplayByteBound: a replay stops where its data would pass maxBytes (the
// first row always comes), says truncated, and replays from its last seq
// return every unread notification exactly once, in seq order.
func TestReplayByteBound(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	sizes := []int{500, 3000, 100, 100, 9000, 200, 4000, 700, 700, 700, 12000, 50}
	lens := publishSized(t, s, "u", len(sizes), func(i int) int { return sizes[i] })
	if _, _, err := s.MarkRead(ctx, "u", nil, 2); err != nil { // seqs 1 and 2 are read: not replayed
		t.Fatal(err)
	}
	var unreadSeqs []int64
	for seq := int64(3); seq <= int64(len(sizes)); seq++ {
		unreadSeqs = append(unreadSeqs, seq)
	}
	for _, maxBytes := range []int{1, 5000, 10000, 1 << 20} {
		var got []int64
		after := int64(0)
		for replays := 0; ; replays++ {
			if replays > len(sizes) {
				t.Fatalf("max %d: no end after %d replays", maxBytes, replays)
			}
			ns, unread, truncated, err := s.Replay(ctx, "u", after, 100, maxBytes)
			if err != nil {
				t.Fatal(err)
			}
			if unread != int64(len(unreadSeqs)) {
				t.Fatalf("max %d: unread %d", maxBytes, unread)
			}
			rest := unreadSeqs[len(got):]
			checkByteCut(t, fmt.Sprintf("max %d after %d", maxBytes, after), seqs(ns), rest, lens, maxBytes, truncated)
			got = append(got, seqs(ns)...)
			if !truncated {
				break
			}
			after = ns[len(ns)-1].Seq
		}
		if !slices.Equal(got, unreadSeqs) {
			t.Fatalf("max %d: continued replays gave %v, want %v", maxBytes, got, unreadSeqs)
		}
	}
	// The count and the byte bound together: whichever cuts first.
	ns, _, truncated, err := s.Replay(ctx, "u", 0, 2, 1<<20)
	if err != nil || !slices.Equal(seqs(ns), []int64{3, 4}) || !truncated {
		t.Fatalf("limit 2: %v truncated %v, %v", seqs(ns), truncated, err)
	}
	ns, _, truncated, err = s.Replay(ctx, "u", 0, 2, 1)
	if err != nil || !slices.Equal(seqs(ns), []int64{3}) || !truncated {
		t.Fatalf("limit 2, 1 byte: %v truncated %v, %v", seqs(ns), truncated, err)
	}
	// Exactly what is left fits: not truncated.
	ns, _, truncated, err = s.Replay(ctx, "u", 10, 100, lens[11]+lens[12])
	if err != nil || !slices.Equal(seqs(ns), []int64{11, 12}) || truncated {
		t.Fatalf("exact fit: %v truncated %v, %v", seqs(ns), truncated, err)
	}
}

// TestReplayByteBoundShared: concurrent replays with different bounds share
// statements and each gets its own cut.
func TestReplayByteBoundShared(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	lens := publishSized(t, s, "u", 20, func(i int) int { return 1000 * (1 + i%3) })
	var want []int64
	for seq := int64(1); seq <= 20; seq++ {
		want = append(want, seq)
	}
	errs := make(chan error, 16)
	for c := range 16 {
		go func() {
			maxBytes := 1 + c*1500
			ns, _, truncated, err := s.Replay(ctx, "u", 0, 100, maxBytes)
			if err != nil {
				errs <- err
				return
			}
			n, sum := 0, 0
			for n < len(want) && (n == 0 || sum+lens[want[n]] <= maxBytes) {
				sum += lens[want[n]]
				n++
			}
			if !slices.Equal(seqs(ns), want[:n]) || truncated != (n < len(want)) {
				errs <- fmt.Errorf("max %d: %v truncated %v, want %v", maxBytes, seqs(ns), truncated, want[:n])
				return
			}
			errs <- nil
		}()
	}
	for range 16 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// TestInboxByteBound: an inbox page stops where its data would pass MaxBytes
// (the first row always), says truncated, and pages from the last seq given
// return every notification exactly once, newest first.
func TestInboxByteBound(t *testing.T) {
	s := storetest.New(t)
	ctx := testCtx(t)
	sizes := []int{500, 3000, 100, 100, 9000, 200, 4000, 700, 700, 700, 12000, 50}
	lens := publishSized(t, s, "u", len(sizes), func(i int) int { return sizes[i] })
	if _, _, err := s.MarkRead(ctx, "u", nil, 3); err != nil {
		t.Fatal(err)
	}
	for _, unreadOnly := range []bool{false, true} {
		var all []int64
		for seq := int64(len(sizes)); seq > 0; seq-- {
			if !unreadOnly || seq > 3 {
				all = append(all, seq)
			}
		}
		for _, maxBytes := range []int{1, 5000, 10000, 1 << 20} {
			var got []int64
			before := int64(0)
			for pages := 0; ; pages++ {
				if pages > len(sizes) {
					t.Fatalf("max %d: no end after %d pages", maxBytes, pages)
				}
				ns, unread, truncated, err := collectInbox(ctx, s, store.InboxQuery{User: "u", UnreadOnly: unreadOnly,
					Limit: 100, BeforeSeq: before, MaxBytes: maxBytes})
				if err != nil {
					t.Fatal(err)
				}
				if unread != int64(len(sizes)-3) {
					t.Fatalf("unread %d", unread)
				}
				for _, n := range ns {
					if len(n.Data) != lens[n.Seq] {
						t.Fatalf("seq %d: data of %d bytes, want %d", n.Seq, len(n.Data), lens[n.Seq])
					}
				}
				checkByteCut(t, fmt.Sprintf("unread %v max %d before %d", unreadOnly, maxBytes, before), seqs(ns), all[len(got):], lens, maxBytes, truncated)
				got = append(got, seqs(ns)...)
				if !truncated {
					break
				}
				before = ns[len(ns)-1].Seq
			}
			if !slices.Equal(got, all) {
				t.Fatalf("unread %v max %d: pages gave %v, want %v", unreadOnly, maxBytes, got, all)
			}
		}
	}
	// The row limit cuts without truncated (a full page: the client asks again).
	ns, _, truncated, err := collectInbox(ctx, s, store.InboxQuery{User: "u", Limit: 2, MaxBytes: 1 << 20})
	if err != nil || !slices.Equal(seqs(ns), []int64{12, 11}) || truncated {
		t.Fatalf("limit 2: %v truncated %v, %v", seqs(ns), truncated, err)
	}
	// An error from each stops the read and is returned.
	stop := errors.New("stop")
	calls := 0
	_, _, err = s.Inbox(ctx, store.InboxQuery{User: "u", Limit: 100}, func(store.Notification) error {
		calls++
		return stop
	})
	if !errors.Is(err, stop) || calls != 1 {
		t.Fatalf("each failing: %d calls, %v", calls, err)
	}
	// The store still serves after a read that stopped early.
	if ns, _, _, err := collectInbox(ctx, s, store.InboxQuery{User: "u", Limit: 1}); err != nil || len(ns) != 1 {
		t.Fatalf("after a stopped read: %v, %v", seqs(ns), err)
	}
}

// BenchmarkReplayByteCut: a replay of a large backlog (200 unread of 30 KB)
// cut at DefaultReplayMaxBytes; B/op is what one such replay allocates.
func BenchmarkReplayByteCut(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	ns := make([]store.NewNotification, 200)
	for i := range ns {
		ns[i] = store.NewNotification{UserID: "big", Topic: "t", Data: []byte(fmt.Sprintf(`{"p":%q}`, strings.Repeat("x", 30<<10)))}
	}
	mustPublish(b, s, ns...)
	b.ReportAllocs()
	for b.Loop() {
		got, _, truncated, err := s.Replay(ctx, "big", 0, 1000, 0)
		if err != nil || !truncated || len(got) == 0 || len(got) >= 200 {
			b.Fatalf("replay: %d rows, truncated %v, %v", len(got), truncated, err)
		}
	}
}

// BenchmarkInboxStreamed: an inbox page of 100 rows of 30 KB read through
// the callback; B/op stays near one row, not the page's 3 MB.
func BenchmarkInboxStreamed(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	ns := make([]store.NewNotification, 100)
	for i := range ns {
		ns[i] = store.NewNotification{UserID: "big", Topic: "t", Data: []byte(fmt.Sprintf(`{"p":%q}`, strings.Repeat("x", 30<<10)))}
	}
	mustPublish(b, s, ns...)
	b.ReportAllocs()
	for b.Loop() {
		rows := 0
		if _, _, err := s.Inbox(ctx, store.InboxQuery{User: "big", Limit: 1000}, func(store.Notification) error { rows++; return nil }); err != nil || rows != 100 {
			b.Fatalf("inbox: %d rows, %v", rows, err)
		}
	}
}
