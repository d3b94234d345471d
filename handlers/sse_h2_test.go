package handlers

import (
	"testing"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// events gives every event the cursor as its id (an empty id would reset
// the browser's Last-Event-ID), the reconnect delay on the first event of
// the stream only, and a fresh event each time (the library owns what is
// published to it).
func TestSSEStreamEvents(t *testing.T) {
	hub := realtime.NewHub(realtime.Config{}, realtime.Hooks{})
	st := &sseStream{t: &sseStreams{api: &API{Options: Options{Hub: hub}}}, lastID: 4}
	n := func(seq int64) realtime.Frame {
		return realtime.Frame{Type: realtime.TypeNotification, Seq: seq, JSON: []byte(`{"type":"notification"}`)}
	}
	hello := realtime.Frame{Type: realtime.TypeHello, JSON: []byte(`{"type":"hello"}`)}
	first := st.events([]realtime.Frame{hello, n(5), n(6)})
	second := st.events([]realtime.Frame{{Type: realtime.TypePong, JSON: []byte(`{"type":"pong"}`)}, n(7)})
	evs := append(first, second...)
	wantIDs := []string{"4", "5", "6", "6", "7"}
	wantTypes := []string{"hello", "notification", "notification", "pong", "notification"}
	for i, ev := range evs {
		if string(ev.ID) != wantIDs[i] || string(ev.Event) != wantTypes[i] || len(ev.Data) == 0 {
			t.Fatalf("event %d: id %q event %q data %q, want id %s, %s", i, ev.ID, ev.Event, ev.Data, wantIDs[i], wantTypes[i])
		}
		if (len(ev.Retry) > 0) != (i == 0) {
			t.Fatalf("event %d: retry %q (only the first carries it)", i, ev.Retry)
		}
	}
	if string(evs[0].Retry) != "1000" {
		t.Fatalf("retry %q, want the bye retry in ms", evs[0].Retry)
	}
	if first[1] == second[1] {
		t.Fatal("an event was reused")
	}
}
