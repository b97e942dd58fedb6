//! A real Kubernetes control plane for tests: etcd and kube-apiserver, started
//! from `KUBEBUILDER_ASSETS` (controller-runtime envtest's convention) on free
//! loopback ports with a fresh data dir.
//!
//! ```no_run
//! # async fn example() {
//! let Some(cp) = kube_envtest::ControlPlane::shared("my test").await else {
//!     return; // KUBEBUILDER_ASSETS unset: printed "SKIPPED my test: ..."
//! };
//! let admin = cp.client().await;
//! let operator = cp.client_for(&cp.service_account("agent-env-system", "agent-env").await).await;
//! # }
//! ```
//!
//! There is no kubelet, scheduler or controller-manager: pods stay `Pending`,
//! Deployments create nothing, namespaces never finish terminating and
//! owner references are not garbage collected. Authentication is a static
//! admin token (`system:masters`) and service account tokens from the
//! TokenRequest API; authorization is RBAC, as in a cluster.
//!
//! No server outlives the test process: a [`ControlPlane`] stops its servers
//! when dropped (also while a test panics), and every server is armed to be
//! killed by the kernel when the test process ends however it ends (see
//! `process.rs`). The shared control plane of a test binary lives until the
//! process ends.

pub mod apply;
mod etcd;
mod process;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// The environment variable naming the directory that holds `etcd` and
/// `kube-apiserver` (and, optionally, `kubectl`).
pub const ASSETS_VAR: &str = "KUBEBUILDER_ASSETS";

/// The static admin token (`system:masters`).
const ADMIN_TOKEN: &str = "envtest-admin";

/// How long a stopped API server may drain before it is killed. It would
/// otherwise hold its port (and the restart) for up to a minute while
/// long-running requests such as watches finish.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How long the API server may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The assets directory, or why there is none.
pub fn assets() -> Result<PathBuf, String> {
    let dir = std::env::var_os(ASSETS_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "{ASSETS_VAR} is not set; point it at a directory holding etcd and kube-apiserver \
                 (`setup-envtest use -p path` prints one)"
            )
        })?;
    for bin in ["etcd", "kube-apiserver"] {
        if !dir.join(bin).is_file() {
            return Err(format!("{ASSETS_VAR}={} holds no {bin}", dir.display()));
        }
    }
    Ok(dir)
}

/// The assets directory; `None` after printing `SKIPPED <what>: <why>`.
pub fn assets_or_skip(what: &str) -> Option<PathBuf> {
    match assets() {
        Ok(dir) => Some(dir),
        Err(why) => {
            // Printed straight to stderr: cargo's capture would hide a skip.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
            None
        }
    }
}

/// How to start a control plane.
#[derive(Clone, Debug, Default)]
pub struct Options {
    apiserver_args: Vec<String>,
    audit: bool,
}

impl Options {
    /// An extra kube-apiserver flag, e.g. `--watch-cache=false`.
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.apiserver_args.push(arg.into());
        self
    }

    /// Record every request in an audit log (metadata only: who, verb,
    /// resource, subresource, object, response code), read with
    /// [`ControlPlane::audit`].
    pub fn audit(mut self) -> Self {
        self.audit = true;
        self
    }
}

/// The audit policy of [`Options::audit`]: one event per request, when it
/// completes (or, for a watch, also when it starts).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n";

#[derive(Clone, Copy, Debug)]
struct Ports {
    etcd: u16,
    peer: u16,
    api: u16,
}

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    dir: PathBuf,
    assets: PathBuf,
    ports: Ports,
    options: Options,
    etcd: Mutex<Option<Child>>,
    apiserver: Mutex<Option<Child>>,
}

static SHARED: tokio::sync::OnceCell<Option<ControlPlane>> = tokio::sync::OnceCell::const_new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A fresh data dir, after removing those of test processes that are gone.
fn data_dir() -> PathBuf {
    let parent = std::env::temp_dir().join("kube-envtest");
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !process::alive(p)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the data dir can be made");
    dir
}

impl ControlPlane {
    /// A control plane of this test's own, stopped when dropped; `None`
    /// (after printing SKIPPED) without assets.
    pub async fn start(what: &str) -> Option<ControlPlane> {
        Self::start_with(what, Options::default()).await
    }

    /// [`start`](Self::start) with options.
    pub async fn start_with(what: &str, options: Options) -> Option<ControlPlane> {
        let assets = assets_or_skip(what)?;
        let cp = ControlPlane {
            dir: data_dir(),
            assets,
            ports: Ports {
                etcd: free_port(),
                peer: free_port(),
                api: free_port(),
            },
            options,
            etcd: Mutex::new(None),
            apiserver: Mutex::new(None),
        };
        cp.write_files();
        cp.start_etcd();
        cp.start_apiserver().await;
        Some(cp)
    }

    /// The control plane shared by every test of this test binary, started
    /// by the first test that asks; it lives until the process ends. Tests
    /// sharing it keep to namespaces of their own.
    pub async fn shared(what: &str) -> Option<&'static ControlPlane> {
        assets_or_skip(what)?;
        SHARED.get_or_init(|| Self::start(what)).await.as_ref()
    }

    fn write_files(&self) {
        let key = rcgen::KeyPair::generate().expect("an ECDSA key");
        std::fs::write(self.dir.join("sa.key"), key.serialize_pem()).expect("sa.key");
        std::fs::write(self.dir.join("sa.pub"), key.public_key_pem()).expect("sa.pub");
        std::fs::write(
            self.dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n"),
        )
        .expect("tokens.csv");
        self.write_kubeconfig(&self.kubeconfig(), "admin", ADMIN_TOKEN);
        if self.options.audit {
            std::fs::write(self.dir.join("audit-policy.yaml"), AUDIT_POLICY)
                .expect("audit-policy.yaml");
        }
    }

    fn write_kubeconfig(&self, path: &Path, user: &str, token: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: envtest\n  context: {{cluster: envtest, user: {user}, namespace: default}}\ncurrent-context: envtest\n",
            self.url(),
            self.ca().display(),
        );
        std::fs::write(path, text).expect("a kubeconfig can be written");
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .expect("a log file")
    }

    fn start_etcd(&self) {
        let url = format!("http://127.0.0.1:{}", self.ports.etcd);
        let mut cmd = Command::new(self.assets.join("etcd"));
        cmd.arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!(
                "--listen-peer-urls=http://127.0.0.1:{}",
                self.ports.peer
            ))
            // Tests need no durability, and fsync would make them slow.
            .arg("--unsafe-no-fsync")
            .stdin(Stdio::null())
            .stdout(self.log("etcd.log"))
            .stderr(self.log("etcd.log"));
        let child = process::spawn(cmd).expect("etcd starts");
        *self.etcd.lock().expect("etcd lock") = Some(child);
    }

    /// Starts the API server (again, on the same port and certificates) and
    /// waits until it is ready.
    pub async fn start_apiserver(&self) {
        let mut cmd = Command::new(self.assets.join("kube-apiserver"));
        let key = self.dir.join("sa.key");
        let public = self.dir.join("sa.pub");
        cmd.arg(format!(
            "--etcd-servers=http://127.0.0.1:{}",
            self.ports.etcd
        ))
        .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
        .arg(format!("--secure-port={}", self.ports.api))
        .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
        .arg(format!(
            "--token-auth-file={}",
            self.dir.join("tokens.csv").display()
        ))
        .arg("--authorization-mode=Node,RBAC")
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!("--service-account-key-file={}", public.display()))
        .arg(format!(
            "--service-account-signing-key-file={}",
            key.display()
        ))
        .args([
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
        ])
        .args(&self.options.apiserver_args)
        .args(self.audit_args())
        .stdin(Stdio::null())
        .stdout(self.log("kube-apiserver.log"))
        .stderr(self.log("kube-apiserver.log"));
        let child = process::spawn(cmd).expect("kube-apiserver starts");
        *self.apiserver.lock().expect("apiserver lock") = Some(child);
        self.wait_ready().await;
    }

    fn audit_args(&self) -> Vec<String> {
        if !self.options.audit {
            return Vec::new();
        }
        vec![
            format!(
                "--audit-policy-file={}",
                self.dir.join("audit-policy.yaml").display()
            ),
            format!("--audit-log-path={}", self.dir.join("audit.log").display()),
            "--audit-log-format=json".into(),
            // Written as each request completes, so a test reads what it just caused.
            "--audit-log-mode=blocking".into(),
            // One file however long the test: the default rotates at 100 MB,
            // and readers of the log would lose what the old file held.
            "--audit-log-maxsize=1000000".into(),
        ]
    }

    /// Every audit event so far (with [`Options::audit`]): JSON objects
    /// with `user.username`, `verb`, `objectRef` (`apiGroup`, `resource`,
    /// `subresource`, `namespace`, `name`), `responseStatus.code`, `stage`.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops the API server (SIGTERM, as in a rolling upgrade, then SIGKILL
    /// after a few seconds of draining); etcd and everything stored stay.
    pub async fn stop_apiserver(&self) {
        let child = self.apiserver.lock().expect("apiserver lock").take();
        if let Some(mut child) = child {
            tokio::task::spawn_blocking(move || process::stop(&mut child, STOP_GRACE))
                .await
                .expect("stopping does not panic");
        }
    }

    /// Stops and starts the API server.
    pub async fn restart_apiserver(&self) {
        self.stop_apiserver().await;
        self.start_apiserver().await;
    }

    async fn wait_ready(&self) {
        let started = Instant::now();
        let failed = |why: &str| -> ! {
            panic!(
                "kube-apiserver {why}; its log ends:\n{}",
                self.log_tail("kube-apiserver.log", 30)
            )
        };
        loop {
            let exited = self
                .apiserver
                .lock()
                .expect("apiserver lock")
                .as_mut()
                .map(|c| matches!(c.try_wait(), Ok(Some(_))))
                .unwrap_or(true);
            if exited {
                failed("exited");
            }
            if started.elapsed() > READY_TIMEOUT {
                failed("did not become ready");
            }
            if self.ca().is_file() {
                let client = self.client().await;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .expect("a request");
                if client
                    .request_text(req)
                    .await
                    .is_ok_and(|t| t.trim() == "ok")
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last `n` lines of one of the servers' logs (`kube-apiserver.log`,
    /// `etcd.log`).
    pub fn log_tail(&self, file: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The data dir: certificates, kubeconfigs, logs, etcd's data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.api)
    }

    /// The API server's CA bundle (self-signed, made at its first start).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("certs").join("apiserver.crt")
    }

    /// A kubeconfig authenticating as `system:masters`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A client as `system:masters`.
    pub async fn client(&self) -> kube::Client {
        self.client_for(&self.kubeconfig()).await
    }

    /// A client from one of this control plane's kubeconfigs.
    pub async fn client_for(&self, kubeconfig: &Path) -> kube::Client {
        kube::Client::try_from(config(kubeconfig).await).expect("a client")
    }

    /// A kubeconfig authenticating as service account `namespace/name`,
    /// with a token from the TokenRequest API (valid for a day). The
    /// namespace and the account are created when missing.
    pub async fn service_account(&self, namespace: &str, name: &str) -> PathBuf {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
        use kube::api::{Api, PostParams};
        let admin = self.client().await;
        let object = |name: &str| serde_json::json!({"metadata": {"name": name}});
        fn created<T>(r: kube::Result<T>) -> kube::Result<()> {
            match r {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        }
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        created(
            namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(object(namespace)).expect("a namespace"),
                )
                .await,
        )
        .expect("the namespace can be created");
        let accounts: Api<ServiceAccount> = Api::namespaced(admin, namespace);
        created(
            accounts
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(object(name)).expect("an account"),
                )
                .await,
        )
        .expect("the service account can be created");
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(24 * 3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .expect("a token for the service account")
            .status
            .expect("a token request answers with a status")
            .token;
        let path = self.dir.join(format!("sa-{namespace}-{name}.kubeconfig"));
        self.write_kubeconfig(
            &path,
            &format!("system:serviceaccount:{namespace}:{name}"),
            &token,
        );
        path
    }

    /// `kubectl` with `KUBECONFIG` set to the admin kubeconfig: the one in
    /// the assets directory, else the one on `PATH`.
    pub fn kubectl(&self) -> Command {
        let bundled = self.assets.join("kubectl");
        let mut cmd = Command::new(if bundled.is_file() {
            bundled
        } else {
            PathBuf::from("kubectl")
        });
        cmd.env("KUBECONFIG", self.kubeconfig())
            // Discovery cached per control plane, not in the user's home.
            .env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        cmd
    }

    /// The API server's own Prometheus metrics (`apiserver_request_total`, ...).
    pub async fn metrics(&self) -> String {
        let req = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("a request");
        self.client()
            .await
            .request_text(req)
            .await
            .expect("the API server serves /metrics")
    }

    /// Compacts etcd at its current revision: every older resourceVersion
    /// is gone, so a watch from one (when the API server's watch cache does
    /// not answer it: `--watch-cache=false`) gets `410 Gone`. Returns the
    /// revision.
    pub async fn compact(&self) -> i64 {
        etcd::compact(self.ports.etcd).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for server in [&self.apiserver, &self.etcd] {
            if let Some(mut child) = server.lock().ok().and_then(|mut c| c.take()) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- kube-apiserver log ({}), last lines ---\n{}",
                self.dir.display(),
                self.log_tail("kube-apiserver.log", 15)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A client configuration from a kubeconfig file.
pub async fn config(kubeconfig: &Path) -> kube::Config {
    let kc = Kubeconfig::read_from(kubeconfig).expect("the kubeconfig reads");
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("the kubeconfig is usable")
}
