package store_test

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// controlLog collects what the listener's OnControl receives.
type controlLog struct {
	mu   sync.Mutex
	msgs []store.ControlMessage
}

func listenControl(t *testing.T, s *store.Store) (*listening, *controlLog) {
	t.Helper()
	cl := &controlLog{}
	lst := startListener(t, s, func(l *store.Listener) {
		l.OnControl = func(ms []store.ControlMessage) {
			cl.mu.Lock()
			cl.msgs = append(cl.msgs, ms...)
			cl.mu.Unlock()
		}
	})
	return lst, cl
}

// wait waits until the log holds n messages and returns them.
func (cl *controlLog) wait(t *testing.T, n int) []store.ControlMessage {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		cl.mu.Lock()
		got := append([]store.ControlMessage(nil), cl.msgs...)
		cl.mu.Unlock()
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("control messages: %d, want %d: %+v", len(got), n, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestControlParseFormatRoundTrip(t *testing.T) {
	t.Parallel()
	msgs := []store.ControlMessage{
		{Kind: store.ControlRead, User: "u\twith tab", Unread: 3, IDs: []string{"a", "b"}},
		{Kind: store.ControlRead, User: "v", Unread: 0},
		{Kind: store.ControlReadRange, User: "w", Unread: 7, FromSeq: 1, ToSeq: 900, FromUS: 10, ToUS: 20},
		{Kind: store.ControlKick, User: "x", Session: "sess-1"},
		{Kind: store.ControlReplace, User: "y", Session: "sess-2"},
		{Kind: store.ControlTouch, IDs: []string{"s1", "s2", "s3"}},
	}
	payloads := store.FormatControl(msgs)
	if len(payloads) != 1 {
		t.Fatalf("payloads = %q", payloads)
	}
	got, err := store.ParseControl(payloads[0])
	if err != nil || !reflect.DeepEqual(got, msgs) {
		t.Fatalf("parse = %+v, %v\nwant %+v", got, err, msgs)
	}
	// Malformed lines are reported and skipped; good ones around them kept.
	got, err = store.ParseControl("kick\ts\tu\nbogus\tx\nread\tx\t\tu\nreadrange\t1\t5\t2\t0\t0\tu\n\ntouch\ta")
	if err == nil || len(got) != 2 || got[0].Kind != store.ControlKick || got[1].Kind != store.ControlTouch {
		t.Fatalf("parse = %+v, %v", got, err)
	}
	// Many messages split into payloads of at most 7,000 bytes.
	var many []store.ControlMessage
	for i := range 500 {
		many = append(many, store.ControlMessage{Kind: store.ControlKick, User: "user", Session: fmt.Sprintf("session-%04d", i)})
	}
	payloads = store.FormatControl(many)
	var back []store.ControlMessage
	for _, p := range payloads {
		if len(p) > 7000 {
			t.Fatalf("payload of %d bytes", len(p))
		}
		ms, err := store.ParseControl(p)
		if err != nil {
			t.Fatal(err)
		}
		back = append(back, ms...)
	}
	if len(payloads) < 2 || !reflect.DeepEqual(back, many) {
		t.Fatalf("%d payloads gave %d messages", len(payloads), len(back))
	}
}

// The long-poll moves' wire form: every move survives its payload, and
// malformed lines are refused.
func TestControlParseMoves(t *testing.T) {
	t.Parallel()
	for _, m := range []store.ControlMessage{
		{Kind: store.ControlMoved, Session: "abc", To: "def", Cursor: 42, User: "u\twith tab"},
		{Kind: store.ControlEnd, Session: "def", Reason: "kicked", User: "u"},
	} {
		payloads := store.FormatControl([]store.ControlMessage{m})
		if len(payloads) != 1 {
			t.Fatalf("payloads of %+v: %q", m, payloads)
		}
		got, err := store.ParseControl(payloads[0])
		if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], m) {
			t.Errorf("round trip of %+v: %+v, %v", m, got, err)
		}
	}
	// None is taken for a move; those that name one are malformed.
	for _, bad := range []string{"", "moved", "moved\tabc\tdef\tx\tu", "moved\tabc\tdef\t-1\tu", "end\tabc\t\tu", "kick\tabc\tu", "moved\t\tdef\t1\tu"} {
		got, err := store.ParseControl(bad)
		for _, m := range got {
			if m.Kind == store.ControlMoved || m.Kind == store.ControlEnd {
				t.Errorf("ParseControl(%q) accepted the move %+v", bad, m)
			}
		}
		if strings.HasPrefix(bad, "moved") || strings.HasPrefix(bad, "end") {
			if err == nil {
				t.Errorf("ParseControl(%q): no error", bad)
			}
		}
	}
}

// FuzzParseControl: any payload parses without panicking; what parses
// formats back to a payload that parses to the same messages.
func FuzzParseControl(f *testing.F) {
	for _, seed := range []string{
		"read\t3\ta,b\tuser", "read\t0\t\tu\tv", "readrange\t1\t1\t9\t5\t6\tu",
		"kick\ts\tu", "replace\ts\tu", "touch\ta,b,c", "touch\t", "kick\t\tu",
		"read\t-1\ta\tu", "bogus", "\n\n", "read\t1\ta",
		"moved\tabc\tdef\t1\tu", "end\tabc\tkicked\tu",
		"ack\tabc\tn1,n2\tu\tv", "ack\tabc\t\tu", "ack\t\tn1\tu", "ack\tabc\tn1,,n2\tu", "ack\tabc\tn1",
		"relay\tabc\t2\tn1,n2\tu\tv", "relay\tabc\t0\t\tu", "relay\t\t1\tn1\tu", "relay\tabc\t-1\tn1\tu", "relay\tabc\t1\tn1",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, p string) {
		msgs, _ := store.ParseControl(p)
		var clean []store.ControlMessage
		for _, m := range msgs {
			// The format's assumptions: no newline anywhere, no tab or comma in a list item.
			ok := !strings.ContainsAny(m.User+m.Session, "\n") && !strings.ContainsAny(m.Session, "\t")
			for _, id := range m.IDs {
				ok = ok && id != "" && !strings.ContainsAny(id, "\t\n,")
			}
			if m.Kind == store.ControlTouch && len(m.IDs) == 0 {
				ok = false // an empty touch formats to "touch\t", which parses to no ids: same
			}
			if ok {
				clean = append(clean, m)
			}
		}
		var back []store.ControlMessage
		for _, out := range store.FormatControl(clean) {
			ms, err := store.ParseControl(out)
			if err != nil {
				t.Fatalf("formatted %q does not parse: %v", out, err)
			}
			back = append(back, ms...)
		}
		if len(clean) > 0 && !reflect.DeepEqual(back, clean) {
			t.Fatalf("round trip of %q: %+v, want %+v", p, back, clean)
		}
	})
}

// The forwarded acks' wire form: an ack survives its payload, the user
// last (tabs and all); an ack with no session or no ids is malformed.
func TestControlParseAcks(t *testing.T) {
	t.Parallel()
	m := store.ControlMessage{Kind: store.ControlAck, Session: "sess-1", IDs: []string{"n1", "n2"}, User: "u\twith tab"}
	payloads := store.FormatControl([]store.ControlMessage{m})
	if len(payloads) != 1 || payloads[0] != "ack\tsess-1\tn1,n2\tu\twith tab" {
		t.Fatalf("payloads = %q", payloads)
	}
	got, err := store.ParseControl(payloads[0])
	if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], m) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for _, bad := range []string{"ack", "ack\tsess-1\t\tu", "ack\t\tn1\tu", "ack\tsess-1\tn1"} {
		if got, err := store.ParseControl(bad); err == nil || len(got) != 0 {
			t.Errorf("ParseControl(%q) = %+v, %v: want an error and no message", bad, got, err)
		}
	}
}

// TestControlParseRelay: a relayed read formats to its wire line and parses
// back to itself; one without a session, with a negative count or missing
// a field is refused.
func TestControlParseRelay(t *testing.T) {
	t.Parallel()
	for _, m := range []store.ControlMessage{
		{Kind: store.ControlRelay, Session: "sess-1", Unread: 2, IDs: []string{"n1", "n2"}, User: "u\twith tab"},
		{Kind: store.ControlRelay, Session: "sess-1", Unread: 5, User: "u"},
	} {
		payloads := store.FormatControl([]store.ControlMessage{m})
		got, err := store.ParseControl(payloads[0])
		if err != nil || len(got) != 1 || !reflect.DeepEqual(got[0], m) {
			t.Fatalf("round trip of %q: %+v, %v", payloads, got, err)
		}
	}
	if p := store.FormatControl([]store.ControlMessage{{Kind: store.ControlRelay, Session: "s", Unread: 1, IDs: []string{"a", "b"}, User: "u"}}); len(p) != 1 || p[0] != "relay\ts\t1\ta,b\tu" {
		t.Fatalf("payloads = %q", p)
	}
	for _, bad := range []string{"relay", "relay\t\t1\tn1\tu", "relay\ts\t-1\tn1\tu", "relay\ts\t1\tn1", "relay\ts\tx\tn1\tu"} {
		if got, err := store.ParseControl(bad); err == nil || len(got) != 0 {
			t.Errorf("ParseControl(%q) = %+v, %v: want an error and no message", bad, got, err)
		}
	}
}

// TestControlAck: acks sent through store.Control reach the listener's
// control hook as ack lines of that session and user, every id in order,
// split over several lines when they exceed one payload (each line still
// fits a NOTIFY); ids holding a separator are skipped and counted, and a
// session or user holding one is refused before anything is sent.
func TestControlAck(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	_, cl := listenControl(t, s)
	c := s.NewControl(testLog())
	for _, bad := range [][2]string{{"a\tb", "u"}, {"a,b", "u"}, {"", "u"}, {"a", "u\nv"}} {
		if _, err := c.Ack(ctx, bad[0], bad[1], []string{"n1"}); err == nil {
			t.Fatalf("acks of session %q user %q sent", bad[0], bad[1])
		}
	}
	user := "u\t" + strings.Repeat("x", 3000) // a long user leaves less room for ids
	var ids []string
	for i := range 900 {
		ids = append(ids, fmt.Sprintf("%08d-0000-4000-8000-000000000000", i))
	}
	skipped, err := c.Ack(ctx, "sess-1", user, append(append([]string{"a,b", "c\td", "e\nf", ""}, ids...), "g,h"))
	if err != nil || skipped != 5 {
		t.Fatalf("ack: skipped %d, %v; want 5 skipped", skipped, err)
	}
	// Nothing to send: no line, no error.
	if skipped, err := c.Ack(ctx, "sess-1", user, []string{"x,y"}); err != nil || skipped != 1 {
		t.Fatalf("ack of separators only: %d %v", skipped, err)
	}
	var back []string
	lines := 0
	deadline := time.Now().Add(20 * time.Second)
	for len(back) < len(ids) && time.Now().Before(deadline) {
		cl.mu.Lock()
		got := append([]store.ControlMessage(nil), cl.msgs[lines:]...)
		cl.mu.Unlock()
		for _, m := range got {
			if m.Kind != store.ControlAck || m.Session != "sess-1" || m.User != user || len(m.IDs) == 0 {
				t.Fatalf("line %d: %+v", lines, m)
			}
			if n := len(store.FormatControl([]store.ControlMessage{m})[0]); n > 7000 {
				t.Fatalf("line %d of %d bytes", lines, n)
			}
			back = append(back, m.IDs...)
			lines++
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !reflect.DeepEqual(back, ids) || lines < 2 {
		t.Fatalf("%d lines gave %d ids, want %d in order over several lines", lines, len(back), len(ids))
	}
}

// TestControlMove: a move sent through store.Control reaches the listener's
// control hook as it was sent; one holding a separator, or no move at all,
// is refused before it is sent.
func TestControlMove(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	_, cl := listenControl(t, s)
	c := s.NewControl(testLog())
	for _, bad := range []store.ControlMessage{
		{Kind: store.ControlMoved, Session: "a\tb", To: "c", User: "u"},
		{Kind: store.ControlEnd, Session: "a", Reason: "kicked", User: "u\nv"},
		{Kind: store.ControlKick, Session: "a", User: "u"},
	} {
		if err := c.Move(ctx, bad); err == nil {
			t.Fatalf("move %+v sent", bad)
		}
	}
	want := []store.ControlMessage{
		{Kind: store.ControlMoved, Session: "old", To: "new", Cursor: 7, User: "u\twith tab"},
		{Kind: store.ControlEnd, Session: "new", Reason: "kicked", User: "u\twith tab"},
		{Kind: store.ControlRelay, Session: "new", Unread: 3, IDs: []string{"n1", "n2"}, User: "u\twith tab"},
	}
	for _, m := range want {
		if err := c.Move(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	// A relay too large for a payload, or with an id that would not parse
	// back, goes as the count alone.
	var many []string
	for i := range 1000 {
		many = append(many, fmt.Sprintf("%08d-0000-4000-8000-000000000000", i))
	}
	for _, ids := range [][]string{many, {"a,b"}} {
		if err := c.Move(ctx, store.ControlMessage{Kind: store.ControlRelay, Session: "new", Unread: 4, IDs: ids, User: "u"}); err != nil {
			t.Fatal(err)
		}
		want = append(want, store.ControlMessage{Kind: store.ControlRelay, Session: "new", Unread: 4, User: "u"})
	}
	if got := cl.wait(t, len(want)); !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

// TestReadTriggerSQLUpdate: an application's own UPDATE of read_at, in its
// own transaction, is announced at commit with the ids newly read (in seq
// order) and the authoritative unread count; marking unread again announces
// the count alone; an UPDATE of another column announces nothing.
func TestReadTriggerSQLUpdate(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	ps := mustPublish(t, s, note("alice"), note("alice"), note("alice"), note("bob"))
	_, cl := listenControl(t, s)
	app := connect(t, s)
	tx, err := app.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `UPDATE notifications SET read_at = now() WHERE seq <= 2`); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if n := len(cl.wait(t, 0)); n != 0 {
		t.Fatalf("%d control messages before commit", n)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	got := cl.wait(t, 2)
	want := []store.ControlMessage{
		{Kind: store.ControlRead, User: "alice", Unread: 1, IDs: []string{ps[0].ID, ps[1].ID}},
		{Kind: store.ControlRead, User: "bob", Unread: 0, IDs: []string{ps[3].ID}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
	if _, err := app.Exec(ctx, `UPDATE notifications SET topic = 'x' WHERE user_id = 'alice'`); err != nil {
		t.Fatal(err)
	}
	if _, err := app.Exec(ctx, `UPDATE notifications SET read_at = NULL WHERE user_id = 'bob'`); err != nil {
		t.Fatal(err)
	}
	got = cl.wait(t, 3)
	if len(got) != 3 || !reflect.DeepEqual(got[2], store.ControlMessage{Kind: store.ControlRead, User: "bob", Unread: 1}) {
		t.Fatalf("after the topic update and marking unread: %+v", got[2:])
	}
}

// TestReadTriggerLargeRead: a read of more ids than a payload holds is sent
// as a range, which ReadIDs resolves to exactly the ids read, in seq order.
func TestReadTriggerLargeRead(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	var batch []store.NewNotification
	for range 600 {
		batch = append(batch, note("big"))
	}
	ps := mustPublish(t, s, batch...)
	// An earlier read inside the range must not come back as newly read.
	if _, _, err := s.MarkRead(ctx, "big", []string{ps[5].ID}, 0); err != nil {
		t.Fatal(err)
	}
	_, cl := listenControl(t, s)
	changed, unread, err := s.MarkRead(ctx, "big", nil, 500)
	if err != nil || len(changed) != 499 || unread != 100 {
		t.Fatalf("mark read: %d ids, unread %d, %v", len(changed), unread, err)
	}
	got := cl.wait(t, 1)
	m := got[0]
	if m.Kind != store.ControlReadRange || m.User != "big" || m.Unread != 100 || m.FromSeq != 1 || m.ToSeq != 500 {
		t.Fatalf("got %+v", m)
	}
	ids, err := s.ReadIDs(ctx, m)
	if err != nil || !reflect.DeepEqual(ids, changed) {
		t.Fatalf("resolved %d ids (%v), want the %d changed", len(ids), err, len(changed))
	}
}

// TestReadTriggerConcurrentCounts: concurrent reads of one user's rows, each
// in its own transaction: the count of the read announced last is the true
// final count (the trigger serializes them on the user's counter row).
func TestReadTriggerConcurrentCounts(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	var batch []store.NewNotification
	for range 40 {
		batch = append(batch, note("racer"))
	}
	ps := mustPublish(t, s, batch...)
	_, cl := listenControl(t, s)
	var wg sync.WaitGroup
	for i := range ps {
		wg.Go(func() {
			if _, _, err := s.MarkRead(ctx, "racer", []string{ps[i].ID}, 0); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got := cl.wait(t, len(ps))
	for i, m := range got {
		// Commit order: each count is one less than the one before.
		if m.Unread != int64(len(ps)-1-i) || len(m.IDs) != 1 {
			t.Fatalf("message %d: %+v", i, m)
		}
	}
}

// TestControlKickReplaceTouch: store.Control finds a session by its open
// history row and sends its message to every node; unknown sessions, ended
// ones and other users' are not found.
func TestControlKickReplaceTouch(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	app := connect(t, s)
	if _, err := app.Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at) VALUES
		(gen_random_uuid(), 'live-1', 'ann', 'websocket', now()),
		(gen_random_uuid(), 'live-2', 'ann', 'sse', now())`); err != nil {
		t.Fatal(err)
	}
	_, cl := listenControl(t, s)
	c := s.NewControl(testLog())
	if r, ok, err := c.SessionOf(ctx, "live-1"); err != nil || !ok || r.User != "ann" || r.Transport != "websocket" || !r.Live {
		t.Fatalf("open session: %+v %v %v", r, ok, err)
	}
	if _, ok, err := c.SessionOf(ctx, "nope"); err != nil || ok {
		t.Fatalf("unknown session found: %v %v", ok, err)
	}
	// A session of a node whose lease lapsed is no one's; one of a live node is found.
	if _, err := app.Exec(ctx, `INSERT INTO nodes (node_id, instance, lease_until) VALUES
			('dead', gen_random_uuid(), now() - interval '1 second'), ('alive', gen_random_uuid(), now() + interval '1 hour');
		INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id) VALUES
			(gen_random_uuid(), 'on-dead', 'ann', 'websocket', now(), 'dead'),
			(gen_random_uuid(), 'on-alive', 'ann', 'websocket', now(), 'alive')`); err != nil {
		t.Fatal(err)
	}
	if r, ok, err := c.SessionOf(ctx, "on-dead"); err != nil || !ok || r.Live {
		t.Fatalf("session of a dead node: %+v %v %v, want found and not live", r, ok, err)
	}
	if ok, err := c.Kick(ctx, "on-dead", ""); err != nil || ok {
		t.Fatalf("session of a dead node kicked: %v %v", ok, err)
	}
	if r, ok, err := c.SessionOf(ctx, "on-alive"); err != nil || !ok || r.User != "ann" || !r.Live {
		t.Fatalf("session of a live node: %+v %v %v", r, ok, err)
	}
	// An ended session is found as ended, with its transport: a poll naming it does not adopt it.
	if _, err := app.Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, ended_at, end_reason)
		VALUES (gen_random_uuid(), 'ended-1', 'ann', 'sse', now(), now(), 'closed')`); err != nil {
		t.Fatal(err)
	}
	if r, ok, err := c.SessionOf(ctx, "ended-1"); err != nil || !ok || r.Live || r.Transport != "sse" {
		t.Fatalf("ended session: %+v %v %v, want found, sse, not live", r, ok, err)
	}
	for _, tc := range []struct {
		id, user string
		want     bool
	}{{"live-1", "bob", false}, {"nope", "", false}, {"live-1", "ann", true}, {"live-1", "", true}} {
		if ok, err := c.Kick(ctx, tc.id, tc.user); err != nil || ok != tc.want {
			t.Fatalf("kick %s as %q: %v %v, want %v", tc.id, tc.user, ok, err, tc.want)
		}
	}
	if ok, err := c.Replace(ctx, "live-2", "bob"); err != nil || ok {
		t.Fatalf("replace as another user: %v %v", ok, err)
	}
	if ok, err := c.Replace(ctx, "live-2", "ann"); err != nil || !ok {
		t.Fatalf("replace: %v %v", ok, err)
	}
	// Replace closed the row: the session is no longer found.
	if ok, err := c.Replace(ctx, "live-2", "ann"); err != nil || ok {
		t.Fatalf("second replace: %v %v", ok, err)
	}
	got := cl.wait(t, 3)
	want := []store.ControlMessage{
		{Kind: store.ControlKick, Session: "live-1", User: "ann"},
		{Kind: store.ControlKick, Session: "live-1", User: "ann"},
		{Kind: store.ControlReplace, Session: "live-2", User: "ann"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v", got)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { c.Run(rctx); close(done) }()
	defer func() { cancel(); <-done }()
	var ids []string
	for i := range 700 {
		ids = append(ids, fmt.Sprintf("session-id-%05d", i))
	}
	for _, id := range ids {
		c.Touch(id)
	}
	var touched []string
	deadline := time.Now().Add(20 * time.Second)
	for len(touched) < len(ids) && time.Now().Before(deadline) {
		touched = touched[:0]
		for _, m := range cl.wait(t, 3)[3:] {
			if m.Kind != store.ControlTouch {
				t.Fatalf("got %+v", m)
			}
			touched = append(touched, m.IDs...)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !reflect.DeepEqual(touched, ids) || c.Dropped() != 0 {
		t.Fatalf("touched %d of %d (dropped %d)", len(touched), len(ids), c.Dropped())
	}
}
