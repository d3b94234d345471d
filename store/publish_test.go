package store_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// seqsOf returns the user's seqs in seq order.
func seqsOf(t *testing.T, s *store.Store, user string) []int64 {
	t.Helper()
	rows, err := s.Pool().Query(testCtx(t), "SELECT seq FROM notifications WHERE user_id = $1 ORDER BY seq", user)
	if err != nil {
		t.Fatal(err)
	}
	var seqs []int64
	for rows.Next() {
		var q int64
		if err := rows.Scan(&q); err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, q)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return seqs
}

func checkDense(t *testing.T, s *store.Store, user string, want int) {
	t.Helper()
	seqs := seqsOf(t, s, user)
	if len(seqs) != want {
		t.Fatalf("user %s: %d rows, want %d", user, len(seqs), want)
	}
	for i, q := range seqs {
		if q != int64(i+1) {
			t.Fatalf("user %s: seq #%d is %d, want %d (not dense)", user, i, q, i+1)
		}
	}
}

func TestSeqDenseAndCommitOrdered(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	lst := startListener(t, s, nil)
	ctx := testCtx(t)
	const goroutines, each = 8, 40
	users := []string{"alice", "bob"}
	// An application's own INSERTs take the per-row trigger's path, on connections of its own.
	app, err := pgxpool.NewWithConfig(ctx, s.Pool().Config().Copy())
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				u := users[(g+i)%2]
				var err error
				switch i % 4 {
				case 0:
					_, err = s.PublishOne(ctx, note(u))
				case 1:
					_, err = s.Publish(ctx, []store.NewNotification{note(u)})
				case 2:
					_, err = app.Exec(ctx, `INSERT INTO notifications (user_id, topic) VALUES ($1, 't'), ('bob', 't')`, u)
				default:
					// A user's rows get seqs in input order, whatever lies between them.
					var ps []store.Published
					ps, err = s.Publish(ctx, []store.NewNotification{note("alice"), note("bob"), note("alice"), note("alice")})
					if err == nil && (ps[2].Seq != ps[0].Seq+1 || ps[3].Seq != ps[0].Seq+2) {
						t.Errorf("alice's seqs in one batch: %d, %d, %d", ps[0].Seq, ps[2].Seq, ps[3].Seq)
					}
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	want := map[string]int{}
	for _, u := range users {
		want[u] = len(seqsOf(t, s, u))
		checkDense(t, s, u, want[u])
	}
	if want["alice"]+want["bob"] < goroutines*each {
		t.Fatalf("only %d rows", want["alice"]+want["bob"])
	}
	// NOTIFYs arrive in commit order: per user the ranges must follow each other exactly.
	lst.waitFor(t, "all changes", func() bool {
		c := lst.covered()
		return c["alice"] == int64(want["alice"]) && c["bob"] == int64(want["bob"])
	})
	lst.mu.Lock()
	defer lst.mu.Unlock()
	next := map[string]int64{}
	for _, c := range lst.changes {
		if c.From != next[c.UserID]+1 {
			t.Fatalf("user %s: change %d..%d after %d: commit order != seq order", c.UserID, c.From, c.To, next[c.UserID])
		}
		next[c.UserID] = c.To
	}
}

func TestIdempotency(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	n := note("u1")
	n.IdempotencyKey = "k1"
	first := mustPublish(t, s, n)[0]
	if first.Duplicate || first.Seq != 1 || first.UserID != "u1" || first.ID == "" {
		t.Fatalf("first = %+v", first)
	}
	again := mustPublish(t, s, n)[0]
	if !again.Duplicate || again.ID != first.ID || again.Seq != first.Seq || !again.CreatedAt.Equal(first.CreatedAt) {
		t.Fatalf("again = %+v, first = %+v", again, first)
	}
	p1, err := s.PublishOne(ctx, n)
	if err != nil || !p1.Duplicate || p1.ID != first.ID {
		t.Fatalf("PublishOne duplicate = %+v, %v", p1, err)
	}
	// Same key for another user is a different notification.
	other := n
	other.UserID = "u2"
	if p := mustPublish(t, s, other)[0]; p.Duplicate || p.Seq != 1 {
		t.Fatalf("other user = %+v", p)
	}
	// In one batch: repeat of an existing key, a new key twice, a keyless row.
	k2 := note("u1")
	k2.IdempotencyKey = "k2"
	ps := mustPublish(t, s, n, k2, note("u1"), k2)
	if !ps[0].Duplicate || ps[0].ID != first.ID {
		t.Fatalf("batch[0] = %+v", ps[0])
	}
	if ps[1].Duplicate || ps[3].ID != ps[1].ID || !ps[3].Duplicate || ps[2].Duplicate {
		t.Fatalf("batch = %+v", ps)
	}
	// No seq was burnt by the duplicates.
	checkDense(t, s, "u1", 3)

	// Concurrent publishers of one key: one row, one result, no seq burnt.
	k3 := note("u1")
	k3.IdempotencyKey = "k3"
	var wg sync.WaitGroup
	results := make([]store.Published, 16)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if i%2 == 0 {
				results[i], err = s.PublishOne(ctx, k3)
			} else {
				var ps []store.Published
				ps, err = s.Publish(ctx, []store.NewNotification{k3, note("u3")})
				if err == nil {
					results[i] = ps[0]
				}
			}
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	dups := 0
	for _, r := range results {
		if r.ID != results[0].ID || r.Seq != 4 {
			t.Fatalf("concurrent results differ: %+v vs %+v", r, results[0])
		}
		if r.Duplicate {
			dups++
		}
	}
	if dups != len(results)-1 {
		t.Fatalf("%d duplicates, want %d", dups, len(results)-1)
	}
	checkDense(t, s, "u1", 4)
}

func TestPublishValidation(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	bad := []store.NewNotification{
		{Topic: "t"},
		{UserID: "u"},
		{UserID: "u", Topic: "t", Data: json.RawMessage(`{nope`)},
	}
	for _, n := range bad {
		if _, err := s.Publish(ctx, []store.NewNotification{note("u"), n}); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("Publish(%+v) = %v, want ErrInvalid", n, err)
		}
		if _, err := s.PublishOne(ctx, n); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("PublishOne(%+v) = %v, want ErrInvalid", n, err)
		}
	}
	if seqs := seqsOf(t, s, "u"); len(seqs) != 0 {
		t.Fatalf("stored %v", seqs)
	}
	// Empty data is {}; results come back in input order.
	ps := mustPublish(t, s, store.NewNotification{UserID: "z", Topic: "t"}, note("a"), note("z"))
	if ps[0].UserID != "z" || ps[0].Seq != 1 || ps[1].UserID != "a" || ps[2].Seq != 2 {
		t.Fatalf("results = %+v", ps)
	}
	ns, _, _, err := s.Replay(ctx, "z", 0, 10, 0)
	if err != nil || len(ns) != 2 || string(ns[0].Data) != "{}" || string(ns[1].Data) != `{"n": 1}` {
		t.Fatalf("replay = %+v, %v", ns, err)
	}
}

func TestBatchRandomUsersNoDeadlock(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	const workers, batches, size, nusers = 4, 5, 1000, 300
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range batches {
				ns := make([]store.NewNotification, size)
				for i := range ns {
					ns[i] = note(fmt.Sprintf("user-%d", rand.IntN(nusers)))
				}
				ps, err := s.Publish(ctx, ns)
				if err != nil {
					t.Error(err)
					return
				}
				for i, p := range ps {
					if p.UserID != ns[i].UserID || p.Seq < 1 {
						t.Errorf("result %d = %+v for %s", i, p, ns[i].UserID)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	var rows, bad int64
	err := s.Pool().QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE seq <> rn) FROM (
		SELECT seq, row_number() OVER (PARTITION BY user_id ORDER BY seq) AS rn FROM notifications) x`).Scan(&rows, &bad)
	if err != nil {
		t.Fatal(err)
	}
	if rows != workers*batches*size || bad != 0 {
		t.Fatalf("%d rows (want %d), %d not dense", rows, workers*batches*size, bad)
	}
}

func TestPublishOneGroups(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	const callers = 400
	before := s.Stats()
	var wg sync.WaitGroup
	res := make([]store.Published, callers)
	start := make(chan struct{})
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			p, err := s.PublishOne(ctx, note(fmt.Sprintf("u%d", i%7)))
			if err != nil {
				t.Error(err)
			}
			res[i] = p
		}()
	}
	close(start)
	wg.Wait()
	after := s.Stats()
	var n int64
	if err := s.Pool().QueryRow(ctx, "SELECT count(*) FROM notifications").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != callers {
		t.Fatalf("%d rows committed, want %d", n, callers)
	}
	stmts := after.PublishStatements - before.PublishStatements
	t.Logf("%d PublishOne calls in %d groups, %d statements", after.PublishOneCalls-before.PublishOneCalls,
		after.PublishGroups-before.PublishGroups, stmts)
	if stmts >= callers {
		t.Fatalf("%d transactions for %d calls: no grouping", stmts, callers)
	}
	seen := map[string]bool{}
	for _, p := range res {
		if p.ID == "" || seen[p.ID] {
			t.Fatalf("bad or repeated result %+v", p)
		}
		seen[p.ID] = true
	}
	for u := range 7 {
		checkDense(t, s, fmt.Sprintf("u%d", u), len(seqsOf(t, s, fmt.Sprintf("u%d", u))))
	}
}

func TestPublishOneBadNeighbour(t *testing.T) {
	t.Parallel()
	// A request that fails in the database (data too deep for jsonb is hard to hit; an
	// over-long idempotency key in a btree is) must not fail the others of its group.
	s := storetest.NewWithOptions(t, store.Options{GroupCommitWait: 20 * time.Millisecond})
	ctx := testCtx(t)
	bad := note("b")
	bad.IdempotencyKey = randomString(10000)
	var wg sync.WaitGroup
	errs := make([]error, 50)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := note(fmt.Sprintf("g%d", i%3))
			if i == 25 {
				n = bad
			}
			_, errs[i] = s.PublishOne(ctx, n)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if (err != nil) != (i == 25) {
			t.Errorf("call %d: err = %v", i, err)
		}
	}
	if !errors.Is(errs[25], store.ErrInvalid) {
		t.Errorf("over-long key: %v, want ErrInvalid", errs[25])
	}
	nul := note("b")
	nul.Data = json.RawMessage(`{"a":"\u0000"}`) // valid JSON, refused by jsonb
	if _, err := s.PublishOne(ctx, nul); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("\\u0000 in data: %v, want ErrInvalid", err)
	}
	nul = note("b\x00")
	if _, err := s.Publish(ctx, []store.NewNotification{nul}); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("NUL in user id: %v, want ErrInvalid", err)
	}
}

// TestPublishBatchesShareGroups: concurrent batches share group transactions
// with each other and with single publishes (a few statements for a dozen
// calls; one each before they shared), and each call still commits whole or
// not at all: the batch holding a row Postgres refuses fails alone, each
// other call gets its own rows' results in its own order, and every user's
// seqs stay dense.
func TestPublishBatchesShareGroups(t *testing.T) {
	t.Parallel()
	s := storetest.NewWithOptions(t, store.Options{GroupCommitWait: 20 * time.Millisecond})
	ctx := testCtx(t)
	const calls, rows = 12, 5
	total := 0
	round := func(name string, bad int) {
		var wg sync.WaitGroup
		res := make([][]store.Published, calls)
		errs := make([]error, calls)
		user := func(i, j int) string { return fmt.Sprintf("share-%d", (i+j)%3) }
		for i := range calls {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if i%4 == 3 { // a single publish among the batches
					p, err := s.PublishOne(ctx, note(user(i, 0)))
					res[i], errs[i] = []store.Published{p}, err
					return
				}
				ns := make([]store.NewNotification, rows)
				for j := range ns {
					ns[j] = note(user(i, j))
					ns[j].Topic = fmt.Sprintf("%s-call-%d-row-%d", name, i, j)
				}
				if i == bad {
					ns[2].IdempotencyKey = randomString(10000) // too long for the btree: refused by Postgres
				}
				res[i], errs[i] = s.Publish(ctx, ns)
			}()
		}
		wg.Wait()
		for i := range calls {
			if i == bad {
				if !errors.Is(errs[i], store.ErrInvalid) {
					t.Errorf("%s: call %d: %v, want ErrInvalid", name, i, errs[i])
				}
				continue
			}
			if errs[i] != nil {
				t.Fatalf("%s: call %d: %v", name, i, errs[i])
			}
			total += len(res[i])
			for j, p := range res[i] {
				if p.UserID != user(i, j) || p.Seq <= 0 || p.Duplicate {
					t.Errorf("%s: call %d row %d: %+v, want a fresh row of %s", name, i, j, p, user(i, j))
				}
				if i%4 == 3 {
					continue
				}
				var topic string
				if err := s.Pool().QueryRow(ctx, "SELECT topic FROM notifications WHERE id = $1", p.ID).Scan(&topic); err != nil ||
					topic != fmt.Sprintf("%s-call-%d-row-%d", name, i, j) {
					t.Errorf("%s: call %d row %d: stored topic %q (%v)", name, i, j, topic, err)
				}
			}
		}
	}
	obs := &groupLog{}
	s.SetGroupObserver(obs)
	before := s.Stats().PublishStatements
	round("shared", -1)
	if n := s.Stats().PublishStatements - before; n > calls/3 {
		t.Errorf("%d publish statements for %d concurrent calls: too few shared", n, calls)
	}
	round("bad", 6)
	stored := 0
	for u := range 3 {
		n := len(seqsOf(t, s, fmt.Sprintf("share-%d", u)))
		checkDense(t, s, fmt.Sprintf("share-%d", u), n)
		stored += n
	}
	if stored != total {
		t.Errorf("%d rows stored, %d published", stored, total)
	}
	// The observer saw every call start and every group end, with all of their rows (the
	// failed group's too: it was stored call by call).
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if want := 2 * calls; obs.queued != want {
		t.Errorf("observer: %d calls queued, want %d", obs.queued, want)
	}
	if groups := s.Stats().PublishGroups; uint64(obs.groups) != groups || obs.rows != 2*(calls/4*(3*rows+1)) {
		t.Errorf("observer: %d groups of %d rows, want %d groups (Stats) of %d rows", obs.groups, obs.rows, groups, 2*(calls/4*(3*rows+1)))
	}
	if obs.negative {
		t.Error("observer: a negative wait or duration")
	}
}

// TestGroupObservedBeforeAnswer: a caller that has its answer finds its group observed, so
// that /metrics agrees with what publishers were told. The observer takes its time over
// Stored: were it told after the answers, PublishOne would return first.
func TestGroupObservedBeforeAnswer(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	obs := &slowObserver{}
	s.SetGroupObserver(obs)
	for i := range 3 {
		if _, err := s.PublishOne(testCtx(t), store.NewNotification{UserID: "observed", Topic: "t"}); err != nil {
			t.Fatal(err)
		}
		if n := obs.stored.Load(); n != int64(i+1) {
			t.Fatalf("publish %d answered with %d groups observed, want %d", i+1, n, i+1)
		}
	}
}

// slowObserver is a store.GroupObserver that counts the groups stored, pausing before it does.
type slowObserver struct{ stored atomic.Int64 }

func (o *slowObserver) Queued(time.Duration) {}

func (o *slowObserver) Stored(int, time.Duration) {
	time.Sleep(50 * time.Millisecond)
	o.stored.Add(1)
}

// groupLog is a store.GroupObserver that counts what it is told.
type groupLog struct {
	mu                   sync.Mutex
	queued, groups, rows int
	negative             bool
}

func (g *groupLog) Queued(wait time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.queued++
	g.negative = g.negative || wait < 0
}

func (g *groupLog) Stored(rows int, took time.Duration) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.groups++
	g.rows += rows
	g.negative = g.negative || took <= 0
}

func randomString(n int) string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	for i := range b {
		b[i] = letters[rand.IntN(len(letters))]
	}
	return string(b)
}

func TestPublishOneAfterClose(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	var wg sync.WaitGroup
	// Close comes once the first publish has answered, with the others in flight.
	first := make(chan struct{})
	var once sync.Once
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.PublishOne(ctx, note(fmt.Sprintf("c%d", i%2)))
			once.Do(func() { close(first) })
			if err != nil && !errors.Is(err, store.ErrClosed) {
				t.Error(err)
			}
		}()
	}
	<-first
	s.Close()
	wg.Wait()
	if _, err := s.PublishOne(ctx, note("x")); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

func TestPublishOneContext(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.PublishOne(ctx, note("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled ctx: %v", err)
	}
}

// TestPublishHook: the hook hears of every publish statement before it runs,
// with its users, and after it, with the rows and results when it committed
// and nothing when it failed.
func TestPublishHook(t *testing.T) {
	t.Parallel()
	s := storetest.New(t)
	ctx := testCtx(t)
	type call struct {
		users     []string
		committed int // rows handed over; -1 for a failure
	}
	var mu sync.Mutex
	var calls []call
	s.SetPublishHook(func(users []string) func([]store.Notification) {
		mu.Lock()
		i := len(calls)
		calls = append(calls, call{users: slices.Clone(users)})
		mu.Unlock()
		return func(ns []store.Notification) {
			mu.Lock()
			defer mu.Unlock()
			if ns == nil {
				calls[i].committed = -1
				return
			}
			for _, n := range ns {
				if n.ID == "" || n.Seq < 1 || n.Topic == "" || len(n.Data) == 0 || n.CreatedAt.IsZero() {
					t.Errorf("hook got row %+v, want every field of the stored row", n)
				}
			}
			calls[i].committed = len(ns)
		}
	})
	mustPublish(t, s, note("b"), note("a"), note("b"))
	if _, err := s.PublishOne(ctx, note("c")); err != nil {
		t.Fatal(err)
	}
	bad := note("d")
	bad.IdempotencyKey = randomString(10000) // refused by the btree: the statement fails
	if _, err := s.Publish(ctx, []store.NewNotification{bad}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("over-long key: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []call{{[]string{"a", "b", "b"}, 3}, {[]string{"c"}, 1}, {[]string{"d"}, -1}}
	if len(calls) != len(want) {
		t.Fatalf("hook calls %+v, want %+v", calls, want)
	}
	for i := range want {
		if !slices.Equal(calls[i].users, want[i].users) || calls[i].committed != want[i].committed {
			t.Errorf("hook call %d = %+v, want %+v", i, calls[i], want[i])
		}
	}
}
