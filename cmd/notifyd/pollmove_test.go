package main

// A long-poll session moving between two nodes on one schema, poll by poll (handlers/pollmove.go).

import (
	"context"
	"net/url"
	"strconv"
	"testing"
	"time"
)

// A poll naming a session another node holds adopts it: the answer carries a new id, no hello
// and no synced, the notifications above the cursor; the old copy is acknowledged to the cursor
// and ended as moved, without a bye; and the session moves back the same way.
func TestPollMovesBetweenNodes(t *testing.T) {
	a := startServer(t, func(c *Config) { c.NodeID = "move-a" })
	b := startServerOn(t, a.DBURL, func(c *Config) { c.NodeID = "move-b" })
	tok := a.token(t, "mover")

	first := a.poll(t, tok, url.Values{})
	if len(first.Messages) != 2 || first.Messages[0].Type != "hello" || first.Messages[1].Type != "synced" {
		t.Fatalf("first poll on a: %+v", first)
	}
	x := first.Session
	n1 := a.publish(t, "mover", "t", nil)
	onA := a.poll(t, tok, url.Values{"session": {x}, "cursor": {"0"}, "wait": {"5"}})
	if len(onA.Messages) != 1 || onA.Messages[0].ID != n1.ID || onA.Session != x {
		t.Fatalf("poll on a: %+v", onA)
	}
	n2 := a.publish(t, "mover", "t", nil)

	// The next poll lands on b: adopted, quietly, from the cursor.
	onB := b.poll(t, tok, url.Values{"session": {x}, "cursor": {strconv.FormatInt(onA.Cursor, 10)}, "wait": {"5"}})
	if onB.Session == "" || onB.Session == x || len(onB.Messages) != 1 || onB.Messages[0].ID != n2.ID || onB.Cursor != n2.Seq {
		t.Fatalf("poll on b: %+v, want only %s under a new session id", onB, n2.ID)
	}
	y := onB.Session
	// Presence (cluster-wide: a node lists the others' sessions from their history rows) shows
	// the session once, under its new id, whichever node is asked.
	eventually(t, 5*time.Second, "presence listing "+y+" alone on both nodes", func() bool {
		return onlySession(t, a, "mover", y) && onlySession(t, b, "mover", y)
	})
	eventually(t, 5*time.Second, "a's copy closed as moved, n1 acknowledged on it", func() bool {
		return a.scalar(t, `SELECT count(*) FROM session_history WHERE session_id = $1 AND end_reason = 'moved'`, x) == 1 &&
			a.scalar(t, `SELECT count(*) FROM deliveries WHERE session_id = $1 AND notification_id = $2 AND acked_at IS NOT NULL`, x, n1.ID) == 1
	})

	// Live delivery on b, then back to a.
	n3 := a.publish(t, "mover", "t", nil)
	live := b.poll(t, tok, url.Values{"session": {y}, "cursor": {strconv.FormatInt(onB.Cursor, 10)}, "wait": {"5"}})
	if live.Session != y || len(live.Messages) != 1 || live.Messages[0].ID != n3.ID {
		t.Fatalf("live poll on b: %+v", live)
	}
	back := a.poll(t, tok, url.Values{"session": {y}, "cursor": {strconv.FormatInt(live.Cursor, 10)}, "wait": {"1"}})
	if back.Session == y || back.Session == x || len(back.Messages) != 0 {
		t.Fatalf("poll back on a: %+v, want nothing under a new id", back)
	}
	eventually(t, 5*time.Second, "presence listing "+back.Session+" alone on both nodes", func() bool {
		return onlySession(t, a, "mover", back.Session) && onlySession(t, b, "mover", back.Session)
	})
}

// onlySession reports whether ts lists exactly one session of user, with id.
func onlySession(t *testing.T, ts *testServer, user, id string) bool {
	s := ts.sessionsOf(t, user)
	return len(s) == 1 && s[0].ID == id
}

// A session kicked on its node between two polls, whose next poll lands on another node: the
// kicked node passes the bye on (end), and that poll answers with it.
func TestPollMoveCarriesTheBye(t *testing.T) {
	a := startServer(t, func(c *Config) { c.NodeID = "bye-a" })
	b := startServerOn(t, a.DBURL, func(c *Config) { c.NodeID = "bye-b" })
	tok := a.token(t, "kicked-mover")
	x := a.poll(t, tok, url.Values{}).Session
	if st := a.do(t, "DELETE", "/v1/sessions/"+x, testAPIKey, nil, nil); st != 204 {
		t.Fatalf("kick: %d", st)
	}
	start := time.Now()
	_, reply, _, err := b.pollOnce(context.Background(), tok, url.Values{"session": {x}, "cursor": {"0"}, "wait": {"10"}})
	if err != nil {
		t.Fatal(err)
	}
	if len(reply.Messages) != 1 || reply.Messages[0].Type != "bye" || reply.Messages[0].Reason != "kicked" || time.Since(start) > 5*time.Second {
		t.Fatalf("poll on b after the kick on a: %+v after %s, want bye kicked", reply, time.Since(start))
	}
	eventually(t, 5*time.Second, "no session left", func() bool {
		return len(a.sessionsOf(t, "kicked-mover")) == 0 && len(b.sessionsOf(t, "kicked-mover")) == 0
	})
	// a does not carry that bye a second time.
	again := a.poll(t, tok, url.Values{"session": {x}, "cursor": {"0"}})
	if len(again.Messages) == 0 || again.Messages[0].Type != "hello" {
		t.Fatalf("poll on a after the bye went through b: %+v, want a new session", again)
	}
}

// A poll naming an SSE session that ended (its proxy went away, its history row closed) is a
// resume, not a move: only long-poll sessions move. The answer opens a new session with hello,
// the replay above the cursor and synced, which the browser client waits for before it probes
// for a better transport.
func TestPollResumesAnEndedStream(t *testing.T) {
	a := startServer(t)
	c := a.dialSSE(t, "resumer", nil, nil)
	x := c.expect(t, "hello").Session
	c.expect(t, "synced")
	a.waitRecorded(t, x)
	c.drop()
	eventually(t, 10*time.Second, "the stream's history row closed", func() bool {
		return a.scalar(t, `SELECT count(*) FROM session_history WHERE session_id = $1 AND ended_at IS NOT NULL`, x) == 1
	})
	n := a.publish(t, "resumer", "t", nil)
	r := a.poll(t, a.token(t, "resumer"), url.Values{"session": {x}, "cursor": {"0"}})
	var types []string
	for _, m := range r.Messages {
		types = append(types, m.Type)
	}
	if len(r.Messages) != 3 || r.Messages[0].Type != "hello" || r.Messages[1].ID != n.ID || r.Messages[2].Type != "synced" || r.Session == x {
		t.Fatalf("poll naming the ended stream %s: session %s, messages %v, want a new session: hello, %s, synced", x, r.Session, types, n.ID)
	}
}
