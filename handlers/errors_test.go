package handlers

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/store"
)

// TestDomainCodes: every domain code has its status, close code and wire
// code; only a database failure and a closing server are 503, told apart by
// their wire codes.
func TestDomainCodes(t *testing.T) {
	for code, want := range map[string]domainCode{
		store.EINVALID:         {400, websocket.ClosePolicyViolation, "bad_request"},
		store.ENOTFOUND:        {404, websocket.ClosePolicyViolation, "not_found"},
		store.ECONFLICT:        {409, websocket.ClosePolicyViolation, "conflict"},
		store.ETOOLARGE:        {413, websocket.CloseMessageTooBig, "too_large"},
		store.ETOOMANYSESSIONS: {429, websocket.ClosePolicyViolation, "too_many_sessions"},
		store.EUNAVAILABLE:     {503, websocket.CloseInternalServerErr, "unavailable"},
		store.ESHUTTINGDOWN:    {503, websocket.CloseServiceRestart, "shutting_down"},
		store.EINTERNAL:        {500, websocket.CloseInternalServerErr, "internal"},
		"no such code":         {500, websocket.CloseInternalServerErr, "internal"},
	} {
		if got := lookupCode(code); got != want || httpStatus(code) != want.status || closeCode(code) != want.close {
			t.Errorf("%s: %+v, want %+v", code, got, want)
		}
	}
	if len(domainCodes) != 8 {
		t.Errorf("domainCodes has %d rows; a new code needs its test row", len(domainCodes))
	}
}

// TestWriteErrorByCode: writeError answers an *Error as it is, a domain
// error (wrapped or not) by its code with its own message, and anything else
// as 500 without its text.
func TestWriteErrorByCode(t *testing.T) {
	for name, tc := range map[string]struct {
		err    error
		status int
		body   string
	}{
		"api error":    {errorf(http.StatusTeapot, "teapot", "short and stout"), 418, `{"error":{"code":"teapot","message":"short and stout"}}`},
		"invalid":      {fmt.Errorf("ctx: %w", store.Errorf(store.EINVALID, "notification 2: empty topic")), 400, `{"error":{"code":"bad_request","message":"notification 2: empty topic"}}`},
		"closed store": {fmt.Errorf("ctx: %w", store.ErrClosed), 503, `{"error":{"code":"shutting_down","message":"the server is restarting; retry later"}}`},
		"db down":      {store.DBError("op", errors.New("dial tcp: refused")), 503, `{"error":{"code":"unavailable","message":"the database is unavailable; retry later"}}`},
		"no code":      {errors.New("secret internals"), 500, `{"error":{"code":"internal","message":"internal error"}}`},
	} {
		w := httptest.NewRecorder()
		writeError(w, tc.err)
		if w.Code != tc.status || strings.TrimSpace(w.Body.String()) != tc.body || w.Header().Get("Content-Type") != "application/json" {
			t.Errorf("%s: %d %s, want %d %s", name, w.Code, w.Body, tc.status, tc.body)
		}
	}
}

// FuzzDecodeErrorsAreClean: whatever body a client sends, a decoding error
// describes it without Go's decoder text or Go type names.
func FuzzDecodeErrorsAreClean(f *testing.F) {
	for _, s := range []string{`{"user_ids":"a"}`, `{"user_id":5}`, `{"notifications":[{"topic":1}]}`, `{"expires_at":"x"}`,
		`{"expires_at":5}`, `{"a":1}`, `{`, ``, `[]`, `{"user_ids":[1]}`, `{"data":`, `"x"`, `{"user_id":"a"} x`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		r := httptest.NewRequest("POST", "/v1/notifications", strings.NewReader(body))
		var req publishRequest
		err := decodeJSON(httptest.NewRecorder(), r, 1<<20, &req)
		if err == nil {
			return
		}
		e := apiError(err)
		for _, bad := range []string{"json:", "Go struct", "Go value", "publishRequest", "publishItem", "[]", "handlers.", "time.Time", "Time.UnmarshalJSON"} {
			if strings.Contains(e.Message, bad) {
				t.Fatalf("body %q: message %q shows %q", body, e.Message, bad)
			}
		}
	})
}
