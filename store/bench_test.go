package store_test

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

// BenchmarkPublishOne: many concurrent single publishes (group commit).
func BenchmarkPublishOne(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	users := make([]string, 1000)
	for i := range users {
		users[i] = fmt.Sprintf("user-%d", i)
	}
	b.SetParallelism(16) // 16 x GOMAXPROCS callers
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
	st := s.Stats()
	b.ReportMetric(float64(st.PublishOneCalls)/float64(max(st.PublishGroups, 1)), "calls/tx")
}

// BenchmarkPublishBatch1000: one Publish of 1,000 notifications for random users per op.
func BenchmarkPublishBatch1000(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	ns := make([]store.NewNotification, 1000)
	users := make([]string, 10000)
	for i := range users {
		users[i] = fmt.Sprintf("user-%d", i)
	}
	b.ResetTimer()
	cpu := processCPU(b)
	for b.Loop() {
		for i := range ns {
			ns[i] = note(users[rand.IntN(len(users))])
		}
		if _, err := s.Publish(ctx, ns); err != nil {
			b.Fatal(err)
		}
	}
	reportGoCPU(b, cpu, b.N*len(ns))
	b.ReportMetric(float64(b.N)*1000/b.Elapsed().Seconds(), "rows/s")
}

// BenchmarkReplayLone: one quiet-time connect's replay of its one unread, alone, so its
// statement is not shared: its cost is mostly the statement's, planning included.
func BenchmarkReplayLone(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	for i := range 200 {
		mustPublish(b, s, note(fmt.Sprintf("lone-%d", i)))
	}
	if _, err := s.Pool().Exec(ctx, "ANALYZE notifications"); err != nil {
		b.Fatal(err)
	}
	i := 0
	for b.Loop() {
		got, unread, _, err := s.Replay(ctx, fmt.Sprintf("lone-%d", i%200), 0, 1000, 0)
		if err != nil || len(got) != 1 || unread != 1 {
			b.Fatalf("replay: %d rows, unread %d, %v", len(got), unread, err)
		}
		i++
	}
}

// BenchmarkReplay1000: a connect that replays 1,000 unread notifications.
func BenchmarkReplay1000(b *testing.B) {
	s := storetest.New(b)
	ctx := testCtx(b)
	ns := make([]store.NewNotification, 1000)
	for i := range ns {
		ns[i] = note("reader")
	}
	mustPublish(b, s, ns...)
	mustPublish(b, s, ns[:500]...) // 1,500 unread: the replay is truncated
	if _, err := s.Pool().Exec(ctx, "ANALYZE notifications"); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		got, unread, truncated, err := s.Replay(ctx, "reader", 0, 1000, 0)
		if err != nil || len(got) != 1000 || unread != 1500 || !truncated {
			b.Fatalf("replay: %d rows, unread %d, truncated %v, %v", len(got), unread, truncated, err)
		}
	}
}
