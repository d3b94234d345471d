package realtime

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/notifyd/notifyd/store"
)

// countingSource is a Source over a fixed set of rows that counts fetches.
type countingSource struct {
	rows    []store.Notification
	fetches int
	asked   []store.SeqRange
}

func (c *countingSource) Fetch(_ context.Context, rs []store.SeqRange) ([]store.Notification, error) {
	c.fetches++
	c.asked = append(c.asked, rs...)
	var out []store.Notification
	for _, r := range rs {
		for _, n := range c.rows {
			if n.UserID == r.UserID && n.Seq >= r.From && n.Seq <= r.To {
				out = append(out, n)
			}
		}
	}
	slices.SortFunc(out, func(a, b store.Notification) int {
		return cmp.Or(strings.Compare(a.UserID, b.UserID), cmp.Compare(a.Seq, b.Seq))
	})
	return out, nil
}

func (c *countingSource) After(context.Context, map[string]int64, int) ([]store.Notification, error) {
	return nil, errors.New("not used")
}

func (c *countingSource) UnreadUpTo(context.Context, map[string]int64) (map[string]int64, error) {
	return nil, errors.New("not used")
}

// annOnline is a hub with one live session of "ann", and a maker of her notifications.
func annOnline(t testing.TB) (*Hub, *Session, func(seq int64) store.Notification) {
	t.Helper()
	h := NewHub(Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, Hooks{})
	s := h.NewSession(SessionInfo{User: "ann", Transport: WebSocket}, 0)
	if err := h.Register(s, ""); err != nil {
		t.Fatal(err)
	}
	s.FinishReplay(nil, 0, false)
	n := func(seq int64) store.Notification {
		return store.Notification{ID: "id" + string(rune('0'+seq)), UserID: "ann", Seq: seq, Topic: "t", Data: []byte(`{}`), CreatedAt: time.Now()}
	}
	return h, s, n
}

// deliveredSeqs takes s's queue and returns the seqs of its notifications.
func deliveredSeqs(s *Session) []int64 {
	var seqs []int64
	for _, f := range s.Take() {
		if f.Type == TypeNotification {
			seqs = append(seqs, f.Seq)
		}
	}
	return seqs
}

// TestDispatcherDeliversRememberedRows: ranges whose rows were remembered are
// delivered without a fetch; a range only partly remembered is fetched whole;
// rows of users nobody is connected as are not kept.
func TestDispatcherDeliversRememberedRows(t *testing.T) {
	h, s, n := annOnline(t)
	src := &countingSource{rows: []store.Notification{n(1), n(2), n(3), n(4)}}
	d := NewDispatcher(h, src, nil, 100)

	d.Expect([]string{"ann", "ann", "offline"})([]store.Notification{n(1), n(2), {ID: "x", UserID: "offline", Seq: 1}})
	if len(d.recent.m) != 2 {
		t.Fatalf("kept %d rows, want 2 (the offline user's row is not kept)", len(d.recent.m))
	}
	d.dispatch(context.Background(), []store.SeqRange{{UserID: "ann", From: 1, To: 2}})
	if src.fetches != 0 {
		t.Fatalf("fetched %d times for remembered rows", src.fetches)
	}
	d.Expect([]string{"ann"})([]store.Notification{n(3)})
	d.dispatch(context.Background(), []store.SeqRange{{UserID: "ann", From: 3, To: 4}})
	if src.fetches != 1 || len(src.asked) != 1 || src.asked[0] != (store.SeqRange{UserID: "ann", From: 3, To: 4}) {
		t.Fatalf("fetches %d, asked %v; want one fetch of 3..4", src.fetches, src.asked)
	}
	seqs := deliveredSeqs(s)
	if len(seqs) != 4 || seqs[0] != 1 || seqs[3] != 4 {
		t.Fatalf("delivered seqs %v, want 1..4 once each", seqs)
	}
}

// TestDispatcherWaitsForExpectedPublish: a commit signal that overtakes its
// publisher's answer waits for the rows rather than reading them back; when
// the publish hands over nothing (it failed, or its rows expire), the rows
// are fetched.
func TestDispatcherWaitsForExpectedPublish(t *testing.T) {
	// In a bubble the clock stands still while the dispatch waits, so only the
	// publish's end, never the wait's timer, can end a wait here.
	synctest.Test(t, func(t *testing.T) {
		h, s, n := annOnline(t)
		src := &countingSource{rows: []store.Notification{n(1), n(2)}}
		d := NewDispatcher(h, src, nil, 100)
		d.recent.wait = time.Minute

		committed := d.Expect([]string{"ann", "offline"})
		if got := len(d.recent.expected); got != 1 {
			t.Fatalf("expecting %d users, want 1 (offline users are not expected)", got)
		}
		dispatched := make(chan struct{})
		go func() {
			d.dispatch(context.Background(), []store.SeqRange{{UserID: "ann", From: 1, To: 1}})
			close(dispatched)
		}()
		synctest.Wait() // the dispatch is blocked, waiting
		select {
		case <-dispatched:
			t.Fatal("the signal did not wait for the expected publish")
		default:
		}
		committed([]store.Notification{n(1)})
		<-dispatched
		if src.fetches != 0 {
			t.Fatalf("fetched %d times; the publish handed the row over", src.fetches)
		}
		if len(d.recent.expected) != 0 {
			t.Fatalf("still expecting %v", d.recent.expected)
		}

		failed := d.Expect([]string{"ann"})
		go func() {
			time.Sleep(50 * time.Millisecond)
			failed(nil)
		}()
		d.dispatch(context.Background(), []store.SeqRange{{UserID: "ann", From: 2, To: 2}})
		if src.fetches != 1 {
			t.Fatalf("fetches = %d, want the row read back once the publish handed over nothing", src.fetches)
		}
		seqs := deliveredSeqs(s)
		if len(seqs) != 2 || seqs[0] != 1 || seqs[1] != 2 {
			t.Fatalf("delivered seqs %v, want 1, 2", seqs)
		}
	})
}

// TestRecentExpiry: past recentMax rows the oldest are forgotten first, and
// after recentTTL every older row is; the kept rows stay in insertion order
// when the expired front is dropped from the queue.
func TestRecentExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := &recent{expected: map[string]int{"ann": 1}}
		rows := func(from int64, n int) []Notification {
			ns := make([]Notification, n)
			for i := range ns {
				ns[i] = Notification{User: "ann", Seq: from + int64(i)}
			}
			return ns
		}
		kept := func(seq int64) bool {
			_, ok := c.m[recentKey{"ann", seq}]
			return ok
		}
		c.rememberLocked(rows(1, recentMax))
		c.rememberLocked(rows(recentMax+1, 10))
		if len(c.m) != recentMax || len(c.order)-c.head != recentMax {
			t.Fatalf("%d rows and %d queued after recentMax+10, want %d of each", len(c.m), len(c.order)-c.head, recentMax)
		}
		for seq, want := range map[int64]bool{1: false, 10: false, 11: true, recentMax + 10: true} {
			if kept(seq) != want {
				t.Errorf("seq %d kept %v, want %v", seq, kept(seq), want)
			}
		}
		if got := c.order[c.head].key.seq; got != 11 {
			t.Errorf("oldest queued seq %d, want 11", got)
		}

		// A second publish later: the first batch's rows expire by age, the second's stay.
		time.Sleep(recentTTL / 2)
		c.rememberLocked(rows(recentMax+11, 5))
		time.Sleep(recentTTL/2 + time.Second)
		c.rememberLocked(rows(recentMax+16, 1))
		if len(c.m) != 6 || !kept(recentMax+11) || !kept(recentMax+16) || kept(recentMax+10) {
			t.Fatalf("after recentTTL %d rows kept, want the last 6", len(c.m))
		}
		// The expired front was more than half the queue: it is gone, the rest in order.
		if c.head != 0 || len(c.order) != 6 {
			t.Fatalf("queue head %d, length %d; want 0 and 6", c.head, len(c.order))
		}
		for i, e := range c.order {
			if want := int64(recentMax + 11 + i); e.key.seq != want {
				t.Errorf("queue[%d] is seq %d, want %d", i, e.key.seq, want)
			}
		}
	})
}
