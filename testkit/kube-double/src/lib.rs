//! An in-process Kubernetes API server double for tests.
//!
//! [`ApiServer::start`] serves the Kubernetes REST API over plain HTTP on a
//! loopback port, so code under test talks to it through its real `kube`
//! client. Objects live in one generic JSON store; custom resources are
//! defaulted, pruned and validated against the CRDs given at start, including
//! their CEL rules. See README.md for what is served and where it differs from
//! a real kube-apiserver.

mod discovery;
mod error;
mod eviction;
mod fields;
mod http;
mod kinds;
mod meta;
mod patch;
mod schema;
mod selector;
mod store;
mod watch;
mod write;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use kinds::Registry;
use store::Store;

/// A running API server double. Clones share the same server.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
}

/// One request the server answered, as RBAC would see it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Request {
    /// The bearer token the request carried ("" without one): `write_kubeconfig`
    /// gives `double-token`, `client()` sends none.
    pub user: String,
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group, "" for core.
    pub group: String,
    pub version: String,
    /// Plural resource name, e.g. "pods".
    pub resource: String,
    /// "status", "eviction", "finalizers", ...
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// HTTP status returned.
    pub status: u16,
}

pub(crate) struct Shared {
    pub(crate) registry: Registry,
    pub(crate) store: Mutex<Store>,
    pub(crate) requests: Mutex<Vec<Request>>,
    pub(crate) addr: SocketAddr,
}

impl Shared {
    // A panic while holding the lock (a bug in a test's assertion thread, say)
    // must not wedge every later request, so poisoning is ignored.
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record(&self, request: Request) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
    }
}

impl ApiServer {
    /// Binds 127.0.0.1:0 and serves in a background tokio task.
    ///
    /// `crds` are CustomResourceDefinition objects (apiextensions.k8s.io/v1)
    /// as JSON; their kinds are served and validated.
    ///
    /// # Panics
    /// If a CRD is malformed (including CEL rules that do not compile) or the
    /// port cannot be bound: both are test setup errors.
    pub async fn start(crds: Vec<Value>) -> ApiServer {
        let registry = Registry::new(&crds).unwrap_or_else(|e| panic!("invalid CRD: {e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            registry,
            store: Mutex::new(Store::new()),
            requests: Mutex::new(Vec::new()),
            addr,
        });
        let router = http::router(shared.clone());
        tokio::spawn(async move {
            // Serving ends only with the runtime; errors here mean the
            // listener died, which the next request surfaces as a refused
            // connection.
            let _ = axum::serve(listener, router).await;
        });
        ApiServer { shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Writes a kubeconfig whose current context points at [`Self::url`]
    /// with namespace "default" and a dummy token, and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: double\n  cluster:\n    server: \"{url}\"\n\
             users:\n\
             - name: double\n  user:\n    token: \"double-token\"\n\
             contexts:\n\
             - name: double\n  context:\n    cluster: double\n    user: double\n    namespace: default\n\
             current-context: double\n",
            url = self.url()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// A `kube::Client` for this server, built the way `Client::try_from(Config)`
    /// builds one for a real cluster (so it retries 429/503/504 like the real
    /// client does).
    pub fn client(&self) -> kube::Client {
        let uri = self.url().parse().expect("server URL is a valid URI");
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).expect("client for the API server double")
    }

    /// Every request served so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the watch event history up to now, so a watch from an older
    /// resourceVersion gets 410 Gone (an `Expired` ERROR event).
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// The stored object, without HTTP; None if absent.
    pub fn get(
        &self,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.shared
            .store()
            .get(&store::key(group, resource, namespace.unwrap_or(""), name))
            .cloned()
    }

    /// Every version of every object written since start (or the last
    /// [`Self::compact`]; at most the last 100,000 writes), oldest first, as (group, resource, namespace or ""
    /// when cluster-scoped, the object): what a scan of everything clients
    /// wrote needs, including versions replaced or deleted since.
    pub fn history(&self) -> Vec<(String, String, String, Value)> {
        self.shared
            .store()
            .retained()
            .map(|e| {
                (
                    e.key.0.clone(),
                    e.key.1.clone(),
                    e.key.2.clone(),
                    e.object.clone(),
                )
            })
            .collect()
    }

    /// The stored objects of one resource, in one namespace or (None) all.
    pub fn list(&self, group: &str, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        self.shared
            .store()
            .scan(group, resource, namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }
}
