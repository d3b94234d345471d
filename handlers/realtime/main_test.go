package realtime

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that no test leaves goroutines behind (sweepers, shutdown
// waiters, dispatch loops, session writers).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
