//! `kvroute up`: N agents and a gateway on this machine, stopped together.
//!
//! Finds `kvroute-agent` next to its own executable (or `$KVROUTE_AGENT_BIN`), starts N agents on
//! free loopback ports, each in its own process group with a parent-death signal, splitting KV
//! memory and CPU threads between them; starts the gateway in this process; waits until every
//! agent is ready and the gateway sees them; prints how to use it; and on Ctrl-C or SIGTERM (or an
//! agent exiting) stops every agent (SIGTERM to its group, SIGKILL after a grace period) and reaps
//! it, so no process outlives it.
//!
//! What it prints is a status block ([`status`]): the model check or download, the agents
//! loading, each agent's KV blocks and the gateway, redrawn in place on a terminal and as plain
//! lines on state changes elsewhere.

pub mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use kvroute_gateway::config::parse_duration;
use kvroute_gateway::types::AgentEndpoint;
use kvroute_gateway::GatewayConfig;
use kvroute_routing::PolicyKind;
use status::{AgentLine, Kv, ModelLine, Phase, Screen, Status};

/// The status block on stdout.
type Out = Screen<std::io::Stdout>;

/// Flags of `kvroute up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Agents to start.
    #[arg(long, default_value_t = 2)]
    pub agents: usize,
    /// Model every agent serves (a name `kvroute-agent serve --model` accepts).
    #[arg(long, default_value = "default")]
    pub model: String,
    /// Name clients put in the OpenAI `model` field (default: the model file's name without its
    /// extension, e.g. `SmolLM2-135M-Instruct.Q4_1` for the default model).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Where the gateway listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// KV cache memory for all agents together (split evenly), e.g. 512MiB, 2GiB.
    /// Default: a quarter of available memory, at most 1 GiB per agent.
    #[arg(long)]
    pub kv_memory: Option<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// CPU threads per agent (default: cores / agents, at least 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Routing policy of the gateway.
    #[arg(long, default_value = "kv")]
    pub policy: PolicyKind,
    /// Admission queue bound.
    #[arg(long, default_value_t = 1024)]
    pub max_queue: usize,
    /// How long a request may wait for room.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub queue_timeout: Duration,
    /// How long to wait for the agents to become ready (model loading).
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Extra argument passed to every agent's `serve` (repeatable), e.g. `--agent-arg=--max-batch=8`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// Where the agents' and the gateway's logs go (default: a new folder under the cache,
    /// `runs/up-<time>-<pid>`; printed at start).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Show the agents' and the gateway's logs on the terminal instead of in files.
    #[arg(long)]
    pub verbose: bool,
}

/// The folder this run's logs go to (`--log-dir`, or a new one under the cache), created.
pub fn log_dir(args: &UpArgs) -> std::io::Result<PathBuf> {
    let dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => {
            let cache = kvroute_engine::fetch::cache_dir().unwrap_or_else(|_| std::env::temp_dir());
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            cache
                .join("runs")
                .join(format!("up-{secs}-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Why `kvroute up` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("kvroute-agent not found at {0} (build it, or set KVROUTE_AGENT_BIN)")]
    AgentBinary(PathBuf),
    #[error("--agents must be at least 1")]
    NoAgents,
    #[error("--kv-memory {0:?}: {1}")]
    KvMemory(String, String),
    #[error("start agent {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("agent {0} exited during start-up ({1})")]
    AgentExited(String, String),
    #[error("agents not ready after {0:?}")]
    NotReady(Duration),
    #[error("free port: {0}")]
    Port(std::io::Error),
    #[error("gateway: {0}")]
    Gateway(#[from] kvroute_gateway::server::ServeError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("agent token file: {0}")]
    Token(std::io::Error),
    #[error("log folder: {0}")]
    LogDir(std::io::Error),
    #[error("model: {0}")]
    Model(String),
}

/// The shared token `kvroute up`'s agents require of its gateway: random per run, in a file
/// only this user can read, removed when `kvroute up` ends.
struct AgentToken {
    dir: PathBuf,
    path: PathBuf,
    token: String,
}

impl AgentToken {
    fn create() -> Result<Self, UpError> {
        use std::io::{Read, Write};
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let mut bytes = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(UpError::Token)?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let dir = std::env::temp_dir().join(format!("kvroute-up-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(UpError::Token)?;
        let path = dir.join("agent-token");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(token.as_bytes()))
            .map_err(UpError::Token)?;
        Ok(Self { dir, path, token })
    }
}

impl Drop for AgentToken {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses a size ([`kvroute_contract::units::parse_size`]: `256MiB`, `2GiB`, `512M`, `1G`,
/// `500MB` = 500·10⁶, or bytes), the agent's `--kv-memory` grammar.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    kvroute_contract::units::parse_size(s).map_err(|e| e.0)
}

fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Where the agent binary is.
pub fn agent_binary() -> Result<PathBuf, UpError> {
    if let Some(p) = std::env::var_os("KVROUTE_AGENT_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(UpError::AgentBinary(p))
        };
    }
    let exe = std::env::current_exe().map_err(|_| UpError::AgentBinary("kvroute-agent".into()))?;
    let p = exe.with_file_name("kvroute-agent");
    if p.is_file() {
        Ok(p)
    } else {
        Err(UpError::AgentBinary(p))
    }
}

fn free_port() -> Result<u16, UpError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(UpError::Port)?;
    Ok(l.local_addr().map_err(UpError::Port)?.port())
}

/// One started agent.
pub struct AgentProcess {
    pub id: String,
    pub endpoint: AgentEndpoint,
    pub child: Child,
    pub pid: u32,
}

/// The name every agent of this `up` serves: `--served-model-name`, else the model file's stem
/// (`default` stands for the engine's default model file).
pub fn served_name(args: &UpArgs) -> String {
    if let Some(name) = &args.served_model_name {
        return name.clone();
    }
    let file = if args.model == "default" {
        kvroute_engine::fetch::DEFAULT_MODEL_FILE
    } else {
        args.model.trim_end_matches('/')
    };
    let path = std::path::Path::new(file);
    let stem = if path.extension().is_some_and(|e| e == "gguf") {
        path.file_stem()
    } else {
        path.file_name()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| args.model.clone())
}

fn spawn_agent(
    bin: &PathBuf,
    id: &str,
    args: &UpArgs,
    kv_bytes: u64,
    threads: Option<usize>,
    token_file: &std::path::Path,
    logs: Option<&std::path::Path>,
) -> Result<AgentProcess, UpError> {
    let http = format!("127.0.0.1:{}", free_port()?);
    let grpc = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(["--model", &args.model])
        .args(["--http", &http])
        .args(["--grpc", &grpc])
        .args(["--kv-memory", &format!("{}MiB", (kv_bytes >> 20).max(1))])
        .args(["--block-size", &args.block_size.to_string()])
        .args(["--agent-id", id])
        .args(["--served-model-name", &served_name(args)]);
    if let Some(t) = threads {
        cmd.args(["--threads", &t.to_string()]);
    }
    cmd.args(&args.agent_args)
        // Only this run's gateway may call the agents (an env var, so an agent binary from
        // before the flag existed still starts).
        .env("KVROUTE_AUTH_TOKEN_FILE", token_file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        // Its own process group: a terminal's Ctrl-C reaches only `kvroute up`, which then
        // stops the agents in order.
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in the
    // child between fork and exec. It makes the kernel SIGKILL the agent if `kvroute up` dies
    // without cleaning up (e.g. SIGKILL), so agents can never be orphaned.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    if let Some(dir) = logs {
        // Both streams to one file per agent: the terminal stays for kvroute up's own lines.
        let file = std::fs::File::create(dir.join(format!("{id}.log")))
            .map_err(|e| UpError::Spawn(id.to_string(), e))?;
        let err = file
            .try_clone()
            .map_err(|e| UpError::Spawn(id.to_string(), e))?;
        cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err));
    }
    let child = cmd.spawn().map_err(|e| UpError::Spawn(id.to_string(), e))?;
    let pid = child.id().unwrap_or(0);
    Ok(AgentProcess {
        id: id.to_string(),
        endpoint: AgentEndpoint {
            http,
            grpc: format!("http://{grpc}"),
        },
        child,
        pid,
    })
}

/// Whether `kvroute-agent serve` accepts `--threads` (read from its `--help`).
async fn agent_takes_threads(bin: &PathBuf) -> bool {
    let out = Command::new(bin)
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match tokio::time::timeout(Duration::from_secs(10), out).await {
        Ok(Ok(o)) => String::from_utf8_lossy(&o.stdout).contains("--threads"),
        _ => false,
    }
}

async fn http_ok(client: &kvroute_gateway::proxy::HttpClient, url: &str) -> bool {
    let Ok(req) = hyper::Request::get(url).body(http_body_util::Full::new(Default::default()))
    else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), client.request(req)).await,
        Ok(Ok(r)) if r.status().is_success()
    )
}

/// Stops every agent: SIGTERM to each process group, SIGKILL after `grace`, then reaps.
pub async fn stop_agents(agents: &mut [AgentProcess], grace: Duration) {
    for a in agents.iter() {
        if a.pid > 0 {
            // SAFETY: plain syscall on a process group we created (pgid = the agent's pid).
            unsafe {
                libc::kill(-(a.pid as i32), libc::SIGTERM);
            }
        }
    }
    let until = Instant::now() + grace;
    for a in agents.iter_mut() {
        let left = until.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, a.child.wait()).await.is_err() {
            if a.pid > 0 {
                // SAFETY: as above.
                unsafe {
                    libc::kill(-(a.pid as i32), libc::SIGKILL);
                }
            }
            let _ = a.child.kill().await;
        }
        let _ = a.child.wait().await;
    }
}

/// Progress of the model fetch, shared with the status block.
struct ModelProgress(Arc<Mutex<ModelLine>>);

impl ModelProgress {
    fn with(&self, f: impl FnOnce(&mut ModelLine)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl kvroute_engine::fetch::Progress for ModelProgress {
    fn stage(&self, name: &str) {
        self.with(|m| {
            m.stage = name.to_string();
            m.done = 0;
            m.total = None;
        });
    }
    fn bytes(&self, done: u64, total: Option<u64>) {
        self.with(|m| {
            m.done = done;
            m.total = total;
        });
    }
}

/// For `--model default`: fetches or checks the default model here, once, with a progress bar,
/// before the agents start (they then find it in the cache, marked as checked). False when a
/// signal came first.
async fn prepare_model(
    args: &UpArgs,
    status: &mut Status,
    screen: &mut Out,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Result<bool, UpError> {
    use kvroute_engine::fetch::{self, ModelRef};
    if !matches!(args.model.parse::<ModelRef>(), Ok(ModelRef::Default)) {
        return Ok(true);
    }
    let cache = fetch::cache_dir().map_err(|e| UpError::Model(e.to_string()))?;
    let shared = Arc::new(Mutex::new(ModelLine {
        stage: "looking in the cache".into(),
        ..ModelLine::default()
    }));
    let progress = ModelProgress(shared.clone());
    let mut job =
        tokio::task::spawn_blocking(move || fetch::resolve(&ModelRef::Default, &cache, &progress));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let resolved = loop {
        tokio::select! {
            r = &mut job => break r,
            _ = tick.tick() => {
                status.model = Some(shared.lock().unwrap_or_else(|e| e.into_inner()).clone());
                screen.draw(status);
            }
            _ = term.recv() => return Ok(false),
            _ = int.recv() => return Ok(false),
        }
    };
    let path = resolved
        .map_err(|e| UpError::Model(e.to_string()))?
        .map_err(|e| UpError::Model(e.to_string()))?
        .path
        .display()
        .to_string();
    status.model = Some(ModelLine {
        path: Some(path),
        ..ModelLine::default()
    });
    screen.draw(status);
    Ok(true)
}

/// Runs `kvroute up` until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> Result<(), UpError> {
    use std::io::IsTerminal;
    use tokio::signal::unix::{signal, SignalKind};
    if args.agents == 0 {
        return Err(UpError::NoAgents);
    }
    // Install handlers first, so a signal during start-up still stops what was started.
    let mut term = signal(SignalKind::terminate()).map_err(UpError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(UpError::Signal)?;
    let bin = agent_binary()?;
    let n = args.agents;
    let total_kv = match &args.kv_memory {
        Some(s) => parse_bytes(s).map_err(|e| UpError::KvMemory(s.clone(), e))?,
        None => {
            let avail = available_memory().unwrap_or(4 << 30);
            (avail / 4).min((1u64 << 30) * n as u64)
        }
    };
    let per_agent = total_kv / n as u64;
    if per_agent < (1 << 20) {
        return Err(UpError::KvMemory(
            format!("{total_kv}"),
            "less than 1 MiB per agent".into(),
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = args.threads.unwrap_or((cores / n).max(1));
    // Split cores only with an agent that takes --threads; otherwise each agent's runtime
    // sizes itself.
    let threads = agent_takes_threads(&bin).await.then_some(threads);
    let token = AgentToken::create()?;
    // In place only on a terminal, and not while the processes' logs share it (--verbose).
    let terminal = std::io::stdout().is_terminal() && !args.verbose;
    let mut screen = Screen::new(
        std::io::stdout(),
        terminal,
        status::terminal_width().unwrap_or(80),
    )
    .follow_width(status::terminal_width);
    let mut status = Status::default();
    let logs = if args.verbose {
        None
    } else {
        let dir = log_dir(&args).map_err(UpError::LogDir)?;
        screen.say(&format!("logs: {}", dir.display()));
        Some(dir)
    };
    if !prepare_model(&args, &mut status, &mut screen, &mut term, &mut int).await? {
        return Ok(());
    }
    let mut agents = Vec::new();
    for i in 0..n {
        let id = format!("agent-{}", i + 1);
        match spawn_agent(
            &bin,
            &id,
            &args,
            per_agent,
            threads,
            &token.path,
            logs.as_deref(),
        ) {
            Ok(a) => {
                tracing::info!(agent = %a.id, pid = a.pid, http = %a.endpoint.http, grpc = %a.endpoint.grpc, "agent started");
                screen.say(&format!(
                    "agent {} pid {} http://{} {}",
                    a.id, a.pid, a.endpoint.http, a.endpoint.grpc
                ));
                status.agents.push(AgentLine {
                    id: a.id.clone(),
                    http: a.endpoint.http.clone(),
                    phase: Phase::Starting,
                    kv: None,
                });
                agents.push(a);
            }
            Err(e) => {
                stop_agents(&mut agents, Duration::from_secs(5)).await;
                return Err(e);
            }
        }
    }
    screen.draw(&status);
    let outcome = serve(
        &args,
        &mut agents,
        &mut term,
        &mut int,
        &token.token,
        &mut status,
        &mut screen,
    )
    .await;
    // Whoever read our stdout may be gone (`kvroute up | head`): a failed write must not stop
    // the agents from being stopped, so the screen ignores write errors instead of panicking.
    screen.say(&format!("stopping {} agents", agents.len()));
    stop_agents(&mut agents, Duration::from_secs(10)).await;
    screen.say("stopped");
    outcome
}

/// Polls every agent not yet ready once: exited, ready, loading (answers `/health`) or still
/// starting. Returns the first that exited.
async fn poll_agents(
    client: &kvroute_gateway::proxy::HttpClient,
    agents: &mut [AgentProcess],
    status: &mut Status,
) -> Option<(String, String)> {
    for (a, line) in agents.iter_mut().zip(status.agents.iter_mut()) {
        if let Ok(Some(exit)) = a.child.try_wait() {
            line.phase = Phase::Exited(exit.to_string());
            return Some((a.id.clone(), exit.to_string()));
        }
        if line.phase == Phase::Ready {
            continue;
        }
        line.phase = if http_ok(client, &format!("http://{}/ready", a.endpoint.http)).await {
            Phase::Ready
        } else if http_ok(client, &format!("http://{}/health", a.endpoint.http)).await {
            Phase::Loading
        } else {
            Phase::Starting
        };
    }
    None
}

/// Copies the gateway's view of each agent's KV blocks, and its queue, into the status.
fn gateway_view(gw: &kvroute_gateway::RunningGateway, status: &mut Status, bound: usize) {
    let seen = gw.gateway.router.agents();
    for line in &mut status.agents {
        line.kv = seen.iter().find(|a| a.agent_id == line.id).map(|a| Kv {
            total: a.total_blocks,
            used: a.used_blocks,
            cached: a.cached_blocks,
            running: a.running_requests,
            waiting: a.waiting_requests,
        });
    }
    let url = format!("http://{}", gw.addr);
    status.gateway = Some((url, gw.gateway.router.queue().depth, bound));
}

async fn serve(
    args: &UpArgs,
    agents: &mut [AgentProcess],
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    agent_token: &str,
    status: &mut Status,
    screen: &mut Out,
) -> Result<(), UpError> {
    let client = kvroute_gateway::proxy::http_client();
    // Wait until every agent answers /ready, or one exits, or a signal comes.
    let deadline = Instant::now() + args.ready_timeout;
    loop {
        if let Some((id, exit)) = poll_agents(&client, agents, status).await {
            screen.draw(status);
            return Err(UpError::AgentExited(id, exit));
        }
        screen.draw(status);
        if status.agents.iter().all(|a| a.phase == Phase::Ready) {
            break;
        }
        if Instant::now() > deadline {
            return Err(UpError::NotReady(args.ready_timeout));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
    let mut config = GatewayConfig::for_agents(
        args.listen,
        agents.iter().map(|a| a.endpoint.clone()).collect(),
    );
    config.policy.kind = args.policy;
    config.max_queue = args.max_queue.max(1);
    config.queue_timeout = args.queue_timeout;
    config.agent_token = Some(agent_token.to_string());
    let bound = config.max_queue;
    let gw = kvroute_gateway::start(config).await?;
    // Every agent known to the gateway and each with a fresh capacity report. (An empty list is
    // not "all eligible": the agent source registers the agents asynchronously after start.)
    let want = agents.len();
    let gw_ready = async {
        loop {
            let seen = gw.gateway.router.agents();
            if seen.len() >= want && seen.iter().all(|a| a.eligible && a.total_blocks > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = gw_ready => {},
        _ = term.recv() => { gw.abort(); return Ok(()) },
        _ = int.recv() => { gw.abort(); return Ok(()) },
    }
    gateway_view(&gw, status, bound);
    let url = format!("http://{}", gw.addr);
    let name = served_name(args);
    for line in [
        String::new(),
        format!(
            "kvroute is up: {} agents serving {name:?} (model {})",
            agents.len(),
            args.model
        ),
        format!("  OpenAI endpoint: {url}/v1"),
        format!("  dashboard:       {url}/dashboard"),
        format!("  metrics:         {url}/metrics"),
        format!("  try: curl {url}/v1/chat/completions -H 'content-type: application/json' \\"),
        format!(
            "         -d '{{\"model\":\"{name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}],\"max_tokens\":32}}'"
        ),
        "Ctrl-C stops everything.".to_string(),
        format!("READY {url}"),
    ] {
        screen.say(&line);
    }
    screen.draw(status);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let result = loop {
        tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = tick.tick() => {
                let exited = poll_agents(&client, agents, status).await;
                gateway_view(&gw, status, bound);
                screen.draw(status);
                if let Some((id, exit)) = exited {
                    tracing::error!(agent = %id, %exit, "agent exited; stopping");
                    break Err(UpError::AgentExited(id, exit));
                }
            }
        }
    };
    gw.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    #[test]
    fn served_name_matches_what_the_agent_would_call_the_model() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let up = |argv: &[&str]| Cli::parse_from([&["up"], argv].concat()).up;
        assert_eq!(served_name(&up(&[])), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(served_name(&up(&["--model", "/m/x.gguf"])), "x");
        assert_eq!(
            served_name(&up(&["--model", "/m/Qwen2-0.5B/"])),
            "Qwen2-0.5B"
        );
        assert_eq!(served_name(&up(&["--served-model-name", "smol"])), "smol");
    }
}
