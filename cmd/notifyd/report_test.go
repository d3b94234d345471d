package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
)

// dialDevice connects a WebSocket as user on device, reading in the background like dialWS.
func (ts *testServer) dialDevice(t *testing.T, user, device string, extra url.Values) *wsClient {
	t.Helper()
	tok, err := ts.auth.NewToken(user, device, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	q := url.Values{"token": {tok}}
	for k, v := range extra {
		q[k] = v
	}
	conn, _, err := websocket.DefaultDialer.Dial(ts.wsURL(q), nil)
	if err != nil {
		t.Fatalf("dial %s/%s: %v", user, device, err)
	}
	return newWSClient(t, conn)
}

// waitNoSessions polls the operator API until user has no live session (bounded).
func (ts *testServer) waitNoSessions(t *testing.T, user string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var out struct {
			Sessions []json.RawMessage `json:"sessions"`
		}
		if st := ts.do(t, "GET", "/v1/users/"+user+"/sessions", testAPIKey, nil, &out); st != http.StatusOK {
			t.Fatalf("sessions of %s: status %d", user, st)
		}
		if len(out.Sessions) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still has %d sessions", user, len(out.Sessions))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pingPong makes sure the server has handled everything c sent before (messages are handled
// in order, so the pong comes after the acks and reads before it were handed on).
func pingPong(t *testing.T, c *wsClient) {
	t.Helper()
	c.send(t, map[string]any{"type": "ping"})
	for {
		if m := c.next(t, 5*time.Second); m.Type == "pong" {
			return
		}
	}
}

// waitCount polls the database until sql counts want (the Recorder flushes every 200ms), bounded.
func waitCount(t *testing.T, st *store.Store, what string, want int64, sql string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int64
		if err := st.Pool().QueryRow(context.Background(), sql).Scan(&n); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d, want %d", what, n, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// reportDB opens the server's database (after the server closed) for the view queries.
func reportDB(t *testing.T, dbURL string) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), dbURL, store.Options{MaxConns: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st
}

// queryMaps runs sql and returns its rows as column -> value maps.
func queryMaps(t *testing.T, st *store.Store, sql string, args ...any) []map[string]any {
	t.Helper()
	rows, err := st.Pool().Query(context.Background(), sql, args...)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToMap)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// wantRows compares the given columns of rows with want, row by row.
func wantRows(t *testing.T, what string, rows []map[string]any, cols []string, want [][]any) {
	t.Helper()
	if len(rows) != len(want) {
		t.Fatalf("%s: %d rows %v, want %d", what, len(rows), rows, len(want))
	}
	for i, w := range want {
		for j, c := range cols {
			got := rows[i][c]
			if n, ok := got.(int64); ok {
				got = int(n)
			}
			if f, ok := got.(float64); ok {
				if wf, ok := w[j].(float64); ok && f-wf < 0.005 && wf-f < 0.005 {
					continue
				}
			}
			if got != w[j] {
				t.Errorf("%s row %d %s = %v (%T), want %v", what, i, c, rows[i][c], rows[i][c], w[j])
			}
		}
	}
}

// wantPercentiles checks that latency percentiles are ordered and within bounds (their exact
// values depend on timing).
func wantPercentiles(t *testing.T, what string, row map[string]any, cols []string, lo, hi float64) {
	t.Helper()
	prev := lo
	for _, c := range cols {
		v, ok := row[c].(float64)
		if !ok || v < prev || v > hi {
			t.Errorf("%s: %s = %v, want %v <= it <= %v (row %v)", what, c, row[c], prev, hi, row)
			continue
		}
		prev = v
	}
}

// TestReportViews drives a scripted workload through the real server (known users, devices, all
// three transports, acks, cursor acks, reads, a kick, a replaced session, a client close, an
// eviction, a shutdown) and checks
// the exact numbers every reporting view returns, then `notifyd report` in its three formats.
func TestReportViews(t *testing.T) {
	t.Parallel()
	ts := startServer(t, func(c *Config) {
		c.PingInterval = 300 * time.Millisecond
		c.PingTimeout = 1500 * time.Millisecond
	})
	start := time.Now()

	// bob: two notifications while he is away, replayed when he connects 1.2 s later.
	bob1 := ts.publish(t, "bob", "order.shipped", map[string]any{"n": 1})
	bob2 := ts.publish(t, "bob", "order.shipped", map[string]any{"n": 2})
	// erin never connects: two notifications never delivered, one read through the API.
	erin1 := ts.publish(t, "erin", "promo", nil)
	ts.publish(t, "erin", "promo", nil)
	if st := ts.do(t, "POST", "/v1/users/erin/read", testAPIKey, map[string]any{"ids": []string{erin1.ID}}, nil); st != http.StatusOK {
		t.Fatalf("read erin: %d", st)
	}

	// alice: two devices get three live notifications; the phone acks all and reads two,
	// the laptop acks one.
	phone := ts.dialDevice(t, "alice", "phone", nil)
	laptop := ts.dialDevice(t, "alice", "laptop", nil)
	for _, c := range []*wsClient{phone, laptop} {
		c.expect(t, "hello")
		c.expect(t, "synced")
	}
	var alice []publishedNote
	for _, topic := range []string{"order.shipped", "order.shipped", "chat.message"} {
		p := ts.publish(t, "alice", topic, nil)
		alice = append(alice, p)
		for _, c := range []*wsClient{phone, laptop} {
			if m := c.expect(t, "notification"); m.ID != p.ID || m.Replayed {
				t.Fatalf("alice got %+v, want live %s", m, p.ID)
			}
		}
	}
	phone.send(t, map[string]any{"type": "ack", "ids": []string{alice[0].ID, alice[1].ID, alice[2].ID}})
	laptop.send(t, map[string]any{"type": "ack", "ids": []string{alice[0].ID}})
	phone.send(t, map[string]any{"type": "read", "ids": []string{alice[0].ID, alice[1].ID}})
	if m := phone.expect(t, "read"); m.Unread != 1 {
		t.Fatalf("read = %+v", m)
	}
	pingPong(t, laptop)

	// carol: a second connection resumes her session (the first is replaced), gets one live
	// notification, and closes.
	c1 := ts.dialDevice(t, "carol", "tablet", nil)
	hello := c1.expect(t, "hello")
	c1.expect(t, "synced")
	c2 := ts.dialDevice(t, "carol", "tablet", url.Values{"session": {hello.Session}})
	if h := c2.expect(t, "hello"); h.Session != hello.Session {
		t.Fatalf("resume got session %s, want %s", h.Session, hello.Session)
	}
	c2.expect(t, "synced")
	if bye := c1.expect(t, "bye"); bye.Reason != "replaced" {
		t.Fatalf("bye = %+v", bye)
	}
	carol := ts.publish(t, "carol", "chat.message", nil)
	if m := c2.expect(t, "notification"); m.ID != carol.ID {
		t.Fatalf("carol got %+v", m)
	}
	_ = c2.conn.Close()
	ts.waitNoSessions(t, "carol")

	// dave: reads until synced, gets one live notification written to his socket, then stops
	// reading (no more pongs) and is evicted by the heartbeat sweeper.
	tok, err := ts.auth.NewToken("dave", "old-phone", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dave, _, err := websocket.DefaultDialer.Dial(ts.wsURL(url.Values{"token": {tok}}), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dave.Close()
	for _, want := range []string{"hello", "synced"} {
		var m msg
		if err := dave.ReadJSON(&m); err != nil || m.Type != want {
			t.Fatalf("dave got %+v, %v; want %s", m, err, want)
		}
	}
	ts.publish(t, "dave", "order.shipped", nil)
	ts.waitNoSessions(t, "dave")

	// bob connects, gets his two notifications replayed, acks them, reads them, is kicked.
	if d := time.Since(start); d < 1200*time.Millisecond {
		time.Sleep(1200*time.Millisecond - d)
	}
	tab := ts.dialDevice(t, "bob", "tab", nil)
	bobHello := tab.expect(t, "hello")
	for _, p := range []publishedNote{bob1, bob2} {
		if m := tab.expect(t, "notification"); m.ID != p.ID || !m.Replayed {
			t.Fatalf("bob got %+v, want replayed %s", m, p.ID)
		}
	}
	tab.expect(t, "synced")
	tab.send(t, map[string]any{"type": "ack", "ids": []string{bob1.ID, bob2.ID}})
	tab.send(t, map[string]any{"type": "read", "up_to_seq": 2})
	if m := tab.expect(t, "read"); m.Unread != 0 {
		t.Fatalf("bob read = %+v", m)
	}
	if st := ts.do(t, "DELETE", "/v1/sessions/"+bobHello.Session, testAPIKey, nil, nil); st != http.StatusNoContent {
		t.Fatalf("kick: %d", st)
	}
	if bye := tab.expect(t, "bye"); bye.Reason != "kicked" {
		t.Fatalf("bye = %+v", bye)
	}

	// frank is on SSE and gina on long-poll (say, behind proxies that break WebSockets): each
	// gets two live notifications; frank acks one by POST and reads one, gina's next poll's
	// cursor acknowledges both. Both sessions end with the server.
	st := reportDB(t, ts.DBURL)
	frank := ts.dialTransport(t, "sse", "frank", nil)
	gina := ts.dialTransport(t, "longpoll", "gina", nil)
	for _, c := range []transportClient{frank, gina} {
		c.expect(t, "hello")
		c.expect(t, "synced")
	}
	var frankIDs []string
	for range 2 {
		p := ts.publish(t, "frank", "order.shipped", nil)
		frankIDs = append(frankIDs, p.ID)
		if m := frank.expect(t, "notification"); m.ID != p.ID || m.Replayed {
			t.Fatalf("frank got %+v", m)
		}
		p = ts.publish(t, "gina", "chat.message", nil)
		if m := gina.expect(t, "notification"); m.ID != p.ID || m.Replayed {
			t.Fatalf("gina got %+v", m)
		}
	}
	frank.send(t, map[string]any{"type": "ack", "ids": frankIDs[:1]})
	frank.send(t, map[string]any{"type": "read", "ids": frankIDs[:1]})
	if m := frank.expect(t, "read"); m.Unread != 1 {
		t.Fatalf("frank read = %+v", m)
	}
	waitCount(t, st, "gina's cursor acks", 2, `SELECT count(*) FROM deliveries WHERE user_id = 'gina' AND acked_at IS NOT NULL`)

	// alice's, frank's and gina's sessions end with the server: shutdown. Close flushes every
	// record.
	ts.stop(t)
	if d := ts.recorder.Dropped(); d != 0 {
		t.Fatalf("recorder dropped %d records", d)
	}
	since := start.Add(-time.Minute)

	wantRows(t, "report_delivery_share", queryMaps(t, st, `SELECT * FROM report_delivery_share($1, interval '1 day')`, since),
		[]string{"published", "within_1s", "within_10s", "within_1m", "later", "never"},
		[][]any{{13, 9, 11, 11, 0, 2}})

	lat := queryMaps(t, st, `SELECT * FROM report_delivery_latency($1, interval '1 day')`, since)
	wantRows(t, "report_delivery_latency", lat, []string{"transport", "deliveries", "live", "replayed", "acked"},
		[][]any{{"longpoll", 2, 2, 0, 2}, {"sse", 2, 2, 0, 1}, {"websocket", 10, 8, 2, 6}})
	for _, r := range lat {
		wantPercentiles(t, "live delivery latency", r, []string{"p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"}, 0, 1000)
	}
	hourly := queryMaps(t, st, `SELECT sum(deliveries)::int AS deliveries, sum(live)::int AS live, count(DISTINCT bucket_start)::int AS hours,
		bool_and(bucket_start = date_trunc('hour', bucket_start)) AS aligned FROM report_delivery_latency($1)`, since)
	if hourly[0]["deliveries"] != int32(14) || hourly[0]["live"] != int32(12) || hourly[0]["aligned"] != true {
		t.Errorf("hourly latency buckets: %v", hourly)
	}

	read := queryMaps(t, st, `SELECT * FROM report_read_latency($1, interval '1 day')`, since)
	wantRows(t, "report_read_latency", read, []string{"transport", "published", "read"},
		[][]any{{"longpoll", 2, 0}, {"none", 2, 1}, {"sse", 2, 1}, {"websocket", 7, 4}})
	for _, r := range read {
		if r["read"] == int64(0) {
			continue
		}
		wantPercentiles(t, "read latency", r, []string{"p50_ms", "p90_ms", "p99_ms", "max_ms"}, 0, 60_000)
	}

	sessions := queryMaps(t, st, `SELECT * FROM report_sessions($1)`, since)
	wantRows(t, "report_sessions", sessions,
		[]string{"transport", "sessions", "open", "client_close", "heartbeat_timeout", "kicked", "replaced", "slow_consumer", "shutdown", "error", "restart", "node_lost"},
		[][]any{
			{"longpoll", 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
			{"sse", 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0},
			{"websocket", 6, 0, 1, 1, 1, 1, 0, 2, 0, 0, 0},
		})
	for _, r := range sessions {
		wantPercentiles(t, "session durations", r, []string{"p50_s", "p90_s", "max_s"}, 0, 120)
	}

	wantRows(t, "report_transport_mix", queryMaps(t, st, `SELECT transport, users, pct_users::float8 AS pct_users, never_websocket FROM report_transport_mix($1)`, since),
		[]string{"transport", "users", "pct_users", "never_websocket"},
		[][]any{{"longpoll", 1, 16.67, 1}, {"sse", 1, 16.67, 1}, {"websocket", 4, 66.67, 0}})
	wantRows(t, "user_transports", queryMaps(t, st, `SELECT * FROM user_transports ORDER BY user_id`),
		[]string{"user_id", "sessions", "websocket", "sse", "longpoll", "last_transport", "fell_back", "never_websocket"},
		[][]any{
			{"alice", 2, 2, 0, 0, "websocket", false, false},
			{"bob", 1, 1, 0, 0, "websocket", false, false},
			{"carol", 2, 2, 0, 0, "websocket", false, false},
			{"dave", 1, 1, 0, 0, "websocket", false, false},
			{"frank", 1, 0, 1, 0, "sse", true, true},
			{"gina", 1, 0, 0, 1, "longpoll", true, true},
		})

	wantRows(t, "session_log", queryMaps(t, st, `SELECT user_id, device, transport, end_reason, open FROM session_log ORDER BY connected_at`),
		[]string{"user_id", "device", "transport", "end_reason", "open"},
		[][]any{
			{"alice", "phone", "websocket", "shutdown", false},
			{"alice", "laptop", "websocket", "shutdown", false},
			{"carol", "tablet", "websocket", "replaced", false},
			{"carol", "tablet", "websocket", "client_close", false},
			{"dave", "old-phone", "websocket", "heartbeat_timeout", false},
			{"bob", "tab", "websocket", "kicked", false},
			{"frank", "test", "sse", "shutdown", false},
			{"gina", "test", "longpoll", "shutdown", false},
		})

	wantRows(t, "unread_aging", queryMaps(t, st, `SELECT * FROM unread_aging ORDER BY user_id, topic`),
		[]string{"user_id", "topic", "unread", "older_1h", "older_1d", "older_7d"},
		[][]any{
			{"alice", "chat.message", 1, 0, 0, 0},
			{"carol", "chat.message", 1, 0, 0, 0},
			{"dave", "order.shipped", 1, 0, 0, 0},
			{"erin", "promo", 1, 0, 0, 0},
			{"frank", "order.shipped", 1, 0, 0, 0},
			{"gina", "chat.message", 2, 0, 0, 0},
		})

	// One notification, every question an operator asks about it.
	ns := queryMaps(t, st, `SELECT deliveries, never_delivered, first_transport, transports, devices,
		read_at IS NOT NULL AS read, acked_at IS NOT NULL AS acked FROM notification_status WHERE id = $1`, alice[0].ID)
	wantRows(t, "notification_status", ns, []string{"deliveries", "never_delivered", "first_transport", "read", "acked"},
		[][]any{{2, false, "websocket", true, true}})
	if devs := ns[0]["devices"]; !sameStrings(devs, "laptop", "phone") {
		t.Errorf("devices = %v", devs)
	}
	wantRows(t, "delivery_log", queryMaps(t, st, `SELECT device, transport, replayed, acked_at IS NOT NULL AS acked,
		read_at IS NOT NULL AS read, delivery_ms >= 0 AS timed FROM delivery_log WHERE notification_id = $1 ORDER BY device`, alice[1].ID),
		[]string{"device", "transport", "replayed", "acked", "read", "timed"},
		[][]any{{"laptop", "websocket", false, false, true, true}, {"phone", "websocket", false, true, true, true}})
	wantRows(t, "notification_status never", queryMaps(t, st, `SELECT count(*) FILTER (WHERE never_delivered) AS never FROM notification_status`),
		[]string{"never"}, [][]any{{2}})

	// notifyd report: the same numbers, in each format.
	var out bytes.Buffer
	if err := runReport(context.Background(), []string{"--since", "1h", "--format", "json", "--database", ts.DBURL}, func(string) string { return "" }, &out); err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Sections []struct {
			Name string           `json:"name"`
			Rows []map[string]any `json:"rows"`
		} `json:"sections"`
	}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("report json: %v\n%s", err, out.String())
	}
	got := map[string][]map[string]any{}
	for _, s := range rep.Sections {
		got[s.Name] = s.Rows
	}
	if len(rep.Sections) != len(store.ReportQueries()) {
		t.Fatalf("report has %d sections, want %d", len(rep.Sections), len(store.ReportQueries()))
	}
	if r := got["delivery_share"]; len(r) != 1 || r[0]["published"] != 13.0 || r[0]["never"] != 2.0 || r[0]["pct_never"] != 15.38 {
		t.Errorf("report delivery_share = %v", r)
	}
	if r := got["sessions"]; len(r) != 3 || r[2]["heartbeat_timeout"] != 1.0 || r[2]["replaced"] != 1.0 || r[0]["shutdown"] != 1.0 {
		t.Errorf("report sessions = %v", r)
	}
	if r := got["unread_aging"]; len(r) != 6 || r[0]["user_id"] != "erin" || r[0]["unread"] != 1.0 {
		t.Errorf("report unread_aging = %v", r)
	}

	out.Reset()
	if err := runReport(context.Background(), []string{"--since=1h", "--format=csv", "--database=" + ts.DBURL}, nil, &out); err != nil {
		t.Fatal(err)
	}
	r := csv.NewReader(&out)
	r.FieldsPerRecord = -1
	recs, err := r.ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, rec := range recs {
		if rec[0] == "delivery_latency" && rec[1] == "websocket" {
			found = rec[2] == "10" && rec[3] == "8" && rec[4] == "2" && rec[5] == "6"
		}
	}
	if !found {
		t.Errorf("csv has no websocket delivery_latency row with 10 8 2 6:\n%s", out.String())
	}

	out.Reset()
	if err := runReport(context.Background(), []string{"--database", ts.DBURL}, nil, &out); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"heartbeat_timeout", "== Users with the oldest unread notifications", "erin", "websocket"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table report lacks %q:\n%s", want, out.String())
		}
	}
	if testing.Verbose() {
		t.Logf("notifyd report:\n%s", out.String())
	}
	if err := runReport(context.Background(), []string{"--format", "xml"}, nil, &out); err == nil {
		t.Error("--format xml accepted")
	}
}

func sameStrings(v any, want ...string) bool {
	got, ok := v.([]any)
	if !ok || len(got) != len(want) {
		return false
	}
	for i := range want {
		if got[i] != want[i] {
			return false
		}
	}
	return true
}
