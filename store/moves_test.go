package store

import "testing"

// The moves channel's wire form: every message survives its payload, and malformed lines are refused.
func TestParseMove(t *testing.T) {
	for _, m := range []Move{
		{Kind: MoveMoved, Session: "abc", To: "def", Cursor: 42, User: "u\twith tab"},
		{Kind: MoveEnd, Session: "def", Reason: "kicked", User: "u"},
	} {
		got, err := ParseMove(m.payload())
		if err != nil || got != m {
			t.Errorf("round trip of %+v: %+v, %v", m, got, err)
		}
	}
	for _, bad := range []string{"", "moved", "moved\tabc\tdef\tx\tu", "moved\tabc\tdef\t-1\tu", "end\tabc\t\tu", "kick\tabc\tu", "moved\t\tdef\t1\tu"} {
		if _, err := ParseMove(bad); err == nil {
			t.Errorf("ParseMove(%q) accepted", bad)
		}
	}
}

// FuzzParseMove: any payload parses or is refused without panicking, and what parses
// round-trips through its wire form.
func FuzzParseMove(f *testing.F) {
	f.Add("moved\tabc\tdef\t1\tu")
	f.Add("end\tabc\tkicked\tu")
	f.Fuzz(func(t *testing.T, p string) {
		m, err := ParseMove(p)
		if err != nil {
			return
		}
		again, err := ParseMove(m.payload())
		if err != nil || again != m {
			t.Fatalf("%q parsed as %+v, which round-trips to %+v, %v", p, m, again, err)
		}
	})
}
