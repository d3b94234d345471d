// Package storetest gives each test its own Postgres schema (and a migrated Store in it).
//
// The database comes from $NOTIFYD_TEST_DATABASE_URL (default
// postgres://127.0.0.1:5432/test?sslmode=disable). No mocks: tests run against real Postgres.
package storetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store"
)

// DefaultURL is the test database used when $NOTIFYD_TEST_DATABASE_URL is unset.
const DefaultURL = "postgres://127.0.0.1:5432/test?sslmode=disable"

// BaseURL returns the test database URL (without a per-test schema).
func BaseURL() string {
	if u := os.Getenv("NOTIFYD_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return DefaultURL
}

// URL returns a Postgres URL for a fresh schema (named t_<random>) in the test database, with
// search_path=<schema> in the URL so any process using it works in that schema. The schema
// is created now and dropped (CASCADE) in t.Cleanup. Migrations are not applied.
func URL(t testing.TB) string {
	t.Helper()
	base := BaseURL()
	var b [8]byte
	_, _ = rand.Read(b[:])
	schema := "t_" + hex.EncodeToString(b[:])

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("storetest: connect to %s: %v", base, err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("storetest: create schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Errorf("storetest: drop schema %s: connect: %v", schema, err)
			return
		}
		defer conn.Close(context.Background())
		if _, err := conn.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Errorf("storetest: drop schema %s: %v", schema, err)
		}
	})
	return withSearchPath(t, base, schema)
}

func withSearchPath(t testing.TB, base, schema string) string {
	if strings.HasPrefix(base, "postgres://") || strings.HasPrefix(base, "postgresql://") {
		u, err := url.Parse(base)
		if err != nil {
			t.Fatalf("storetest: parse %s: %v", base, err)
		}
		q := u.Query()
		q.Set("search_path", schema)
		u.RawQuery = q.Encode()
		return u.String()
	}
	return base + " search_path=" + schema // keyword/value form
}

// New returns an opened and migrated *store.Store on URL(t), closed in t.Cleanup.
func New(t testing.TB) *store.Store {
	t.Helper()
	return NewWithOptions(t, store.Options{})
}

// NewWithOptions is New with the given store options.
func NewWithOptions(t testing.TB, opt store.Options) *store.Store {
	t.Helper()
	u := URL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := store.Open(ctx, u, opt)
	if err != nil {
		t.Fatalf("storetest: open: %v", err)
	}
	t.Cleanup(s.Close)
	if err := s.Migrate(ctx); err != nil {
		t.Fatalf("storetest: migrate: %v", err)
	}
	return s
}
