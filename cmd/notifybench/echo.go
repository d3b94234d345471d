package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// The echo floor (-echo-floor) is what idle WebSocket sessions cost a server
// that does nothing but answer them: a bare gorilla echo server, in a process
// of its own (this binary with -echo-serve), with the buffer settings
// LIBRARIES.md recommends, one goroutine per connection, answering every
// message with a pong-sized one. The clients send the ping notifyd's clients
// send, at the same rate as the ws-idle scenario. Its CPU and RSS are the
// floor that notifyd's ws-idle figures compare with on the same machine.

// echoPong is as long as notifyd's answer to a ping.
var echoPong = []byte(`{"type":"pong","server_time":"2026-11-27T01:19:39.123456Z"}`)

// echoServe runs the bare echo server on addr until the process is killed.
func echoServe(addr string) error {
	up := websocket.Upgrader{ReadBufferSize: 512, WriteBufferSize: 1024, WriteBufferPool: &sync.Pool{}}
	return http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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

// EchoFloor is the result of -echo-floor.
type EchoFloor struct {
	Connections  int     `json:"connections"`
	PingInterval string  `json:"ping_interval"`
	Window       string  `json:"window"`
	MessagesPerS float64 `json:"messages_per_second"`
	CPU          float64 `json:"server_cpu_pct"`
	RSSPerConn   float64 `json:"rss_per_connection_bytes"`
}

// echoFloor starts the echo server, opens n connections over sources that
// each ping every interval (spread evenly), lets one interval pass so that
// every connection pings at its pace, then measures the server's CPU over
// window and its RSS per connection.
func echoFloor(ctx context.Context, n int, every, window time.Duration, sources []net.IP) (*EchoFloor, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "-echo-serve", addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start echo server: %w", err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	base, err := readProc(cmd.Process.Pid)
	if err != nil {
		return nil, err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	url := "ws://" + addr + "/"
	var pongs atomic.Int64
	sem := make(chan struct{}, 64)
	conns := make([]*websocket.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	start := time.Now()
	for i := range n {
		src := &net.Dialer{LocalAddr: &net.TCPAddr{IP: sources[i%len(sources)]}}
		d := websocket.Dialer{NetDialContext: src.DialContext, HandshakeTimeout: 10 * time.Second}
		var c *websocket.Conn
		for try := 0; ; try++ { // the server may still be starting
			sem <- struct{}{}
			c, _, err = d.DialContext(ctx, url, nil)
			<-sem
			if err == nil || try == 50 || ctx.Err() != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
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
	a, err := readProc(cmd.Process.Pid)
	if err != nil {
		return nil, err
	}
	p0 := pongs.Load()
	time.Sleep(window)
	b, err := readProc(cmd.Process.Pid)
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

// runEchoFloor is -echo-floor: it measures, prints the row and saves
// echo-floor.md and echo-floor.json in outDir (when given).
func runEchoFloor(ctx context.Context, c Scenario, sources []net.IP, outDir string) error {
	n, window := c.WS, c.Idle
	if n == 0 {
		n = 19000
	}
	if window == 0 {
		window = 40 * time.Second
	}
	ef, err := echoFloor(ctx, n, c.PingInterval, window, sources)
	if err != nil {
		return err
	}
	row := ef.markdown()
	fmt.Print(row)
	if outDir == "" {
		return nil
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return err
	}
	if err := writeJSON(filepath.Join(outDir, "echo-floor.json"), ef); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(outDir, "echo-floor.md"), []byte(row), 0o644)
}
