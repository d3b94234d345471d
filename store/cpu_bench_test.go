package store_test

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/notifyd/notifyd/store"
)

// processCPU is the CPU this process (the store's Go side, not Postgres)
// has used so far.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportGoCPU reports the process's CPU per row since start, in µs: what a
// publish costs the server apart from Postgres and the wait.
func reportGoCPU(b *testing.B, start time.Duration, rows int) {
	if rows > 0 {
		b.ReportMetric(float64(processCPU(b)-start)/float64(rows)/1e3, "go-cpu-µs/row")
	}
}

// backendCPU sums the CPU, read from /proc, of the Postgres backends behind
// the idle connections of s's pool (all of them, between benchmark loops),
// by backend pid. It is empty when Postgres runs elsewhere.
func backendCPU(b *testing.B, s *store.Store) map[int]time.Duration {
	out := map[int]time.Duration{}
	for _, c := range s.Pool().AcquireAllIdle(testCtx(b)) {
		var pid int
		err := c.QueryRow(testCtx(b), "SELECT pg_backend_pid()").Scan(&pid)
		c.Release()
		if err != nil {
			b.Fatal(err)
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		out[pid] = time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ is 100 on Linux
	}
	return out
}

// reportBackendCPU reports what the pool's backends spent per row since
// before (a backend not in before was opened meanwhile: all of its CPU).
func reportBackendCPU(b *testing.B, s *store.Store, before map[int]time.Duration, rows int) {
	now := backendCPU(b, s)
	if len(now) == 0 || rows == 0 {
		return
	}
	var sum time.Duration
	for pid, t := range now {
		sum += t - before[pid]
	}
	b.ReportMetric(float64(sum)/float64(rows)/1e3, "pg-cpu-µs/row")
}
