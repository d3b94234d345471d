package handlers

import (
	"net/http/httptest"
	"testing"
	"time"
)

// BenchmarkAuthClient: authenticating one client token, as every connect does.
func BenchmarkAuthClient(b *testing.B) {
	a := NewAuth("secret-for-the-benchmark", "", nil)
	tok, err := a.NewToken("user-123", "phone", time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	r := httptest.NewRequest("GET", "/v1/ws?token="+tok, nil)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := a.Client(r); err != nil {
			b.Fatal(err)
		}
	}
}
