package handlers

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"reflect"
	"strings"
	"testing"
)

func TestDecodePublishRefusesLongArraysEarly(t *testing.T) {
	for _, body := range []string{
		`{"topic":"t","user_ids":["a","b","c","d"]}`,
		`{"notifications":[{},{},{},{}]}`,
		`{"user_ids":["a","b","c","d",` + strings.Repeat(`"x",`, 1000) + `BROKEN`,
	} {
		var req publishRequest
		err := decodePublish(strings.NewReader(body), -1, 3, &req)
		var e *Error
		if !errors.As(err, &e) || e.Status != http.StatusRequestEntityTooLarge || e.Code != "batch_too_large" {
			t.Errorf("%.40s…: %v, want 413 batch_too_large", body, err)
		}
	}
	body := `{"topic":"t","user_ids":["a","b","c"],"data":{"k":[1,2]}}`
	for _, size := range []int64{-1, int64(len(body))} {
		var req publishRequest
		if err := decodePublish(strings.NewReader(body), size, 3, &req); err != nil {
			t.Fatalf("3 ids of 3 (size %d): %v", size, err)
		}
		if len(req.UserIDs) != 3 || string(req.Data) != `{"k":[1,2]}` || req.Topic != "t" {
			t.Fatalf("decoded %+v (size %d)", req, size)
		}
	}
}

// TestDecodePublishSmallBodies: a body of known length up to smallPublishBytes
// is decoded in one pass, and answers as the stream decoder does: arrays past
// the limit 413 batch_too_large, a body cut short or not an object 400.
func TestDecodePublishSmallBodies(t *testing.T) {
	for _, c := range []struct {
		body       string
		size       int64 // the Content-Length; the reader holds body alone
		status     int
		code, want string
	}{
		{`{"topic":"t","user_ids":["a","b","c","d"]}`, -2, 413, "batch_too_large", ""},
		{`{"notifications":[{},{},{},{}]}`, -2, 413, "batch_too_large", ""},
		{`{"user_id":"a","topic":"t"}`, 40, 400, "bad_request", "the body ends before the JSON value does"},
		{``, 0, 400, "bad_request", "the body is empty"},
		{``, 10, 400, "bad_request", "the body is empty"}, // a Content-Length and no body
		{`  [1]`, -2, 400, "bad_request", "the body: must be an object"},
		{`{"user_id":"a","bogus":1}`, -2, 400, "bad_request", `unknown field "bogus"`},
		{`{"user_ids":[1]}`, -2, 400, "bad_request", "user_ids: must be a string"},
		{`{"user_id":"a"} {}`, -2, 400, "bad_request", "trailing data after the JSON body"},
	} {
		size := c.size
		if size == -2 {
			size = int64(len(c.body))
		}
		var req publishRequest
		err := decodePublish(strings.NewReader(c.body), size, 3, &req)
		var e *Error
		if !errors.As(err, &e) || e.Status != c.status || e.Code != c.code || !strings.Contains(e.Message, c.want) {
			t.Errorf("%q (size %d): %v, want %d %s %q", c.body, size, err, c.status, c.code, c.want)
		}
	}
}

// FuzzDecodePublish: within the batch limit, the streaming decoder accepts
// what encoding/json accepts, and decodes it the same; the one exception is a
// body starting with null, which encoding/json takes as an empty request and
// decodePublish refuses as not an object (both answer 400). The one-pass
// decoder of small bodies accepts and decodes what the streaming one does,
// and refuses what it refuses with the same status and code (but for a
// batch_too_large that the streaming decoder finds before a later error).
func FuzzDecodePublish(f *testing.F) {
	for _, s := range []string{
		`{"user_id":"a","topic":"t","data":{"x":1},"idempotency_key":"k","expires_at":"2030-01-01T00:00:00Z"}`,
		`{"user_ids":["a","b"],"topic":"t","data":[1,"2"]}`,
		`{"notifications":[{"user_id":"a","topic":"t","data":null},{"user_id":"b","topic":"u"}]}`,
		`{"user_ids":null,"notifications":[]}`, `{"user_ids":[1]}`, `{"x":1}`, `{"user_id":`, `[]`, `null`, `{} {}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var got, small, want publishRequest
		err := decodePublish(bytes.NewReader(body), -1, 3, &got)
		serr := decodePublish(bytes.NewReader(body), int64(len(body)), 3, &small)
		if (err == nil) != (serr == nil) {
			t.Fatalf("%q: streamed %v, in one pass %v", body, err, serr)
		}
		if err == nil && !reflect.DeepEqual(got, small) {
			t.Fatalf("%q: streamed %+v, in one pass %+v", body, got, small)
		}
		var se, ss *Error
		if err != nil && errors.As(err, &se) && errors.As(serr, &ss) && se.Code != "batch_too_large" &&
			(se.Status != ss.Status || se.Code != ss.Code) {
			t.Fatalf("%q: streamed %v, in one pass %v", body, err, serr)
		}
		werr := decodeStrict(bytes.NewReader(body), &want) // encoding/json on the whole body
		if bytes.HasPrefix(bytes.TrimSpace(body), []byte("null")) {
			return
		}
		if werr == nil && len(want.UserIDs) <= 3 && len(want.Notifications) <= 3 {
			if err != nil {
				t.Fatalf("%q: refused (%v); encoding/json decodes it", body, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("%q: decoded %+v, encoding/json %+v", body, got, want)
			}
		}
		if err == nil && werr != nil {
			t.Fatalf("%q: accepted; encoding/json refuses it: %v", body, werr)
		}
	})
}

// BenchmarkDecodePublishFanOut decodes a fan-out of 1,000 users and 4 KiB of data.
func BenchmarkDecodePublishFanOut(b *testing.B) {
	ids := make([]string, 1000)
	for i := range ids {
		ids[i] = "user-" + strings.Repeat("x", i%20)
	}
	body, _ := json.Marshal(map[string]any{"user_ids": ids, "topic": "t", "data": map[string]string{"s": strings.Repeat("y", 4<<10)}})
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		var req publishRequest
		if err := decodePublish(bytes.NewReader(body), -1, 1000, &req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodePublishSingle decodes a single publish (the publish-single
// scenario's body) in one pass and as a stream, side by side.
func BenchmarkDecodePublishSingle(b *testing.B) {
	body := []byte(`{"user_id":"user-1234","topic":"bench","data":{"n":12345,"at":"2026-12-03T15:00:00.000000Z"}}`)
	for _, c := range []struct {
		name string
		size int64
	}{{"one-pass", int64(len(body))}, {"stream", -1}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var req publishRequest
				if err := decodePublish(bytes.NewReader(body), c.size, 1000, &req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
