package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/notifyd/notifyd/handlers"
)

// Scenario is one measured run: sessions of any mix of transports, opened at
// a set rate, then any of: an idle window (RSS and CPU), a publish phase, a
// mass reconnect with cursors, sessions falling silent (eviction).
type Scenario struct {
	Name  string `json:"name"`
	Title string `json:"title"`
	// Sessions per transport.
	WS   int `json:"ws"`
	SSE  int `json:"sse"`
	Poll int `json:"poll"`
	// ConnectRate is sessions opened per second (0: as fast as
	// ConnectConcurrency allows).
	ConnectRate        float64 `json:"connect_rate"`
	ConnectConcurrency int     `json:"connect_concurrency"`
	// PingInterval and PingTimeout configure the server; clients ping at
	// PingInterval.
	PingInterval time.Duration `json:"ping_interval"`
	PingTimeout  time.Duration `json:"ping_timeout"`
	// Unread notifications are stored per user before connecting; every
	// connect must replay exactly them.
	Unread int `json:"unread"`
	// RSS measures server memory per session after connecting.
	RSS bool `json:"rss"`
	// Idle is the window over which idle server CPU is measured.
	Idle time.Duration `json:"idle"`
	// Publish is "", "single", "batch" or "sql", by Publishers workers,
	// Batch notifications per request, for PublishFor.
	Publish    string        `json:"publish,omitempty"`
	Publishers int           `json:"publishers,omitempty"`
	Batch      int           `json:"batch,omitempty"`
	PublishFor time.Duration `json:"publish_for,omitempty"`
	// Reconnect sessions disconnect, get ReconnectUnread new notifications
	// each while offline, and reconnect with their cursors within
	// ReconnectWithin.
	Reconnect       int           `json:"reconnect,omitempty"`
	ReconnectUnread int           `json:"reconnect_unread,omitempty"`
	ReconnectWithin time.Duration `json:"reconnect_within,omitempty"`
	// Silent sessions stop every sign of life and must be evicted within a
	// second of their ping timeout.
	Silent int `json:"silent,omitempty"`
	// Targets are the numbers this scenario must reach.
	Targets Targets `json:"targets"`
	// settle is how long the server is left alone before RSS is read (and
	// after a forced GC); 3s when zero (tests shorten it).
	settle time.Duration
}

func (sc Scenario) settleTime() time.Duration {
	if sc.settle > 0 {
		return sc.settle
	}
	return 3 * time.Second
}

// Targets are the numbers a scenario is judged by; zero means not judged.
// Correctness (no connect errors, replay exact, nothing lost, duplicated or
// out of order, no unexpected bye) is always judged.
type Targets struct {
	MaxRSSPerSession   float64 `json:"max_rss_per_session_bytes,omitempty"`
	MaxIdleCPU         float64 `json:"max_idle_cpu_pct,omitempty"`
	MinConnectRate     float64 `json:"min_connect_per_sec,omitempty"`
	MinDeliveredPerSec float64 `json:"min_delivered_per_sec,omitempty"`
	MaxP99Ms           float64 `json:"max_p99_ms,omitempty"`
	MaxAllSyncedSec    float64 `json:"max_all_synced_sec,omitempty"`
	MaxSweepMs         float64 `json:"max_sweep_ms,omitempty"`
	MaxEvictLagMs      float64 `json:"max_evict_lag_ms,omitempty"`
}

func (sc Scenario) sessions() int { return sc.WS + sc.SSE + sc.Poll }

// runConfig is what every scenario of one invocation shares.
type runConfig struct {
	bin     string // notifyd binary to spawn per scenario ("" uses ext)
	baseDB  string
	ext     *target // an external server (when bin is empty)
	sources []net.IP
	outDir  string // server logs and profiles ("" for none)
	pprof   bool
	log     *slog.Logger
}

// Result is what one scenario measured.
type Result struct {
	Scenario Scenario  `json:"scenario"`
	Started  time.Time `json:"started"`
	Seconds  float64   `json:"seconds"`
	Error    string    `json:"error,omitempty"`

	Connect *ConnectResult `json:"connect,omitempty"`
	Memory  *MemoryResult  `json:"memory,omitempty"`
	// IdleCPU is the server's CPU over the idle window, percent of one core.
	IdleCPU   *float64         `json:"idle_cpu_pct,omitempty"`
	Publish   *PublishResult   `json:"publish,omitempty"`
	Reconnect *ReconnectResult `json:"reconnect,omitempty"`
	Evict     *EvictResult     `json:"evict,omitempty"`
	// Sweep is the server's own timing of its sweeper, when it reports one.
	SweepLastMs *float64 `json:"sweep_last_ms,omitempty"`
	SweepMaxMs  *float64 `json:"sweep_max_ms,omitempty"`
	// Byes counts bye reasons the clients saw outside the eviction check
	// (any is a failure); ErrorMessages the error messages.
	Byes          map[string]int `json:"byes,omitempty"`
	ErrorMessages int64          `json:"error_messages"`
	BadMessages   int64          `json:"bad_messages"`
	PingErrors    int64          `json:"ping_errors"`
	Profiles      []string       `json:"profiles,omitempty"`
	// CPU is what the machine, the server and the tool used over the run.
	CPU    *phaseCPU `json:"cpu,omitempty"`
	Checks []Check   `json:"checks"`
}

// ConnectResult is the connect phase.
type ConnectResult struct {
	Sessions  int         `json:"sessions"`
	Seconds   float64     `json:"seconds"`
	PerSecond float64     `json:"per_second"`
	Errors    int         `json:"errors"`
	Samples   []string    `json:"error_samples,omitempty"`
	ReplayBad int         `json:"replay_bad"`
	Latency   Percentiles `json:"latency"`
	// CPU is what the machine, server, Postgres and tool used while
	// connecting, per connected session too.
	CPU *phaseCPU `json:"cpu,omitempty"`
}

// MemoryResult is server RSS before and after the sessions connected.
type MemoryResult struct {
	BaselineRSS int64 `json:"baseline_rss"`
	LoadedRSS   int64 `json:"loaded_rss"`
	// SettledRSS is read after a forced GC and a few seconds for the
	// runtime to return freed pages (what a long-running server holds).
	SettledRSS       int64   `json:"settled_rss"`
	PerSession       float64 `json:"per_session_bytes"`
	PerSessionLoaded float64 `json:"per_session_loaded_bytes"`
	ServerFDs        int     `json:"server_fds"`
	// Runtime figures from the server's /metrics at the settled point:
	// where the memory is (goroutine stacks, heap in use) and how many
	// goroutines hold it.
	Goroutines     float64 `json:"goroutines"`
	StackInuse     float64 `json:"stack_inuse_bytes"`
	HeapInuse      float64 `json:"heap_inuse_bytes"`
	BaseStackInuse float64 `json:"baseline_stack_inuse_bytes"`
	BaseHeapInuse  float64 `json:"baseline_heap_inuse_bytes"`
}

// PublishResult is the publish phase.
type PublishResult struct {
	Mode            string         `json:"mode"`
	Publishers      int            `json:"publishers"`
	Batch           int            `json:"batch"`
	Seconds         float64        `json:"seconds"`
	Committed       int64          `json:"committed"`
	PublishedPerSec float64        `json:"published_per_sec"`
	Expected        int64          `json:"expected"`
	Delivered       int64          `json:"delivered"`
	DeliveredPerSec float64        `json:"delivered_per_sec"`
	Lost            int64          `json:"lost"`
	Gaps            int64          `json:"gaps"`
	Duplicates      int64          `json:"duplicates"`
	Errors          int64          `json:"errors"`
	ErrorKinds      map[string]int `json:"error_kinds,omitempty"`
	Latency         Percentiles    `json:"latency"`
	Request         Percentiles    `json:"request"`
	ServerCPU       float64        `json:"server_cpu_pct"`
	// ReadBack is the share of the notifications dispatched meanwhile whose
	// rows the server read back from Postgres instead of taking them from its
	// own publishes (notifyd_dispatched_total); -1 when not known.
	ReadBack float64 `json:"read_back_fraction"`
	// CPU is what the machine, server, Postgres and tool used while publishing,
	// per committed notification too.
	CPU *phaseCPU `json:"cpu,omitempty"`
	// CallsPerTx is how many single publishes shared a transaction (the
	// server's notifyd_publish_single_total over notifyd_publish_groups_total);
	// 0 when not known.
	CallsPerTx float64 `json:"calls_per_tx,omitempty"`
	// Groups is the server's group commit meanwhile (nil when its metrics lack it).
	Groups *GroupStats `json:"groups,omitempty"`
}

// ReconnectResult is the mass reconnect.
type ReconnectResult struct {
	Clients   int         `json:"clients"`
	Within    float64     `json:"within_seconds"`
	AllSynced float64     `json:"all_synced_seconds"`
	Errors    int         `json:"errors"`
	Samples   []string    `json:"error_samples,omitempty"`
	ReplayBad int         `json:"replay_bad"`
	Latency   Percentiles `json:"latency"`
}

// EvictResult is the eviction check.
type EvictResult struct {
	Silent     int         `json:"silent"`
	Evicted    int         `json:"evicted"`
	WrongBye   int         `json:"wrong_bye"`
	OthersLost int         `json:"others_evicted"`
	Lag        Percentiles `json:"lag"` // bye after the deadline (last sign of life + ping timeout)
}

// runScenario starts a server (or uses the external one), runs sc against
// it and stops it.
func runScenario(ctx context.Context, cfg runConfig, sc Scenario) *Result {
	res := &Result{Scenario: sc, Started: time.Now().UTC()}
	defer func() { res.Seconds = time.Since(res.Started).Seconds(); res.Checks = checks(res) }()
	t := cfg.ext
	if cfg.bin != "" {
		logPath := ""
		if cfg.outDir != "" {
			logPath = filepath.Join(cfg.outDir, sc.Name+".server.log")
		}
		var err error
		t, err = spawnServer(ctx, cfg.bin, cfg.baseDB, logPath, serverSettings{PingInterval: sc.PingInterval,
			PingTimeout: sc.PingTimeout, MaxSessionsPerUser: 20})
		if err != nil {
			res.Error = err.Error()
			return res
		}
		defer t.stop()
	}
	res.CPU = startPhaseCPU(t.PID)
	res.CPU.LoadAvg = loadAvg()
	err := run(ctx, cfg, t, sc, res)
	res.CPU.finish(0)
	if err != nil {
		res.Error = err.Error()
	}
	if !t.alive() {
		res.Error = strings.TrimSpace(res.Error + "; server exited during the run")
	}
	return res
}

func run(ctx context.Context, cfg runConfig, t *target, sc Scenario, res *Result) error {
	log := cfg.log.With("scenario", sc.Name)
	b := newBench(ctx, t, cfg.sources, sc.PingInterval, sc.PingTimeout)
	defer b.close()
	var profiled sync.Mutex // the publish phase takes its CPU and allocation profiles at once
	profile := func(kind, name string) {
		if !cfg.pprof || cfg.outDir == "" {
			return
		}
		path := filepath.Join(cfg.outDir, "pprof", sc.Name+"."+name+".pb.gz")
		if err := t.profile(ctx, kind, path); err != nil {
			log.Warn("profile", "kind", kind, "err", err)
			return
		}
		profiled.Lock()
		res.Profiles = append(res.Profiles, path)
		profiled.Unlock()
	}

	// One user per session; tokens are minted before the clock starts.
	auth := handlers.NewAuth(t.JWTSecret, "", nil)
	n := sc.sessions()
	users := make([]string, n)
	sessions := make([]*session, n)
	for i := range sessions {
		users[i] = fmt.Sprintf("u%06d", i)
		tok, err := auth.NewToken(users[i], "bench", 6*time.Hour)
		if err != nil {
			return err
		}
		tr := transportWS
		switch {
		case i >= sc.WS+sc.SSE:
			tr = transportPoll
		case i >= sc.WS:
			tr = transportSSE
		}
		sessions[i] = &session{b: b, idx: i, user: i, userID: users[i], token: tok, tr: tr}
	}
	if sc.Unread > 0 {
		log.Info("storing unread backlog", "per_user", sc.Unread)
		if err := storeUnread(ctx, t.DBURL, users, sc.Unread); err != nil {
			return err
		}
	}
	var base procSample
	var baseRT map[string]float64
	if t.PID > 0 {
		_ = t.forceGC(ctx)
		time.Sleep(sc.settleTime())
		base, _ = readProc(t.PID)
		baseRT = t.runtimeMetrics(ctx)
	}
	defer closeAll(sessions)

	// Connect.
	log.Info("connecting", "sessions", n, "rate", sc.ConnectRate)
	phase := startPhaseCPU(t.PID)
	cr := connectAll(ctx, sessions, sc.ConnectRate, sc.ConnectConcurrency, func(s *session) (int64, string) { return 0, "" })
	phase.finish(int64(n - cr.Errors))
	cr.CPU = phase
	for _, s := range sessions {
		s.mu.Lock()
		if s.synced && (s.replayBad != "" || s.replayed != sc.Unread || s.cursor != int64(sc.Unread)) {
			cr.ReplayBad++
			if len(cr.Samples) < 5 {
				cr.Samples = append(cr.Samples, fmt.Sprintf("session %d: replayed %d (want %d), cursor %d: %s",
					s.idx, s.replayed, sc.Unread, s.cursor, s.replayBad))
			}
		}
		s.mu.Unlock()
	}
	res.Connect = cr
	log.Info("connected", "per_second", int(cr.PerSecond), "errors", cr.Errors, "replay_bad", cr.ReplayBad)
	if cr.Errors == n {
		return fmt.Errorf("no session connected: %v", cr.Samples)
	}
	if _, err := t.waitSessions(ctx, int64(n-cr.Errors), 30*time.Second); err != nil {
		log.Warn("server session count", "err", err)
	}

	if sc.RSS && t.PID > 0 {
		time.Sleep(sc.settleTime())
		loaded, _ := readProc(t.PID)
		profile("heap", "heap")
		// Two GCs a few seconds apart: the runtime returns freed pages to the
		// OS in the background after a GC.
		_ = t.forceGC(ctx)
		time.Sleep(sc.settleTime())
		_ = t.forceGC(ctx)
		time.Sleep(sc.settleTime())
		settled, _ := readProc(t.PID)
		live := float64(n - cr.Errors)
		res.Memory = &MemoryResult{BaselineRSS: base.RSS, LoadedRSS: loaded.RSS, SettledRSS: settled.RSS,
			PerSession: float64(settled.RSS-base.RSS) / live, PerSessionLoaded: float64(loaded.RSS-base.RSS) / live,
			ServerFDs: settled.FDs}
		rt := t.runtimeMetrics(ctx)
		res.Memory.Goroutines, res.Memory.StackInuse, res.Memory.HeapInuse = rt["go_goroutines"],
			rt["go_memstats_stack_inuse_bytes"], rt["go_memstats_heap_inuse_bytes"]
		res.Memory.BaseStackInuse, res.Memory.BaseHeapInuse = baseRT["go_memstats_stack_inuse_bytes"], baseRT["go_memstats_heap_inuse_bytes"]
		log.Info("memory", "per_session", int(res.Memory.PerSession), "loaded", int(res.Memory.PerSessionLoaded))
	}

	if sc.Idle > 0 && t.PID > 0 {
		// Let the connect burst settle before the window opens.
		time.Sleep(sc.settleTime())
		var wg sync.WaitGroup
		if cfg.pprof {
			wg.Add(1)
			go func() {
				defer wg.Done()
				profile(fmt.Sprintf("profile?seconds=%d", int(sc.Idle.Seconds())), "idle.cpu")
			}()
		}
		c0, _ := readProc(t.PID)
		time.Sleep(sc.Idle)
		c1, _ := readProc(t.PID)
		wg.Wait()
		cpu := cpuPercent(c0, c1)
		res.IdleCPU = &cpu
		log.Info("idle", "cpu_pct", cpu)
	}

	if sc.Publish != "" {
		before := t.runtimeMetrics(ctx)
		pr, err := publishPhase(ctx, t, b, sc, users, sessions, profile)
		if err != nil {
			return err
		}
		after := t.runtimeMetrics(ctx)
		pr.ReadBack = readBack(before, after)
		pr.CallsPerTx = callsPerTx(before, after)
		pr.Groups = groupStats(before, after)
		res.Publish = pr
		log.Info("published", "delivered_per_sec", int(pr.DeliveredPerSec), "lost", pr.Lost, "p99_ms", pr.Latency.P99)
	}

	if sc.Reconnect > 0 {
		rr, err := reconnectPhase(ctx, t, sc, users, sessions)
		if err != nil {
			return err
		}
		res.Reconnect = rr
		log.Info("reconnected", "all_synced_s", rr.AllSynced, "errors", rr.Errors, "replay_bad", rr.ReplayBad)
	}

	if sc.Silent > 0 {
		res.Evict = evictPhase(sc, sessions)
		log.Info("evicted", "evicted", res.Evict.Evicted, "lag_max_ms", res.Evict.Lag.Max)
	}

	if st, err := t.stats(ctx); err == nil && st.Sweep != nil {
		res.SweepLastMs, res.SweepMaxMs = &st.Sweep.LastMs, &st.Sweep.MaxMs
	}
	b.mu.Lock()
	res.Byes = b.byes
	b.mu.Unlock()
	res.ErrorMessages, res.BadMessages, res.PingErrors = b.errMsgs.Load(), b.badMsgs.Load(), b.pingErrs.Load()
	return nil
}

// connectAll opens sessions at rate (0: as fast as possible) with at most
// conc connects in flight; from gives each session its cursor and the
// session id to resume.
func connectAll(ctx context.Context, sessions []*session, rate float64, conc int, from func(*session) (int64, string)) *ConnectResult {
	if conc <= 0 {
		conc = 256
	}
	cr := &ConnectResult{Sessions: len(sessions)}
	var mu sync.Mutex
	var durs []time.Duration
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	start := time.Now()
	for i, s := range sessions {
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))); d > 0 {
				time.Sleep(d)
			}
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			cursor, resume := from(s)
			t0 := time.Now()
			err := s.connect(ctx, cursor, resume)
			d := time.Since(t0)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				cr.Errors++
				if len(cr.Samples) < 5 {
					cr.Samples = append(cr.Samples, err.Error())
				}
				return
			}
			durs = append(durs, d)
		}()
	}
	wg.Wait()
	cr.Seconds = time.Since(start).Seconds()
	cr.PerSecond = float64(len(sessions)-cr.Errors) / cr.Seconds
	cr.Latency = percentiles(durs)
	return cr
}

func closeAll(sessions []*session) {
	sem := make(chan struct{}, 256)
	var wg sync.WaitGroup
	for _, s := range sessions {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s.close()
		}()
	}
	wg.Wait()
}

// publishPhase publishes to every connected user for sc.PublishFor, waits
// for delivery to drain, and checks every session got every notification of
// its user exactly once and in seq order.
func publishPhase(ctx context.Context, t *target, b *bench, sc Scenario, users []string, sessions []*session,
	profile func(kind, name string)) (*PublishResult, error) {
	var online []string
	var onlineIdx []int
	for i, s := range sessions {
		s.mu.Lock()
		if s.synced && s.byeReason == "" {
			online = append(online, users[i])
			onlineIdx = append(onlineIdx, i)
		}
		s.mu.Unlock()
	}
	if len(online) == 0 {
		return nil, fmt.Errorf("publish: no session online")
	}
	startLive := make([]int64, len(sessions))
	for i, s := range sessions {
		s.mu.Lock()
		startLive[i] = s.live
		s.mu.Unlock()
	}
	b.lat.reset()
	recv0 := b.received.Load()
	p := newPublisher(t, online)
	var wg sync.WaitGroup
	if profile != nil {
		secs := max(1, int(sc.PublishFor.Seconds())-1)
		wg.Add(2)
		go func() {
			defer wg.Done()
			profile(fmt.Sprintf("profile?seconds=%d", secs), "publish.cpu")
		}()
		go func() {
			defer wg.Done()
			profile(fmt.Sprintf("allocs?seconds=%d", secs), "publish.allocs")
		}()
	}
	c0, _ := readProc(t.PID)
	phase := startPhaseCPU(t.PID)
	start := time.Now()
	took, err := p.run(ctx, sc.Publish, sc.Publishers, sc.Batch, sc.PublishFor)
	if err != nil {
		return nil, err
	}
	c1, _ := readProc(t.PID)
	var committed int64
	for i := range p.committed {
		committed += p.committed[i].Load()
	}
	phase.finish(committed)
	// Drain: wait until everything committed arrived, or nothing moved for 5s.
	last, lastMove := b.received.Load(), time.Now()
	for b.received.Load()-recv0 < committed && time.Since(lastMove) < 5*time.Second {
		time.Sleep(50 * time.Millisecond)
		if r := b.received.Load(); r != last {
			last, lastMove = r, time.Now()
		}
	}
	wg.Wait()
	pr := &PublishResult{Mode: sc.Publish, Publishers: sc.Publishers, Batch: sc.Batch, Seconds: took.Seconds(),
		Committed: committed, PublishedPerSec: float64(committed) / took.Seconds(), Errors: p.errors.Load(),
		Latency: b.lat.summary(), Request: p.reqLat.summary(), CPU: phase}
	if t.PID > 0 {
		pr.ServerCPU = cpuPercent(c0, c1)
	}
	p.mu.Lock()
	if len(p.statuses) > 0 {
		pr.ErrorKinds = p.statuses
	}
	p.mu.Unlock()
	for j, i := range onlineIdx {
		s := sessions[i]
		want := p.committed[j].Load()
		s.mu.Lock()
		got := s.live - startLive[i]
		pr.Gaps += s.gaps
		pr.Duplicates += s.dups
		s.mu.Unlock()
		pr.Expected += want
		pr.Delivered += got
		if got < want {
			pr.Lost += want - got
		}
	}
	if end := b.lastRecv.Load(); end > start.UnixNano() {
		pr.DeliveredPerSec = float64(pr.Delivered) / time.Unix(0, end).Sub(start).Seconds()
	}
	return pr, nil
}

// reconnectPhase: the first sc.Reconnect sessions disconnect, their users
// get sc.ReconnectUnread notifications each while offline, and all reconnect
// with their cursors (and session ids) spread over sc.ReconnectWithin; it
// measures until the last one is synced with exactly the missed ones replayed.
func reconnectPhase(ctx context.Context, t *target, sc Scenario, users []string, sessions []*session) (*ReconnectResult, error) {
	m := min(sc.Reconnect, len(sessions))
	group := sessions[:m]
	cursors := make([]int64, m)
	ids := make([]string, m)
	var names []string
	for i, s := range group {
		s.mu.Lock()
		cursors[i], ids[i] = s.cursor, s.id
		s.mu.Unlock()
		names = append(names, users[s.user])
	}
	st, err := t.stats(ctx)
	if err != nil {
		return nil, err
	}
	closeAll(group)
	if _, err := t.waitSessions(ctx, st.Sessions-int64(m), 30*time.Second); err != nil {
		return nil, fmt.Errorf("reconnect: sessions did not end: %w", err)
	}
	if err := storeUnread(ctx, t.DBURL, names, sc.ReconnectUnread); err != nil {
		return nil, err
	}
	rr := &ReconnectResult{Clients: m, Within: sc.ReconnectWithin.Seconds()}
	var mu sync.Mutex
	var wg sync.WaitGroup
	var durs []time.Duration
	start := time.Now()
	for i, s := range group {
		at := start.Add(time.Duration(int64(sc.ReconnectWithin) * int64(i) / int64(m)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Until(at))
			err := s.connect(ctx, cursors[i], ids[i])
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				rr.Errors++
				if len(rr.Samples) < 5 {
					rr.Samples = append(rr.Samples, err.Error())
				}
				return
			}
			s.mu.Lock()
			durs = append(durs, s.syncedAt.Sub(at))
			if s.replayBad != "" || s.replayed != sc.ReconnectUnread || s.cursor != cursors[i]+int64(sc.ReconnectUnread) {
				rr.ReplayBad++
				if len(rr.Samples) < 5 {
					rr.Samples = append(rr.Samples, fmt.Sprintf("session %d: replayed %d (want %d) %s", s.idx, s.replayed, sc.ReconnectUnread, s.replayBad))
				}
			}
			if d := s.syncedAt.Sub(start).Seconds(); d > rr.AllSynced {
				rr.AllSynced = d
			}
			s.mu.Unlock()
		}()
	}
	wg.Wait()
	rr.Latency = percentiles(durs)
	return rr, nil
}

// evictPhase silences sc.Silent sessions and waits for the server
// to evict them: each must get bye heartbeat_timeout within a second after
// its deadline, and no other session may be evicted.
func evictPhase(sc Scenario, sessions []*session) *EvictResult {
	// A silent long-poll session is not polling, so nothing can carry its
	// bye: the silent ones are the last WebSocket and SSE sessions.
	var carriers, others, silent []*session
	for _, s := range sessions {
		if s.tr == transportPoll {
			others = append(others, s)
		} else {
			carriers = append(carriers, s)
		}
	}
	k := min(sc.Silent, len(carriers))
	silent = carriers[len(carriers)-k:]
	others = append(others, carriers[:len(carriers)-k]...)
	for _, s := range silent {
		s.silent.Store(true)
	}
	er := &EvictResult{Silent: k}
	deadline := time.Now().Add(sc.PingTimeout + sc.PingInterval + 5*time.Second)
	for time.Now().Before(deadline) {
		done := 0
		for _, s := range silent {
			s.mu.Lock()
			if s.byeReason != "" {
				done++
			}
			s.mu.Unlock()
		}
		if done == k {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var lags []time.Duration
	for _, s := range silent {
		s.mu.Lock()
		switch s.byeReason {
		case "":
		case "heartbeat_timeout":
			er.Evicted++
			due := time.Unix(0, s.lastSign.Load()).Add(sc.PingTimeout)
			lags = append(lags, s.byeAt.Sub(due))
		default:
			er.WrongBye++
		}
		s.mu.Unlock()
	}
	for _, s := range others {
		s.mu.Lock()
		if s.byeReason == "heartbeat_timeout" {
			er.OthersLost++
		}
		s.mu.Unlock()
	}
	er.Lag = percentiles(lags)
	return er
}

// sortedKeys returns m's keys in order (stable output).
func sortedKeys(m map[string]int) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// callsPerTx is how many single publishes shared a transaction between two
// readings of the server's metrics, or 0 when none were grouped.
func callsPerTx(before, after map[string]float64) float64 {
	const calls, groups = "notifyd_publish_single_total", "notifyd_publish_groups_total"
	c, g := after[calls]-before[calls], after[groups]-before[groups]
	if c <= 0 || g <= 0 {
		return 0
	}
	return c / g
}

// readBack is the share of dispatched notifications read back from Postgres
// between two readings of the server's metrics, or -1 without them.
func readBack(before, after map[string]float64) float64 {
	const db, mem = `notifyd_dispatched_total{source="db"}`, `notifyd_dispatched_total{source="memory"}`
	d, okD := after[db]
	m, okM := after[mem]
	if !okD || !okM {
		return -1
	}
	d, m = d-before[db], m-before[mem]
	if d+m <= 0 {
		return -1
	}
	return d / (d + m)
}
