package main

import (
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
)

// apiErrorBody is the JSON body of an error answer.
type apiErrorBody struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// postRaw sends body as it is to path with the API key; it returns the
// status and the decoded error body (empty when the answer is not one).
func (ts *testServer) postRaw(t *testing.T, path, bearer, body string) (int, apiErrorBody, []byte) {
	t.Helper()
	req, err := http.NewRequest("POST", ts.URL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+bearer)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var e apiErrorBody
	_ = json.Unmarshal(raw, &e)
	return resp.StatusCode, e, raw
}

// goInternals are the marks of Go's own error texts that must not reach a client.
var goInternals = []string{"json:", "Go struct", "[]string", "publishRequest", "publishItem", "pgconn", "SQLSTATE"}

func assertClean(t *testing.T, what, msg string) {
	t.Helper()
	if msg == "" {
		t.Errorf("%s: empty error message", what)
	}
	for _, bad := range goInternals {
		if strings.Contains(msg, bad) {
			t.Errorf("%s: message %q shows Go internals (%q)", what, msg, bad)
		}
	}
}

// TestPublishCreatedAtInMilliseconds: the publish answer writes created_at as
// every wire timestamp is written (PROTOCOL.md: RFC 3339 UTC with
// milliseconds), for the single, fan-out and batch forms. It failed before:
// the answer had RFC3339Nano's microseconds.
func TestPublishCreatedAtInMilliseconds(t *testing.T) {
	ts := startServer(t)
	wire := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$`)
	for i := range 5 { // a commit at a whole millisecond would pass by chance; five do not
		p := ts.publish(t, "ms", "t", map[string]int{"i": i})
		if !wire.MatchString(p.CreatedAt) {
			t.Fatalf("single publish created_at %q, want RFC 3339 UTC with milliseconds", p.CreatedAt)
		}
	}
	for name, body := range map[string]any{
		"fan-out": map[string]any{"user_ids": []string{"ms1", "ms2"}, "topic": "t"},
		"batch":   map[string]any{"notifications": []map[string]any{{"user_id": "ms3", "topic": "t"}, {"user_id": "ms4", "topic": "t"}}},
	} {
		var out struct {
			Notifications []publishedNote `json:"notifications"`
		}
		if st := ts.do(t, "POST", "/v1/notifications", testAPIKey, body, &out); st != http.StatusCreated || len(out.Notifications) != 2 {
			t.Fatalf("%s: %d %+v", name, st, out)
		}
		for _, p := range out.Notifications {
			if !wire.MatchString(p.CreatedAt) {
				t.Errorf("%s: created_at %q, want RFC 3339 UTC with milliseconds", name, p.CreatedAt)
			}
		}
	}
}

// TestPublishDataPostgresRejectsIs400: data that passes the handler's checks
// but that Postgres refuses (a number jsonb cannot hold, a lone surrogate
// escape, a NUL in an idempotency key) answers 400 with a message in the
// client's terms, in every publish form, and nothing is stored. It failed
// before: each answered 503 "unavailable … retry later".
func TestPublishDataPostgresRejectsIs400(t *testing.T) {
	ts := startServer(t)
	cases := map[string]string{
		"huge number":     `{"user_id":"rej","topic":"t","data":{"x":1e1000000}}`,
		"lone surrogate":  `{"user_id":"rej","topic":"t","data":{"s":"\ud800"}}`,
		"NUL in key":      `{"user_id":"rej","topic":"t","idempotency_key":"a\u0000b"}`,
		"fan-out number":  `{"user_ids":["rej","rej2"],"topic":"t","data":{"x":1e1000000}}`,
		"fan-out key":     `{"user_ids":["rej","rej2"],"topic":"t","idempotency_key":"a\u0000b"}`,
		"batch surrogate": `{"notifications":[{"user_id":"rej","topic":"t"},{"user_id":"rej2","topic":"t","data":["\ud800"]}]}`,
	}
	for name, body := range cases {
		st, e, raw := ts.postRaw(t, "/v1/notifications", testAPIKey, body)
		if st != http.StatusBadRequest || e.Error.Code != "bad_request" {
			t.Errorf("%s: %d %s, want 400 bad_request", name, st, raw)
			continue
		}
		assertClean(t, name, e.Error.Message)
		if !strings.Contains(e.Error.Message, "rejected the data") {
			t.Errorf("%s: message %q does not say the data was refused", name, e.Error.Message)
		}
	}
	// Nothing of the refused requests was stored.
	if p := ts.publish(t, "rej", "t", nil); p.Seq != 1 {
		t.Fatalf("first accepted publish got seq %d, want 1", p.Seq)
	}
}

// TestPublishDecodeErrorsNameTheField: a body of the wrong shape is answered
// in JSON terms (the field, the type it must have, the byte offset), never
// with Go's decoder text. It failed before: the message was
// "json: cannot unmarshal string into Go struct field publishRequest.user_ids
// of type []string".
func TestPublishDecodeErrorsNameTheField(t *testing.T) {
	ts := startServer(t)
	for name, tc := range map[string]struct{ body, want string }{
		"user_ids string":  {`{"user_ids":"ann","topic":"t"}`, "user_ids: must be an array of strings"},
		"user_id number":   {`{"user_id":5,"topic":"t"}`, "user_id: must be a string"},
		"batch not array":  {`{"notifications":{"user_id":"a"}}`, "notifications: must be an array of objects"},
		"nested field":     {`{"notifications":[{"user_id":"a","topic":7}]}`, "notifications.topic: must be a string"},
		"syntax":           {`{"user_id":"a",}`, "at byte"},
		"bad expires_at":   {`{"user_id":"a","topic":"t","expires_at":"tomorrow"}`, "RFC 3339"},
		"unknown field":    {`{"user_id":"a","topic":"t","colour":"red"}`, `unknown field "colour"`},
		"cut off":          {`{"user_id":`, "ends before"},
		"user_ids numbers": {`{"user_ids":[1,2],"topic":"t"}`, "user_ids: must be a string"},
	} {
		st, e, raw := ts.postRaw(t, "/v1/notifications", testAPIKey, tc.body)
		if st != http.StatusBadRequest || e.Error.Code != "bad_request" {
			t.Errorf("%s: %d %s, want 400 bad_request", name, st, raw)
			continue
		}
		assertClean(t, name, e.Error.Message)
		if !strings.Contains(e.Error.Message, tc.want) {
			t.Errorf("%s: message %q, want it to say %q", name, e.Error.Message, tc.want)
		}
	}
}

// TestPublishWhileShuttingDownIs503ShuttingDown: a publish the store can no
// longer take because it is closing answers 503 shutting_down, not the
// database-failure 503 unavailable. It failed before: it was "unavailable".
func TestPublishWhileShuttingDownIs503ShuttingDown(t *testing.T) {
	ts := startServer(t)
	ts.store.Close() // what Main.Close does last, once in-flight requests are done
	st, e, raw := ts.postRaw(t, "/v1/notifications", testAPIKey, `{"user_id":"late","topic":"t"}`)
	if st != http.StatusServiceUnavailable || e.Error.Code != "shutting_down" {
		t.Fatalf("publish on a closed store: %d %s, want 503 shutting_down", st, raw)
	}
	assertClean(t, "shutting down", e.Error.Message)
}

// TestNegotiateRefusedDataIs400: a negotiate report whose reason Postgres
// refuses (the handler cuts it at 64 bytes, here in the middle of a two-byte
// character, leaving invalid UTF-8) answers 400 bad_request with a clean
// message. It failed before: 503 unavailable. (If the cut learns to respect
// character boundaries, the report is stored and answered 204: also not 503.)
func TestNegotiateRefusedDataIs400(t *testing.T) {
	ts := startServer(t)
	reason := "a" + strings.Repeat("é", 40) // byte 64 falls inside an é
	body := `{"transport":"websocket","ok":false,"reason":"` + reason + `"}`
	st, raw := negotiateReq(t, ts, "POST", ts.token(t, "neg"), "Mozilla/5.0 Firefox/120.0", "", body)
	if st == http.StatusNoContent {
		t.Skip("the reason was cut at a character boundary and stored: nothing for Postgres to refuse")
	}
	var e apiErrorBody
	_ = json.Unmarshal(raw, &e)
	if st != http.StatusBadRequest || e.Error.Code != "bad_request" {
		t.Fatalf("negotiate with a reason cut mid-character: %d %s, want 400 bad_request", st, raw)
	}
	assertClean(t, "negotiate", e.Error.Message)
}
