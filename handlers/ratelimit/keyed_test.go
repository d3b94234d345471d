package ratelimit

import (
	"fmt"
	"testing"
	"time"
)

// clock is a settable time for a Keyed.
type clock struct{ t time.Time }

func (c *clock) now() time.Time      { return c.t }
func (c *clock) add(d time.Duration) { c.t = c.t.Add(d) }
func newKeyed(l Limit, max int) (*Keyed, *clock) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	k := New(l, max)
	k.now = c.now
	return k, c
}

func TestBurstThenRefusedWithRetryAfter(t *testing.T) {
	k, c := newKeyed(Limit{Rate: 1, Burst: 3}, 0)
	for i := range 3 {
		if ok, _ := k.Allow("alice"); !ok {
			t.Fatalf("take %d of a burst of 3 refused", i+1)
		}
	}
	ok, after := k.Allow("alice")
	if ok || after <= 0 || after > time.Second {
		t.Fatalf("fourth take: %v, retry after %s; want refused, within 1s", ok, after)
	}
	if ok, _ := k.Allow("bob"); !ok {
		t.Error("another key was refused")
	}
	c.add(after)
	if ok, _ := k.Allow("alice"); !ok {
		t.Error("refused after the given Retry-After")
	}
	if k.Refused() != 1 {
		t.Errorf("%d refused; want 1", k.Refused())
	}
}

func TestOffAllowsAll(t *testing.T) {
	k, _ := newKeyed(Limit{}, 0)
	for range 1000 {
		if ok, _ := k.Allow("x"); !ok {
			t.Fatal("a zero Limit refused")
		}
	}
	var nilKeyed *Keyed
	if ok, _ := nilKeyed.Allow("x"); !ok {
		t.Fatal("a nil Keyed refused")
	}
}

// Keys idle for a whole refill are dropped; the map never holds more than maxKeys.
func TestMemoryBounded(t *testing.T) {
	k, c := newKeyed(Limit{Rate: 10, Burst: 10}, 100) // refill 1s
	for i := range 1000 {
		k.Allow(fmt.Sprint("busy", i))
		if n := k.Len(); n > 100 {
			t.Fatalf("%d keys held; want at most 100", n)
		}
	}
	c.add(500 * time.Millisecond) // none idle yet: one busy key gives way
	k.Allow("late")
	if n := k.Len(); n != 100 {
		t.Errorf("%d keys at the cap; want 100", n)
	}
	c.add(sweepEvery)
	k.Allow("later")
	if n := k.Len(); n != 1 {
		t.Errorf("%d keys after a minute idle; want 1 (the idle ones swept)", n)
	}
}

// A refused key is not reset by sweeping: it was used, so it is not idle.
func TestSweepKeepsBusyKeys(t *testing.T) {
	k, c := newKeyed(Limit{Rate: 1.0 / 120, Burst: 1}, 0) // refill 2 min
	k.Allow("alice")
	c.add(sweepEvery)
	if ok, _ := k.Allow("alice"); ok {
		t.Fatal("a sweep reset a bucket that was not full")
	}
}

func BenchmarkAllow(b *testing.B) {
	k := New(Limit{Rate: 1e9, Burst: 1 << 30}, 0)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = fmt.Sprint("user", i)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		k.Allow(keys[i&1023])
		i++
	}
}
