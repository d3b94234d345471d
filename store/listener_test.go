package store_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

func TestListenerSQLInsert(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	lst := startListener(t, s, nil)
	ctx := testCtx(t)
	app := connect(t, s)
	// An application's own INSERT, in its own transaction, is delivered too.
	tx, err := app.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO notifications(user_id, topic, data) VALUES ('sql-user', 'from.sql', '{"a":1}')`); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO notifications(user_id, topic, seq) VALUES ('sql-user', 'from.sql', 999), ('x', 't', 5), ('sql-user', 'from.sql', 0)`); err != nil {
		t.Fatal(err)
	}
	// A publish committed meanwhile is a marker: NOTIFYs arrive in commit order, so once its
	// change is in, anything the open transaction had sent early would be in too.
	mustPublish(t, s, note("marker"))
	lst.waitFor(t, "the marker", func() bool { return len(lst.changes) >= 1 })
	lst.mu.Lock()
	early := len(lst.changes) - 1
	lst.mu.Unlock()
	if early != 0 {
		t.Fatalf("changes before commit: %d", early)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	lst.waitFor(t, "changes", func() bool { return len(lst.changes) == 4 })
	lst.mu.Lock()
	got := slices.Clone(lst.changes)
	lst.mu.Unlock()
	want := []store.SeqRange{{UserID: "marker", From: 1, To: 1},
		{UserID: "sql-user", From: 1, To: 1}, {UserID: "sql-user", From: 2, To: 3}, {UserID: "x", From: 1, To: 1}}
	// The second statement's lines are ordered by user: sql-user before x.
	if !slices.Equal(got, want) {
		t.Fatalf("changes = %+v, want %+v", got, want)
	}
	ns, err := s.Fetch(ctx, []store.SeqRange{{UserID: "sql-user", From: 1, To: 3}})
	if err != nil || len(ns) != 3 || string(ns[0].Data) != `{"a": 1}` || string(ns[1].Data) != `{}` {
		t.Fatalf("fetch = %+v, %v", ns, err)
	}
}

func TestListenerPayloadSplit(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	// Count the NOTIFYs themselves on a raw connection.
	raw := connect(t, s)
	var schema string
	if err := raw.QueryRow(ctx, "SELECT current_schema()").Scan(&schema); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec(ctx, `LISTEN "notifyd:`+schema+`"`); err != nil {
		t.Fatal(err)
	}
	lst := startListener(t, s, nil)
	const users = 1000
	ns := make([]store.NewNotification, 0, 2*users)
	for i := range users {
		u := fmt.Sprintf("user-with-a-rather-long-identifier-%04d", i)
		ns = append(ns, note(u), note(u))
	}
	mustPublish(t, s, ns...)
	lst.waitFor(t, "all users", func() bool { return len(lst.changes) == users })
	lst.mu.Lock()
	for _, c := range lst.changes {
		if c.From != 1 || c.To != 2 {
			t.Fatalf("change %+v", c)
		}
	}
	lst.mu.Unlock()
	notifies, total := 0, 0
	for total < users {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		n, err := raw.WaitForNotification(wctx)
		cancel()
		if err != nil {
			t.Fatalf("after %d notifies (%d lines): %v", notifies, total, err)
		}
		if len(n.Payload) >= 7000 {
			t.Fatalf("payload of %d bytes", len(n.Payload))
		}
		notifies++
		total += strings.Count(n.Payload, "\n") + 1
	}
	if notifies < 2 || notifies > 10 {
		t.Fatalf("%d NOTIFYs for %d users", notifies, users)
	}
	t.Logf("%d users in %d NOTIFYs", users, notifies)
}

func TestListenerReconnect(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	lst := startListener(t, s, nil)
	ctx := testCtx(t)
	mustPublish(t, s, note("r"))
	lst.waitFor(t, "first change", func() bool { return len(lst.changes) == 1 })

	var killed int
	err := s.Pool().QueryRow(ctx, `SELECT count(*) FROM (SELECT pg_terminate_backend(pid)
		FROM pg_stat_activity WHERE application_name = $1) x`, lst.l.AppName).Scan(&killed)
	if err != nil || killed != 1 {
		t.Fatalf("killed %d listener backends: %v", killed, err)
	}
	lst.waitFor(t, "reconnect", func() bool { return lst.reconnects == 1 })
	mustPublish(t, s, note("r"), note("q"))
	lst.waitFor(t, "changes after reconnect", func() bool { return lst.covered()["r"] == 2 && lst.covered()["q"] == 1 })
}

func TestListenerDetectsSilence(t *testing.T) {
	t.Parallel()
	// With a short health interval the quiet connection is pinged and stays up; a change still
	// arrives afterwards and no reconnect happens.
	s := storetest.New(t)
	lst := startListener(t, s, func(l *store.Listener) { l.HealthInterval = 50 * time.Millisecond })
	waitPings(t, s, lst.l.AppName, 3)
	mustPublish(t, s, note("quiet"))
	lst.waitFor(t, "change", func() bool { return len(lst.changes) == 1 })
	lst.mu.Lock()
	defer lst.mu.Unlock()
	if lst.reconnects != 0 {
		t.Fatalf("%d reconnects on a healthy connection", lst.reconnects)
	}
}

// waitPings waits until the listener's backend (found by its application name) has run n
// pings: pgx's Ping sends "-- ping", which pg_stat_activity shows with the time it started.
func waitPings(t *testing.T, s *store.Store, app string, n int) {
	t.Helper()
	ctx := testCtx(t)
	seen := map[time.Time]bool{}
	deadline := time.Now().Add(30 * time.Second)
	for len(seen) < n {
		var query string
		var start time.Time
		err := s.Pool().QueryRow(ctx, `SELECT query, query_start FROM pg_stat_activity WHERE application_name = $1`, app).Scan(&query, &start)
		if err != nil {
			t.Fatalf("listener backend: %v", err)
		}
		if query == "-- ping" {
			seen[start] = true
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pings seen in 30s, want %d", len(seen), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestParsePayload(t *testing.T) {
	t.Parallel()
	cs, err := store.ParsePayload("a\t1\t2\nb\tc\t3\t3\n\n")
	if err != nil || !slices.Equal(cs, []store.SeqRange{{UserID: "a", From: 1, To: 2}, {UserID: "b\tc", From: 3, To: 3}}) {
		t.Fatalf("= %+v, %v", cs, err)
	}
	cs, err = store.ParsePayload("a\t1\t2\nbad\nb\t5\t4\nc\t1\tx\n\t1\t1\nd\t7\t7")
	if err == nil || !slices.Equal(cs, []store.SeqRange{{UserID: "a", From: 1, To: 2}, {UserID: "d", From: 7, To: 7}}) {
		t.Fatalf("= %+v, %v", cs, err)
	}
	if cs, err := store.ParsePayload(""); err != nil || cs != nil {
		t.Fatalf("empty = %+v, %v", cs, err)
	}
}

func FuzzParsePayload(f *testing.F) {
	for _, seed := range []string{
		"", "a\t1\t1", "a\t1\t2\nb\t3\t9", "user@x.y\t12\t12\n", "a\tb\t1\t2", "\t1\t1", "a\t-1\t2",
		"a\t9223372036854775807\t9223372036854775807", "a\t1\t99999999999999999999", "a\t2\t1", "\n\n\t\t\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, p string) {
		cs, err := store.ParsePayload(p)
		lines := 0
		for _, l := range strings.Split(p, "\n") {
			if l != "" {
				lines++
			}
		}
		if len(cs) > lines || (err == nil && len(cs) != lines) {
			t.Fatalf("%q: %d changes from %d lines, err %v", p, len(cs), lines, err)
		}
		// Formatting the changes back gives a payload that parses to the same changes.
		var b strings.Builder
		for i, c := range cs {
			if c.UserID == "" || strings.Contains(c.UserID, "\n") || c.From < 1 || c.To < c.From {
				t.Fatalf("%q: bad change %+v", p, c)
			}
			if i > 0 {
				b.WriteByte('\n')
			}
			fmt.Fprintf(&b, "%s\t%d\t%d", c.UserID, c.From, c.To)
		}
		again, err := store.ParsePayload(b.String())
		if err != nil || !slices.Equal(again, cs) {
			t.Fatalf("%q: round trip %+v -> %+v, %v", p, cs, again, err)
		}
	})
}
