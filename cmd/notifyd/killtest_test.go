package main

// The server binary as a child process: kill -9 right after a 201 loses nothing, and SIGTERM
// drains (bye shutdown, close 1012, exit 0, no 2xx without its row).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/notifyd/notifyd/handlers"
	"github.com/notifyd/notifyd/store/storetest"
)

// buildNotifyd builds this package's binary into a temporary directory.
func buildNotifyd(t testing.TB) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(os.Getenv("GOROOT"), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "notifyd")
	cmd := exec.Command(goBin, "build", "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// lockedBuffer collects a child's output from its copying goroutine.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// procServer is the notifyd binary running as a child process.
type procServer struct {
	cmd    *exec.Cmd
	out    *lockedBuffer
	exited chan struct{}
	err    error // the result of Wait, once exited is closed
	*testServer
}

// freeAddr returns a loopback address with a port nobody listens on now.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// startProc runs bin on dbURL and waits until it answers /healthz; env adds NAME=value settings.
func startProc(t testing.TB, bin, dbURL string, env ...string) *procServer {
	t.Helper()
	addr := freeAddr(t)
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(),
		"DATABASE_URL="+dbURL, "NOTIFY_ADDR="+addr,
		"NOTIFY_JWT_SECRET="+testSecret, "NOTIFY_API_KEY="+testAPIKey,
		"NOTIFY_LOG_LEVEL=warn", "NOTIFY_DEV=false")
	cmd.Env = append(cmd.Env, env...)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start notifyd: %v", err)
	}
	c := &procServer{cmd: cmd, out: out, exited: make(chan struct{}),
		testServer: &testServer{URL: "http://" + addr, DBURL: dbURL, auth: handlers.NewAuth(testSecret, testAPIKey, nil)}}
	go func() {
		c.err = cmd.Wait()
		close(c.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-c.exited
		if t.Failed() {
			t.Logf("notifyd output:\n%s", out.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(c.URL + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return c
			}
		}
		select {
		case <-c.exited:
			t.Fatalf("notifyd exited at start: %v\n%s", c.err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("notifyd did not answer /healthz within 30s\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitExit waits for the child to exit and returns its exit code.
func (c *procServer) waitExit(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-c.exited:
	case <-time.After(timeout):
		t.Fatalf("notifyd still running after %s\n%s", timeout, c.out.String())
	}
	var ee *exec.ExitError
	switch {
	case c.err == nil:
		return 0
	case errors.As(c.err, &ee):
		return ee.ExitCode()
	default:
		t.Fatalf("wait: %v", c.err)
		return -1
	}
}

// publishOutcome is what one publish attempt got.
type publishOutcome struct {
	user   string
	status int
	note   publishedNote
	err    error
}

// pump publishes single notifications for user until stop is closed or a request gets no
// answer while the server is gone, sends every outcome to out and counts the 201s in created.
func pump(client *http.Client, base, user string, stop, exited <-chan struct{}, out chan<- publishOutcome, created *atomic.Int64) {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		var note publishedNote
		st, err := apiPost(client, base, "/v1/notifications",
			map[string]any{"user_id": user, "topic": "pump", "data": map[string]int{"i": i}}, &note)
		out <- publishOutcome{user: user, status: st, note: note, err: err}
		if err == nil && st == http.StatusCreated {
			created.Add(1)
		}
		if err != nil {
			select {
			case <-exited:
				return
			default:
				time.Sleep(5 * time.Millisecond)
			}
		}
	}
}

// pumps are n pump goroutines (users prefix-0 .. prefix-<n-1>) publishing to one server.
type pumps struct {
	stop     chan struct{}
	wg       sync.WaitGroup
	outcomes chan publishOutcome
}

// startPumps starts the pumps and returns once they had 10 publishes answered 201, so that a
// signal sent next lands on publishes in flight.
func startPumps(t testing.TB, client *http.Client, base, prefix string, n int, exited <-chan struct{}) *pumps {
	t.Helper()
	p := &pumps{stop: make(chan struct{}), outcomes: make(chan publishOutcome, 100000)}
	var pumped atomic.Int64
	for i := range n {
		p.wg.Go(func() { pump(client, base, fmt.Sprintf("%s-%d", prefix, i), p.stop, exited, p.outcomes, &pumped) })
	}
	deadline := time.Now().Add(20 * time.Second)
	for pumped.Load() < 10 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d publishes answered 201 in 20s", pumped.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return p
}

// end stops the pumps and returns every outcome, once all of them have returned.
func (p *pumps) end() <-chan publishOutcome {
	close(p.stop)
	p.wg.Wait()
	close(p.outcomes)
	return p.outcomes
}

// TestServerProcess runs the built binary: kill -9 and SIGTERM (one build for both).
func TestServerProcess(t *testing.T) {
	t.Parallel()
	bin := buildNotifyd(t)
	t.Run("kill -9 keeps what was answered 201", func(t *testing.T) { testKill9KeepsCommitted(t, bin) })
	t.Run("SIGTERM drains", func(t *testing.T) { testSIGTERMDrains(t, bin) })
}

// testKill9KeepsCommitted: a publish answered 201 survives kill -9 of the server right after,
// and so does every publish that was answered 201 while the kill happened; the restarted server
// replays them, and seqs stay dense (a transaction cut by the kill gives its seq back).
func testKill9KeepsCommitted(t *testing.T, bin string) {
	dbURL := storetest.URL(t)
	first := startProc(t, bin, dbURL)

	pumping := startPumps(t, publishClient(t), first.URL, "pumped", 3, first.exited)

	p := first.publish(t, "kim", "before.kill", map[string]any{"n": 1})
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if code := first.waitExit(t, 10*time.Second); code != -1 {
		t.Fatalf("exit code %d after SIGKILL", code)
	}
	outcomes := pumping.end()

	second := startProc(t, bin, dbURL)
	c := second.dialWS(t, "kim", map[string][]string{"cursor": {"0"}})
	c.expect(t, "hello")
	rep := c.expect(t, "notification")
	if rep.ID != p.ID || rep.Seq != p.Seq || !rep.Replayed || rep.Topic != "before.kill" {
		t.Fatalf("replay after kill -9 = %+v, want %+v", rep, p)
	}
	if s := c.expect(t, "synced"); s.Cursor != p.Seq || s.Unread != 1 {
		t.Fatalf("synced = %+v", s)
	}

	conn := pgConn(t, dbURL)
	created := 0
	for o := range outcomes {
		if o.err != nil {
			continue // no answer: the server was killed under it
		}
		if o.status != http.StatusCreated {
			t.Errorf("pump %s: status %d", o.user, o.status)
			continue
		}
		created++
		if n := countRows(t, conn, "id = $1 AND user_id = $2 AND seq = $3", o.note.ID, o.user, o.note.Seq); n != 1 {
			t.Errorf("answered 201 %+v but not in Postgres after kill -9", o.note)
		}
	}
	if created == 0 {
		t.Fatal("no publish was answered 201 before the kill")
	}
	// Dense: each user's seqs are 1..count, and the next publish continues from there.
	for i := range 3 {
		user := fmt.Sprintf("pumped-%d", i)
		n := countRows(t, conn, "user_id = $1", user)
		if dense := countRows(t, conn, "user_id = $1 AND seq BETWEEN 1 AND $2", user, n); dense != n {
			t.Errorf("%s: %d rows, only %d with seq in 1..%d", user, n, dense, n)
		}
		if next := second.publish(t, user, "after.restart", nil); next.Seq != n+1 {
			t.Errorf("%s: publish after restart got seq %d, want %d", user, next.Seq, n+1)
		}
	}
	t.Logf("%d publishes answered 201 around the kill, all stored", created)
}

// testSIGTERMDrains: on SIGTERM, connected WebSocket clients get bye shutdown with retry_ms and
// close 1012, the process exits 0, and a publish in flight either got 201 with its row stored
// or never got an answer (refused or cut before the request was read): never 2xx without the row.
func testSIGTERMDrains(t *testing.T, bin string) {
	dbURL := storetest.URL(t)
	srv := startProc(t, bin, dbURL)

	var clients []*wsClient
	for _, u := range []string{"tess", "tess", "uma"} {
		c := srv.dialWS(t, u, nil)
		c.expect(t, "hello")
		c.expect(t, "synced")
		clients = append(clients, c)
	}

	pumping := startPumps(t, publishClient(t), srv.URL, "drain", 4, srv.exited)
	if err := srv.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	for i, c := range clients {
		var bye msg
		for bye.Type != "bye" {
			bye = c.next(t, 10*time.Second)
			if bye.Type != "bye" && bye.Type != "notification" {
				t.Fatalf("client %d: %+v before bye", i, bye)
			}
		}
		if bye.Reason != "shutdown" || bye.RetryMs <= 0 {
			t.Fatalf("client %d: bye = %+v, want shutdown with retry_ms > 0", i, bye)
		}
		err := c.waitClosed(t, 10*time.Second)
		var ce *websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != websocket.CloseServiceRestart {
			t.Fatalf("client %d: closed with %v, want 1012", i, err)
		}
	}
	if code := srv.waitExit(t, 15*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0\n%s", code, srv.out.String())
	}
	outcomes := pumping.end() // the pumps have stopped on the exit

	conn := pgConn(t, dbURL)
	var created, noAnswer, refused int
	var cuts []string
	for o := range outcomes {
		switch {
		case o.err != nil:
			noAnswer++
			if strings.Contains(o.err.Error(), "connection refused") {
				refused++
			} else {
				cuts = append(cuts, o.err.Error())
			}
		case o.status == http.StatusCreated:
			created++
			if n := countRows(t, conn, "id = $1 AND user_id = $2 AND seq = $3", o.note.ID, o.user, o.note.Seq); n != 1 {
				t.Errorf("answered 201 %+v during the drain but not stored", o.note)
			}
		case o.status == http.StatusServiceUnavailable:
		default:
			t.Errorf("%s: status %d during the drain", o.user, o.status)
		}
	}
	if created == 0 || refused == 0 {
		t.Fatalf("%d publishes answered 201, %d refused: the drain was not exercised", created, refused)
	}
	// Every stored row of the pumps was answered: nothing committed behind a refusal is
	// possible only for requests cut mid-flight, which are counted in noAnswer.
	var stored int64
	if err := conn.QueryRow(context.Background(), "SELECT count(*) FROM notifications WHERE topic = 'pump'").Scan(&stored); err != nil {
		t.Fatal(err)
	}
	if stored < int64(created) || stored > int64(created+noAnswer-refused) {
		t.Errorf("%d rows stored, %d answered 201, %d cut without an answer", stored, created, noAnswer-refused)
	}
	t.Logf("drain: %d publishes answered 201 (all stored), %d refused, %d cut before an answer %q", created, refused, noAnswer-refused, cuts)
}
