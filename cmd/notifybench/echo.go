package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// The floors (-echo-floor) are what the load of three scenarios costs a server
// that does nothing but answer it: a bare gorilla and net/http server, in a
// process of its own (this binary with -echo-serve), measured with the tool's
// own clients on the same machine. notifyd's figures compare with them.
//   - Idle: WebSocket connections with the buffer settings LIBRARIES.md
//     recommends, one goroutine per connection, each message answered with a
//     pong-sized one; the clients send the ping notifyd's clients send, at
//     the rate of the ws-idle scenario. CPU and RSS per connection.
//   - Storm: WebSocket handshakes as fast as the storm scenario makes them
//     (its dialer, 512 at once), with nothing sent after. Connects per second
//     and CPU per connect.
//   - HTTP: the single-publish scenario's requests (its client, 64 at once),
//     each answered 201 with a publish-sized body and nothing stored.
//     Requests per second and CPU per request.

// echoPong is as long as notifyd's answer to a ping.
var echoPong = []byte(`{"type":"pong","server_time":"2026-11-27T01:19:39.123456Z"}`)

// echoPublished is as long as notifyd's answer to a single publish.
var echoPublished = []byte(`{"id":"019ac4f2-7d2e-7c3a-9f51-3b2f0c4d5e6f","user_id":"u1234","seq":1234,"created_at":"2026-11-27T01:19:39.123456Z"}` + "\n")

// echoServe runs the bare server on addr until the process is killed: a GET
// is upgraded to a WebSocket echo, a POST gets 201 and echoPublished.
func echoServe(addr string) error {
	up := websocket.Upgrader{ReadBufferSize: 512, WriteBufferSize: 1024, WriteBufferPool: &sync.Pool{}}
	return http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			_, _ = io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			_, _ = w.Write(echoPublished)
			return
		}
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					return
				}
				if err := c.WriteMessage(websocket.TextMessage, echoPong); err != nil {
					return
				}
			}
		}()
	}))
}

// echoBinary is the notifybench binary that serves -echo-serve; empty means
// this one (tests, whose binary is not notifybench, set it).
var echoBinary string

// startEcho starts the bare server in a process of its own and waits until it
// answers; stop kills it.
func startEcho(ctx context.Context) (addr string, pid int, stop func(), err error) {
	addr, err = freeAddr()
	if err != nil {
		return "", 0, nil, err
	}
	self := echoBinary
	if self == "" {
		if self, err = os.Executable(); err != nil {
			return "", 0, nil, err
		}
	}
	cmd := exec.Command(self, "-echo-serve", addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return "", 0, nil, fmt.Errorf("start echo server: %w", err)
	}
	stop = func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }
	for try := 0; ; try++ {
		c, derr := net.Dial("tcp", addr)
		if derr == nil {
			c.Close()
			return addr, cmd.Process.Pid, stop, nil
		}
		if try == 100 || ctx.Err() != nil {
			stop()
			return "", 0, nil, fmt.Errorf("echo server does not answer: %w", derr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ConnectFloor is the storm floor: bare WebSocket handshakes.
type ConnectFloor struct {
	Connections int       `json:"connections"`
	Concurrency int       `json:"concurrency"`
	PerSecond   float64   `json:"connects_per_second"`
	Errors      int64     `json:"errors"`
	CPU         *phaseCPU `json:"cpu"`
}

// stormFloor opens n WebSocket connections to the bare server, conc at once,
// with the storm scenario's dialer, then closes them.
func stormFloor(ctx context.Context, n, conc int, sources []net.IP) (*ConnectFloor, error) {
	addr, pid, stop, err := startEcho(ctx)
	if err != nil {
		return nil, err
	}
	defer stop()
	b := newBench(ctx, &target{URL: "http://" + addr}, sources, time.Minute, time.Minute)
	defer b.close()
	conns := make([]*websocket.Conn, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	var errs atomic.Int64
	var next atomic.Int64
	phase := startPhaseCPU(pid)
	start := time.Now()
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				c, _, err := b.ws.DialContext(ctx, "ws://"+addr+"/", nil)
				if err != nil {
					errs.Add(1)
					continue
				}
				conns[i] = c
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	made := int64(n) - errs.Load()
	phase.finish(made)
	return &ConnectFloor{Connections: n, Concurrency: conc, PerSecond: float64(made) / took.Seconds(),
		Errors: errs.Load(), CPU: phase}, nil
}

// RequestFloor is the HTTP floor: bare 201 answers to the tool's publishes.
type RequestFloor struct {
	Publishers int         `json:"publishers"`
	Seconds    float64     `json:"seconds"`
	PerSecond  float64     `json:"requests_per_second"`
	Errors     int64       `json:"errors"`
	Latency    Percentiles `json:"latency"`
	CPU        *phaseCPU   `json:"cpu"`
}

// httpFloor runs the single-publish scenario's publisher against the bare
// server for d.
func httpFloor(ctx context.Context, publishers int, d time.Duration) (*RequestFloor, error) {
	addr, pid, stop, err := startEcho(ctx)
	if err != nil {
		return nil, err
	}
	defer stop()
	users := make([]string, 5000)
	for i := range users {
		users[i] = "u" + strconv.Itoa(i)
	}
	p := newPublisher(&target{URL: "http://" + addr, APIKey: "floor"}, users)
	phase := startPhaseCPU(pid)
	took, err := p.run(ctx, publishSingle, publishers, 1, d)
	if err != nil {
		return nil, err
	}
	var done int64
	for i := range p.committed {
		done += p.committed[i].Load()
	}
	phase.finish(done)
	return &RequestFloor{Publishers: publishers, Seconds: took.Seconds(), PerSecond: float64(done) / took.Seconds(),
		Errors: p.errors.Load(), Latency: p.reqLat.summary(), CPU: phase}, nil
}

// EchoFloor is the result of -echo-floor.
type EchoFloor struct {
	Connections  int     `json:"connections"`
	PingInterval string  `json:"ping_interval"`
	Window       string  `json:"window"`
	MessagesPerS float64 `json:"messages_per_second"`
	CPU          float64 `json:"server_cpu_pct"`
	RSSPerConn   float64 `json:"rss_per_connection_bytes"`
}

// echoFloor starts the echo server, opens n connections over sources (the
// scenarios' dialer) that each ping every interval (spread evenly), lets one interval pass so that
// every connection pings at its pace, then measures the server's CPU over
// window and its RSS per connection.
func echoFloor(ctx context.Context, n int, every, window time.Duration, sources []net.IP) (*EchoFloor, error) {
	addr, pid, stop, err := startEcho(ctx)
	if err != nil {
		return nil, err
	}
	defer stop()
	base, err := readProc(pid)
	if err != nil {
		return nil, err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	url := "ws://" + addr + "/"
	clients := newBench(ctx, &target{URL: "http://" + addr}, sources, every, every)
	defer clients.close()
	var pongs atomic.Int64
	conns := make([]*websocket.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	start := time.Now()
	for i := range n {
		c, _, err := clients.ws.DialContext(ctx, url, nil)
		if err != nil {
			return nil, fmt.Errorf("connection %d: %w", i, err)
		}
		conns = append(conns, c)
		go func() {
			for {
				if _, _, err := c.ReadMessage(); err != nil {
					return
				}
				pongs.Add(1)
			}
		}()
		go func() {
			offset := time.Duration(i) * every / time.Duration(n)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(start.Add(offset))):
			}
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				if err := c.WriteMessage(websocket.TextMessage, []byte(`{"type":"ping"}`)); err != nil {
					return
				}
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}
	// One interval from the start: every connection is pinging at its pace.
	time.Sleep(time.Until(start.Add(every)))
	a, err := readProc(pid)
	if err != nil {
		return nil, err
	}
	p0 := pongs.Load()
	time.Sleep(window)
	b, err := readProc(pid)
	if err != nil {
		return nil, err
	}
	secs := b.At.Sub(a.At).Seconds()
	return &EchoFloor{Connections: n, PingInterval: every.String(), Window: window.String(),
		MessagesPerS: float64(pongs.Load()-p0) / secs, CPU: cpuPercent(a, b),
		RSSPerConn: float64(b.RSS-base.RSS) / float64(n)}, nil
}

// markdown is the floor as one table row.
func (e *EchoFloor) markdown() string {
	return fmt.Sprintf("| bare gorilla echo server (-echo-floor): %s connections, %s pings | %s KiB RSS per connection, %.2f%% CPU for %s messages/s |\n",
		num(float64(e.Connections)), e.PingInterval, fmt.Sprintf("%.1f", e.RSSPerConn/1024), e.CPU, num(e.MessagesPerS))
}

func (f *ConnectFloor) markdown() string {
	return fmt.Sprintf("| bare gorilla handshakes (-echo-floor): %s connects, %d at once, the storm's dialer | %s connects/s, %d errors; CPU per connect: server %.0f µs, tool %.0f µs (machine %.0f%% of a core) |\n",
		num(float64(f.Connections)), f.Concurrency, num(f.PerSecond), f.Errors, f.CPU.ServerUS, f.CPU.BenchUS, f.CPU.Machine)
}

func (f *RequestFloor) markdown() string {
	return fmt.Sprintf("| bare net/http 201 answers (-echo-floor): %d publishers, the single-publish scenario's client, nothing stored | %s requests/s, p50 %.1f / p99 %.1f ms, %d errors; CPU per request: server %.0f µs, tool %.0f µs (machine %.0f%% of a core) |\n",
		f.Publishers, num(f.PerSecond), f.Latency.P50, f.Latency.P99, f.Errors, f.CPU.ServerUS, f.CPU.BenchUS, f.CPU.Machine)
}

// Floors is what -echo-floor measures.
type Floors struct {
	Storm *ConnectFloor `json:"storm"`
	HTTP  *RequestFloor `json:"http"`
	Idle  *EchoFloor    `json:"idle"`
}

// runEchoFloor is -echo-floor: it measures the three floors, each against a
// fresh server process, prints their rows and saves echo-floor.md and
// echo-floor.json in outDir (when given).
func runEchoFloor(ctx context.Context, c Scenario, sources []net.IP, outDir string) error {
	n, window := c.WS, c.Idle
	if n == 0 {
		n = 19000
	}
	if window == 0 {
		window = 40 * time.Second
	}
	var f Floors
	var err error
	if f.Storm, err = stormFloor(ctx, 5000, 512, sources); err != nil {
		return fmt.Errorf("storm floor: %w", err)
	}
	if f.HTTP, err = httpFloor(ctx, 64, 10*time.Second); err != nil {
		return fmt.Errorf("http floor: %w", err)
	}
	if f.Idle, err = echoFloor(ctx, n, c.PingInterval, window, sources); err != nil {
		return fmt.Errorf("idle floor: %w", err)
	}
	rows := strings.Join([]string{f.Idle.markdown(), f.Storm.markdown(), f.HTTP.markdown()}, "")
	fmt.Print(rows)
	if outDir == "" {
		return nil
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(outDir, "echo-floor.json"), f); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(outDir, "echo-floor.md"), []byte(rows), 0o644)
}
