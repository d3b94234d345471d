package store

import (
	"context"
	"errors"
	"testing"
)

// TestUserGate: at most per holders of one user at once; a waiter whose
// context ends gets its error; a release lets the next one in; other users
// are not held up; idle users leave nothing behind.
func TestUserGate(t *testing.T) {
	g := userGate{per: 2}
	ctx := context.Background()
	r1, err1 := g.acquire(ctx, "u")
	r2, err2 := g.acquire(ctx, "u")
	if err1 != nil || err2 != nil {
		t.Fatalf("first two: %v, %v", err1, err2)
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := g.acquire(ended, "u"); !errors.Is(err, context.Canceled) {
		t.Fatalf("third with an ended context: %v", err)
	}
	rv, err := g.acquire(ended, "v")
	if err != nil {
		// A free slot and an ended context are both ready; either may win.
		rv, err = g.acquire(ctx, "v")
	}
	if err != nil {
		t.Fatalf("another user: %v", err)
	}
	rv()

	got := make(chan error, 1)
	go func() {
		r3, err := g.acquire(ctx, "u")
		if err == nil {
			r3()
		}
		got <- err
	}()
	r1()
	if err := <-got; err != nil {
		t.Fatalf("third after a release: %v", err)
	}
	r2()
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.users) != 0 {
		t.Fatalf("idle users kept: %v", g.users)
	}
}
