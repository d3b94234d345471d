package store_test

import (
	"fmt"
	"math/rand/v2"
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
			b.ReportMetric(float64(st.PublishOneCalls)/float64(max(st.PublishOneGroups, 1)), "calls/tx")
		})
	}
}
