package main

// Helpers of the browser end-to-end tests (browser_test.go): a remote control
// of Debian's chromium through static/e2e/drive.mjs (playwright-core), real
// nginx and squid processes configured from static/e2e/proxies/*.tmpl, and
// notifyd itself as a child process for the restart case.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"
)

const e2eDir = "../../static/e2e"

// requireE2E skips the test when the browser tools are missing, unless
// NOTIFYD_E2E is set (as `make test` does after installing them): then a
// missing tool is a failure.
func requireE2E(t *testing.T, tools ...string) {
	t.Helper()
	need := append([]string{"node", chromiumPath()}, tools...)
	var missing []string
	for _, tool := range need {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if _, err := os.Stat(filepath.Join(e2eDir, "node_modules", "playwright-core")); err != nil {
		missing = append(missing, "playwright-core (npm ci in static/e2e)")
	}
	if len(missing) == 0 {
		return
	}
	if os.Getenv("NOTIFYD_E2E") != "" {
		t.Fatalf("NOTIFYD_E2E is set but %s missing (run .ci/e2e-deps)", strings.Join(missing, ", "))
	}
	t.Skipf("browser end-to-end test skipped: %s not installed (run .ci/e2e-deps, or make test, which does)", strings.Join(missing, ", "))
}

// e2eSlots bounds how many browser tests run at once ($NOTIFYD_E2E_PARALLEL,
// default 3): each drives a Chromium whose page has timeouts of its own, and
// more of them at once starve each other of CPU. Below make test-go's
// -parallel 4, so that browser tests waiting for a slot never hold every one
// of go test's.
var e2eSlots = make(chan struct{}, e2eParallel())

func e2eParallel() int {
	if n, err := strconv.Atoi(os.Getenv("NOTIFYD_E2E_PARALLEL")); err == nil && n > 0 {
		return n
	}
	return 3
}

// e2eSlot takes one of the browser slots until the test ends.
func e2eSlot(t *testing.T) {
	t.Helper()
	e2eSlots <- struct{}{}
	t.Cleanup(func() { <-e2eSlots })
}

func chromiumPath() string {
	if p := os.Getenv("CHROMIUM"); p != "" {
		return p
	}
	return "/usr/bin/chromium"
}

// sbin finds nginx and squid, which live in /usr/sbin (not always on PATH).
func sbin(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	return "/usr/sbin/" + name
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// waitPort waits until something accepts connections on addr.
func waitPort(t *testing.T, addr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s after %s: %v", addr, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitFor polls cond until it holds; on timeout it fails with cond's last words.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s; last state: %s", what, timeout, detail)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---- the browser ------------------------------------------------------------

// browser is a running drive.mjs: one JSON command per line in, one answer out.
type browser struct {
	t   *testing.T
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
	mu  sync.Mutex
	id  int
}

// startBrowser starts the driver; contexts are launched with launch.
func startBrowser(t *testing.T) *browser {
	t.Helper()
	cmd := exec.Command("node", "drive.mjs")
	cmd.Dir = e2eDir
	cmd.Env = append(os.Environ(), "CHROMIUM="+chromiumPath())
	cmd.Stderr = &testWriter{t: t}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node drive.mjs: %v", err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	b := &browser{t: t, cmd: cmd, in: in, out: sc}
	t.Cleanup(func() {
		_, _ = b.call(map[string]any{"cmd": "quit"})
		_ = in.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	})
	return b
}

func (b *browser) call(cmd map[string]any) (json.RawMessage, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.id++
	cmd["id"] = b.id
	line, err := json.Marshal(cmd)
	if err != nil {
		return nil, err
	}
	if _, err := b.in.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("driver: write: %w", err)
	}
	if !b.out.Scan() {
		return nil, fmt.Errorf("driver: no answer to %s: %v", cmd["cmd"], b.out.Err())
	}
	var ans struct {
		ID    int             `json:"id"`
		OK    bool            `json:"ok"`
		Value json.RawMessage `json:"value"`
		Error string          `json:"error"`
	}
	if err := json.Unmarshal(b.out.Bytes(), &ans); err != nil {
		return nil, fmt.Errorf("driver: bad answer %q: %w", b.out.Text(), err)
	}
	if !ans.OK {
		return nil, fmt.Errorf("driver: %s: %s", cmd["cmd"], ans.Error)
	}
	return ans.Value, nil
}

func (b *browser) must(cmd map[string]any) json.RawMessage {
	b.t.Helper()
	v, err := b.call(cmd)
	if err != nil {
		b.t.Fatal(err)
	}
	return v
}

// launch starts a fresh Chromium profile, through proxy when not empty.
func (b *browser) launch(ctx, proxy string) {
	b.t.Helper()
	args := map[string]any{"cmd": "launch", "ctx": ctx}
	if proxy != "" {
		args["proxy"] = proxy
	}
	b.must(args)
}

func (b *browser) open(ctx, page, url string) {
	b.t.Helper()
	b.must(map[string]any{"cmd": "open", "ctx": ctx, "page": page, "url": url})
}

// eval evaluates a JavaScript expression in page and decodes its value into out.
func (b *browser) eval(page, expr string, out any) {
	b.t.Helper()
	v := b.must(map[string]any{"cmd": "eval", "page": page, "expr": expr})
	if out != nil {
		if err := json.Unmarshal(v, out); err != nil {
			b.t.Fatalf("eval %s: %s: %v", expr, v, err)
		}
	}
}

func (b *browser) consoleErrors(page string) []string {
	b.t.Helper()
	var errs []string
	if err := json.Unmarshal(b.must(map[string]any{"cmd": "console", "page": page}), &errs); err != nil {
		b.t.Fatal(err)
	}
	return errs
}

// screenshot saves page as static/e2e/artifacts/<name>.png (gitignored).
func (b *browser) screenshot(page, name string) string {
	b.t.Helper()
	dir, err := filepath.Abs(filepath.Join(e2eDir, "artifacts"))
	if err != nil {
		b.t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.t.Fatal(err)
	}
	path := filepath.Join(dir, name+".png")
	b.must(map[string]any{"cmd": "screenshot", "page": page, "path": path})
	return path
}

// demoState is what the demo page (index.html) exposes as window.notifyDemo.
type demoState struct {
	State     string  `json:"state"`
	Transport string  `json:"transport"`
	Session   string  `json:"session"`
	Unread    *int64  `json:"unread"`
	Cursor    int64   `json:"cursor"`
	Received  []recvd `json:"received"`
	History   []struct {
		T         float64 `json:"t"`
		Event     string  `json:"event"`
		State     string  `json:"state"`
		Transport string  `json:"transport"`
		Reason    string  `json:"reason"`
		Message   string  `json:"message"`
		Role      string  `json:"role"`
		OK        bool    `json:"ok"`
		Ms        float64 `json:"ms"`
		Delay     *int64  `json:"delay"`
		Order     []string
		Source    string `json:"source"`
	} `json:"history"`
	Timings struct {
		Start             float64 `json:"start"`
		Hello             float64 `json:"hello"`
		FirstNotification float64 `json:"firstNotification"`
	} `json:"timings"`
	Errors []struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"errors"`
}

type recvd struct {
	ID        string  `json:"id"`
	Seq       int64   `json:"seq"`
	T         float64 `json:"t"`
	Transport string  `json:"transport"`
	Replayed  bool    `json:"replayed"`
	Recovered bool    `json:"recovered"`
}

const demoStateJS = `(() => {
  const d = window.notifyDemo, c = d && d.client;
  if (!c) return null;
  return { state: c.state, transport: c.transport, session: c.session, unread: c.unread, cursor: c.cursor,
    received: d.received, history: c.history, timings: c.timings, errors: d.errors };
})()`

// demo reads the demo page's state (zero value before the client exists).
func (b *browser) demo(page string) demoState {
	b.t.Helper()
	var s *demoState
	b.eval(page, demoStateJS, &s)
	if s == nil {
		return demoState{}
	}
	return *s
}

// brief is a one-line summary of the page's state for failure messages.
func (s demoState) brief() string {
	var h []string
	for _, e := range s.History {
		switch e.Event {
		case "attempt":
			h = append(h, fmt.Sprintf("%s %s ok=%v %s %.0fms", e.Role, e.Transport, e.OK, e.Reason, e.Ms))
		case "state":
			h = append(h, fmt.Sprintf("[%s %s: %s %q]", e.State, e.Transport, e.Reason, e.Message))
		case "share":
			h = append(h, "share "+e.Role)
		default:
			h = append(h, e.Event)
		}
	}
	return fmt.Sprintf("state=%s transport=%s received=%d errors=%v history=%s", s.State, s.Transport, len(s.Received), s.Errors, strings.Join(h, "; "))
}

// ---- proxies ----------------------------------------------------------------

// proxyProc is a proxy child process that can be stopped and started again.
type proxyProc struct {
	t    *testing.T
	name string
	dir  string
	port int
	args []string
	cmd  *exec.Cmd
	done chan struct{}
	// stopSignal and stopWait: how to stop it (squid takes seconds).
	stopWait time.Duration
}

func (p *proxyProc) addr() string { return fmt.Sprintf("127.0.0.1:%d", p.port) }

func (p *proxyProc) start() {
	p.t.Helper()
	cmd := exec.Command(sbin(p.name), p.args...)
	cmd.Dir = p.dir
	logf, err := os.OpenFile(filepath.Join(p.dir, p.name+".out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	p.cmd = cmd
	p.done = make(chan struct{})
	go func(done chan struct{}) { _ = cmd.Wait(); logf.Close(); close(done) }(p.done)
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-p.done:
			out, _ := os.ReadFile(filepath.Join(p.dir, p.name+".out"))
			p.t.Fatalf("%s exited at start:\n%s", p.name, out)
		default:
		}
		if c, err := net.DialTimeout("tcp", p.addr(), 200*time.Millisecond); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s does not listen on %s", p.name, p.addr())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends the proxy (SIGTERM: connections through it are cut) and waits.
func (p *proxyProc) stop() {
	if p.cmd == nil {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(p.stopWait):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	p.cmd = nil
}

// signal sends sig to the proxy's master process.
func (p *proxyProc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
}

func (p *proxyProc) log(name string) string {
	b, _ := os.ReadFile(filepath.Join(p.dir, "logs", name))
	return string(b)
}

// proxyDir makes a directory a proxy (and its unprivileged workers) can use.
func proxyDir(t *testing.T, name string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "notifyd-e2e-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	for _, sub := range []string{"logs", "temp"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func writeTemplate(t *testing.T, tmplName, dst string, data any) {
	t.Helper()
	tmpl, err := template.ParseFiles(filepath.Join(e2eDir, "proxies", tmplName))
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := tmpl.Execute(f, data); err != nil {
		t.Fatal(err)
	}
}

// nginxConf is what nginx.conf.tmpl needs.
type nginxConf struct {
	Dir       string
	Port      int
	Backend   string
	Upgrade   bool
	Buffering bool
}

// startNginx runs nginx in front of backend.
func startNginx(t *testing.T, backend string, upgrade, buffering bool) (*proxyProc, func(upgrade, buffering bool)) {
	t.Helper()
	dir := proxyDir(t, "nginx")
	conf := nginxConf{Dir: dir, Port: freePort(t), Backend: backend, Upgrade: upgrade, Buffering: buffering}
	write := func(upgrade, buffering bool) {
		conf.Upgrade, conf.Buffering = upgrade, buffering
		writeTemplate(t, "nginx.conf.tmpl", filepath.Join(dir, "nginx.conf"), conf)
	}
	write(upgrade, buffering)
	p := &proxyProc{t: t, name: "nginx", dir: dir, port: conf.Port, stopWait: 5 * time.Second,
		args: []string{"-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "logs", "error.log")}}
	p.start()
	t.Cleanup(p.stop)
	return p, write
}

// startSquid runs squid as a forward proxy that refuses CONNECT to ports other than 443.
func startSquid(t *testing.T) *proxyProc {
	t.Helper()
	dir := proxyDir(t, "squid")
	port := freePort(t)
	writeTemplate(t, "squid.conf.tmpl", filepath.Join(dir, "squid.conf"), struct {
		Dir  string
		Port int
	}{dir, port})
	// squid drops to the proxy user and must own its folders.
	if u, err := user.Lookup("proxy"); err == nil {
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		_ = filepath.Walk(dir, func(path string, _ os.FileInfo, err error) error {
			if err == nil {
				err = os.Lchown(path, uid, gid)
			}
			return err
		})
	}
	p := &proxyProc{t: t, name: "squid", dir: dir, port: port, stopWait: 10 * time.Second,
		args: []string{"-N", "-d", "1", "-f", filepath.Join(dir, "squid.conf")}}
	p.start()
	t.Cleanup(p.stop)
	return p
}

// ---- notifyd as a child process ------------------------------------------------

// notifydBinary builds cmd/notifyd into the test's temp dir (the build cache
// makes this a link step).
func notifydBinary(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notifyd")
	if out, err := exec.Command("go", "build", "-o", path, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return path
}

// childServer is notifyd running as its own process on a fixed address.
type childServer struct {
	t    *testing.T
	bin  string
	env  []string
	addr string
	cmd  *exec.Cmd
	done chan error
	out  *e2eOutput
}

type e2eOutput struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *e2eOutput) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *e2eOutput) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startChildServer(t *testing.T, dbURL string) *childServer {
	t.Helper()
	s := &childServer{t: t, bin: notifydBinary(t), addr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), out: &e2eOutput{}}
	s.env = append(os.Environ(), "DATABASE_URL="+dbURL, "NOTIFY_ADDR="+s.addr, "NOTIFY_DEV=1",
		"NOTIFY_JWT_SECRET="+testSecret, "NOTIFY_API_KEY="+testAPIKey, "NOTIFY_LOG_LEVEL=warn",
		"NOTIFY_SHUTDOWN_TIMEOUT=10s")
	s.start()
	t.Cleanup(func() {
		if s.cmd != nil {
			_ = s.cmd.Process.Kill()
			<-s.done
		}
	})
	return s
}

func (s *childServer) start() {
	s.t.Helper()
	cmd := exec.Command(s.bin)
	cmd.Env = s.env
	cmd.Stdout, cmd.Stderr = s.out, s.out
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	s.cmd = cmd
	s.done = make(chan error, 1)
	go func() { s.done <- cmd.Wait() }()
	waitPort(s.t, s.addr, 30*time.Second)
}

// sigterm stops the server the way an orchestrator does and checks it drained cleanly (exit 0).
func (s *childServer) sigterm() {
	s.t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		s.t.Fatal(err)
	}
	select {
	case err := <-s.done:
		s.cmd = nil
		var exit *exec.ExitError
		if errors.As(err, &exit) || err != nil {
			s.t.Fatalf("notifyd did not exit 0 on SIGTERM: %v\n%s", err, s.out.String())
		}
	case <-time.After(20 * time.Second):
		s.t.Fatalf("notifyd still running 20s after SIGTERM\n%s", s.out.String())
	}
}

// ctx returns a context for a short database operation.
func shortCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}
