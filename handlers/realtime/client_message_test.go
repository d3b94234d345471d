package realtime

import (
	"errors"
	"testing"
	"time"
)

func TestParseClientMessages(t *testing.T) {
	tests := []struct {
		name, in string
		want     int    // messages parsed
		code     string // error code, when it must fail
	}{
		{"ping", `{"type":"ping"}`, 1, ""},
		{"ack", `{"type":"ack","ids":["a","b"]}`, 1, ""},
		{"read ids", `{"type":"read","ids":["a"]}`, 1, ""},
		{"read up_to", `{"type":"read","up_to_seq":17}`, 1, ""},
		{"array", ` [{"type":"ping"},{"type":"ack","ids":["x"]}] `, 2, ""},
		{"empty", ``, 0, "bad_message"},
		{"empty array", `[]`, 0, "bad_message"},
		{"not json", `ping`, 0, "bad_message"},
		{"missing type", `{}`, 0, "bad_message"},
		{"unknown type", `{"type":"subscribe"}`, 0, "unknown_type"},
		{"unknown field", `{"type":"ping","x":1}`, 0, "bad_message"},
		{"ack without ids", `{"type":"ack"}`, 0, "bad_message"},
		{"read both", `{"type":"read","ids":["a"],"up_to_seq":3}`, 0, "bad_message"},
		{"read neither", `{"type":"read"}`, 0, "bad_message"},
		{"negative seq", `{"type":"read","up_to_seq":-3}`, 0, "bad_message"},
		{"wrong type", `{"type":"ack","ids":"a"}`, 0, "bad_message"},
		{"trailing", `{"type":"ping"} {"type":"ping"}`, 0, "bad_message"},
		{"empty id", `{"type":"ack","ids":[""]}`, 0, "bad_message"},
		{"one bad in array", `[{"type":"ping"},{"type":"nope"}]`, 0, "unknown_type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			msgs, err := ParseClientMessages([]byte(tt.in))
			if tt.code != "" {
				var pe *ProtocolError
				if !errors.As(err, &pe) || pe.Code != tt.code {
					t.Fatalf("ParseClientMessages(%q) error = %v, want code %s", tt.in, err, tt.code)
				}
				return
			}
			if err != nil || len(msgs) != tt.want {
				t.Fatalf("ParseClientMessages(%q) = %v, %v; want %d messages", tt.in, msgs, err, tt.want)
			}
		})
	}
}

func FuzzParseClientMessages(f *testing.F) {
	for _, s := range []string{`{"type":"ping"}`, `[{"type":"ack","ids":["a"]}]`, `{"type":"read","up_to_seq":1}`, `[`, `{"type":1}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, err := ParseClientMessages(b)
		if err != nil {
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				t.Fatalf("error %v is not a *ProtocolError", err)
			}
			if msgs != nil {
				t.Fatalf("messages returned with an error")
			}
			return
		}
		if len(msgs) == 0 || len(msgs) > MaxMessagesPerBatch {
			t.Fatalf("%d messages accepted", len(msgs))
		}
		for _, m := range msgs {
			if err := m.validate(); err != nil {
				t.Fatalf("accepted an invalid message %+v: %v", m, err)
			}
		}
	})
}

// AppendPong writes the time exactly as TimeFormat does, in UTC.
func TestAppendPongTime(t *testing.T) {
	times := []time.Time{
		time.Date(2026, 11, 27, 2, 11, 44, 123456789, time.UTC),
		time.Date(1, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC),
		time.Date(2024, 2, 29, 9, 5, 7, 1_000_000, time.FixedZone("x", -7*3600)),
		time.Now(),
	}
	for _, tm := range times {
		want := `{"type":"pong","server_time":"` + tm.UTC().Format(TimeFormat) + `"}`
		if got := string(AppendPong(nil, tm)); got != want {
			t.Errorf("AppendPong(%v) = %s, want %s", tm, got, want)
		}
	}
}
