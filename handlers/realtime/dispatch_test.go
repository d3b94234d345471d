package realtime

import (
	"strconv"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
)

// TestExpectKeepsNoExpiringRows: rows that expire are left to the store's
// filtering of expired rows: a signal for them is read back, not served from
// memory.
func TestExpectKeepsNoExpiringRows(t *testing.T) {
	h, _, n := annOnline(t)
	d := NewDispatcher(h, &countingSource{}, nil, 100)
	expiring := n(2)
	later := time.Now().Add(time.Hour)
	expiring.ExpiresAt = &later
	d.Expect([]string{"ann"})([]store.Notification{n(1), expiring})
	if len(d.recent.m) != 1 {
		t.Fatalf("kept %d rows, want 1 (not the expiring one)", len(d.recent.m))
	}
	if got := FromStore(n(1)); got.User != "ann" || got.Seq != 1 || got.ID != n(1).ID || string(got.Data) != "{}" {
		t.Fatalf("FromStore = %+v", got)
	}
}

// BenchmarkExpectCommitted is the publish hook's cost for a batch of 1,000
// rows whose user is online: announcing the users, then converting and
// keeping the committed rows.
func BenchmarkExpectCommitted(b *testing.B) {
	h, _, _ := annOnline(b)
	d := NewDispatcher(h, &countingSource{}, nil, 100)
	users := make([]string, 1000)
	rows := make([]store.Notification, 1000)
	for i := range rows {
		users[i] = "ann"
		rows[i] = store.Notification{ID: "id" + strconv.Itoa(i), UserID: "ann", Topic: "t", Data: []byte(`{}`), CreatedAt: time.Now()}
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		for j := range rows {
			rows[j].Seq = int64(i*len(rows) + j + 1)
		}
		d.Expect(users)(rows)
		clear(d.recent.m) // as the dispatcher's take would
		d.recent.order, d.recent.head = d.recent.order[:0], 0
	}
}

// BenchmarkRememberFull is the publish hook's cost in a steady state: the
// memory of recent rows is full (recentMax), so each group of 24 committed
// rows expires 24 old ones.
func BenchmarkRememberFull(b *testing.B) {
	h, _, _ := annOnline(b)
	d := NewDispatcher(h, &countingSource{}, nil, 100)
	const group = 24
	users := make([]string, group)
	rows := make([]store.Notification, group)
	for i := range rows {
		users[i] = "ann"
		rows[i] = store.Notification{ID: "id" + strconv.Itoa(i), UserID: "ann", Topic: "t", Data: []byte(`{}`), CreatedAt: time.Now()}
	}
	seq := int64(0)
	publish := func() {
		for j := range rows {
			seq++
			rows[j].Seq = seq
		}
		d.Expect(users)(rows)
	}
	for range recentMax / group {
		publish()
	}
	b.ReportAllocs()
	for b.Loop() {
		publish()
	}
	if n := len(d.recent.m); n != recentMax {
		b.Fatalf("%d rows remembered, want recentMax (%d)", n, recentMax)
	}
}
