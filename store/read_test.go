package store_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

func publishN(t *testing.T, s *store.Store, user string, n int) []store.Published {
	t.Helper()
	ns := make([]store.NewNotification, n)
	for i := range ns {
		ns[i] = note(user)
	}
	return mustPublish(t, s, ns...)
}

func seqs(ns []store.Notification) []int64 {
	out := make([]int64, len(ns))
	for i, n := range ns {
		out[i] = n.Seq
	}
	return out
}

func TestReplay(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	ps := publishN(t, s, "u", 10) // seqs 1..10
	publishN(t, s, "other", 3)
	past := time.Now().Add(-time.Minute)
	future := time.Now().Add(time.Hour)
	exp := note("u")
	exp.ExpiresAt = &past
	live := note("u")
	live.ExpiresAt = &future
	mustPublish(t, s, exp, live) // seq 11 expired, 12 not yet
	if _, _, err := s.MarkRead(ctx, "u", []string{ps[1].ID, ps[4].ID}, 0); err != nil {
		t.Fatal(err)
	}
	// unread: 1,3,4,6,7,8,9,10,12 = 9
	ns, unread, truncated, err := s.Replay(ctx, "u", 0, 3, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqs(ns), []int64{1, 3, 4}) || unread != 9 || !truncated {
		t.Fatalf("replay(0,3) = %v unread %d truncated %v", seqs(ns), unread, truncated)
	}
	if ns[0].ID != ps[0].ID || ns[0].UserID != "u" || ns[0].Topic != "test.topic" || ns[0].ReadAt != nil || ns[0].CreatedAt.IsZero() {
		t.Fatalf("row = %+v", ns[0])
	}
	ns, unread, truncated, err = s.Replay(ctx, "u", 4, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqs(ns), []int64{6, 7, 8, 9, 10, 12}) || unread != 9 || truncated {
		t.Fatalf("replay(4,100) = %v unread %d truncated %v", seqs(ns), unread, truncated)
	}
	if ns[5].ExpiresAt == nil || !ns[5].ExpiresAt.Equal(future.Truncate(time.Microsecond)) {
		t.Fatalf("expires_at = %v, want %v", ns[5].ExpiresAt, future)
	}
	// Exactly limit left: not truncated.
	ns, _, truncated, err = s.Replay(ctx, "u", 9, 2, 0)
	if err != nil || !slices.Equal(seqs(ns), []int64{10, 12}) || truncated {
		t.Fatalf("replay(9,2) = %v %v %v", seqs(ns), truncated, err)
	}
	ns, unread, truncated, err = s.Replay(ctx, "nobody", 0, 10, 0)
	if err != nil || len(ns) != 0 || unread != 0 || truncated {
		t.Fatalf("replay(nobody) = %v %d %v %v", ns, unread, truncated, err)
	}
}

// TestReplayConcurrentShareStatements: many connects replaying at once share
// statements, and each still gets exactly its own user's rows above its own
// cursor, its own count and its own truncation.
func TestReplayConcurrentShareStatements(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	const users = 40
	for u := range users {
		publishN(t, s, fmt.Sprintf("u%d", u), u%7) // seqs 1..u%7
	}
	before := s.Stats().ReplayStatements
	const callers = 600
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for c := range callers {
		wg.Go(func() {
			u := c % users
			total := int64(u % 7)
			after := int64(c % 3)
			limit := 1 + c%4
			ns, unread, truncated, err := s.Replay(ctx, fmt.Sprintf("u%d", u), after, limit, 0)
			if err != nil {
				errs <- err
				return
			}
			var want []int64
			for q := after + 1; q <= total && len(want) < limit; q++ {
				want = append(want, q)
			}
			wantTrunc := total-after > int64(limit)
			for _, n := range ns {
				if n.UserID != fmt.Sprintf("u%d", u) {
					errs <- fmt.Errorf("caller %d got a row of %s", c, n.UserID)
					return
				}
			}
			if !slices.Equal(seqs(ns), want) || unread != total || truncated != wantTrunc {
				errs <- fmt.Errorf("caller %d (u%d after %d limit %d): %v unread %d truncated %v; want %v, %d, %v",
					c, u, after, limit, seqs(ns), unread, truncated, want, total, wantTrunc)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	stmts := s.Stats().ReplayStatements - before
	if stmts == 0 || stmts >= callers {
		t.Fatalf("%d callers used %d statements; want them shared", callers, stmts)
	}
	t.Logf("%d concurrent replays in %d statements", callers, stmts)
}

func TestMarkRead(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	ps := publishN(t, s, "u", 6)
	foreign := publishN(t, s, "v", 1)[0]
	changed, unread, err := s.MarkRead(ctx, "u", []string{ps[2].ID, ps[0].ID, foreign.ID, "not-a-uuid", uuid.NewString()}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(changed, []string{ps[0].ID, ps[2].ID}) || unread != 4 {
		t.Fatalf("changed %v unread %d", changed, unread)
	}
	// Again: nothing changes.
	changed, unread, err = s.MarkRead(ctx, "u", []string{ps[0].ID}, 0)
	if err != nil || len(changed) != 0 || unread != 4 {
		t.Fatalf("again: changed %v unread %d err %v", changed, unread, err)
	}
	// up_to_seq 4 changes 2 and 4.
	changed, unread, err = s.MarkRead(ctx, "u", nil, 4)
	if err != nil || !slices.Equal(changed, []string{ps[1].ID, ps[3].ID}) || unread != 2 {
		t.Fatalf("up_to 4: changed %v unread %d err %v", changed, unread, err)
	}
	// Nothing asked: just the count.
	changed, unread, err = s.MarkRead(ctx, "u", nil, 0)
	if err != nil || len(changed) != 0 || unread != 2 {
		t.Fatalf("none: changed %v unread %d err %v", changed, unread, err)
	}
	if _, n, err := s.MarkRead(ctx, "v", nil, 0); err != nil || n != 1 {
		t.Fatalf("foreign user unread = %d, %v", n, err)
	}
	ns, _, _, err := collectInbox(ctx, s, store.InboxQuery{User: "u", Limit: 10})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range ns {
		if (n.ReadAt != nil) != (n.Seq <= 4) {
			t.Fatalf("seq %d read_at %v", n.Seq, n.ReadAt)
		}
	}
}

func TestInbox(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	ps := publishN(t, s, "u", 25)
	if _, _, err := s.MarkRead(ctx, "u", nil, 5); err != nil {
		t.Fatal(err)
	}
	_ = ps
	var got []int64
	before := int64(0)
	for {
		ns, unread, _, err := collectInbox(ctx, s, store.InboxQuery{User: "u", Limit: 10, BeforeSeq: before})
		if err != nil {
			t.Fatal(err)
		}
		if unread != 20 {
			t.Fatalf("unread = %d", unread)
		}
		if len(ns) == 0 {
			break
		}
		got = append(got, seqs(ns)...)
		before = ns[len(ns)-1].Seq
	}
	want := make([]int64, 25)
	for i := range want {
		want[i] = int64(25 - i)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("pages = %v", got)
	}
	ns, _, _, err := collectInbox(ctx, s, store.InboxQuery{User: "u", UnreadOnly: true, Limit: 1000, BeforeSeq: 8})
	if err != nil || !slices.Equal(seqs(ns), []int64{7, 6}) {
		t.Fatalf("unread before 8 = %v, %v", seqs(ns), err)
	}
	ns, _, _, err = collectInbox(ctx, s, store.InboxQuery{User: "u", UnreadOnly: true})
	if err != nil || len(ns) != 20 || ns[0].Seq != 25 {
		t.Fatalf("default limit = %v, %v", seqs(ns), err)
	}
}

func TestFetchAndAfter(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	publishN(t, s, "b", 5)
	publishN(t, s, "a", 5)
	if _, _, err := s.MarkRead(ctx, "a", nil, 5); err != nil {
		t.Fatal(err)
	}
	ns, err := s.Fetch(ctx, []store.SeqRange{{UserID: "b", From: 2, To: 3}, {UserID: "a", From: 4, To: 9}, {UserID: "b", From: 3, To: 4}, {UserID: "z", From: 1, To: 1}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, n := range ns {
		got = append(got, n.UserID+string(rune('0'+n.Seq)))
	}
	if !slices.Equal(got, []string{"a4", "a5", "b2", "b3", "b4"}) {
		t.Fatalf("fetch = %v", got)
	}
	if ns[0].ReadAt == nil {
		t.Fatal("read state lost")
	}
	ns, err = s.After(ctx, map[string]int64{"a": 3, "b": 0, "zz": 0}, 2)
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, n := range ns {
		got = append(got, n.UserID+string(rune('0'+n.Seq)))
	}
	if !slices.Equal(got, []string{"b1", "b2"}) { // a4 and a5 are read
		t.Fatalf("after = %v", got)
	}
	if ns, err := s.Fetch(ctx, nil); err != nil || ns != nil {
		t.Fatalf("empty fetch = %v, %v", ns, err)
	}
}

func TestEndStaleSessions(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	now := time.Now().Truncate(time.Microsecond)
	_, err := s.Pool().Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, last_seen_at, ended_at)
		VALUES ($1, 's1', 'u', 'websocket', $2, NULL, NULL), ($3, 's2', 'u', 'sse', $2, $4, NULL), ($5, 's3', 'u', 'sse', $2, NULL, $4)`,
		uuid.NewString(), now.Add(-time.Hour), uuid.NewString(), now.Add(-time.Minute), uuid.NewString())
	if err != nil {
		t.Fatal(err)
	}
	// Rows of this node and of no node are its own; another node's open row is left alone.
	if _, err := s.Pool().Exec(ctx, `INSERT INTO session_history (id, session_id, user_id, transport, connected_at, node_id)
		VALUES ($1, 's4', 'u', 'sse', $3, 'me'), ($2, 'other', 'u', 'sse', $3, 'other-node')`,
		uuid.NewString(), uuid.NewString(), now.Add(-time.Hour)); err != nil {
		t.Fatal(err)
	}
	n, err := s.EndStaleSessions(ctx, "me", "crash")
	if err != nil || n != 3 {
		t.Fatalf("ended %d, %v", n, err)
	}
	var otherOpen bool
	if err := s.Pool().QueryRow(ctx, `SELECT ended_at IS NULL FROM session_history WHERE session_id = 'other'`).Scan(&otherOpen); err != nil || !otherOpen {
		t.Fatalf("the other node's row was closed (%v, %v)", otherOpen, err)
	}
	if _, err := s.Pool().Exec(ctx, `DELETE FROM session_history WHERE session_id = 'other'`); err != nil {
		t.Fatal(err)
	}
	var bad int
	if err := s.Pool().QueryRow(ctx, `SELECT count(*) FROM session_history WHERE ended_at IS NULL
		OR (session_id = 's1' AND (ended_at <> connected_at OR end_reason <> 'crash'))
		OR (session_id = 's2' AND ended_at <> last_seen_at)
		OR (session_id = 's3' AND end_reason IS NOT NULL)
		OR (session_id = 's4' AND end_reason <> 'crash')`).Scan(&bad); err != nil || bad != 0 {
		t.Fatalf("bad rows %d, %v", bad, err)
	}
}
