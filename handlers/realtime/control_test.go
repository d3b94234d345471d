package realtime

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
)

// takeFrames collects s's frames, hello and synced left out, until n have
// come, failing after a while.
func takeFrames(t *testing.T, s *Session, n int) []Frame {
	t.Helper()
	var got []Frame
	deadline := time.Now().Add(10 * time.Second)
	for len(got) < n {
		for _, f := range s.Take() {
			if f.Type != TypeHello && f.Type != TypeSynced {
				got = append(got, f)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d frames, want %d", len(got), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return got
}

// TestControlReadKeepsCommitOrder: a read that the listener received
// between two commit signals reaches the session between their
// notifications, though the dispatcher merges the signals waiting around it.
func TestControlReadKeepsCommitOrder(t *testing.T) {
	h, s, n := annOnline(t)
	src := &countingSource{rows: []store.Notification{n(1), n(2), n(3)}}
	d := NewDispatcher(h, src, nil, 100)
	c := NewControl(h, d, nil, nil)
	// Everything is queued before the dispatcher runs, so it finds all of it waiting.
	d.Changes([]store.SeqRange{{UserID: "ann", From: 1, To: 1}})
	c.Apply([]store.ControlMessage{{Kind: store.ControlRead, User: "ann", Unread: 0, IDs: []string{n(1).ID}},
		{Kind: store.ControlRead, User: "nobody-online", Unread: 3}})
	d.Changes([]store.SeqRange{{UserID: "ann", From: 2, To: 3}})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.Run(ctx)
	got := takeFrames(t, s, 4)
	want := []string{TypeNotification, TypeRead, TypeNotification, TypeNotification}
	for i, f := range got {
		if f.Type != want[i] {
			t.Fatalf("frame %d is %s, want %s (%s)", i, f.Type, want[i], f.JSON)
		}
	}
	if string(got[1].JSON) != `{"type":"read","ids":["`+n(1).ID+`"],"unread":0}` {
		t.Fatalf("read = %s", got[1].JSON)
	}
}

type failingResolver struct{ ids []string }

func (f failingResolver) ReadIDs(context.Context, store.ControlMessage) ([]string, error) {
	if f.ids == nil {
		return nil, errors.New("down")
	}
	return f.ids, nil
}

// TestControlReadRange: a read range is resolved to ids, sent in frames of
// at most MaxIDsPerMessage ids; an unresolvable one still sends the count.
func TestControlReadRange(t *testing.T) {
	ids := make([]string, MaxIDsPerMessage+1)
	for i := range ids {
		ids[i] = "id"
	}
	for _, tc := range []struct {
		name   string
		res    failingResolver
		frames int
	}{{"resolved", failingResolver{ids: ids}, 2}, {"lookup fails", failingResolver{}, 1}} {
		t.Run(tc.name, func(t *testing.T) {
			h, s, _ := annOnline(t)
			d := NewDispatcher(h, &countingSource{}, nil, 100)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go d.Run(ctx)
			NewControl(h, d, tc.res, nil).Apply([]store.ControlMessage{{Kind: store.ControlReadRange, User: "ann", Unread: 4, FromSeq: 1, ToSeq: 9}})
			got := takeFrames(t, s, tc.frames)
			if len(got) != tc.frames {
				t.Fatalf("%d frames", len(got))
			}
			if tc.frames == 1 && string(got[0].JSON) != `{"type":"read","ids":[],"unread":4}` {
				t.Fatalf("read = %s", got[0].JSON)
			}
		})
	}
}

// TestControlEndsAndTouchesLocalSessions: kick and replace end the local
// session of that id only when the user matches; touch refreshes.
func TestControlEndsAndTouchesLocalSessions(t *testing.T) {
	h, s, _ := annOnline(t)
	c := NewControl(h, NewDispatcher(h, &countingSource{}, nil, 100), nil, nil)
	s.lastSeen.Store(time.Now().Add(-time.Minute).UnixNano())
	before := s.LastSeen()
	c.Apply([]store.ControlMessage{{Kind: store.ControlTouch, IDs: []string{"unknown", s.ID}}})
	if !s.LastSeen().After(before) {
		t.Fatal("touch did not refresh the session")
	}
	c.Apply([]store.ControlMessage{{Kind: store.ControlKick, Session: s.ID, User: "mallory"}, {Kind: store.ControlKick, Session: "unknown", User: "ann"}})
	if s.isClosed() {
		t.Fatal("a kick naming another user ended the session")
	}
	c.Apply([]store.ControlMessage{{Kind: store.ControlKick, Session: s.ID, User: "ann"}})
	if s.Reason() != ReasonKicked {
		t.Fatalf("reason %q, want kicked", s.Reason())
	}
	r := h.NewSession(SessionInfo{User: "ann", Transport: SSE}, 0)
	if err := h.Register(r, ""); err != nil {
		t.Fatal(err)
	}
	c.Apply([]store.ControlMessage{{Kind: store.ControlReplace, Session: r.ID, User: "ann"}})
	if r.Reason() != ReasonReplaced || len(h.UserSessions("ann")) != 0 {
		t.Fatalf("reason %q, %d sessions left", r.Reason(), len(h.UserSessions("ann")))
	}
}

// TestControlHandsMovesOn: moved, end and relay go to OnMove, in their order, and
// end no local session themselves; without OnMove they are dropped.
func TestControlHandsMovesOn(t *testing.T) {
	h, s, _ := annOnline(t)
	c := NewControl(h, NewDispatcher(h, &countingSource{}, nil, 100), nil, nil)
	moves := []store.ControlMessage{
		{Kind: store.ControlMoved, Session: s.ID, To: "new", Cursor: 3, User: "ann"},
		{Kind: store.ControlEnd, Session: s.ID, Reason: "kicked", User: "ann"},
		{Kind: store.ControlRelay, Session: s.ID, Unread: 2, IDs: []string{"n1"}, User: "ann"},
	}
	c.Apply(moves) // no OnMove: dropped
	var got []store.ControlMessage
	c.OnMove = func(m store.ControlMessage) { got = append(got, m) }
	c.Apply(append([]store.ControlMessage{{Kind: store.ControlTouch, IDs: []string{s.ID}}}, moves...))
	if len(got) != 3 || got[0].Kind != store.ControlMoved || got[0].To != "new" || got[1].Kind != store.ControlEnd || got[1].Reason != "kicked" ||
		got[2].Kind != store.ControlRelay || got[2].Unread != 2 || len(got[2].IDs) != 1 {
		t.Fatalf("OnMove got %+v", got)
	}
	if s.isClosed() {
		t.Fatalf("a move ended the session itself: %q", s.Reason())
	}
}

// TestControlHandsAcksOn: an ack goes to OnAck with the local session it
// names, only when the user matches; acks of sessions held elsewhere, of
// another user, and those arriving with no OnAck are dropped.
func TestControlHandsAcksOn(t *testing.T) {
	h, s, _ := annOnline(t)
	c := NewControl(h, NewDispatcher(h, &countingSource{}, nil, 100), nil, nil)
	ack := store.ControlMessage{Kind: store.ControlAck, Session: s.ID, User: "ann", IDs: []string{"n1", "n2"}}
	c.Apply([]store.ControlMessage{ack}) // no OnAck: dropped
	type got struct {
		s   *Session
		ids []string
	}
	var gots []got
	c.OnAck = func(s *Session, ids []string) { gots = append(gots, got{s, ids}) }
	c.Apply([]store.ControlMessage{
		{Kind: store.ControlAck, Session: s.ID, User: "mallory", IDs: []string{"m1"}},
		{Kind: store.ControlAck, Session: "elsewhere", User: "ann", IDs: []string{"e1"}},
		ack,
	})
	if len(gots) != 1 || gots[0].s != s || fmt.Sprint(gots[0].ids) != "[n1 n2]" {
		t.Fatalf("OnAck got %+v", gots)
	}
	if s.isClosed() {
		t.Fatalf("an ack ended the session: %q", s.Reason())
	}
}

// TestExpectReadWaitsForTheNotify: a read awaited by this node is applied
// even when the user has no session here (one may connect meanwhile), and
// Wait returns once a read naming the id has been applied.
func TestExpectReadWaitsForTheNotify(t *testing.T) {
	h := NewHub(Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, Hooks{})
	d := NewDispatcher(h, &countingSource{}, nil, 100)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go d.Run(ctx)
	c := NewControl(h, d, nil, nil)
	w := h.ExpectRead("offline")
	defer w.Done()
	c.Apply([]store.ControlMessage{{Kind: store.ControlRead, User: "offline", Unread: 1, IDs: []string{"a", "b"}}})
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	if !w.Wait(wctx, "b") {
		t.Fatal("the read was not applied")
	}
	short, scancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer scancel()
	if w.Wait(short, "never-read") {
		t.Fatal("Wait returned for an id no read named")
	}
	w.Done()
	if h.reads.waiting("offline") {
		t.Fatal("waiter still registered after Done")
	}
}
