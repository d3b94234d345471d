package store_test

import (
	"syscall"
	"testing"
	"time"
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
