package main

// End-to-end tests of the delivery guarantees (the core issue): against the real server and real
// Postgres, no gap and no duplicate under racing publishers and reconnects, the SQL publish path,
// and the listener's catch-up after its connection is killed.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// pgConn opens a direct connection to Postgres (not the server's pool), closed at cleanup.
func pgConn(t testing.TB, dbURL string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatalf("connect to postgres: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// sqlInsert stores one notification the way an application would, with a plain INSERT in its
// own transaction, and returns the seq the trigger gave it.
func sqlInsert(ctx context.Context, conn *pgx.Conn, user, topic string) (int64, error) {
	var seq int64
	err := conn.QueryRow(ctx, `INSERT INTO notifications (user_id, topic, data) VALUES ($1, $2, '{"via":"sql"}') RETURNING seq`,
		user, topic).Scan(&seq)
	if err != nil {
		return 0, fmt.Errorf("insert for %s: %w", user, err)
	}
	return seq, nil
}

// countRows counts a user's stored notifications, directly in Postgres.
func countRows(t testing.TB, conn *pgx.Conn, where string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := conn.QueryRow(context.Background(), "SELECT count(*) FROM notifications WHERE "+where, args...).Scan(&n); err != nil {
		t.Fatalf("count notifications: %v", err)
	}
	return n
}

// apiPost sends body as JSON with the API key and decodes a JSON answer into out (when not
// nil). Unlike ts.do it never fails the test, so publishers may call it from any goroutine;
// err reports a request that got no answer.
func apiPost(client *http.Client, base, path string, body, out any) (int, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequest("POST", base+path, bytes.NewReader(b))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			return resp.StatusCode, fmt.Errorf("decode %q: %w", raw, err)
		}
	}
	return resp.StatusCode, nil
}

// publishClient is an HTTP client for tests that publish from several goroutines at once.
func publishClient(t testing.TB) *http.Client {
	tr := &http.Transport{MaxIdleConns: 64, MaxIdleConnsPerHost: 64, IdleConnTimeout: 30 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// seqLedger checks what one client received against the guarantees: within a connection seqs
// strictly increase; across connections a seq always carries the same id (duplicates are
// dropped by id, as the client does).
type seqLedger struct {
	t      testing.TB
	last   map[int]int64    // connection -> last seq it carried
	byID   map[string]int64 // id -> seq
	bySeq  map[int64]string // seq -> id
	dups   int              // notifications seen again on a later connection
	cursor int64            // the highest seq held
}

func newSeqLedger(t testing.TB) *seqLedger {
	return &seqLedger{t: t, last: map[int]int64{}, byID: map[string]int64{}, bySeq: map[int64]string{}}
}

// add records a notification that arrived on connection conn.
func (l *seqLedger) add(conn int, m msg) {
	l.t.Helper()
	if m.Seq <= l.last[conn] {
		l.t.Errorf("connection %d: seq %d after %d (seqs must strictly increase within a connection)", conn, m.Seq, l.last[conn])
	}
	l.last[conn] = m.Seq
	if seq, ok := l.byID[m.ID]; ok {
		if seq != m.Seq {
			l.t.Errorf("id %s came with seq %d and seq %d", m.ID, seq, m.Seq)
		}
		l.dups++
		return
	}
	if id, ok := l.bySeq[m.Seq]; ok && id != m.ID {
		l.t.Errorf("seq %d came as two notifications: %s and %s", m.Seq, id, m.ID)
	}
	l.byID[m.ID] = m.Seq
	l.bySeq[m.Seq] = m.ID
	l.cursor = max(l.cursor, m.Seq)
}

// missing lists the seqs of 1..n not received.
func (l *seqLedger) missing(n int64) []int64 {
	var out []int64
	for s := int64(1); s <= n; s++ {
		if _, ok := l.bySeq[s]; !ok {
			out = append(out, s)
		}
	}
	return out
}

// TestRacingPublishersReconnectingClient is the core guarantee: 4 publishers race one user
// through the API (single publishes and small batches) while the client reconnects (resuming its session with its cursor) every
// 100 ms. In the end every seq 1..N arrived exactly once after dedupe by id, and within each
// connection seqs strictly increased.
func TestRacingPublishersReconnectingClient(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.ReplayLimit = 100000 })
	const user = "racer"
	client := publishClient(t)

	var (
		mu        sync.Mutex
		published = map[int64]string{} // seq -> id, from the 201s
		stop      = make(chan struct{})
		wg        sync.WaitGroup
	)
	for p := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				// Every other request is a batch of 2-6 rows: both publish paths race.
				var notes []publishedNote
				var st int
				var err error
				if i%2 == 0 {
					var note publishedNote
					st, err = apiPost(client, ts.URL, "/v1/notifications",
						map[string]any{"user_id": user, "topic": "race.one", "data": map[string]int{"p": p, "i": i}}, &note)
					notes = append(notes, note)
				} else {
					items := make([]map[string]any, 2+i%5)
					for k := range items {
						items[k] = map[string]any{"user_id": user, "topic": "race.batch", "data": map[string]int{"p": p, "i": i, "k": k}}
					}
					var out struct{ Notifications []publishedNote }
					st, err = apiPost(client, ts.URL, "/v1/notifications", map[string]any{"notifications": items}, &out)
					notes = out.Notifications
				}
				if err != nil || st != http.StatusCreated {
					t.Errorf("publisher %d: status %d, err %v", p, st, err)
					return
				}
				mu.Lock()
				for _, note := range notes {
					if old, ok := published[note.Seq]; ok {
						t.Errorf("seq %d given twice: %s and %s", note.Seq, old, note.ID)
					}
					published[note.Seq] = note.ID
				}
				mu.Unlock()
			}
		}()
	}

	ledger := newSeqLedger(t)
	session := ""
	connNo := 0
	// dial opens the next connection with the client's cursor and session.
	dial := func() (*wsClient, int) {
		q := url.Values{"cursor": {strconv.FormatInt(ledger.cursor, 10)}}
		if session != "" {
			q.Set("session", session)
		}
		c := ts.dialWS(t, user, q)
		h := c.expect(t, "hello")
		if session != "" && h.Session != session {
			t.Fatalf("resume of %s got session %s", session, h.Session)
		}
		session = h.Session
		connNo++
		return c, connNo
	}
	// read records what c carries; with until set it stops there, else when c ends.
	synced := map[int]bool{}
	read := func(c *wsClient, n int, until <-chan time.Time, want string) {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case m, ok := <-c.in:
				if !ok {
					var ce *websocket.CloseError
					if want != "" && (!errors.As(c.closeErr, &ce) || ce.Code != 4001) {
						t.Fatalf("connection %d ended with %v, want close 4001", n, c.closeErr)
					}
					return
				}
				switch m.Type {
				case "notification":
					ledger.add(n, m)
				case "synced":
					synced[n] = true
				case "bye":
					if m.Reason != want {
						t.Fatalf("connection %d: bye %+v, want reason %q", n, m, want)
					}
				default:
					t.Fatalf("connection %d: unexpected %+v", n, m)
				}
			case <-until:
				return
			case <-timeout:
				t.Fatalf("connection %d: did not end", n)
			}
		}
	}

	cur, curN := dial()
	end := time.Now().Add(4 * time.Second)
	for time.Now().Before(end) {
		read(cur, curN, time.After(100*time.Millisecond), "")
		next, nextN := dial()
		read(cur, curN, nil, "replaced") // the old one: what it still carried, bye replaced, 4001
		cur, curN = next, nextN
	}
	close(stop)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	n := int64(len(published))
	for s := int64(1); s <= n; s++ {
		if _, ok := published[s]; !ok {
			t.Fatalf("the API gave %d seqs but not seq %d: seqs are not dense", n, s)
		}
	}

	// Final reconnect: wait for synced, then drain until everything is there.
	final, finalN := dial()
	read(cur, curN, nil, "replaced")
	deadline := time.After(15 * time.Second)
	for !synced[finalN] || int64(len(ledger.bySeq)) < n {
		select {
		case m, ok := <-final.in:
			if !ok {
				t.Fatalf("final connection ended: %v", final.closeErr)
			}
			switch m.Type {
			case "notification":
				ledger.add(finalN, m)
			case "synced":
				synced[finalN] = true
			default:
				t.Fatalf("final connection: unexpected %+v", m)
			}
		case <-deadline:
			t.Fatalf("after the final reconnect: %d of %d notifications; missing %v", len(ledger.bySeq), n, ledger.missing(n))
		}
	}
	if miss := ledger.missing(n); len(miss) > 0 {
		t.Fatalf("gaps: %v", miss)
	}
	for s, id := range ledger.bySeq {
		if published[s] != id {
			t.Errorf("seq %d arrived as %s, the API published %s", s, id, published[s])
		}
	}
	if int64(len(ledger.bySeq)) != n {
		t.Errorf("received %d distinct notifications, published %d", len(ledger.bySeq), n)
	}
	conn := pgConn(t, ts.DBURL)
	if rows := countRows(t, conn, "user_id = $1", user); rows != n {
		t.Errorf("%d rows in Postgres, %d publishes answered 201", rows, n)
	}
	t.Logf("%d notifications from 4 publishers, %d connections, %d duplicates across connections dropped by id",
		n, connNo, ledger.dups)
}

// TestSQLPublishPath: a plain INSERT committed by another transaction reaches a connected
// client live; an INSERT rolled back delivers nothing and its seq is reused (seqs stay dense).
func TestSQLPublishPath(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const user = "sql-user"
	c := ts.liveWS(t, user)
	conn := pgConn(t, ts.DBURL)
	ctx := context.Background()

	if _, err := conn.Exec(ctx, `INSERT INTO notifications (user_id, topic, data) VALUES ('sql-user', 'sql.plain', '{"k":"v"}')`); err != nil {
		t.Fatal(err)
	}
	got := c.expect(t, "notification")
	if got.Seq != 1 || got.Topic != "sql.plain" || got.Replayed || !jsonEqual(got.Data, `{"k":"v"}`) {
		t.Fatalf("live from SQL = %+v", got)
	}

	// A multi-row INSERT in an explicit transaction: delivered in seq order at commit.
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO notifications (user_id, topic) VALUES ('sql-user', 'sql.tx.a'), ('sql-user', 'sql.tx.b')`); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-c.in:
		t.Fatalf("delivered before commit: %+v", m)
	case <-time.After(200 * time.Millisecond):
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for i, topic := range []string{"sql.tx.a", "sql.tx.b"} {
		if m := c.expect(t, "notification"); m.Seq != int64(2+i) || m.Topic != topic {
			t.Fatalf("after commit: %+v, want seq %d topic %s", m, 2+i, topic)
		}
	}

	// Rolled back: nothing delivered, and the seq it held is given to the next publish.
	tx, err = conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var held int64
	if err := tx.QueryRow(ctx, `INSERT INTO notifications (user_id, topic) VALUES ('sql-user', 'sql.rolled.back') RETURNING seq`).Scan(&held); err != nil {
		t.Fatal(err)
	}
	if held != 4 {
		t.Fatalf("the rolled-back insert held seq %d, want 4", held)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-c.in:
		t.Fatalf("a rolled-back insert was delivered: %+v", m)
	case <-time.After(300 * time.Millisecond):
	}
	p := ts.publish(t, user, "after.rollback", nil)
	if p.Seq != held {
		t.Fatalf("publish after the rollback got seq %d, want the reused seq %d", p.Seq, held)
	}
	if m := c.expect(t, "notification"); m.ID != p.ID || m.Seq != held || m.Topic != "after.rollback" {
		t.Fatalf("next live = %+v, want %+v", m, p)
	}
	if n := countRows(t, conn, "user_id = $1 AND topic = 'sql.rolled.back'", user); n != 0 {
		t.Fatalf("%d rolled-back rows stored", n)
	}
}

// jsonEqual compares a JSON value with want, ignoring formatting.
func jsonEqual(got json.RawMessage, want string) bool {
	var a, b any
	if json.Unmarshal(got, &a) != nil || json.Unmarshal([]byte(want), &b) != nil {
		return false
	}
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// schemaOf returns the per-test schema named in a storetest URL.
func schemaOf(t testing.TB, dbURL string) string {
	t.Helper()
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	s := u.Query().Get("search_path")
	if s == "" {
		t.Fatalf("no search_path in %s", dbURL)
	}
	return s
}

// listenerPID waits for the backend of the server's LISTEN connection (application_name
// store.ListenerAppName, listening on this schema's channel) that is not pid not, and returns it.
func listenerPID(t testing.TB, admin *pgx.Conn, schema string, not int32) int32 {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		var pids []int32
		rows, err := admin.Query(context.Background(), `SELECT pid FROM pg_stat_activity
			WHERE application_name = $1 AND strpos(query, $2) > 0 AND pid <> $3`,
			store.ListenerAppName, store.ChannelPrefix+schema, not)
		if err == nil {
			pids, err = pgx.CollectRows(rows, pgx.RowTo[int32])
		}
		if err != nil {
			t.Fatalf("find the listener backend: %v", err)
		}
		if len(pids) == 1 {
			return pids[0]
		}
		if len(pids) > 1 {
			t.Fatalf("%d listener backends for schema %s", len(pids), schema)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no listener backend for schema %s (other than %d)", schema, not)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestListenerReconnectCatchUp kills the server's LISTEN backend again and again while
// notifications are inserted with SQL (while it is down and right after it is back): the client
// connected throughout still gets every one, in order, with no gap and no duplicate.
func TestListenerReconnectCatchUp(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const user = "listen-user"
	schema := schemaOf(t, ts.DBURL)
	c := ts.liveWS(t, user)
	admin := pgConn(t, storetest.BaseURL())
	direct := pgConn(t, ts.DBURL)
	background := pgConn(t, ts.DBURL)
	ctx := context.Background()

	var inserted atomic.Int64
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if _, err := sqlInsert(ctx, background, user, "steady"); err != nil {
				done <- err
				return
			}
			inserted.Add(1)
			time.Sleep(3 * time.Millisecond)
		}
	}()

	pid := listenerPID(t, admin, schema, 0)
	const rounds = 4
	for range rounds {
		var ok bool
		if err := admin.QueryRow(ctx, "SELECT pg_terminate_backend($1)", pid).Scan(&ok); err != nil || !ok {
			t.Fatalf("terminate listener backend %d: %v %v", pid, ok, err)
		}
		// While it is down (it reconnects after a backoff of at least 100 ms).
		for range 3 {
			if _, err := sqlInsert(ctx, direct, user, "while.down"); err != nil {
				t.Fatal(err)
			}
		}
		next := listenerPID(t, admin, schema, pid)
		// Right after it is back.
		for range 3 {
			if _, err := sqlInsert(ctx, direct, user, "right.after"); err != nil {
				t.Fatal(err)
			}
		}
		pid = next
		time.Sleep(150 * time.Millisecond)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	n := countRows(t, direct, "user_id = $1", user)
	if n != inserted.Load()+rounds*6 {
		t.Fatalf("%d rows, inserted %d", n, inserted.Load()+rounds*6)
	}

	// Connected throughout, everything is live: exactly 1, 2, ..., n in order. After each
	// catch-up comes a `read` with no ids and the unread count of the rows received so far
	// (nothing was read: all of them).
	deadline := time.After(15 * time.Second)
	reads := 0
	for want := int64(1); want <= n; {
		select {
		case m, ok := <-c.in:
			if !ok {
				t.Fatalf("connection ended: %v", c.closeErr)
			}
			if m.Type == "read" {
				if len(m.IDs) != 0 || m.Unread != want-1 {
					t.Fatalf("read after a catch-up: %+v, want no ids and unread %d", m, want-1)
				}
				reads++
				continue
			}
			if m.Type != "notification" || m.Seq != want || m.Replayed {
				t.Fatalf("got %+v, want live seq %d of %d", m, want, n)
			}
			want++
		case <-deadline:
			t.Fatalf("got %d of %d notifications", want-1, n)
		}
	}
	for more := true; more; {
		select {
		case m := <-c.in:
			if m.Type != "read" || m.Unread != n {
				t.Fatalf("more than %d: %+v", n, m)
			}
			reads++
		case <-time.After(300 * time.Millisecond):
			more = false
		}
	}
	if reads < rounds {
		t.Fatalf("%d unread counts after %d listener reconnects, want one each", reads, rounds)
	}
	t.Logf("%d notifications across %d listener reconnects, none missed", n, rounds)
}

// TestListenerReconnectSendsReads: a read committed (by SQL) while the server's LISTEN
// connection is down sends its NOTIFY to no one; once the listener is back, the client still
// learns the unread count, in a `read` with no ids. It failed before: the count came only with
// the next read.
func TestListenerReconnectSendsReads(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const user = "read-while-down"
	for range 3 {
		ts.publish(t, user, "t", nil)
	}
	c := ts.dialWS(t, user, nil)
	c.expect(t, "hello")
	for range 3 {
		c.expect(t, "notification")
	}
	if s := c.expect(t, "synced"); s.Unread != 3 {
		t.Fatalf("synced = %+v, want unread 3", s)
	}
	admin := pgConn(t, storetest.BaseURL())
	direct := pgConn(t, ts.DBURL)
	schema := schemaOf(t, ts.DBURL)
	ctx := context.Background()
	pid := listenerPID(t, admin, schema, 0)
	if _, err := admin.Exec(ctx, "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	// Once the old backend is gone, nothing can hand the read's NOTIFY to the server.
	for gone := false; !gone; {
		if err := admin.QueryRow(ctx, "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = $1)", pid).Scan(&gone); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := direct.Exec(ctx, `UPDATE notifications SET read_at = now() WHERE user_id = $1 AND seq <= 2`, user); err != nil {
		t.Fatal(err)
	}
	var committed time.Time
	if err := direct.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&committed); err != nil {
		t.Fatal(err)
	}
	next := listenerPID(t, admin, schema, pid)
	var started time.Time
	if err := admin.QueryRow(ctx, "SELECT backend_start FROM pg_stat_activity WHERE pid = $1", next).Scan(&started); err != nil {
		t.Fatal(err)
	}
	if !started.After(committed) {
		t.Fatalf("the listener was back (%s) before the read committed (%s): the test shows nothing", started, committed)
	}
	if m := c.expect(t, "read"); len(m.IDs) != 0 || m.Unread != 1 {
		t.Fatalf("after the listener reconnected: %+v, want a read with no ids and unread 1", m)
	}
}

// TestCatchUpSkipsReadHistory: a client connected with no cursor to a user whose history is all
// read holds nothing after synced; when the listener reconnects, its catch-up must bring only
// what was committed while it was down, not the read history as if it were new.
func TestCatchUpSkipsReadHistory(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const user = "history"
	for range 30 {
		ts.publish(t, user, "old", nil)
	}
	if st := ts.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"up_to_seq": 30}, nil); st != http.StatusOK {
		t.Fatalf("read: %d", st)
	}
	c := ts.dialWS(t, user, nil)
	c.expect(t, "hello")
	if s := c.expect(t, "synced"); s.Cursor != 0 || s.Unread != 0 {
		t.Fatalf("synced = %+v", s)
	}
	admin := pgConn(t, storetest.BaseURL())
	direct := pgConn(t, ts.DBURL)
	schema := schemaOf(t, ts.DBURL)
	pid := listenerPID(t, admin, schema, 0)
	if _, err := admin.Exec(context.Background(), "SELECT pg_terminate_backend($1)", pid); err != nil {
		t.Fatal(err)
	}
	seq, err := sqlInsert(context.Background(), direct, user, "while.down")
	if err != nil {
		t.Fatal(err)
	}
	listenerPID(t, admin, schema, pid)
	if m := c.expect(t, "notification"); m.Seq != seq || m.Topic != "while.down" {
		t.Fatalf("after the listener reconnected: %+v, want only seq %d (while.down)", m, seq)
	}
	if m := c.expect(t, "read"); len(m.IDs) != 0 || m.Unread != 1 {
		t.Fatalf("after the catch-up: %+v, want a read with no ids and unread 1", m)
	}
	select {
	case m := <-c.in:
		t.Fatalf("more after the catch-up: %+v", m)
	case <-time.After(300 * time.Millisecond):
	}
}
