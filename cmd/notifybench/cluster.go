package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/notifyd/notifyd/handlers"
)

// The cluster comparison (-cluster-compare) measures what cluster mode costs
// on one machine: the same connect storm, idle window and single-publish
// phase against one node and then against -nodes nodes sharing one schema,
// in one run. Every node is its own notifyd process (own port, own
// NOTIFY_NODE_ID); clients and publishers are spread round-robin over the
// nodes directly, with no balancer in between, and server CPU is the sum over
// the nodes' processes. With other live nodes a connect costs a node one
// COUNT query (the cluster-wide session cap) and the session's history row is
// read by the others: the ratio of server CPU per connect, many nodes over
// one, is the cost of cluster mode, judged against maxConnectCPURatio.
//
// Between the two runs a control (-cluster-control) runs the same load on
// -nodes separate single nodes (each its own schema, so none sees another):
// the same number of processes sharing the machine, without cluster mode.
// Cluster over control is what the cluster's queries cost; control over one
// node is what splitting one server into several processes on one machine
// costs.

// maxConnectCPURatio is the target for server CPU per connect, cluster over
// one node: at most 15% more.
const maxConnectCPURatio = 1.15

// clusterOptions are the -cluster-compare flags.
type clusterOptions struct {
	compare    bool
	control    bool
	nodes      int
	storm      int
	idle       int
	idleFor    time.Duration
	publishers int
	publishFor time.Duration
	procs      int
	rounds     int
}

// clusterFlags registers the cluster comparison's flags on the command line.
func clusterFlags() *clusterOptions {
	o := &clusterOptions{}
	flag.BoolVar(&o.compare, "cluster-compare", false, "instead of scenarios, run the connect storm, idle WebSocket CPU and single publishes against 1 node and then -nodes nodes on one schema (needs -spawn)")
	flag.BoolVar(&o.control, "cluster-control", true, "cluster-compare: also run -nodes separate single nodes (own schemas, no cluster mode) as a control")
	flag.IntVar(&o.nodes, "nodes", 3, "cluster-compare: nodes of the cluster")
	flag.IntVar(&o.storm, "cluster-storm", 15000, "cluster-compare: WebSocket clients of the connect storm (1 unread each)")
	flag.IntVar(&o.idle, "cluster-idle", 19000, "cluster-compare: WebSocket sessions in the idle window (the storm's plus more)")
	flag.DurationVar(&o.idleFor, "cluster-idle-for", 40*time.Second, "cluster-compare: idle CPU window")
	flag.IntVar(&o.publishers, "cluster-publishers", 64, "cluster-compare: single-notification publishers, spread over the nodes")
	flag.DurationVar(&o.publishFor, "cluster-publish-for", 10*time.Second, "cluster-compare: publish phase length")
	flag.IntVar(&o.procs, "cluster-procs", -1, "cluster-compare: GOMAXPROCS of each node of the runs with several nodes (-1: the node's share of the machine's cores, rounded up; 0: Go's default, every core); the one-node run always has every core")
	flag.IntVar(&o.rounds, "cluster-rounds", 3, "cluster-compare: rounds of the runs, interleaved; the verdict is the round with the median connect CPU ratio")
	return o
}

// ClusterRun is what one cluster size measured. CPU figures are sums over
// the nodes' processes; the ByNode slices are each node's share.
type ClusterRun struct {
	Nodes int `json:"nodes"`
	// Separate nodes each have their own schema: no node sees another (the
	// control run: as many processes, no cluster mode).
	Separate bool   `json:"separate,omitempty"`
	LoadAvg  string `json:"loadavg_at_start"`
	Error    string `json:"error,omitempty"`

	Storm *ConnectResult `json:"storm,omitempty"`
	// StormServerUS is server CPU per connect, µs, summed over the nodes.
	StormServerUS       float64   `json:"storm_server_us_per_connect"`
	StormServerUSByNode []float64 `json:"storm_server_us_per_connect_by_node,omitempty"`

	IdleSessions int     `json:"idle_sessions"`
	IdleSeconds  float64 `json:"idle_seconds"`
	// IdleCPU is server CPU over the idle window, percent of one core,
	// summed over the nodes.
	IdleCPU       float64   `json:"idle_cpu_pct"`
	IdleCPUByNode []float64 `json:"idle_cpu_pct_by_node,omitempty"`

	Publish *PublishResult `json:"publish,omitempty"`
}

// ClusterCompare is the cluster run over the one-node run (0 where the
// one-node figure is missing).
type ClusterCompare struct {
	Nodes            int     `json:"nodes"`
	ConnectRate      float64 `json:"connect_rate_ratio"`
	ConnectServerCPU float64 `json:"connect_server_cpu_ratio"`
	ConnectPostgres  float64 `json:"connect_postgres_cpu_ratio"`
	IdleCPU          float64 `json:"idle_cpu_ratio"`
	PublishRate      float64 `json:"publish_rate_ratio"`
	// Pass: the connect CPU ratio is within maxConnectCPURatio and the runs
	// were correct (Correct).
	Pass bool `json:"pass"`
	// Correct: the one-node and the cluster run connected every session with
	// exact replays and delivered every publish exactly once.
	Correct bool `json:"correct"`
	// OverControl is server CPU per connect of the cluster over that of the
	// separate nodes (0 without a control run).
	OverControl float64 `json:"connect_server_cpu_over_control,omitempty"`
}

// ClusterReport is the output of -cluster-compare: every round, and the one
// whose connect CPU ratio is the median (Runs, Compare), which decides.
type ClusterReport struct {
	Date    string `json:"date"`
	Machine string `json:"machine"`
	Commit  string `json:"commit"`
	// Procs is each node's GOMAXPROCS in the runs with several nodes (0: Go's default).
	Procs   int            `json:"procs_per_node"`
	Runs    []*ClusterRun  `json:"runs"`
	Compare ClusterCompare `json:"compare"`
	Rounds  []ClusterRound `json:"rounds"`
}

// ClusterRound is one round of the runs, one node first.
type ClusterRound struct {
	Runs    []*ClusterRun  `json:"runs"`
	Compare ClusterCompare `json:"compare"`
}

// nodeProcs is a node's GOMAXPROCS for the -cluster-procs flag procs with
// nodes nodes on cores cores: -1 gives each node its share of the cores
// (rounded up), as a deployment of several nodes on one machine would (with
// CPU limits, Go takes GOMAXPROCS from them); 0 leaves Go's default.
func nodeProcs(procs, nodes, cores int) int {
	if procs >= 0 {
		return procs
	}
	return max(1, (cores+nodes-1)/nodes)
}

// medianRound is the index of the round whose connect CPU ratio is the
// median (the lower middle one of an even count); rounds without a ratio
// count as the highest.
func medianRound(rounds []ClusterRound) int {
	idx := make([]int, len(rounds))
	for i := range idx {
		idx[i] = i
	}
	key := func(i int) float64 {
		if r := rounds[i].Compare.ConnectServerCPU; r > 0 {
			return r
		}
		return math.Inf(1)
	}
	slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(key(a), key(b)) })
	return idx[(len(idx)-1)/2]
}

// sumTicks adds the CPU ticks of samples, one per node.
func sumTicks(samples []procSample) int64 {
	var n int64
	for _, s := range samples {
		n += s.CPUTick
	}
	return n
}

// usPerUnit is ticks of CPU per unit of work, in µs (0 without units).
func usPerUnit(ticks, units int64) float64 {
	if units <= 0 {
		return 0
	}
	return float64(ticks) / clockTick * 1e6 / float64(units)
}

// pctOfCore is ticks of CPU over d, in percent of one core.
func pctOfCore(ticks int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(ticks) / clockTick / d.Seconds() * 100
}

// ratio is b over a, 0 when a is not positive.
func ratio(a, b float64) float64 {
	if a <= 0 {
		return 0
	}
	return b / a
}

// splitWorkers spreads workers over n nodes, the first ones taking the
// remainder; every node gets at least one.
func splitWorkers(workers, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = workers / n
		if i < workers%n {
			out[i]++
		}
		out[i] = max(1, out[i])
	}
	return out
}

// clusterCorrect reports whether a run connected every session with exact
// replays and delivered every publish exactly once.
func clusterCorrect(r *ClusterRun) bool {
	if r.Error != "" || r.Storm == nil || r.Storm.Errors > 0 || r.Storm.ReplayBad > 0 {
		return false
	}
	p := r.Publish
	return p != nil && p.Expected > 0 && p.Lost == 0 && p.Gaps == 0 && p.Duplicates == 0 && p.Errors == 0
}

// compareRuns sets many's figures against one's, and many's server CPU per
// connect against control's (nil: no control run).
func compareRuns(one, control, many *ClusterRun) ClusterCompare {
	c := ClusterCompare{Nodes: many.Nodes, IdleCPU: ratio(one.IdleCPU, many.IdleCPU),
		ConnectServerCPU: ratio(one.StormServerUS, many.StormServerUS)}
	if one.Storm != nil && many.Storm != nil {
		c.ConnectRate = ratio(one.Storm.PerSecond, many.Storm.PerSecond)
		if one.Storm.CPU != nil && many.Storm.CPU != nil {
			c.ConnectPostgres = ratio(one.Storm.CPU.PostgresUS, many.Storm.CPU.PostgresUS)
		}
	}
	if one.Publish != nil && many.Publish != nil {
		c.PublishRate = ratio(one.Publish.PublishedPerSec, many.Publish.PublishedPerSec)
	}
	if control != nil {
		c.OverControl = ratio(control.StormServerUS, many.StormServerUS)
	}
	c.Correct = clusterCorrect(one) && clusterCorrect(many)
	c.Pass = c.ConnectServerCPU > 0 && c.ConnectServerCPU <= maxConnectCPURatio && c.Correct
	return c
}

// runClusterCompare runs one node, then o.nodes nodes, and writes the
// comparison (stdout, and cluster.json and cluster.md in cfg.outDir).
func runClusterCompare(ctx context.Context, cfg runConfig, o *clusterOptions, commit string) error {
	if cfg.bin == "" {
		return errors.New("-cluster-compare needs -spawn BIN")
	}
	if o.nodes < 2 || o.storm <= 0 {
		return fmt.Errorf("-cluster-compare: want -nodes >= 2 and -cluster-storm > 0")
	}
	rep := &ClusterReport{Date: today(), Machine: machine(), Commit: commit, Procs: nodeProcs(o.procs, o.nodes, runtime.NumCPU())}
	for round := range max(1, o.rounds) {
		runs := []*ClusterRun{{Nodes: 1}}
		if o.control {
			runs = append(runs, &ClusterRun{Nodes: o.nodes, Separate: true})
		}
		runs = append(runs, &ClusterRun{Nodes: o.nodes})
		var done []*ClusterRun
		for _, r := range runs {
			if ctx.Err() != nil {
				break
			}
			cfg.log.Info("cluster", "round", round+1, "nodes", r.Nodes, "separate", r.Separate)
			r.LoadAvg = loadAvg()
			if err := runCluster(ctx, cfg, o, r); err != nil {
				r.Error = err.Error()
				cfg.log.Warn("cluster run", "nodes", r.Nodes, "separate", r.Separate, "err", err)
			}
			done = append(done, r)
			time.Sleep(time.Second) // let the sockets of this run leave TIME_WAIT's way a little
		}
		if len(done) < len(runs) {
			break
		}
		var control *ClusterRun
		if o.control {
			control = done[1]
		}
		rep.Rounds = append(rep.Rounds, ClusterRound{Runs: done, Compare: compareRuns(done[0], control, done[len(done)-1])})
	}
	if len(rep.Rounds) > 0 {
		m := rep.Rounds[medianRound(rep.Rounds)]
		rep.Runs, rep.Compare = m.Runs, m.Compare
		for _, r := range rep.Rounds {
			// Every round must be correct, whichever decides.
			rep.Compare.Pass = rep.Compare.Pass && r.Compare.Correct
		}
	}
	writeClusterMarkdown(os.Stdout, rep)
	if cfg.outDir == "" {
		return nil
	}
	if err := writeJSON(filepath.Join(cfg.outDir, "cluster.json"), rep); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(cfg.outDir, "cluster.md"))
	if err != nil {
		return err
	}
	writeClusterMarkdown(f, rep)
	return f.Close()
}

// clusterStatsView is the part of a node's GET /v1/stats the comparison reads.
type clusterStatsView struct {
	Sessions int64 `json:"sessions"`
	Nodes    []struct {
		Node string `json:"node"`
	} `json:"nodes"`
}

// waitCluster waits until every node lists want live nodes in /v1/stats (a
// node runs the cluster queries only once it has seen another live node).
func waitCluster(ctx context.Context, nodes []*target, want int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, t := range nodes {
		for {
			var st clusterStatsView
			if _, err := t.get(ctx, "/v1/stats", &st); err == nil && len(st.Nodes) == want {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s does not list %d live nodes within %s", t.URL, want, timeout)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}

// waitClusterSessions waits until the first node counts want sessions across
// the cluster, or, for separate nodes, their counts add up to want.
func waitClusterSessions(ctx context.Context, nodes []*target, separate bool, want int64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	if !separate {
		nodes = nodes[:1]
	}
	for {
		var st clusterStatsView
		var err error
		for _, t := range nodes {
			var one clusterStatsView
			_, e := t.get(ctx, "/v1/stats", &one)
			st.Sessions += one.Sessions
			err = errors.Join(err, e)
		}
		if err == nil && st.Sessions == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster has %d sessions, want %d (err %v)", st.Sessions, want, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// runKind names r's kind in file names: cluster or separate.
func runKind(r *ClusterRun) string {
	if r.Separate {
		return "separate"
	}
	return "cluster"
}

// nodePIDs are the nodes' process ids.
func nodePIDs(nodes []*target) []int {
	out := make([]int, len(nodes))
	for i, t := range nodes {
		out[i] = t.PID
	}
	return out
}

// readNodes samples every node's /proc.
func readNodes(nodes []*target) []procSample {
	out := make([]procSample, len(nodes))
	for i, t := range nodes {
		out[i], _ = readProc(t.PID)
	}
	return out
}

// runCluster starts r.Nodes nodes on one fresh schema (or each on its own,
// r.Separate) and measures the storm, the idle window and the publish phase
// against them.
func runCluster(ctx context.Context, cfg runConfig, o *clusterOptions, r *ClusterRun) error {
	const ping, pingTimeout = 20 * time.Second, 60 * time.Second
	log := cfg.log.With("nodes", r.Nodes, "separate", r.Separate)
	set := serverSettings{PingInterval: ping, PingTimeout: pingTimeout, MaxSessionsPerUser: 20,
		APIKey: "bench-key-" + randomHex(12), JWTSecret: "bench-secret-" + randomHex(16)}
	if r.Nodes > 1 {
		set.GOMAXPROCS = nodeProcs(o.procs, r.Nodes, runtime.NumCPU())
	}
	if !r.Separate {
		set.Schema = "bench_" + randomHex(6)
		if err := execSQL(ctx, cfg.baseDB, "CREATE SCHEMA "+set.Schema); err != nil {
			return fmt.Errorf("create schema: %w", err)
		}
		defer dropSchema(cfg.baseDB, set.Schema)
	}
	var nodes []*target
	defer func() {
		for _, t := range nodes {
			t.stop()
		}
	}()
	for i := range r.Nodes {
		set.NodeID = fmt.Sprintf("bench-%d-of-%d", i+1, r.Nodes)
		logPath := ""
		if cfg.outDir != "" {
			logPath = filepath.Join(cfg.outDir, fmt.Sprintf("%s-%d.node-%d.server.log", runKind(r), r.Nodes, i+1))
		}
		t, err := spawnServer(ctx, cfg.bin, cfg.baseDB, logPath, set)
		if err != nil {
			return fmt.Errorf("node %d: %w", i+1, err)
		}
		nodes = append(nodes, t)
	}
	if r.Nodes > 1 && !r.Separate {
		if err := waitCluster(ctx, nodes, r.Nodes, 30*time.Second); err != nil {
			return err
		}
	}

	// One bench per node; session i talks to node i mod N.
	benches := make([]*bench, len(nodes))
	for i, t := range nodes {
		benches[i] = newBench(ctx, t, cfg.sources, ping, pingTimeout)
		defer benches[i].close()
	}
	auth := handlers.NewAuth(set.JWTSecret, "", nil)
	total := max(o.storm, o.idle)
	users := make([]string, total)
	sessions := make([]*session, total)
	for i := range sessions {
		users[i] = fmt.Sprintf("u%06d", i)
		tok, err := auth.NewToken(users[i], "bench", 6*time.Hour)
		if err != nil {
			return err
		}
		sessions[i] = &session{b: benches[i%len(benches)], idx: i, user: i, userID: users[i], token: tok, tr: transportWS}
	}
	defer closeAll(sessions)
	// Each node's users get their unread in its schema (one schema for a cluster).
	for k, t := range nodes {
		var mine []string
		for i := k; i < o.storm; i += len(nodes) {
			mine = append(mine, users[i])
		}
		if err := storeUnread(ctx, t.DBURL, mine, 1); err != nil {
			return err
		}
	}
	for _, t := range nodes {
		_ = t.forceGC(ctx)
	}
	time.Sleep(3 * time.Second)

	// The storm: o.storm clients at once, each replaying its one unread.
	log.Info("storm", "clients", o.storm)
	var profiles sync.WaitGroup
	if cfg.pprof && cfg.outDir != "" {
		// Each node's CPU profile over the storm and a little after it.
		for i, t := range nodes {
			path := filepath.Join(cfg.outDir, "pprof", fmt.Sprintf("%s-%d.node-%d.storm.cpu.pb.gz", runKind(r), r.Nodes, i+1))
			profiles.Go(func() { _ = t.profile(ctx, "profile?seconds=4", path) })
		}
		time.Sleep(100 * time.Millisecond)
	}
	phase := startPhaseCPU(0, nodePIDs(nodes)...)
	c0 := readNodes(nodes)
	cr := connectAll(ctx, sessions[:o.storm], 0, 512, func(*session) (int64, string) { return 0, "" })
	c1 := readNodes(nodes)
	profiles.Wait()
	connected := int64(o.storm - cr.Errors)
	phase.finish(connected)
	cr.CPU = phase
	r.StormServerUS = usPerUnit(sumTicks(c1)-sumTicks(c0), connected)
	served := make([]int64, len(nodes))
	for _, s := range sessions[:o.storm] {
		s.mu.Lock()
		if s.synced {
			served[s.idx%len(nodes)]++
			if s.replayBad != "" || s.replayed != 1 || s.cursor != 1 {
				cr.ReplayBad++
			}
		}
		s.mu.Unlock()
	}
	for i := range nodes {
		// A node's share is its CPU over the connects it served.
		r.StormServerUSByNode = append(r.StormServerUSByNode, usPerUnit(c1[i].CPUTick-c0[i].CPUTick, served[i]))
	}
	cr.CPU.ServerUS, cr.CPU.Server = r.StormServerUS, pctOfCore(sumTicks(c1)-sumTicks(c0), c1[0].At.Sub(c0[0].At))
	r.Storm = cr
	log.Info("stormed", "per_second", int(cr.PerSecond), "errors", cr.Errors, "server_us", int(r.StormServerUS))
	if cr.Errors == o.storm {
		return fmt.Errorf("no session connected: %v", cr.Samples)
	}

	// The rest of the idle sessions, then the idle window.
	rest := connectAll(ctx, sessions[o.storm:], 0, 256, func(*session) (int64, string) { return 0, "" })
	live := int64(total - cr.Errors - rest.Errors)
	if err := waitClusterSessions(ctx, nodes, r.Separate, live, 30*time.Second); err != nil {
		log.Warn("cluster session count", "err", err)
	}
	time.Sleep(3 * time.Second)
	r.IdleSessions = int(live)
	i0 := readNodes(nodes)
	time.Sleep(o.idleFor)
	i1 := readNodes(nodes)
	span := i1[0].At.Sub(i0[0].At)
	r.IdleSeconds = span.Seconds()
	r.IdleCPU = pctOfCore(sumTicks(i1)-sumTicks(i0), span)
	for i := range nodes {
		r.IdleCPUByNode = append(r.IdleCPUByNode, pctOfCore(i1[i].CPUTick-i0[i].CPUTick, span))
	}
	log.Info("idle", "sessions", live, "cpu_pct", r.IdleCPU)

	pr, err := clusterPublish(ctx, nodes, benches, r.Separate, o, users, sessions)
	if err != nil {
		return err
	}
	r.Publish = pr
	log.Info("published", "per_second", int(pr.PublishedPerSec), "lost", pr.Lost, "p99_ms", pr.Latency.P99)
	for i, t := range nodes {
		if !t.alive() {
			return fmt.Errorf("node %d exited during the run", i+1)
		}
	}
	return nil
}

// clusterPublish publishes single notifications to every online user for
// o.publishFor, with the publishers spread over the nodes, and checks that
// every session got every notification of its user exactly once, whichever
// node took the publish. Separate nodes' publishers publish only to the
// users of their own node (a node knows only its own schema).
func clusterPublish(ctx context.Context, nodes []*target, benches []*bench, separate bool, o *clusterOptions, users []string,
	sessions []*session) (*PublishResult, error) {
	var online []string
	var onlineIdx []int
	startLive := make([]int64, len(sessions))
	for i, s := range sessions {
		s.mu.Lock()
		if s.synced && s.byeReason == "" {
			online = append(online, users[i])
			onlineIdx = append(onlineIdx, i)
		}
		startLive[i] = s.live
		s.mu.Unlock()
	}
	if len(online) == 0 {
		return nil, errors.New("publish: no session online")
	}
	var recv0 int64
	for _, b := range benches {
		b.lat.reset()
		recv0 += b.received.Load()
	}
	// pubUsers[k] are the indexes into online that node k's publisher serves.
	pubs := make([]*publisher, len(nodes))
	pubUsers := make([][]int, len(nodes))
	for k, t := range nodes {
		var names []string
		for j, i := range onlineIdx {
			if !separate || i%len(nodes) == k {
				pubUsers[k] = append(pubUsers[k], j)
				names = append(names, online[j])
			}
		}
		pubs[k] = newPublisher(t, names)
	}
	workers := splitWorkers(o.publishers, len(nodes))
	phase := startPhaseCPU(0, nodePIDs(nodes)...)
	c0 := readNodes(nodes)
	start := time.Now()
	var wg sync.WaitGroup
	took := make([]time.Duration, len(nodes))
	errs := make([]error, len(nodes))
	for i, p := range pubs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			took[i], errs[i] = p.run(ctx, publishSingle, workers[i], 1, o.publishFor)
		}()
	}
	wg.Wait()
	c1 := readNodes(nodes)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	committed := make([]int64, len(online))
	var all int64
	for k, p := range pubs {
		for x, j := range pubUsers[k] {
			n := p.committed[x].Load()
			committed[j] += n
			all += n
		}
	}
	phase.finish(all)
	received := func() int64 {
		var n int64
		for _, b := range benches {
			n += b.received.Load()
		}
		return n - recv0
	}
	// Drain: wait until everything committed arrived, or nothing moved for 5s.
	last, lastMove := received(), time.Now()
	for received() < all && time.Since(lastMove) < 5*time.Second {
		time.Sleep(50 * time.Millisecond)
		if n := received(); n != last {
			last, lastMove = n, time.Now()
		}
	}
	secs := slices.Max(took).Seconds()
	pr := &PublishResult{Mode: publishSingle, Publishers: o.publishers, Batch: 1, Seconds: secs, Committed: all,
		PublishedPerSec: float64(all) / secs, ReadBack: -1, CPU: phase,
		ServerCPU: pctOfCore(sumTicks(c1)-sumTicks(c0), c1[0].At.Sub(c0[0].At))}
	phase.ServerUS, phase.Server = usPerUnit(sumTicks(c1)-sumTicks(c0), all), pr.ServerCPU
	var lats, reqs latencies
	var lastRecv int64
	for i, b := range benches {
		mergeLatencies(&lats, &b.lat)
		mergeLatencies(&reqs, &pubs[i].reqLat)
		lastRecv = max(lastRecv, b.lastRecv.Load())
		pr.Errors += pubs[i].errors.Load()
		pubs[i].mu.Lock()
		for k, v := range pubs[i].statuses {
			if pr.ErrorKinds == nil {
				pr.ErrorKinds = map[string]int{}
			}
			pr.ErrorKinds[k] += v
		}
		pubs[i].mu.Unlock()
	}
	pr.Latency, pr.Request = lats.summary(), reqs.summary()
	for j, i := range onlineIdx {
		s := sessions[i]
		s.mu.Lock()
		got := s.live - startLive[i]
		pr.Gaps += s.gaps
		pr.Duplicates += s.dups
		s.mu.Unlock()
		pr.Expected += committed[j]
		pr.Delivered += got
		if got < committed[j] {
			pr.Lost += committed[j] - got
		}
	}
	if lastRecv > start.UnixNano() {
		pr.DeliveredPerSec = float64(pr.Delivered) / time.Unix(0, lastRecv).Sub(start).Seconds()
	}
	return pr, nil
}

// mergeLatencies adds every latency of src to dst.
func mergeLatencies(dst, src *latencies) {
	for i := range src.shards {
		sh := &src.shards[i]
		sh.mu.Lock()
		for _, d := range sh.xs {
			dst.add(i, d)
		}
		sh.mu.Unlock()
	}
}

// writeClusterMarkdown writes the comparison table: one column per run, then
// the ratio of the last run over the first.
func writeClusterMarkdown(w io.Writer, rep *ClusterReport) {
	fmt.Fprintf(w, "Cluster mode on one machine, measured %s on %s, commit %s. Every node is its own notifyd process "+
		"(NOTIFY_DEV=0, own port and NOTIFY_NODE_ID) on one schema of the same Postgres 15; clients and publishers go "+
		"round-robin to the nodes directly; server CPU is the sum over the nodes' processes (from /proc). %s\n\n",
		rep.Date, rep.Machine, rep.Commit, procsNote(rep.Procs))
	if n := len(rep.Rounds); n > 1 {
		fmt.Fprintf(w, "%d rounds ran interleaved (1 node, then the others, in each); the table is the round whose "+
			"server CPU per connect, cluster over one node, is the median, and the rounds are listed after it.\n\n", n)
	}
	if len(rep.Runs) == 0 {
		return
	}
	head, rule := "| measure |", "|---|"
	for _, r := range rep.Runs {
		switch {
		case r.Separate:
			head += fmt.Sprintf(" control: %d separate nodes |", r.Nodes)
		case r.Nodes == 1:
			head += " 1 node |"
		default:
			head += fmt.Sprintf(" cluster of %d nodes |", r.Nodes)
		}
		rule += "---|"
	}
	fmt.Fprintln(w, head+" ratio | target | met |")
	fmt.Fprintln(w, rule+"---|---|---|")
	c := rep.Compare
	row := func(what string, cell func(*ClusterRun) string, ratio float64, target, met string) {
		line := "| " + what + " |"
		for _, r := range rep.Runs {
			line += " " + cell(r) + " |"
		}
		rs := ""
		if ratio > 0 {
			rs = fmt.Sprintf("%.2f", ratio)
		}
		fmt.Fprintf(w, "%s %s | %s | %s |\n", line, rs, target, met)
	}
	storm := func(f func(*ConnectResult) string) func(*ClusterRun) string {
		return func(r *ClusterRun) string {
			if r.Storm == nil {
				return "–"
			}
			return f(r.Storm)
		}
	}
	pub := func(f func(*PublishResult) string) func(*ClusterRun) string {
		return func(r *ClusterRun) string {
			if r.Publish == nil {
				return "–"
			}
			return f(r.Publish)
		}
	}
	yes := func(ok bool) string {
		if ok {
			return "yes"
		}
		return "**NO**"
	}
	r0 := rep.Runs[0]
	row("load average at start", func(r *ClusterRun) string { return r.LoadAvg }, 0, "", "")
	if r0.Storm != nil {
		row(fmt.Sprintf("connect storm, %s WebSocket clients at once (1 unread each): connects/s", num(float64(r0.Storm.Sessions))),
			storm(func(s *ConnectResult) string {
				return fmt.Sprintf("%s (%d errors, %d bad replays, p99 %.0f ms)", num(s.PerSecond), s.Errors, s.ReplayBad, s.Latency.P99)
			}), c.ConnectRate, "reported", "")
	}
	row("server CPU per connect, sum over nodes", func(r *ClusterRun) string { return fmt.Sprintf("%.0f µs", r.StormServerUS) },
		c.ConnectServerCPU, fmt.Sprintf("ratio <= %.2f", maxConnectCPURatio), yes(c.Pass))
	row("Postgres CPU per connect", storm(func(s *ConnectResult) string {
		if s.CPU == nil {
			return "–"
		}
		return fmt.Sprintf("%.0f µs", s.CPU.PostgresUS)
	}), c.ConnectPostgres, "reported", "")
	row("machine CPU per connect (all processes)", storm(func(s *ConnectResult) string {
		if s.CPU == nil {
			return "–"
		}
		return fmt.Sprintf("%.0f µs", s.CPU.MachineUS)
	}), 0, "reported", "")
	row("idle server CPU, 20 s pings, sum over nodes (% of a core)", func(r *ClusterRun) string {
		return fmt.Sprintf("%.2f%% (%s sessions, %.0f s)", r.IdleCPU, num(float64(r.IdleSessions)), r.IdleSeconds)
	}, c.IdleCPU, "reported", "")
	row("single publishes committed/s, publishers spread over the nodes", pub(func(p *PublishResult) string {
		return fmt.Sprintf("%s (%d publishers, server CPU %.0f%%, %.0f µs each)", num(p.PublishedPerSec), p.Publishers, p.ServerCPU, p.CPU.ServerUS)
	}), c.PublishRate, "reported", "")
	row("publish-to-receive latency p50 / p99", pub(func(p *PublishResult) string {
		return fmt.Sprintf("%.1f / %.1f ms", p.Latency.P50, p.Latency.P99)
	}), 0, "reported", "")
	row("lost (by seq), duplicated, publish errors", pub(func(p *PublishResult) string {
		return fmt.Sprintf("%d lost of %s, %d gaps, %d dups, %d errors", p.Lost, num(float64(p.Expected)), p.Gaps, p.Duplicates, p.Errors)
	}), 0, "0", yes(clusterCorrect(r0) && clusterCorrect(rep.Runs[len(rep.Runs)-1])))
	if c.OverControl > 0 {
		fmt.Fprintf(w, "\nRatio: the last run over the first. Server CPU per connect, cluster over the control: %.2f.\n", c.OverControl)
	}
	for _, r := range rep.Runs {
		if r.Error != "" {
			fmt.Fprintf(w, "\n%d node(s), separate %v: **error**: %s\n", r.Nodes, r.Separate, r.Error)
		}
	}
	if len(rep.Rounds) > 1 {
		fmt.Fprintln(w, "\n| round | server CPU per connect: 1 node / control / cluster | cluster ÷ 1 node | cluster ÷ control | correct |")
		fmt.Fprintln(w, "|---|---|---|---|---|")
		for i, rd := range rep.Rounds {
			var us []string
			for _, r := range rd.Runs {
				us = append(us, fmt.Sprintf("%.0f", r.StormServerUS))
			}
			fmt.Fprintf(w, "| %d | %s µs | %.2f | %.2f | %s |\n", i+1, strings.Join(us, " / "),
				rd.Compare.ConnectServerCPU, rd.Compare.OverControl, yes(rd.Compare.Correct))
		}
	}
}

// procsNote says what GOMAXPROCS the nodes of the runs with several nodes had.
func procsNote(procs int) string {
	if procs <= 0 {
		return "Every node has Go's default GOMAXPROCS (every core)."
	}
	return fmt.Sprintf("In the runs with several nodes each node has GOMAXPROCS=%d, its share of the machine's cores "+
		"(as CPU limits give it in a deployment); the one node has every core.", procs)
}
