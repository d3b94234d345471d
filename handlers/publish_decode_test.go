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

// decodeWhole is what decodePublish streams: encoding/json's decode of the
// whole body.
func decodeWhole(body []byte, req *publishRequest) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(req); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data")
	}
	return nil
}

func TestDecodePublishRefusesLongArraysEarly(t *testing.T) {
	for _, body := range []string{
		`{"topic":"t","user_ids":["a","b","c","d"]}`,
		`{"notifications":[{},{},{},{}]}`,
		`{"user_ids":["a","b","c","d",` + strings.Repeat(`"x",`, 1000) + `BROKEN`,
	} {
		var req publishRequest
		err := decodePublish(strings.NewReader(body), 3, &req)
		var e *Error
		if !errors.As(err, &e) || e.Status != http.StatusRequestEntityTooLarge || e.Code != "batch_too_large" {
			t.Errorf("%.40s…: %v, want 413 batch_too_large", body, err)
		}
	}
	var req publishRequest
	if err := decodePublish(strings.NewReader(`{"topic":"t","user_ids":["a","b","c"],"data":{"k":[1,2]}}`), 3, &req); err != nil {
		t.Fatalf("3 ids of 3: %v", err)
	}
	if len(req.UserIDs) != 3 || string(req.Data) != `{"k":[1,2]}` || req.Topic != "t" {
		t.Fatalf("decoded %+v", req)
	}
}

// FuzzDecodePublish: within the batch limit, the streaming decoder accepts
// what encoding/json accepts, and decodes it the same; the one exception is a
// body starting with null, which encoding/json takes as an empty request and
// decodePublish refuses as not an object (both answer 400).
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
		var got, want publishRequest
		err := decodePublish(bytes.NewReader(body), 3, &got)
		werr := decodeWhole(body, &want)
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
		if err := decodePublish(bytes.NewReader(body), 1000, &req); err != nil {
			b.Fatal(err)
		}
	}
}
