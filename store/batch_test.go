package store

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// echoReq is a batched request whose result is its own value doubled.
type echoReq struct {
	batchItem
	in, out int
}

// TestBatcherCombinesConcurrentCalls: while one statement runs, the requests
// that come meanwhile wait and then go as one batch; each caller gets its
// own result; a caller whose context ends gets its error without failing the
// batch it was in; a lone call runs at once.
func TestBatcherCombinesConcurrentCalls(t *testing.T) {
	release := make(chan struct{})
	var runs atomic.Int32
	var sizes []int
	var mu sync.Mutex
	b := newBatcher(1, 64, func(batch []*echoReq) {
		if runs.Add(1) == 1 {
			<-release // the first statement is slow: the others queue behind it
		}
		mu.Lock()
		sizes = append(sizes, len(batch))
		mu.Unlock()
		for _, r := range batch {
			r.out = 2 * r.in
		}
	})
	ctx := context.Background()
	first := &echoReq{batchItem: newBatchItem(), in: -1}
	firstDone := make(chan error, 1)
	go func() { firstDone <- b.do(ctx, first) }()
	for runs.Load() == 0 {
		time.Sleep(time.Millisecond)
	}

	const n = 40
	reqs := make([]*echoReq, n)
	errs := make(chan error, n)
	for i := range reqs {
		reqs[i] = &echoReq{batchItem: newBatchItem(), in: i}
		go func() { errs <- b.do(ctx, reqs[i]) }()
	}
	quitter := &echoReq{batchItem: newBatchItem(), in: 1000}
	quitCtx, quit := context.WithCancel(ctx)
	quitDone := make(chan error, 1)
	go func() { quitDone <- b.do(quitCtx, quitter) }()
	for len(b.pending) < n+1 {
		time.Sleep(time.Millisecond)
	}
	quit()
	if err := <-quitDone; !errors.Is(err, context.Canceled) {
		t.Fatalf("a caller whose context ended: %v, want context.Canceled", err)
	}
	close(release)
	if err := <-firstDone; err != nil || first.out != -2 {
		t.Fatalf("first: %v, out %d", err, first.out)
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for i, r := range reqs {
		if r.out != 2*i {
			t.Fatalf("request %d got %d, want %d", i, r.out, 2*i)
		}
	}
	mu.Lock()
	got := append([]int(nil), sizes...)
	mu.Unlock()
	// The quitter is still in the second batch: whoever runs it drops its result.
	if len(got) != 2 || got[0] != 1 || got[1] != n+1 {
		t.Fatalf("batch sizes %v, want [1 %d]: the waiting requests go in one statement", got, n+1)
	}

	lone := &echoReq{batchItem: newBatchItem(), in: 7}
	if err := b.do(ctx, lone); err != nil || lone.out != 14 {
		t.Fatalf("lone call: %v, out %d", err, lone.out)
	}
}
