package handlers

import (
	"testing"
	"time"

	"github.com/notifyd/notifyd/handlers/realtime"
)

// adopted makes the fixture's session one adopted from another node, whose
// reads are matched against its old copy's relay.
func (f *pollFixture) adopted() {
	f.lp.mu.Lock()
	f.lp.handover = &readHandover{until: time.Now().Add(handoverFor), here: map[string]int{}, relayed: map[string]int{}}
	f.lp.mu.Unlock()
}

// The old copy of a moved session gives up its queued reads, in order, for
// the relay; the notifications queued with them stay for a poll still
// waiting there.
func TestLongPollMoveTakesReads(t *testing.T) {
	f := newPollFixture(t, 64)
	f.hub.BroadcastRead("alice", []string{"n0"}, 2)
	f.publish(1, 1)
	f.hub.BroadcastRead("alice", []string{}, 3)
	f.lp.mu.Lock()
	reads := f.lp.takeReadsLocked()
	f.lp.mu.Unlock()
	if len(reads) != 2 || string(reads[0].JSON) != string(realtime.ReadFrame([]string{"n0"}, 2).JSON) ||
		string(reads[1].JSON) != string(realtime.ReadFrame(nil, 3).JSON) {
		t.Fatalf("reads taken: %q", describeFrames(reads))
	}
	if got := f.poll(t, 0, 0); got != "1" {
		t.Fatalf("poll after the reads were taken = %q, want 1", got)
	}
}

// An adopted session sends a read once whether it came from this node's
// broadcast, from the old copy's relay, or both, in either order and
// whether or not a poll took the first copy already; a relayed read wakes a
// waiting poll.
func TestLongPollRelayedReadOnce(t *testing.T) {
	f := newPollFixture(t, 64)
	f.adopted()
	read := func(id string) realtime.Frame { return realtime.ReadFrame([]string{id}, 1) }

	// Here first, still queued; then the relay.
	f.hub.BroadcastRead("alice", []string{"a"}, 1)
	f.lp.relay(read("a"))
	if got := f.poll(t, 0, 0); got != "read" {
		t.Fatalf("queued here, then relayed: %q, want one read", got)
	}
	// Here first, already answered; then the relay.
	f.hub.BroadcastRead("alice", []string{"b"}, 1)
	if got := f.poll(t, 0, 0); got != "read" {
		t.Fatalf("read here: %q", got)
	}
	f.lp.relay(read("b"))
	if got := f.poll(t, 0, 0); got != "" {
		t.Fatalf("relayed after it was sent here: %q, want nothing", got)
	}
	// The relay first; then here.
	f.lp.relay(read("c"))
	f.hub.BroadcastRead("alice", []string{"c"}, 1)
	if got := f.poll(t, 0, 0); got != "read" {
		t.Fatalf("relayed, then here: %q, want one read", got)
	}
	// Relayed only, to a waiting poll.
	done := make(chan string, 1)
	go func() { done <- f.poll(t, 0, 5*time.Second) }()
	time.Sleep(50 * time.Millisecond)
	f.lp.relay(read("d"))
	select {
	case got := <-done:
		if got != "read" {
			t.Fatalf("relayed only: %q, want one read", got)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("a relayed read did not wake the waiting poll")
	}
	// Other reads here are untouched.
	f.hub.BroadcastRead("alice", []string{"e"}, 0)
	if got := f.poll(t, 0, 0); got != "read" {
		t.Fatalf("read here only: %q", got)
	}
}
