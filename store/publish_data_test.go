package store_test

import (
	"encoding/json"
	"testing"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// Rows sharing one data (a fan-out) and rows with data of their own, mixed in
// one batch, each store their own data.
func TestPublishSharedAndOwnData(t *testing.T) {
	s := storetest.New(t)
	shared := json.RawMessage(`{"shared":true}`)
	ns := []store.NewNotification{
		{UserID: "c", Topic: "t", Data: shared},
		{UserID: "a", Topic: "t", Data: shared},
		{UserID: "b", Topic: "t", Data: json.RawMessage(`{"own":"b"}`)},
		{UserID: "d", Topic: "t", Data: shared},
		{UserID: "e", Topic: "t"},
		{UserID: "f", Topic: "t", Data: json.RawMessage(`{"shared":true}`)}, // equal, not shared
	}
	if _, err := s.Publish(testCtx(t), ns); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a": `{"shared": true}`, "b": `{"own": "b"}`, "c": `{"shared": true}`,
		"d": `{"shared": true}`, "e": `{}`, "f": `{"shared": true}`}
	rows, err := s.Pool().Query(testCtx(t), `SELECT user_id, data::text FROM notifications`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var u, d string
		if err := rows.Scan(&u, &d); err != nil {
			t.Fatal(err)
		}
		if want[u] != d {
			t.Errorf("%s holds %s, want %s", u, d, want[u])
		}
		n++
	}
	if n != len(want) {
		t.Fatalf("%d rows, want %d", n, len(want))
	}
}

// A shared data that is not JSON is refused for every row.
func TestPublishSharedInvalidData(t *testing.T) {
	s := storetest.New(t)
	bad := json.RawMessage(`{"x":`)
	_, err := s.Publish(testCtx(t), []store.NewNotification{{UserID: "a", Topic: "t", Data: bad}, {UserID: "b", Topic: "t", Data: bad}})
	if store.ErrorCode(err) != store.EINVALID {
		t.Fatalf("publish of invalid shared data: %v, want EINVALID", err)
	}
}
