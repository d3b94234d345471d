package store_test

import (
	"context"
	"fmt"
	"io/fs"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/migrations"
	"github.com/notifyd/notifyd/store"
	"github.com/notifyd/notifyd/store/storetest"
)

func TestEnsureDatabase(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	base := storetest.BaseURL()
	if !strings.HasPrefix(base, "postgres://") && !strings.HasPrefix(base, "postgresql://") {
		t.Skip("needs a URL-form NOTIFYD_TEST_DATABASE_URL")
	}
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("notifyd_ensure_%d", time.Now().UnixNano())
	u.Path = "/" + name
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	// Cleanup runs after the test returns: the admin connection must outlive it.
	t.Cleanup(func() {
		if _, err := admin.Exec(context.Background(), "DROP DATABASE IF EXISTS "+name); err != nil {
			t.Errorf("drop %s: %v", name, err)
		}
		_ = admin.Close(context.Background())
	})
	var wg sync.WaitGroup
	for range 3 { // nodes starting at once
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := store.EnsureDatabase(ctx, u.String()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := store.EnsureDatabase(ctx, u.String()); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := admin.QueryRow(ctx, "SELECT count(*) FROM pg_database WHERE datname = $1", name).Scan(&n); err != nil || n != 1 {
		t.Fatalf("database count %d, %v", n, err)
	}
}

func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	u := storetest.URL(t)
	ctx := testCtx(t)
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := store.Open(ctx, u, store.Options{MaxConns: 2})
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close()
			if err := s.Migrate(ctx); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	s, err := store.Open(ctx, u, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Migrate(ctx); err != nil { // again: nothing to do
		t.Fatal(err)
	}
	files, err := fs.Glob(migrations.FS, "*.sql")
	if err != nil {
		t.Fatal(err)
	}
	var version int
	if err := s.Pool().QueryRow(ctx, "SELECT version FROM schema_version").Scan(&version); err != nil || version != len(files) {
		t.Fatalf("version %d, want %d, %v", version, len(files), err)
	}
	if err := s.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	// The tables are in the test schema, not in public.
	var schema string
	if err := s.Pool().QueryRow(ctx, "SELECT schemaname FROM pg_tables WHERE tablename = 'notifications' AND schemaname LIKE 't\\_%' AND schemaname = current_schema()").Scan(&schema); err != nil {
		t.Fatalf("notifications not in the test schema: %v", err)
	}
}

func TestOpenBadURL(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := store.Open(ctx, "postgres://127.0.0.1:1/nope?connect_timeout=1", store.Options{}); err == nil {
		t.Fatal("Open on a closed port succeeded")
	}
}
