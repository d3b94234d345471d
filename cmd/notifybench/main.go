// Command notifybench is notifyd's load generator. It speaks PROTOCOL.md over
// WebSocket, SSE and long-poll (any mix), opens sessions at a set rate from
// several loopback source addresses (127.0.0.2, ...) so that it gets past the
// ephemeral ports of one address, keeps them pinging, publishes through the
// API (single requests or batches, C concurrent publishers) or SQL inserts,
// and reports connect rate and errors, server RSS per session and idle CPU
// (from the server's /proc), publish-to-receive latency, delivered per
// second, lost notifications (checked by seq), eviction and mass reconnect
// times, as a markdown table and JSON.
//
//	notifybench -spawn bin/notifyd -scenarios default -out bench-results
//	notifybench -url http://127.0.0.1:8080 -pid 1234 -api-key K -jwt-secret S -dburl postgres://... -scenarios custom -ws 1000 -publish batch
//
// With -spawn it starts a fresh server (own schema, NOTIFY_DEV=0, a debug
// listener for pprof) for every scenario and stops it after.
//
//	notifybench -spawn bin/notifyd -cluster-compare -nodes 3 -out bench-results
//
// compares one node with a cluster of -nodes on one schema (cluster.go).
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	rpprof "runtime/pprof"
	"strings"
	"syscall"
	"time"
)

// presets are the scenarios of the default suite (`make bench`), each with
// the numbers it must reach on the 2-core machine.
func presets() []Scenario {
	ping := 20 * time.Second
	timeout := 60 * time.Second
	return []Scenario{
		{Name: "floor", Title: "old gateway's floor: 1,000 WebSocket sessions pinging every 20 s",
			WS: 1000, PingInterval: ping, PingTimeout: timeout, RSS: true, Idle: 40 * time.Second,
			Targets: Targets{MaxIdleCPU: 5, MaxSweepMs: 100}},
		{Name: "ws-idle", Title: "19,000 idle WebSocket sessions, 20 s pings",
			WS: 19000, PingInterval: ping, PingTimeout: timeout, RSS: true, Idle: 40 * time.Second,
			Targets: Targets{MaxRSSPerSession: 8 << 10, MaxIdleCPU: 3, MaxSweepMs: 100}},
		{Name: "sse-idle", Title: "19,000 idle SSE sessions, 20 s pings (POST)",
			SSE: 19000, PingInterval: ping, PingTimeout: timeout, RSS: true, Idle: 20 * time.Second,
			Targets: Targets{MaxRSSPerSession: 16 << 10}},
		{Name: "poll-idle", Title: "19,000 idle long-poll sessions (wait=25)",
			Poll: 19000, PingInterval: ping, PingTimeout: timeout, RSS: true, Idle: 20 * time.Second,
			Targets: Targets{MaxRSSPerSession: 16 << 10}},
		{Name: "publish-batch", Title: "5,000 WebSocket sessions, batched API publishes",
			WS: 5000, PingInterval: ping, PingTimeout: timeout,
			Publish: publishBatch, Publishers: 4, Batch: 1000, PublishFor: 10 * time.Second,
			Targets: Targets{MinDeliveredPerSec: 30000, MaxP99Ms: 25}},
		{Name: "publish-batch-100", Title: "5,000 WebSocket sessions, batched API publishes, small batches (fewer in flight)",
			WS: 5000, PingInterval: ping, PingTimeout: timeout,
			Publish: publishBatch, Publishers: 4, Batch: 100, PublishFor: 10 * time.Second,
			Targets: Targets{MinDeliveredPerSec: 30000, MaxP99Ms: 25}},
		{Name: "publish-single", Title: "5,000 WebSocket sessions, single-notification API publishes",
			WS: 5000, PingInterval: ping, PingTimeout: timeout,
			Publish: publishSingle, Publishers: 64, PublishFor: 10 * time.Second,
			Targets: Targets{MinDeliveredPerSec: 10000, MaxP99Ms: 25}},
		// publish-single for long enough that what the server keeps of recent publishes is
		// full and expiring (10,000/s fill it in 20 s): the steady state a 10 s phase never
		// reaches.
		{Name: "publish-long", Title: "5,000 WebSocket sessions, single-notification API publishes for 45 s",
			WS: 5000, PingInterval: ping, PingTimeout: timeout,
			Publish: publishSingle, Publishers: 64, PublishFor: 45 * time.Second},
		{Name: "publish-sql", Title: "5,000 WebSocket sessions, application SQL inserts",
			WS: 5000, PingInterval: ping, PingTimeout: timeout,
			Publish: publishSQL, Publishers: 4, Batch: 1000, PublishFor: 10 * time.Second},
		{Name: "mixed", Title: "1,000 sessions each of WebSocket, SSE and long-poll, batched publishes",
			WS: 1000, SSE: 1000, Poll: 1000, PingInterval: ping, PingTimeout: timeout,
			Publish: publishBatch, Publishers: 2, Batch: 500, PublishFor: 5 * time.Second},
		{Name: "storm", Title: "connect storm: 5,000 WebSocket clients at once, 1 unread each to replay",
			WS: 5000, ConnectConcurrency: 512, Unread: 1, PingInterval: ping, PingTimeout: timeout,
			Targets: Targets{MinConnectRate: 8000}},
		{Name: "reconnect", Title: "10,000 WebSocket clients reconnect within 1 s with cursors, 10 unread each",
			WS: 10000, ConnectConcurrency: 512, PingInterval: ping, PingTimeout: timeout,
			Reconnect: 10000, ReconnectUnread: 10, ReconnectWithin: time.Second,
			Targets: Targets{MaxAllSyncedSec: 5}},
		{Name: "evict", Title: "1,000 WebSocket sessions, 1 s pings / 3 s timeout, 100 fall silent",
			WS: 1000, PingInterval: time.Second, PingTimeout: 3 * time.Second, Silent: 100,
			Targets: Targets{MaxEvictLagMs: 1000}},
	}
}

func main() {
	if err := mainErr(); err != nil {
		fmt.Fprintln(os.Stderr, "notifybench:", err)
		os.Exit(1)
	}
}

func mainErr() error {
	// The tool shares the machine with the server it measures: it trades
	// memory (it has plenty) for less of the CPU the server needs, by
	// collecting garbage a quarter as often. In-process, so a spawned server
	// does not inherit it the way it would inherit GOGC.
	debug.SetGCPercent(400)
	var (
		list     = flag.String("scenarios", "default", "comma-separated preset names, 'default' (all presets) or 'custom' (the flags below)")
		spawn    = flag.String("spawn", "", "notifyd binary to start per scenario (fresh schema, NOTIFY_DEV=0)")
		baseDB   = flag.String("db", envOr("NOTIFYD_TEST_DATABASE_URL", "postgres://127.0.0.1:5432/test?sslmode=disable"), "database for spawned servers (a schema is made per scenario)")
		extURL   = flag.String("url", "", "external server URL (instead of -spawn)")
		extPID   = flag.Int("pid", 0, "external server pid (for RSS and CPU from /proc)")
		extDebug = flag.String("debug", "", "external server debug URL (NOTIFY_DEBUG_ADDR) for GC and pprof")
		apiKey   = flag.String("api-key", os.Getenv("NOTIFY_API_KEY"), "external server API key")
		secret   = flag.String("jwt-secret", os.Getenv("NOTIFY_JWT_SECRET"), "external server JWT secret")
		dbURL    = flag.String("dburl", os.Getenv("DATABASE_URL"), "external server database URL (SQL publishing, replay setup)")
		sources  = flag.Int("sources", 16, "loopback source addresses to spread connections over (127.0.0.2 ...)")
		outDir   = flag.String("out", "", "directory for results.json, results.md, server logs and profiles")
		pprof    = flag.Bool("pprof", false, "capture server heap and CPU profiles during the runs, and the allocations of each publish phase (needs -out)")
		commit   = flag.String("commit", "", "commit measured (default: git rev-parse of the working directory)")
		cpuProf  = flag.String("cpuprofile", "", "write the load tool's own CPU profile to this file")
		echo     = flag.Bool("echo-floor", false, "instead of scenarios, measure the floors of a bare gorilla and net/http server: a storm of 5,000 handshakes, 10 s of single publishes from 64 publishers, and -ws idle connections (default 19000) pinging every -ping, CPU over -idle (default 40s)")
		goalsOut = flag.Bool("goals", false, "instead of scenarios, judge the run in -out (results.json and echo-floor.json) against the targets of issue 16 (with rate pairs in -out/rate, N-baseline and N-current publish-single runs, the rate target compares their medians): print the table and write it into results.md and goals.json")
		baseline = flag.String("baseline", "", "with -goals: an earlier results.json, whose single-publish rate the rate target compares with and whose figures the no-regression rows show")
		baseRate = flag.Float64("baseline-rate", 0, "with -goals: the single-publish rate (committed/s) the rate target compares with, instead of -baseline's")
		echoAt   = flag.String("echo-serve", "", "run the bare echo server on this address (started by -echo-floor)")

		c Scenario
	)
	cluster := clusterFlags()
	flag.IntVar(&c.WS, "ws", 0, "custom: WebSocket sessions")
	flag.IntVar(&c.SSE, "sse", 0, "custom: SSE sessions")
	flag.IntVar(&c.Poll, "poll", 0, "custom: long-poll sessions")
	flag.Float64Var(&c.ConnectRate, "rate", 0, "custom: sessions opened per second (0: as fast as possible)")
	flag.IntVar(&c.ConnectConcurrency, "connect-concurrency", 256, "custom: connects in flight at most")
	flag.DurationVar(&c.PingInterval, "ping", 20*time.Second, "custom: ping interval (server and clients)")
	flag.DurationVar(&c.PingTimeout, "ping-timeout", 60*time.Second, "custom: server ping timeout")
	flag.IntVar(&c.Unread, "unread", 0, "custom: unread notifications stored per user before connecting")
	flag.BoolVar(&c.RSS, "rss", false, "custom: measure server RSS per session")
	flag.DurationVar(&c.Idle, "idle", 0, "custom: idle CPU window")
	flag.StringVar(&c.Publish, "publish", "", "custom: single, batch or sql")
	flag.IntVar(&c.Publishers, "publishers", 4, "custom: concurrent publishers")
	flag.IntVar(&c.Batch, "batch", 1000, "custom: notifications per batch")
	flag.DurationVar(&c.PublishFor, "for", 10*time.Second, "custom: publish phase length")
	flag.IntVar(&c.Reconnect, "reconnect", 0, "custom: sessions that reconnect at once with cursors")
	flag.IntVar(&c.ReconnectUnread, "reconnect-unread", 10, "custom: notifications each misses before reconnecting")
	flag.DurationVar(&c.ReconnectWithin, "reconnect-within", time.Second, "custom: reconnects spread over this")
	flag.IntVar(&c.Silent, "silent", 0, "custom: sessions that fall silent and must be evicted")
	flag.Parse()

	raiseFileLimit()
	if *echoAt != "" {
		return echoServe(*echoAt)
	}
	if *goalsOut {
		return runGoals(*outDir, *baseline, *baseRate)
	}
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := rpprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("cpu profile: %w", err)
		}
		defer rpprof.StopCPUProfile()
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *echo {
		return runEchoFloor(ctx, c, loopbackSources(*sources), *outDir)
	}

	var scenarios []Scenario
	all := presets()
	for _, name := range strings.Split(*list, ",") {
		switch name = strings.TrimSpace(name); name {
		case "":
		case "default":
			scenarios = append(scenarios, all...)
		case "custom":
			c.Name = "custom"
			if c.sessions() == 0 {
				return fmt.Errorf("custom scenario: give -ws, -sse or -poll")
			}
			scenarios = append(scenarios, c)
		default:
			found := false
			for _, p := range all {
				if p.Name == name {
					scenarios, found = append(scenarios, p), true
				}
			}
			if !found {
				return fmt.Errorf("unknown scenario %q", name)
			}
		}
	}

	cfg := runConfig{bin: *spawn, baseDB: *baseDB, sources: loopbackSources(*sources), outDir: *outDir, pprof: *pprof, log: log}
	if cluster.compare {
		if cfg.outDir != "" {
			if err := os.MkdirAll(cfg.outDir, 0o755); err != nil {
				return err
			}
		}
		return runClusterCompare(ctx, cfg, cluster, cmp.Or(*commit, gitCommit()))
	}
	if cfg.bin == "" {
		if *extURL == "" || *apiKey == "" || *secret == "" {
			return fmt.Errorf("give -spawn BIN, or -url, -api-key and -jwt-secret of a running server")
		}
		cfg.ext = &target{URL: strings.TrimRight(*extURL, "/"), DebugURL: strings.TrimRight(*extDebug, "/"),
			APIKey: *apiKey, JWTSecret: *secret, DBURL: *dbURL, PID: *extPID}
	}
	if cfg.outDir != "" {
		if err := os.MkdirAll(cfg.outDir, 0o755); err != nil {
			return err
		}
	}
	rep := &Report{Date: today(), Machine: machine(), Commit: *commit, Note: reportNote}
	if rep.Commit == "" {
		rep.Commit = gitCommit()
	}
	failed := 0
	for _, sc := range scenarios {
		if ctx.Err() != nil {
			break
		}
		log.Info("scenario", "name", sc.Name, "title", sc.Title)
		r := runScenario(ctx, cfg, sc)
		for _, c := range r.Checks {
			if !c.Pass {
				failed++
			}
		}
		rep.Results = append(rep.Results, r)
		if err := save(cfg.outDir, rep); err != nil {
			return err
		}
		// Let the sockets of this run leave TIME_WAIT's way a little.
		time.Sleep(time.Second)
	}
	writeMarkdown(os.Stdout, rep)
	if failed > 0 {
		fmt.Fprintf(os.Stderr, "notifybench: %d check(s) not met\n", failed)
	}
	return nil
}

// writeJSON writes v as indented JSON to path.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// save writes results.json and results.md (after every scenario, so an
// interrupted suite keeps what it measured).
func save(dir string, rep *Report) error {
	if dir == "" {
		return nil
	}
	if err := writeJSON(filepath.Join(dir, "results.json"), rep); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "results.md"))
	if err != nil {
		return err
	}
	writeMarkdown(f, rep)
	return f.Close()
}

// raiseFileLimit lifts the soft open-files limit to the hard one (20,000
// here): every session is a socket.
func raiseFileLimit() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

// loopbackSources returns 127.0.0.2 ... 127.0.0.(n+1).
func loopbackSources(n int) []net.IP {
	var out []net.IP
	for i := range n {
		out = append(out, net.IPv4(127, 0, 0, byte(2+i)))
	}
	return out
}

func gitCommit() string {
	out, err := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	c := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(st) > 0 {
		c += " (with uncommitted changes)"
	}
	return c
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
