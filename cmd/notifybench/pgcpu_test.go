package main

import (
	"context"
	"os"
	"slices"
	"strconv"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/notifyd/notifyd/store/storetest"
)

func TestParseClientPorts(t *testing.T) {
	// Two connections to 5432 (0x1538), one of them not ours, and a listener.
	table := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:B94E 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 1111 1 0 20 4 30 10 -1
   1: 0100007F:B950 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 2222 1 0 20 4 30 10 -1
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3333 1 0 100 0 0 10 0
   3: 0100007F:C000 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 20 4 30 10 -1
`
	got := parseClientPorts(table, map[string]bool{"1111": true, "3333": true, "4444": true}, pgPort)
	if len(got) != 1 || !got[0xB94E] {
		t.Fatalf("ports %v, want only %d", got, 0xB94E)
	}
}

// TestOwnBackends opens a connection to the test database and finds the
// backend serving it among the machine's Postgres processes (and no other).
func TestOwnBackends(t *testing.T) {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, storetest.BaseURL())
	if err != nil {
		t.Skip("no database:", err)
	}
	defer conn.Close(ctx)
	var pid int
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err != nil {
		t.Skip("Postgres is not on this machine")
	}
	got := ownBackends(os.Getpid())
	if !slices.Contains(got, pid) {
		t.Fatalf("own backends %v do not hold %d", got, pid)
	}
	if len(got) != 1 {
		t.Errorf("own backends %v, want only %d", got, pid)
	}
	ticks := backendTicks(got)
	if _, ok := ticks[pid]; !ok {
		t.Errorf("no CPU reading for backend %d", pid)
	}
	if ticksSince(map[int]int64{pid: ticks[pid] + 5}, ticks) != -5 || ticksSince(nil, ticks) != ticks[pid] {
		t.Error("ticksSince does not subtract per backend")
	}
}
