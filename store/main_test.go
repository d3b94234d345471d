package store_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that no test leaves goroutines behind (group-commit loop, listener, recorder,
// pool background work).
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
