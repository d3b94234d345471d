package main

// The publisher and operator HTTP API end to end: batch and fan-out, idempotency, validation,
// limits, inbox paging, read broadcast, the replay limit, and the slow consumer.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// publishRaw posts body with bearer and returns the status and the error code of the body
// ("" when the answer is not an error body).
func (ts *testServer) publishRaw(t testing.TB, bearer string, body any) (int, string) {
	t.Helper()
	var raw json.RawMessage
	st := ts.do(t, "POST", "/v1/notifications", bearer, body, &raw)
	return st, errorCode(raw)
}

// inboxPage is the answer of GET /v1/users/{user}/notifications.
type inboxPage struct {
	Notifications []struct {
		ID     string  `json:"id"`
		Seq    int64   `json:"seq"`
		Topic  string  `json:"topic"`
		ReadAt *string `json:"read_at"`
	} `json:"notifications"`
	Unread int64 `json:"unread"`
}

func (p inboxPage) seqs() []int64 {
	out := make([]int64, len(p.Notifications))
	for i, n := range p.Notifications {
		out[i] = n.Seq
	}
	return out
}

func TestPublishBatchAndFanOut(t *testing.T) {
	t.Parallel()
	const limit = 40
	ts := startServer(t, func(c *Config) { c.MaxBatch = limit })

	// A batch of exactly the limit, four users interleaved: one transaction, results in input
	// order, each user's seqs dense in input order.
	items := make([]map[string]any, limit)
	for i := range items {
		items[i] = map[string]any{"user_id": fmt.Sprintf("b%d", i%4), "topic": "batch", "data": map[string]int{"i": i}}
	}
	var res struct{ Notifications []publishedNote }
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"notifications": items}, &res); st != http.StatusCreated {
		t.Fatalf("batch of %d: status %d", limit, st)
	}
	if len(res.Notifications) != limit {
		t.Fatalf("batch: %d results", len(res.Notifications))
	}
	for i, p := range res.Notifications {
		if p.UserID != fmt.Sprintf("b%d", i%4) || p.Seq != int64(i/4+1) || p.ID == "" || p.CreatedAt == "" {
			t.Fatalf("batch result %d = %+v", i, p)
		}
	}
	// limit+1: refused whole.
	if st, code := ts.publishRaw(t, testAPIKey, map[string]any{"notifications": append(items, items[0])}); st != http.StatusRequestEntityTooLarge || code != "batch_too_large" {
		t.Fatalf("batch of %d: %d %q", limit+1, st, code)
	}
	// One bad row: nothing of the batch is stored.
	bad := []map[string]any{{"user_id": "b0", "topic": "ok"}, {"user_id": "b0", "topic": "not ok!"}}
	if st, code := ts.publishRaw(t, testAPIKey, map[string]any{"notifications": bad}); st != http.StatusBadRequest || code != "invalid_notification" {
		t.Fatalf("batch with a bad row: %d %q", st, code)
	}
	var page inboxPage
	if st := ts.do(t, "GET", "/v1/users/b0/notifications?limit=1000", testAPIKey, nil, &page); st != 200 || len(page.Notifications) != limit/4 {
		t.Fatalf("b0 inbox after the refused batches: %d, %d rows", st, len(page.Notifications))
	}

	// Fan-out to many users, each connected: everyone gets it live.
	const users = 30
	clients := make([]*wsClient, users)
	ids := make([]string, 0, users+1)
	for i := range users {
		u := fmt.Sprintf("fan%02d", i)
		ids = append(ids, u)
		clients[i] = ts.liveWS(t, u)
	}
	ids = append(ids, "fan03") // a repeat is sent once
	var fan struct{ Notifications []publishedNote }
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey,
		map[string]any{"user_ids": ids, "topic": "fan.out", "data": map[string]string{"msg": "hi all"}}, &fan); st != http.StatusCreated {
		t.Fatalf("fan-out: %d", st)
	}
	if len(fan.Notifications) != users {
		t.Fatalf("fan-out: %d results for %d distinct users", len(fan.Notifications), users)
	}
	seen := map[string]bool{}
	for i, c := range clients {
		p := fan.Notifications[i]
		if p.UserID != ids[i] || p.Seq != 1 || seen[p.ID] {
			t.Fatalf("fan-out result %d = %+v", i, p)
		}
		seen[p.ID] = true
		m := c.expect(t, "notification")
		if m.ID != p.ID || m.Seq != 1 || m.Topic != "fan.out" || m.Replayed || !jsonEqual(m.Data, `{"msg":"hi all"}`) {
			t.Fatalf("%s got %+v, want %+v", ids[i], m, p)
		}
	}
	many := make([]string, limit+1)
	for i := range many {
		many[i] = fmt.Sprintf("many%d", i)
	}
	if st, code := ts.publishRaw(t, testAPIKey, map[string]any{"user_ids": many, "topic": "too.many"}); st != http.StatusRequestEntityTooLarge || code != "batch_too_large" {
		t.Fatalf("fan-out to %d: %d %q", limit+1, st, code)
	}
	for _, c := range clients[:3] {
		select {
		case m := <-c.in:
			t.Fatalf("refused fan-out delivered %+v", m)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func TestPublishIdempotency(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	body := map[string]any{"user_id": "idem", "topic": "t", "idempotency_key": "order-1"}
	var first, again publishedNote
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, body, &first); st != http.StatusCreated || first.Seq != 1 {
		t.Fatalf("first: %d %+v", st, first)
	}
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, body, &again); st != http.StatusOK || again != first {
		t.Fatalf("same key again: %d %+v, want 200 %+v", st, again, first)
	}
	// No seq was burnt by the repeat.
	if next := ts.publish(t, "idem", "t", nil); next.Seq != 2 {
		t.Fatalf("next publish got seq %d, want 2", next.Seq)
	}
	// The key is per user.
	var other publishedNote
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"user_id": "idem-2", "topic": "t", "idempotency_key": "order-1"}, &other); st != http.StatusCreated || other.ID == first.ID {
		t.Fatalf("same key, other user: %d %+v", st, other)
	}

	// Eight concurrent requests with one new key: one row, one 201, the others 200 with it.
	client := publishClient(t)
	var wg sync.WaitGroup
	results := make([]publishedNote, 8)
	statuses := make([]int, 8)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := apiPost(client, ts.URL, "/v1/notifications", map[string]any{"user_id": "idem", "topic": "t", "idempotency_key": "order-2"}, &results[i])
			if err != nil {
				t.Error(err)
			}
			statuses[i] = st
		}()
	}
	wg.Wait()
	created := 0
	for i, r := range results {
		switch statuses[i] {
		case http.StatusCreated:
			created++
		case http.StatusOK:
		default:
			t.Fatalf("concurrent same key: status %d", statuses[i])
		}
		if r.ID != results[0].ID || r.Seq != 3 {
			t.Fatalf("concurrent same key: %+v vs %+v", r, results[0])
		}
	}
	if created != 1 {
		t.Fatalf("concurrent same key: %d answers 201, want 1", created)
	}

	// A fan-out retried with its key answers 200 with the same rows.
	fanBody := map[string]any{"user_ids": []string{"idem", "idem-3"}, "topic": "t", "idempotency_key": "news-9"}
	var f1, f2 struct{ Notifications []publishedNote }
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, fanBody, &f1); st != http.StatusCreated {
		t.Fatalf("fan-out with key: %d", st)
	}
	if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, fanBody, &f2); st != http.StatusOK || fmt.Sprint(f1) != fmt.Sprint(f2) {
		t.Fatalf("fan-out retried: %d %+v, want 200 %+v", st, f2, f1)
	}
	if next := ts.publish(t, "idem", "t", nil); next.Seq != 5 {
		t.Fatalf("after the retried fan-out: seq %d, want 5", next.Seq)
	}
}

func TestPublishValidation(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.MaxDataBytes = 1024 })
	ok := map[string]any{"user_id": "val", "topic": "t"}
	for name, bearer := range map[string]string{
		"no key":       "",
		"wrong key":    "not-the-api-key-0123456789",
		"client token": ts.token(t, "val"),
	} {
		if st, code := ts.publishRaw(t, bearer, ok); st != http.StatusUnauthorized || code == "" {
			t.Errorf("%s: %d %q, want 401 with an error body", name, st, code)
		}
	}
	big := strings.Repeat("x", 1100)
	for name, tc := range map[string]struct {
		body   any
		status int
		code   string
	}{
		"bad user":         {map[string]any{"user_id": "no spaces", "topic": "t"}, 400, "invalid_notification"},
		"long user":        {map[string]any{"user_id": strings.Repeat("u", 129), "topic": "t"}, 400, "invalid_notification"},
		"no topic":         {map[string]any{"user_id": "val"}, 400, "invalid_notification"},
		"bad topic":        {map[string]any{"user_id": "val", "topic": "a b"}, 400, "invalid_notification"},
		"NUL in data":      {map[string]any{"user_id": "val", "topic": "t", "data": map[string]string{"s": "a\x00b"}}, 400, "invalid_notification"},
		"no form":          {map[string]any{"topic": "t"}, 400, "bad_request"},
		"two forms":        {map[string]any{"user_id": "val", "user_ids": []string{"val"}, "topic": "t"}, 400, "bad_request"},
		"unknown field":    {map[string]any{"user_id": "val", "topic": "t", "colour": "red"}, 400, "bad_request"},
		"empty fan-out":    {map[string]any{"user_ids": []string{}, "topic": "t"}, 400, "bad_request"},
		"batch with topic": {map[string]any{"notifications": []map[string]any{ok}, "topic": "t"}, 400, "bad_request"},
		"data too large":   {map[string]any{"user_id": "val", "topic": "t", "data": map[string]string{"s": big}}, 413, "too_large"},
		"batch data too large": {map[string]any{"notifications": []map[string]any{ok,
			{"user_id": "val", "topic": "t", "data": big}}}, 413, "too_large"},
		"fan-out data too large": {map[string]any{"user_ids": []string{"val"}, "topic": "t", "data": big}, 413, "too_large"},
	} {
		if st, code := ts.publishRaw(t, testAPIKey, tc.body); st != tc.status || code != tc.code {
			t.Errorf("%s: %d %q, want %d %q", name, st, code, tc.status, tc.code)
		}
	}
	req, err := http.NewRequest("POST", ts.URL+"/v1/notifications", strings.NewReader(`{"user_id":`))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testAPIKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var raw json.RawMessage
	_ = json.NewDecoder(resp.Body).Decode(&raw)
	resp.Body.Close()
	if resp.StatusCode != 400 || errorCode(raw) != "bad_request" || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("broken JSON: %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), raw)
	}
	// Nothing of the refused requests was stored; data just under the limit is fine.
	if p := ts.publish(t, "val", "t", map[string]string{"s": strings.Repeat("x", 1000)}); p.Seq != 1 {
		t.Fatalf("first accepted publish got seq %d, want 1", p.Seq)
	}
}

func TestInboxPaging(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const user = "ivy"
	var ids []string
	for i := range 10 {
		ids = append(ids, ts.publish(t, user, "inbox", map[string]int{"i": i}).ID)
	}
	get := func(bearer, query string) (int, inboxPage) {
		t.Helper()
		var p inboxPage
		st := ts.do(t, "GET", "/v1/users/"+user+"/notifications"+query, bearer, nil, &p)
		return st, p
	}
	check := func(bearer, query string, want []int64, unread int64) {
		t.Helper()
		st, p := get(bearer, query)
		if st != 200 || fmt.Sprint(p.seqs()) != fmt.Sprint(want) || p.Unread != unread {
			t.Fatalf("inbox%s: %d %v unread %d, want %v unread %d", query, st, p.seqs(), p.Unread, want, unread)
		}
	}
	own := ts.token(t, user)
	check(testAPIKey, "?limit=3", []int64{10, 9, 8}, 10)
	check(testAPIKey, "?limit=3&before_seq=8", []int64{7, 6, 5}, 10)
	check(own, "?limit=3&before_seq=2", []int64{1}, 10)
	check(own, "", []int64{10, 9, 8, 7, 6, 5, 4, 3, 2, 1}, 10)

	var read struct {
		IDs    []string `json:"ids"`
		Unread int64    `json:"unread"`
	}
	if st := ts.do(t, "POST", "/v1/users/"+user+"/read", own, map[string]any{"up_to_seq": 4}, &read); st != 200 || read.Unread != 6 || fmt.Sprint(read.IDs) != fmt.Sprint(ids[:4]) {
		t.Fatalf("read up to 4: %d %+v", st, read)
	}
	check(testAPIKey, "?unread=true", []int64{10, 9, 8, 7, 6, 5}, 6)
	check(own, "?unread=true&limit=2&before_seq=7", []int64{6, 5}, 6)
	_, all := get(testAPIKey, "?limit=10")
	for _, n := range all.Notifications {
		if (n.Seq <= 4) != (n.ReadAt != nil) {
			t.Fatalf("seq %d read_at %v", n.Seq, n.ReadAt)
		}
	}

	// Someone else's token: 403; no credential: 401; bad parameters: 400.
	for _, tc := range []struct {
		bearer, query string
		status        int
	}{
		{ts.token(t, "mallory"), "", 403},
		{"", "", 401},
		{testAPIKey, "?limit=0", 400},
		{testAPIKey, "?limit=1001", 400},
		{testAPIKey, "?before_seq=-1", 400},
		{testAPIKey, "?unread=maybe", 400},
	} {
		var raw json.RawMessage
		if st := ts.do(t, "GET", "/v1/users/"+user+"/notifications"+tc.query, tc.bearer, nil, &raw); st != tc.status || errorCode(raw) == "" {
			t.Errorf("inbox%s: %d %s, want %d with an error body", tc.query, st, raw, tc.status)
		}
	}
	if st := ts.do(t, "POST", "/v1/users/"+user+"/read", ts.token(t, "mallory"), map[string]any{"up_to_seq": 10}, nil); st != 403 {
		t.Fatalf("read with another user's token: %d", st)
	}
	check(testAPIKey, "?unread=true&limit=1", []int64{10}, 6)
}

// TestReadReachesEveryDevice: marking read through the API reaches both of the user's
// WebSocket devices with the authoritative unread count.
func TestReadReachesEveryDevice(t *testing.T) {
	t.Parallel()
	ts := startServer(t)
	const user = "rae"
	a := ts.dialWS(t, user, nil)
	b := ts.dialWS(t, user, nil)
	other := ts.dialWS(t, "not-rae", nil)
	for _, c := range []*wsClient{a, b, other} {
		c.expect(t, "hello")
		c.expect(t, "synced")
	}
	var ps []publishedNote
	for range 3 {
		ps = append(ps, ts.publish(t, user, "r", nil))
	}
	for _, c := range []*wsClient{a, b} {
		for i := range 3 {
			if m := c.expect(t, "notification"); m.ID != ps[i].ID {
				t.Fatalf("got %+v, want %s", m, ps[i].ID)
			}
		}
	}
	var res struct {
		IDs    []string `json:"ids"`
		Unread int64    `json:"unread"`
	}
	if st := ts.do(t, "POST", "/v1/users/"+user+"/read", testAPIKey, map[string]any{"ids": []string{ps[1].ID}}, &res); st != 200 || res.Unread != 2 || len(res.IDs) != 1 || res.IDs[0] != ps[1].ID {
		t.Fatalf("read by id: %d %+v", st, res)
	}
	for name, c := range map[string]*wsClient{"a": a, "b": b} {
		if m := c.expect(t, "read"); len(m.IDs) != 1 || m.IDs[0] != ps[1].ID || m.Unread != 2 {
			t.Fatalf("device %s: %+v", name, m)
		}
	}
	if st := ts.do(t, "POST", "/v1/users/"+user+"/read", ts.token(t, user), map[string]any{"up_to_seq": 3}, &res); st != 200 || res.Unread != 0 || fmt.Sprint(res.IDs) != fmt.Sprint([]string{ps[0].ID, ps[2].ID}) {
		t.Fatalf("read up to 3: %d %+v", st, res)
	}
	for name, c := range map[string]*wsClient{"a": a, "b": b} {
		if m := c.expect(t, "read"); fmt.Sprint(m.IDs) != fmt.Sprint(res.IDs) || m.Unread != 0 {
			t.Fatalf("device %s: %+v", name, m)
		}
	}
	select {
	case m := <-other.in:
		t.Fatalf("another user got %+v", m)
	case <-time.After(200 * time.Millisecond):
	}
}

// TestReplayLimitTruncates: at most NOTIFY_REPLAY_LIMIT are replayed, synced says truncated,
// and the next connect from the new cursor gets the rest.
func TestReplayLimitTruncates(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.ReplayLimit = 5 })
	const user = "tru"
	for range 8 {
		ts.publish(t, user, "r", nil)
	}
	c := ts.dialWS(t, user, url.Values{"cursor": {"0"}})
	c.expect(t, "hello")
	for seq := int64(1); seq <= 5; seq++ {
		if m := c.expect(t, "notification"); m.Seq != seq || !m.Replayed {
			t.Fatalf("replay: %+v, want seq %d", m, seq)
		}
	}
	if s := c.expect(t, "synced"); !s.Truncated || s.Cursor != 5 || s.Unread != 8 {
		t.Fatalf("synced = %+v, want truncated at cursor 5 with 8 unread", s)
	}
	d := ts.dialWS(t, user, url.Values{"cursor": {"5"}})
	d.expect(t, "hello")
	for seq := int64(6); seq <= 8; seq++ {
		if m := d.expect(t, "notification"); m.Seq != seq || !m.Replayed {
			t.Fatalf("second replay: %+v, want seq %d", m, seq)
		}
	}
	if s := d.expect(t, "synced"); s.Truncated || s.Cursor != 8 || s.Unread != 8 {
		t.Fatalf("second synced = %+v", s)
	}
}

// dialStalled connects as user with a small receive buffer (so that it cannot soak up
// megabytes) and returns the raw connection after hello and synced; the caller then stops
// reading, so the server's writes back up.
func (ts *testServer) dialStalled(t testing.TB, user string) *websocket.Conn {
	t.Helper()
	d := websocket.Dialer{
		HandshakeTimeout: 5 * time.Second,
		NetDialContext: (&net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 16<<10)
			})
			return errors.Join(err, serr)
		}}).DialContext,
	}
	conn, _, err := d.Dial(ts.wsURL(url.Values{"token": {ts.token(t, user)}}), nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	for _, want := range []string{"hello", "synced"} {
		var m msg
		if err := conn.ReadJSON(&m); err != nil || m.Type != want {
			t.Fatalf("stalled client: %+v %v, want %s", m, err, want)
		}
	}
	return conn
}

// TestSlowConsumer: a client that stops reading is ended as a slow consumer (bye
// slow_consumer, close 4003) once its queue passes the limit, while another user's client keeps
// getting everything live; the slow one replays what it missed from its cursor.
func TestSlowConsumer(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) { c.QueueLimit = 4; c.ReplayLimit = 4; c.MaxDataBytes = 1 << 20 })
	slow := ts.dialStalled(t, "slow")
	fast := ts.liveWS(t, "fast")

	var slowSeq, fastSeq int64
	// publish stores n notifications for each client, with data of pad bytes for the slow one;
	// the fast client must get its own at once: it is not held back by the stalled one.
	publish := func(n, pad int) {
		t.Helper()
		var items []map[string]any
		for range n {
			items = append(items, map[string]any{"user_id": "slow", "topic": "bulk", "data": map[string]string{"pad": strings.Repeat("p", pad)}},
				map[string]any{"user_id": "fast", "topic": "bulk"})
		}
		if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, map[string]any{"notifications": items}, nil); st != http.StatusCreated {
			t.Fatalf("publish: %d", st)
		}
		slowSeq += int64(n)
		for range n {
			fastSeq++
			if m := fast.next(t, 5*time.Second); m.Type != "notification" || m.Seq != fastSeq {
				t.Fatalf("fast client: %+v, want seq %d", m, fastSeq)
			}
		}
	}
	// Big notifications fill the socket buffers (on loopback the kernel takes about 3 MB),
	// then small ones pile up in the session's queue until it overflows.
	for range 4 {
		publish(1, 900<<10)
	}
	ended := false
	for round := 0; round < 100 && !ended; round++ {
		publish(2, 16)
		var sessions struct{ Sessions []struct{ ID string } }
		ts.do(t, "GET", "/v1/users/slow/sessions", testAPIKey, nil, &sessions)
		ended = len(sessions.Sessions) == 0
	}
	if !ended {
		t.Fatalf("the stalled client was not ended after %d notifications", slowSeq)
	}
	t.Logf("stalled client ended after %d notifications were published to it", slowSeq)

	// Reading again (with a normal buffer), the slow client gets what was queued, then bye
	// slow_consumer and 4003.
	if tc, ok := slow.UnderlyingConn().(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(4 << 20)
	}
	var got int64
	var bye msg
	for {
		var m msg
		_ = slow.SetReadDeadline(time.Now().Add(10 * time.Second))
		if err := slow.ReadJSON(&m); err != nil {
			var ce *websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != 4003 {
				t.Fatalf("slow client ended with %v, want close 4003", err)
			}
			break
		}
		switch m.Type {
		case "notification":
			if m.Seq != got+1 {
				t.Fatalf("slow client: seq %d after %d", m.Seq, got)
			}
			got = m.Seq
		case "bye":
			bye = m
		default:
			t.Fatalf("slow client: %+v", m)
		}
	}
	if bye.Reason != "slow_consumer" || bye.RetryMs <= 0 {
		t.Fatalf("bye = %+v", bye)
	}
	if got >= slowSeq {
		t.Fatalf("the slow client got all %d: it was not slow", got)
	}

	// Reconnecting with its cursor, it replays the rest (in pages of the replay limit).
	cursor := got
	for cursor < slowSeq {
		c := ts.dialWS(t, "slow", url.Values{"cursor": {strconv.FormatInt(cursor, 10)}})
		c.expect(t, "hello")
		for {
			m := c.next(t, 5*time.Second)
			if m.Type == "synced" {
				if m.Cursor != cursor || m.Truncated != (cursor < slowSeq) {
					t.Fatalf("synced = %+v at cursor %d of %d", m, cursor, slowSeq)
				}
				break
			}
			if m.Type != "notification" || m.Seq != cursor+1 || !m.Replayed {
				t.Fatalf("replay after slow_consumer: %+v, want seq %d", m, cursor+1)
			}
			cursor = m.Seq
		}
		_ = c.conn.Close()
	}
	t.Logf("slow client: %d read before 4003, %d replayed after", got, slowSeq-got)
}
