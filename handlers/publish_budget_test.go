package handlers

import (
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// The budget refuses a body that would overrun it while others hold bytes,
// admits one alone whatever its size, and gets its bytes back on release.
func TestPublishBudget(t *testing.T) {
	b := &publishBudget{max: 1000}
	body := func(n int) string { return strings.Repeat("x", n) }

	first, err := b.admit(httptest.NewRequest("POST", "/", strings.NewReader(body(600))))
	if err != nil {
		t.Fatalf("first: %v", err)
	}
	if _, err := b.admit(httptest.NewRequest("POST", "/", strings.NewReader(body(600)))); !errors.Is(err, errPublishBusy) {
		t.Fatalf("600 bytes on top of 600 of 1000: %v, want busy", err)
	}
	small, err := b.admit(httptest.NewRequest("POST", "/", strings.NewReader(body(300))))
	if err != nil {
		t.Fatalf("300 bytes on top of 600: %v", err)
	}
	small()
	first()
	if b.used.Load() != 0 {
		t.Fatalf("%d bytes held after every release", b.used.Load())
	}
	alone, err := b.admit(httptest.NewRequest("POST", "/", strings.NewReader(body(5000))))
	if err != nil {
		t.Fatalf("5000 bytes alone: %v, want admitted (the budget never refuses a lone request)", err)
	}
	alone()

	// A chunked body (no length) is charged as it is read.
	held, _ := b.admit(httptest.NewRequest("POST", "/", strings.NewReader(body(900))))
	r := httptest.NewRequest("POST", "/", strings.NewReader(body(500)))
	r.ContentLength = -1
	release, err := b.admit(r)
	if err != nil {
		t.Fatalf("chunked admit: %v", err)
	}
	if _, err := io.ReadAll(r.Body); !errors.Is(err, errPublishBusy) {
		t.Fatalf("reading 500 chunked bytes on top of 900: %v, want busy", err)
	}
	release()
	held()
	if b.used.Load() != 0 {
		t.Fatalf("%d bytes held after every release", b.used.Load())
	}
	var none *publishBudget
	if rel, err := none.admit(r); err != nil {
		t.Fatal(err)
	} else {
		rel()
	}
}

// BenchmarkPublishBudget is the cost of charging and releasing one body of known length.
func BenchmarkPublishBudget(b *testing.B) {
	budget := &publishBudget{max: 1 << 30}
	r := httptest.NewRequest("POST", "/", strings.NewReader("{}"))
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			release, err := budget.admit(r)
			if err != nil {
				b.Fatal(err)
			}
			release()
		}
	})
}
