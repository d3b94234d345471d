package realtime

import (
	"fmt"
	"testing"
	"time"
)

func TestSentRingForgetsOldestAndAdmitsOnce(t *testing.T) {
	var r sentRing
	for i := range 10 {
		r.add(fmt.Sprint("id-", i), 4)
	}
	if len(r.ids) != 4 || r.live != 4 {
		t.Fatalf("ring holds %d (%d live), want 4", len(r.ids), r.live)
	}
	for i := range 6 {
		if r.take(fmt.Sprint("id-", i)) {
			t.Fatalf("id-%d admitted after 4 newer ones pushed it out", i)
		}
	}
	if !r.take("id-7") || r.take("id-7") {
		t.Fatalf("id-7: want admitted once")
	}
	r.add("id-10", 4) // takes the oldest slot (id-6), not the acked one
	if r.take("id-6") || !r.take("id-8") || !r.take("id-9") || !r.take("id-10") {
		t.Fatalf("after wrapping: want id-6 forgotten, id-8..10 admitted")
	}
	if r.live != 0 || r.take("never") {
		t.Fatalf("live %d after every entry was acked", r.live)
	}
}

// An ack is admitted only for a notification the writer took, once; ids past
// the session's ack rate are counted as limited, unexamined.
func TestAdmitAcks(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	s := mustLive(t, h, "alice", WebSocket)
	h.Deliver(notifs("alice", 1, 3))
	now := time.Now()
	if ok, lim, unk := s.AdmitAcks([]string{"alice-1"}, AckLimit{}, now); len(ok) != 0 || lim != 0 || unk != 1 {
		t.Fatalf("ack of a queued, not yet taken notification: admitted %v limited %d unknown %d", ok, lim, unk)
	}
	s.Take()
	ok, lim, unk := s.AdmitAcks([]string{"alice-1", "alice-1", "bob-1", "alice-3"}, AckLimit{}, now)
	if fmt.Sprint(ok) != "[alice-1 alice-3]" || lim != 0 || unk != 2 {
		t.Fatalf("admitted %v limited %d unknown %d, want [alice-1 alice-3] 0 2", ok, lim, unk)
	}
	lim2 := AckLimit{Rate: 1, Burst: 2}
	ok, lim, unk = s.AdmitAcks([]string{"x", "alice-2", "y", "z"}, lim2, now)
	if fmt.Sprint(ok) != "[alice-2]" || lim != 2 || unk != 1 {
		t.Fatalf("rate-limited: admitted %v limited %d unknown %d, want [alice-2] 2 1", ok, lim, unk)
	}
	if _, lim, _ = s.AdmitAcks([]string{"a"}, lim2, now); lim != 1 {
		t.Fatalf("an empty bucket admitted an ack")
	}
	if _, lim, _ = s.AdmitAcks([]string{"a"}, lim2, now.Add(time.Second)); lim != 0 {
		t.Fatalf("the bucket did not refill")
	}
}

// BenchmarkSentRingTakeMiss is the cost of refusing an ack of an unknown id
// against a full ring of 1,256 (the default queue plus replay limit).
func BenchmarkSentRingTakeMiss(b *testing.B) {
	var r sentRing
	for i := range 1256 {
		r.add(fmt.Sprint("id-", i), 1256)
	}
	b.ReportAllocs()
	for b.Loop() {
		r.take("0194f3a2-7c1e-7b3a-9c2d-4e5f6a7b8c9d")
	}
}

// A connection that resumes a session admits the acks of what the connection
// it replaced was sent.
func TestResumeKeepsSentForAcks(t *testing.T) {
	h := NewHub(testConfig(), Hooks{})
	a := mustLive(t, h, "erin", WebSocket)
	h.Deliver(notifs("erin", 1, 2))
	a.Take()
	if ok, _, _ := a.AdmitAcks([]string{"erin-1"}, AckLimit{}, time.Now()); len(ok) != 1 {
		t.Fatalf("erin-1 not admitted on its own connection")
	}
	b := mustRegister(t, h, "erin", WebSocket, a.ID)
	if b.ID != a.ID {
		t.Fatalf("resume got id %s, want %s", b.ID, a.ID)
	}
	ok, _, unk := b.AdmitAcks([]string{"erin-2", "erin-1"}, AckLimit{}, time.Now())
	if fmt.Sprint(ok) != "[erin-2]" || unk != 1 {
		t.Fatalf("after resume: admitted %v unknown %d, want [erin-2] and erin-1 (acked before) refused", ok, unk)
	}
}
