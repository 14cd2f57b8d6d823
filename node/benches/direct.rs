//! Direct delivery on loopback, against a bare libp2p request-response baseline measured in the
//! same run (`docs/performance.md`, "Direct delivery").
//!
//! ```text
//! cargo bench -p meshchat-node --bench direct                          # full run
//! MESHCHAT_BENCH_QUICK=1 cargo bench -p meshchat-node --bench direct   # fewer samples
//! MESHCHAT_BENCH_RSS=1 cargo bench -p meshchat-node --bench direct     # idle RSS only, with
//!                                                                      # its breakdown
//! MESHCHAT_BENCH_PROFILE=20000 cargo bench -p meshchat-node --bench direct  # only N sends
//!                                                                      # in flight, for perf
//! ```
//!
//! Prints, for two nodes in one process over TCP + noise + yamux on 127.0.0.1:
//! - latency p50/p99 of one message, from `send_text` until the recipient acknowledged it after
//!   storing it durably, and of one bare request-response round trip with a payload of the same
//!   size, and their ratio;
//! - sustained durable messages per second with many sends in flight, and bare round trips per
//!   second with as many in flight;
//! - the resident memory (RSS) of a process running one idle node connected to a peer;
//! - for reference, the p50 of one synced 498-byte RocksDB write on the same disk: a message
//!   waits for two such syncs (the sender's commit and the recipient's), which no batching
//!   removes from the latency of a single message.

use std::{
    collections::HashMap,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{
    noise, request_response, swarm::SwarmEvent, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
    Swarm,
};
use meshchat_node::{storage::Storage, Node, NodeConfig, NodeHandle, SendOutcome};
use meshchat_protocol::Identity;
use rand_core::OsRng;
use tokio::sync::Semaphore;

/// Bytes of one sealed envelope of a short text message on the wire (256-byte bucket).
const PAYLOAD: usize = 498;
/// Sends in flight for the throughput runs.
const WINDOW: usize = 64;

fn quick() -> bool {
    std::env::var_os("MESHCHAT_BENCH_QUICK").is_some()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ------------------------------------------------------------------------------------------
// Bare request-response baseline
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
struct Frames;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(std::io::Error::other("frame too large"));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(
    io: &mut T,
    data: &[u8],
) -> std::io::Result<()> {
    io.write_all(&(data.len() as u32).to_be_bytes()).await?;
    io.write_all(data).await?;
    io.close().await
}

impl request_response::Codec for Frames {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &r).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        r: Vec<u8>,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame(io, &r).await
    }
}

type Bare = Swarm<request_response::Behaviour<Frames>>;

fn bare_swarm() -> Bare {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(|_| {
            request_response::Behaviour::new(
                [(
                    StreamProtocol::new("/bench/1"),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(30))
                    .with_max_concurrent_streams(256),
            )
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// The server answers every request with a 40-byte acknowledgement; runs until the process ends.
fn spawn_bare_server() -> (PeerId, Multiaddr) {
    let mut server = bare_swarm();
    server
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"))
        .expect("listen");
    let peer = *server.local_peer_id();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match server.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(address);
                    }
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                }) => {
                    let _ = server.behaviour_mut().send_response(channel, vec![0u8; 40]);
                }
                _ => {}
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server listens");
    (peer, addr)
}

async fn bare_round_trips(
    client: &mut Bare,
    peer: PeerId,
    total: usize,
    window: usize,
) -> Vec<Duration> {
    let mut started = HashMap::new();
    let mut lat = Vec::with_capacity(total);
    let mut sent = 0;
    while lat.len() < total {
        while sent < total && started.len() < window {
            let id = client
                .behaviour_mut()
                .send_request(&peer, vec![7u8; PAYLOAD]);
            started.insert(id, Instant::now());
            sent += 1;
        }
        match client.select_next_some().await {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            }) => {
                if let Some(t) = started.remove(&request_id) {
                    lat.push(t.elapsed());
                }
            }
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure { error, .. }) => {
                panic!("bare request failed: {error}")
            }
            _ => {}
        }
    }
    lat
}

// ------------------------------------------------------------------------------------------
// meshchat nodes
// ------------------------------------------------------------------------------------------

struct BenchNode {
    _home: tempfile::TempDir,
    handle: NodeHandle,
    identity: Identity,
    addr: Multiaddr,
}

async fn start_node(bootstrap: Vec<Multiaddr>) -> BenchNode {
    let home = tempfile::tempdir().expect("tempdir");
    let identity = Identity::generate(&mut OsRng);
    Storage::open(home.path())
        .expect("open storage")
        .save_identity(&identity)
        .expect("save identity");
    let mut config = NodeConfig::new(home.path());
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = bootstrap;
    config.dht_server = true;
    let handle = Node::start(config).await.expect("node starts");
    let status = handle.status().await.expect("status");
    let addr = status
        .listen_addrs
        .iter()
        .find(|a| a.contains("/tcp/"))
        .expect("a TCP address")
        .parse()
        .expect("multiaddr");
    BenchNode {
        _home: home,
        handle,
        identity,
        addr,
    }
}

/// Two users who know each other, records published, first messages (handshake) delivered.
async fn pair() -> (BenchNode, BenchNode) {
    let a = start_node(Vec::new()).await;
    let b = start_node(vec![a.addr.clone()]).await;
    a.handle
        .add_contact("b".into(), b.identity.public())
        .await
        .expect("contact");
    b.handle
        .add_contact("a".into(), a.identity.public())
        .await
        .expect("contact");
    for n in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = n.handle.publish_records().await.expect("publish");
            if r.bundle_published && r.presence_published == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "records not published");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let r = a
        .handle
        .send_text(b.identity.public(), "hello".into())
        .await
        .expect("first message");
    assert_eq!(r.outcome, SendOutcome::Delivered, "first message delivered");
    let r = b
        .handle
        .send_text(a.identity.public(), "hello back".into())
        .await
        .expect("reply");
    assert_eq!(r.outcome, SendOutcome::Delivered, "reply delivered");
    (a, b)
}

async fn meshchat_sends(
    a: &BenchNode,
    b: &BenchNode,
    total: usize,
    window: usize,
) -> Vec<Duration> {
    let sem = Arc::new(Semaphore::new(window));
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let handle = a.handle.clone();
        let to = b.identity.public();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = handle
                .send_text(to, format!("message {i}"))
                .await
                .expect("send");
            drop(permit);
            assert_eq!(r.outcome, SendOutcome::Delivered, "message {i} delivered");
            t.elapsed()
        }));
    }
    let mut lat = Vec::with_capacity(total);
    for t in tasks {
        lat.push(t.await.expect("send task"));
    }
    lat
}

/// Syncs of the write-ahead log by both nodes so far.
fn syncs(a: &BenchNode, b: &BenchNode) -> u64 {
    a.handle.storage().syncs() + b.handle.storage().syncs()
}

/// Latencies of `n` synced single writes of [`PAYLOAD`] bytes to a fresh RocksDB.
fn synced_writes(n: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, dir.path()).expect("open rocksdb");
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    let value = vec![7u8; PAYLOAD];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        db.put_opt((i as u64).to_be_bytes(), &value, &wo)
            .expect("synced write");
        lat.push(t.elapsed());
    }
    lat
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (clock ticks
/// of 10 ms: read over runs of seconds).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn rss_only() -> bool {
    std::env::var_os("MESHCHAT_BENCH_RSS").is_some()
}

/// Where the idle node's resident memory is: `smaps_rollup` and the largest mappings.
fn print_rss_detail(pid: u32) {
    if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        println!("{rollup}");
    }
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return;
    };
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            name = line
                .split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ");
            if name.is_empty() {
                name = "[anon]".into();
            }
        } else if first == "Rss:" {
            let kib = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            maps.push((kib, name.clone()));
        }
    }
    let mut by_name: HashMap<String, (u64, usize)> = HashMap::new();
    for (kib, name) in &maps {
        let e = by_name.entry(name.clone()).or_default();
        e.0 += kib;
        e.1 += 1;
    }
    let mut by_name: Vec<_> = by_name.into_iter().collect();
    by_name.sort_by_key(|(_, (kib, _))| std::cmp::Reverse(*kib));
    println!("RSS by mapping name (KiB, mappings):");
    for (name, (kib, n)) in by_name.iter().take(12) {
        println!("{kib:>8} {n:>5}  {name}");
    }
    maps.sort_by_key(|(kib, _)| std::cmp::Reverse(*kib));
    println!("largest single mappings (KiB):");
    for (kib, name) in maps.iter().take(12) {
        println!("{kib:>8}  {name}");
    }
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        println!("threads: {}", entries.count());
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Child mode: one node, connected to the peer in MESHCHAT_BENCH_IDLE_PEER, idle until killed.
async fn idle_child(peer: String) {
    let node = start_node(vec![peer.parse().expect("peer multiaddr")]).await;
    println!("ready");
    let _keep = node;
    tokio::time::sleep(Duration::from_secs(600)).await;
}

async fn idle_rss(peer: &Multiaddr) -> u64 {
    let exe = std::env::current_exe().expect("own path");
    let mut child = Command::new(exe)
        .env("MESHCHAT_BENCH_IDLE_PEER", peer.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn idle node");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("child says ready");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = rss_kib(child.id()).expect("read child RSS");
    if rss_only() {
        print_rss_detail(child.id());
    }
    let _ = child.kill();
    let _ = child.wait();
    rss
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(peer) = std::env::var("MESHCHAT_BENCH_IDLE_PEER") {
        idle_child(peer).await;
        return;
    }
    // `cargo test --benches` runs bench binaries without `--bench`; keep that cheap.
    if !std::env::args().any(|a| a == "--bench") {
        println!("direct: run with `cargo bench -p meshchat-node --bench direct`");
        return;
    }
    if rss_only() {
        let a = start_node(Vec::new()).await;
        let rss = idle_rss(&a.addr).await;
        println!("idle node RSS: {:.1} MiB", rss as f64 / 1024.0);
        a.handle.shutdown().await;
        return;
    }
    if let Some(n) = std::env::var("MESHCHAT_BENCH_PROFILE")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        // Only the throughput run, `n` sends: for a profiler.
        let (a, b) = pair().await;
        let (t, cpu, before) = (Instant::now(), cpu_time(), syncs(&a, &b));
        meshchat_sends(&a, &b, n, WINDOW).await;
        println!(
            "{n} sends: {:.0}/s, CPU {:.0} µs per message, {:.3} syncs per message",
            n as f64 / t.elapsed().as_secs_f64(),
            (cpu_time() - cpu).as_secs_f64() * 1e6 / n as f64,
            (syncs(&a, &b) - before) as f64 / n as f64
        );
        a.handle.shutdown().await;
        b.handle.shutdown().await;
        return;
    }
    let (lat_n, tput_n) = if quick() { (200, 1000) } else { (1000, 5000) };

    // Bare request-response, same transport stack.
    let (peer, addr) = spawn_bare_server();
    let mut client = bare_swarm();
    client
        .dial(addr.with(libp2p::multiaddr::Protocol::P2p(peer)))
        .expect("dial");
    bare_round_trips(&mut client, peer, 50, 1).await; // warm-up
    let mut bare_lat = bare_round_trips(&mut client, peer, lat_n, 1).await;
    bare_lat.sort();
    let (t, cpu) = (Instant::now(), cpu_time());
    bare_round_trips(&mut client, peer, tput_n, WINDOW).await;
    let bare_tput = tput_n as f64 / t.elapsed().as_secs_f64();
    let bare_cpu = (cpu_time() - cpu) / tput_n as u32;

    // meshchat direct delivery.
    let (a, b) = pair().await;
    meshchat_sends(&a, &b, 20, 1).await; // warm-up
    let mut mc_lat = meshchat_sends(&a, &b, lat_n, 1).await;
    mc_lat.sort();
    let (t, cpu, syncs_before) = (Instant::now(), cpu_time(), syncs(&a, &b));
    meshchat_sends(&a, &b, tput_n, WINDOW).await;
    let mc_tput = tput_n as f64 / t.elapsed().as_secs_f64();
    let mc_cpu = (cpu_time() - cpu) / tput_n as u32;
    let mc_syncs = (syncs(&a, &b) - syncs_before) as f64 / tput_n as f64;

    let rss = idle_rss(&a.addr).await;
    let mut sync_lat = tokio::task::spawn_blocking(move || synced_writes(lat_n))
        .await
        .expect("sync task");
    sync_lat.sort();

    let (b50, b99) = (percentile(&bare_lat, 0.5), percentile(&bare_lat, 0.99));
    let (m50, m99) = (percentile(&mc_lat, 0.5), percentile(&mc_lat, 0.99));
    println!();
    println!("direct delivery on loopback (TCP + noise + yamux), 2 nodes in one process");
    println!(
        "{:<40} {:>10} {:>10} {:>12}",
        "", "p50 ms", "p99 ms", "per second"
    );
    println!(
        "{:<40} {:>10.3} {:>10.3} {:>12.0}",
        format!("bare request-response ({PAYLOAD} B)"),
        ms(b50),
        ms(b99),
        bare_tput
    );
    println!(
        "{:<40} {:>10.3} {:>10.3} {:>12.0}",
        "meshchat send -> durable ack",
        ms(m50),
        ms(m99),
        mc_tput
    );
    println!(
        "{:<40} {:>10.2} {:>10.2} {:>12.2}",
        "ratio meshchat / bare",
        ms(m50) / ms(b50),
        ms(m99) / ms(b99),
        mc_tput / bare_tput
    );
    println!("latency: {lat_n} sequential sends; throughput: {tput_n} sends, {WINDOW} in flight");
    println!(
        "CPU time of the whole process per message in the throughput runs: bare {:.0} µs, \
         meshchat {:.0} µs (both nodes; {} cores)",
        bare_cpu.as_secs_f64() * 1e6,
        mc_cpu.as_secs_f64() * 1e6,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("syncs of the write-ahead log per message in the throughput run: {mc_syncs:.3} (both nodes)");
    println!(
        "one synced {PAYLOAD} B RocksDB write on this disk: p50 {:.3} ms, p99 {:.3} ms",
        ms(percentile(&sync_lat, 0.5)),
        ms(percentile(&sync_lat, 0.99))
    );
    println!(
        "idle node RSS: {:.1} MiB (one node, one peer, 5 s idle)",
        rss as f64 / 1024.0
    );
    println!("goals: p50 <= 3x bare; >= 10000 durable messages/s; idle RSS < 20 MiB");
    a.handle.shutdown().await;
    b.handle.shutdown().await;
}
