package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
	"github.com/notifyd/notifyd/store"
)

// pagedStore answers Inbox with rows, then fails with err after failAfter of
// them when err is set (a database that goes away in the middle of a page,
// which the real one does not do on cue). Its other methods are not used.
type pagedStore struct {
	Store
	rows      []store.Notification
	failAfter int
	err       error
	truncated bool
}

func (p *pagedStore) Inbox(_ context.Context, _ store.InboxQuery, each func(store.Notification) error) (int64, bool, error) {
	for i, n := range p.rows {
		if p.err != nil && i == p.failAfter {
			return 0, false, p.err
		}
		if err := each(n); err != nil {
			return 0, false, err
		}
	}
	if p.err != nil {
		return 0, false, p.err
	}
	return int64(len(p.rows)), p.truncated, nil
}

func inboxServer(t *testing.T, st Store) *httptest.Server {
	t.Helper()
	hub := realtime.NewHub(realtime.Config{PingInterval: time.Second, PingTimeout: 3 * time.Second}, realtime.Hooks{})
	h := New(Options{Hub: hub, Store: st, Auth: NewAuth("test-secret-0123456789abcdef", testKey, nil),
		Log: slog.New(slog.DiscardHandler)})
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

const testKey = "test-api-key-0123456789abcdef"

func getInbox(t *testing.T, srv *httptest.Server) (int, []byte, error) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, srv.URL+"/v1/users/u/notifications?limit=10", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err // the server cut the connection before a response
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// TestInboxStreamed: the streamed page is the JSON the in-memory answer was
// (data compacted and HTML-escaped as writeJSON does), an empty page is an
// empty array, a database error before the first row is a 503 JSON error,
// and one after it cuts the response instead of ending a short valid page.
func TestInboxStreamed(t *testing.T) {
	at := time.Date(2026, 11, 26, 21, 4, 5, 123e6, time.UTC)
	rows := []store.Notification{
		{ID: "a", Seq: 2, Topic: "t", Data: json.RawMessage(`{"html": "<b>&</b>", "n": [1, 2]}`), CreatedAt: at, ReadAt: &at},
		{ID: "b", Seq: 1, Topic: "t", Data: json.RawMessage(`"\u2028"`), CreatedAt: at},
	}
	srv := inboxServer(t, &pagedStore{rows: rows, truncated: true})
	st, body, err := getInbox(t, srv)
	if err != nil || st != http.StatusOK {
		t.Fatalf("inbox: %d %v", st, err)
	}
	type item struct {
		ID        string          `json:"id"`
		Seq       int64           `json:"seq"`
		Topic     string          `json:"topic"`
		Data      json.RawMessage `json:"data"`
		CreatedAt string          `json:"created_at"`
		ReadAt    *string         `json:"read_at"`
	}
	var page struct {
		Notifications []item `json:"notifications"`
		Unread        int64  `json:"unread"`
		Truncated     bool   `json:"truncated"`
	}
	if err := json.Unmarshal(body, &page); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, body)
	}
	if len(page.Notifications) != 2 || page.Unread != 2 || !page.Truncated {
		t.Fatalf("page: %s", body)
	}
	for i, got := range page.Notifications {
		n := rows[i]
		want, _ := json.Marshal(item{ID: n.ID, Seq: n.Seq, Topic: n.Topic, Data: n.Data,
			CreatedAt: n.CreatedAt.Format(realtime.TimeFormat), ReadAt: wireTimePtr(n.ReadAt)})
		gotJSON, _ := json.Marshal(got)
		if string(gotJSON) != string(want) {
			t.Fatalf("item %d: %s, want %s", i, gotJSON, want)
		}
	}
	if !strings.Contains(string(body), `\u003cb\u003e\u0026`) || !strings.Contains(string(body), `\u2028`) || strings.Contains(string(body), `": `) {
		t.Fatalf("data not compacted and escaped as writeJSON does: %s", body)
	}

	srv = inboxServer(t, &pagedStore{})
	if st, body, err := getInbox(t, srv); err != nil || st != http.StatusOK ||
		strings.TrimSpace(string(body)) != `{"notifications":[],"unread":0,"truncated":false}` {
		t.Fatalf("empty page: %d %s %v", st, body, err)
	}

	down := store.DBError("store: inbox", errors.New("database went away"))
	srv = inboxServer(t, &pagedStore{rows: rows, failAfter: 0, err: down})
	if st, body, err := getInbox(t, srv); err != nil || st != http.StatusServiceUnavailable || !strings.Contains(string(body), `"unavailable"`) {
		t.Fatalf("failing before the first row: %d %s %v", st, body, err)
	}

	srv = inboxServer(t, &pagedStore{rows: rows, failAfter: 1, err: down})
	// The first row may still sit in the server's write buffer (the client
	// then gets no response at all) or have gone out (a cut body).
	if st, body, err := getInbox(t, srv); err == nil || json.Valid(body) {
		t.Fatalf("failing after the first row: %d %v, body %s; want the response cut", st, err, body)
	}
}
