package realtime

import (
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
)

// TestWireTime: the wire writes RFC 3339 UTC with milliseconds, the same
// bytes from WireTime and from the pong's hand-written time.
func TestWireTime(t *testing.T) {
	at := time.Date(2026, 11, 26, 22, 4, 5, 123456789, time.FixedZone("CET", 3600))
	if got := WireTime(at); got != "2026-11-26T21:04:05.123Z" {
		t.Fatalf("WireTime = %q", got)
	}
	if got, want := string(AppendPong(nil, at)), `{"type":"pong","server_time":"`+WireTime(at)+`"}`; got != want {
		t.Fatalf("AppendPong = %s, want %s", got, want)
	}
}

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
