package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// target is the notifyd under test: where it listens, its secrets, its
// database (for the SQL publish path and the replay setup) and, for /proc
// figures, its pid.
type target struct {
	URL       string // http://127.0.0.1:port
	DebugURL  string // http://127.0.0.1:port of NOTIFY_DEBUG_ADDR; may be empty
	APIKey    string
	JWTSecret string
	DBURL     string // with search_path set to the server's schema
	PID       int    // 0: no /proc figures

	// set when the tool started the server itself
	cmd        *exec.Cmd
	schema     string
	ownsSchema bool // made the schema, so drops it at stop
	base       string
	exited     chan error
}

// serverSettings are the parts of the server's configuration a scenario chooses.
type serverSettings struct {
	PingInterval, PingTimeout time.Duration
	MaxSessionsPerUser        int
	// Schema, APIKey, JWTSecret and NodeID, when set, make the server a node
	// of a cluster: it joins an existing schema (left for its maker to drop)
	// with the cluster's secrets and its own NOTIFY_NODE_ID.
	Schema, APIKey, JWTSecret, NodeID string
	// GOMAXPROCS, when positive, is the server's GOMAXPROCS.
	GOMAXPROCS int
}

// spawnServer starts bin as its own process with NOTIFY_DEV=0, fresh
// secrets, loopback listen and debug addresses and a fresh schema of the
// database baseDB; it returns once /readyz answers 200.
func spawnServer(ctx context.Context, bin, baseDB, logPath string, set serverSettings) (*target, error) {
	schema, own := set.Schema, set.Schema == ""
	if own {
		schema = "bench_" + randomHex(6)
		if err := execSQL(ctx, baseDB, "CREATE SCHEMA "+schema); err != nil {
			return nil, fmt.Errorf("create schema: %w", err)
		}
	}
	dbURL, err := withSearchPath(baseDB, schema)
	if err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	debug, err := freeAddr()
	if err != nil {
		return nil, err
	}
	t := &target{URL: "http://" + addr, DebugURL: "http://" + debug, APIKey: cmp.Or(set.APIKey, "bench-key-"+randomHex(12)),
		JWTSecret: cmp.Or(set.JWTSecret, "bench-secret-"+randomHex(16)), DBURL: dbURL, schema: schema, ownsSchema: own,
		base: baseDB, exited: make(chan error, 1)}
	env := append(os.Environ(),
		"NOTIFY_DEV=0", "NOTIFY_ADDR="+addr, "NOTIFY_DEBUG_ADDR="+debug,
		"NOTIFY_API_KEY="+t.APIKey, "NOTIFY_JWT_SECRET="+t.JWTSecret, "DATABASE_URL="+dbURL,
		"NOTIFY_LOG_LEVEL=warn",
		"NOTIFY_PING_INTERVAL="+set.PingInterval.String(), "NOTIFY_PING_TIMEOUT="+set.PingTimeout.String(),
		// Every client dials from loopback: the per-address and connect limits are for the open internet.
		"NOTIFY_MAX_CONNS=0", "NOTIFY_MAX_CONNS_PER_IP=0", "NOTIFY_CONNECT_RATE_PER_USER=off", "NOTIFY_CONNECT_RATE_PER_IP=off")
	if set.NodeID != "" {
		env = append(env, "NOTIFY_NODE_ID="+set.NodeID)
	}
	if set.GOMAXPROCS > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(set.GOMAXPROCS))
	}
	if set.MaxSessionsPerUser > 0 {
		env = append(env, "NOTIFY_MAX_SESSIONS_PER_USER="+strconv.Itoa(set.MaxSessionsPerUser))
	}
	cmd := exec.Command(bin)
	cmd.Env = env
	if logPath != "" {
		f, err := os.Create(logPath)
		if err != nil {
			return nil, fmt.Errorf("server log: %w", err)
		}
		defer f.Close() // the child keeps its own descriptor
		cmd.Stdout, cmd.Stderr = f, f
	}
	if err := cmd.Start(); err != nil {
		if own {
			_ = execSQL(context.Background(), baseDB, "DROP SCHEMA "+schema+" CASCADE")
		}
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	t.cmd, t.PID = cmd, cmd.Process.Pid
	go func() { t.exited <- cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		if st, err := t.get(ctx, "/readyz", nil); err == nil && st == http.StatusOK {
			return t, nil
		}
		select {
		case err := <-t.exited:
			t.exited <- err
			t.stop()
			return nil, fmt.Errorf("server exited at start (%v); see %s", err, logPath)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.stop()
			return nil, fmt.Errorf("server not ready within 60s; see %s", logPath)
		}
	}
}

// stop ends a server the tool started (SIGTERM: it drains) and drops its schema.
func (t *target) stop() {
	if t.cmd == nil {
		return
	}
	_ = t.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-t.exited:
	case <-time.After(20 * time.Second):
		_ = t.cmd.Process.Kill()
		<-t.exited
	}
	t.cmd = nil
	if t.ownsSchema {
		dropSchema(t.base, t.schema)
	}
}

// dropSchema drops a bench schema and everything in it.
func dropSchema(base, schema string) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_ = execSQL(ctx, base, "DROP SCHEMA "+schema+" CASCADE")
}

// alive reports whether a spawned server is still running.
func (t *target) alive() bool {
	if t.cmd == nil {
		return true
	}
	select {
	case err := <-t.exited:
		t.exited <- err
		return false
	default:
		return true
	}
}

var adminClient = &http.Client{Timeout: 30 * time.Second}

// get sends an API-key GET and decodes a JSON answer into out (if not nil).
func (t *target) get(ctx context.Context, path string, out any) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.URL+path, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+t.APIKey)
	resp, err := adminClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, err
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			return resp.StatusCode, fmt.Errorf("GET %s: %w", path, err)
		}
	}
	return resp.StatusCode, nil
}

// serverStats is the part of GET /v1/stats the tool reads.
type serverStats struct {
	Sessions   int64 `json:"sessions"`
	Evictions  int64 `json:"evictions"`
	Deliveries int64 `json:"deliveries"`
	// Sweep is reported by servers that time their sweeper (optional).
	Sweep *struct {
		LastMs float64 `json:"last_ms"`
		MaxMs  float64 `json:"max_ms"`
	} `json:"sweep"`
}

func (t *target) stats(ctx context.Context) (serverStats, error) {
	var st serverStats
	code, err := t.get(ctx, "/v1/stats", &st)
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("GET /v1/stats: status %d", code)
	}
	return st, err
}

// waitSessions waits until the server counts want sessions (or timeout).
func (t *target) waitSessions(ctx context.Context, want int64, timeout time.Duration) (int64, error) {
	deadline := time.Now().Add(timeout)
	for {
		st, err := t.stats(ctx)
		if err == nil && st.Sessions == want {
			return st.Sessions, nil
		}
		if time.Now().After(deadline) {
			return st.Sessions, fmt.Errorf("server has %d sessions, want %d (err %v)", st.Sessions, want, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// runtimeMetrics reads the Go runtime's gauges from the server's /metrics
// (empty when it has none).
func (t *target) runtimeMetrics(ctx context.Context) map[string]float64 {
	out := map[string]float64{}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.URL+"/metrics", nil)
	if err != nil {
		return out
	}
	req.Header.Set("Authorization", "Bearer "+t.APIKey) // /metrics is behind the API key by default
	resp, err := adminClient.Do(req)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok || !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "notifyd_") {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(val), 64); err == nil {
			out[name] = v
		}
	}
	return out
}

// procSample is one reading of a process's /proc files.
type procSample struct {
	At      time.Time
	RSS     int64 // bytes
	CPUTick int64 // utime + stime, in clock ticks
	// ChildTick is cutime + cstime: the CPU of the children it waited for.
	ChildTick int64
	FDs       int
}

// clockTick is USER_HZ, 100 on every Linux this runs on.
const clockTick = 100

func readProc(pid int) (procSample, error) {
	s := procSample{At: time.Now()}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// Fields after the command name (which may hold spaces) start at ") ".
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return s, errors.New("malformed /proc stat")
	}
	f := strings.Fields(string(stat[i+2:]))
	if len(f) < 13 {
		return s, errors.New("short /proc stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14 utime
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15 stime
	s.CPUTick = ut + st
	if len(f) >= 15 {
		cut, _ := strconv.ParseInt(f[13], 10, 64) // field 16 cutime
		cst, _ := strconv.ParseInt(f[14], 10, 64) // field 17 cstime
		s.ChildTick = cut + cst
	}
	status, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	defer status.Close()
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			s.RSS = kb << 10
		}
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.FDs = len(ents)
	}
	return s, nil
}

// cpuPercent is the CPU used between two samples, in percent of one core.
func cpuPercent(a, b procSample) float64 {
	secs := b.At.Sub(a.At).Seconds()
	if secs <= 0 {
		return 0
	}
	return float64(b.CPUTick-a.CPUTick) / clockTick / secs * 100
}

// machineCPU reads the busy and total jiffies of all cores from /proc/stat.
func machineCPU() (busy, total int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total
}

// postgresTicks is the CPU (clock ticks) of every live process named
// postgres (the backends, the WAL writer and the rest of the cluster), with
// the CPU of the children they reaped: a backend that exits (the tool's SQL
// publishers close theirs as the phase ends) is counted in its postmaster's.
func postgresTicks() int64 {
	var sum int64
	for _, pid := range postgresPIDs() {
		if s, err := readProc(pid); err == nil {
			sum += s.CPUTick + s.ChildTick
		}
	}
	return sum
}

// phaseCPU is what the machine, the server, Postgres and the tool used over a
// scenario or one of its phases, in percent of one core (the machine is
// shared, and a busy neighbour shows here), and, for a phase, per unit of work
// (a connect, a committed notification) in microseconds of CPU: where a
// throughput ceiling comes from.
type phaseCPU struct {
	// LoadAvg is the load average when a scenario started.
	LoadAvg string  `json:"loadavg_at_start,omitempty"`
	Machine float64 `json:"machine_pct"`
	Server  float64 `json:"server_pct"`
	// Postgres is the backends serving the server and the tool (pgcpu.go);
	// PostgresAll every Postgres process of the machine, other clients' too.
	Postgres    float64 `json:"postgres_pct"`
	PostgresAll float64 `json:"postgres_all_pct"`
	Bench       float64 `json:"bench_pct"`
	// Per unit, in µs of CPU (zero when no units were given).
	MachineUS     float64 `json:"machine_us_per_unit,omitempty"`
	ServerUS      float64 `json:"server_us_per_unit,omitempty"`
	PostgresUS    float64 `json:"postgres_us_per_unit,omitempty"`
	PostgresAllUS float64 `json:"postgres_all_us_per_unit,omitempty"`
	BenchUS       float64 `json:"bench_us_per_unit,omitempty"`
	// Cores is how many cores the machine has: Machine is at most Cores × 100.
	Cores int `json:"cores,omitempty"`

	at              time.Time
	busy, total, pg int64
	backends        map[int]int64
	server, bench   procSample
	serverPID       int
	// clients are the processes whose Postgres backends count: the server
	// (or the nodes of a cluster), and the tool.
	clients []int
}

// startPhaseCPU takes a phase's first reading. serverPID is the server whose
// CPU it reports (0: none, the caller sums a cluster's nodes); the Postgres
// backends counted are those of the server, of nodes and of the tool.
func startPhaseCPU(serverPID int, nodes ...int) *phaseCPU {
	c := &phaseCPU{at: time.Now(), serverPID: serverPID, Cores: runtime.NumCPU(),
		clients: append([]int{serverPID, os.Getpid()}, nodes...)}
	c.busy, c.total = machineCPU()
	c.pg = postgresTicks()
	c.backends = backendTicks(ownBackends(c.clients...))
	if serverPID > 0 {
		c.server, _ = readProc(serverPID)
	}
	c.bench, _ = readProc(os.Getpid())
	return c
}

// loadAvg is the 1, 5 and 15 minute load averages.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}

// finish takes the second reading; units is the work done meanwhile (0 for
// none: no per-unit figures).
func (c *phaseCPU) finish(units int64) {
	secs := time.Since(c.at).Seconds()
	busy, total := machineCPU()
	if total > c.total {
		c.Machine = float64(busy-c.busy) / float64(total-c.total) * 100 * float64(c.Cores)
	}
	c.PostgresAll = float64(postgresTicks()-c.pg) / clockTick / secs * 100
	own := backendTicks(ownBackends(c.clients...))
	c.Postgres = float64(ticksSince(c.backends, own)) / clockTick / secs * 100
	if c.serverPID > 0 {
		if s, err := readProc(c.serverPID); err == nil {
			c.Server = cpuPercent(c.server, s)
		}
	}
	if s, err := readProc(os.Getpid()); err == nil {
		c.Bench = cpuPercent(c.bench, s)
	}
	if units > 0 {
		per := func(pct float64) float64 { return pct / 100 * secs / float64(units) * 1e6 }
		c.MachineUS, c.ServerUS, c.PostgresUS, c.BenchUS = per(c.Machine), per(c.Server), per(c.Postgres), per(c.Bench)
		c.PostgresAllUS = per(c.PostgresAll)
	}
}

// forceGC asks the server's runtime for a garbage collection through the
// debug listener (pprof's heap profile with gc=1), so that RSS is read as a
// long-running server would settle (Go also forces one every two minutes).
func (t *target) forceGC(ctx context.Context) error {
	if t.DebugURL == "" {
		return errors.New("no debug listener")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.DebugURL+"/debug/pprof/heap?gc=1", nil)
	if err != nil {
		return err
	}
	resp, err := adminClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	return err
}

// profile saves a pprof profile from the debug listener into dir; kind is
// "heap" or "profile?seconds=N" (CPU).
func (t *target) profile(ctx context.Context, kind, path string) error {
	if t.DebugURL == "" || path == "" {
		return nil
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, t.DebugURL+"/debug/pprof/"+kind, nil)
	if err != nil {
		return err
	}
	c := &http.Client{Timeout: 5 * time.Minute}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("pprof %s: status %d", kind, resp.StatusCode)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func execSQL(ctx context.Context, dbURL, sql string) error {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	_, err = conn.Exec(ctx, sql)
	return err
}

func withSearchPath(base, schema string) (string, error) {
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return "", fmt.Errorf("database url %q: want a postgres:// URL", base)
	}
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
