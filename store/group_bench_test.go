package store_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// BenchmarkPublishOneGroupWait: 64 concurrent single publishes (the
// publish-single scenario's publishers) with no group window (the default)
// and with a window of 1 ms, side by side in one run: what the wait for a
// fuller group costs in throughput against what it saves in transactions.
func BenchmarkPublishOneGroupWait(b *testing.B) {
	users := make([]string, 5000)
	for i := range users {
		users[i] = fmt.Sprintf("user-%d", i)
	}
	for _, wait := range []time.Duration{0, time.Millisecond} {
		b.Run(fmt.Sprintf("wait=%s", wait), func(b *testing.B) {
			s := storetest.NewWithOptions(b, store.Options{GroupCommitWait: wait})
			ctx := testCtx(b)
			b.SetParallelism(32) // 32 x GOMAXPROCS (2) callers
			// Open the pool's connections before the backends' CPU is read.
			warm := make(chan error, 64)
			for i := range 64 {
				go func() { _, err := s.PublishOne(ctx, note(users[i])); warm <- err }()
			}
			for range 64 {
				if err := <-warm; err != nil {
					b.Fatal(err)
				}
			}
			pg := backendCPU(b, s)
			b.ResetTimer()
			cpu := processCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := s.PublishOne(ctx, note(users[rand.IntN(len(users))])); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			reportGoCPU(b, cpu, b.N)
			reportBackendCPU(b, s, pg, b.N)
			st := s.Stats()
			b.ReportMetric(float64(st.PublishOneCalls)/float64(max(st.PublishGroups, 1)), "calls/tx")
		})
	}
}

// BenchmarkPublishBatchesConcurrent: four closed-loop publishers of batches of
// 100 random users (the publish-batch-100 scenario's load, without HTTP or
// delivery), 25 batches each per op: how tight the store keeps their request
// times, the mean and the p99 over every batch of the run.
func BenchmarkPublishBatchesConcurrent(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	const publishers, batches, rows = 4, 25, 100
	var (
		mu  sync.Mutex
		lat []time.Duration
	)
	b.ResetTimer()
	for b.Loop() {
		var wg sync.WaitGroup
		for range publishers {
			wg.Go(func() {
				for range batches {
					ns := make([]store.NewNotification, rows)
					for i := range ns {
						ns[i] = note(fmt.Sprintf("user-%d", rand.IntN(5000)))
					}
					start := time.Now()
					if _, err := s.Publish(ctx, ns); err != nil {
						b.Error(err)
						return
					}
					d := time.Since(start)
					mu.Lock()
					lat = append(lat, d)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
	}
	b.StopTimer()
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	b.ReportMetric(float64(sum.Microseconds())/float64(len(lat))/1000, "mean-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
	st := s.Stats()
	b.ReportMetric(float64(len(lat))/float64(max(st.PublishGroups, 1)), "batches/tx")
}
