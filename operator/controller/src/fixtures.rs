//! Reconcile tests against a mocked API server (`tower-test`): a [`Ctx`]
//! whose client talks to [`ApiMock`], and whose caches hold the objects a
//! test gives. The test plays the API server: it answers each request the
//! reconcile makes, in order, checking method, path and body; Events are
//! answered (and recorded) on the side, since when they are published is
//! not what these tests pin down.

use std::future::Future;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde_json::Value;
use yukumo_api::{Host, NetworkGroup, Site, VirtualCluster, VirtualNode, Volume};
use yukumo_telemetry::Health;

use crate::context::{Ctx, Metrics, Stores};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A request the reconcile made: method, path (with query) and JSON body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

/// A request taken but not answered yet.
pub struct Pending(tower_test::mock::SendResponse<Response<Body>>);

/// The API server side of the mock.
pub struct ApiMock {
    handle: Handle,
    /// Events published so far (their JSON bodies).
    pub events: Vec<Value>,
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

/// The body of a Kubernetes error response.
pub fn status_error(code: u16, reason: &str, message: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

impl ApiMock {
    /// A client and the mock that answers it.
    pub fn new() -> (Client, ApiMock) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (
            Client::new(service, "default"),
            ApiMock {
                handle,
                events: Vec::new(),
            },
        )
    }

    /// The next request that is not an Event (Events are answered 201 and
    /// recorded); `None` when the client is gone.
    async fn next(&mut self) -> Option<(Seen, tower_test::mock::SendResponse<Response<Body>>)> {
        loop {
            let (req, send) = self.handle.next_request().await?;
            let method = req.method().clone();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.expect("request body");
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON request body")
            };
            if path.contains("/events") {
                send.send_response(respond(StatusCode::CREATED, &body));
                self.events.push(body);
                continue;
            }
            return Some((Seen { method, path, body }, send));
        }
    }

    /// Answer the next request, which must be `method` on a path containing
    /// `path`, with what `reply` makes of it; returns the request.
    pub async fn expect(
        &mut self,
        method: Method,
        path: &str,
        reply: impl FnOnce(&Seen) -> (StatusCode, Value),
    ) -> Seen {
        let (seen, send) = self
            .next()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, but the client is gone"));
        assert_eq!(seen.method, method, "{seen:?}");
        assert!(
            seen.path.contains(path),
            "expected {method} …{path}…, got {} {}",
            seen.method,
            seen.path
        );
        let (code, body) = reply(&seen);
        send.send_response(respond(code, &body));
        seen
    }

    /// Take the next request, which must be `method` on a path containing
    /// `path`, without answering it yet (see [`ApiMock::reply`]).
    pub async fn take(&mut self, method: Method, path: &str) -> (Seen, Pending) {
        let (seen, send) = self
            .next()
            .await
            .unwrap_or_else(|| panic!("expected {method} {path}, but the client is gone"));
        assert_eq!(seen.method, method, "{seen:?}");
        assert!(
            seen.path.contains(path),
            "expected …{path}…, got {}",
            seen.path
        );
        (seen, Pending(send))
    }

    /// Answer a request taken earlier.
    pub fn reply(pending: Pending, code: StatusCode, body: &Value) {
        pending.0.send_response(respond(code, body));
    }

    /// Run `fut` to completion while answering only Events: any other
    /// request fails the test.
    pub async fn finish<T>(&mut self, fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                next = self.next() => {
                    if let Some((seen, _)) = next {
                        panic!("unexpected request {} {}: {}", seen.method, seen.path, seen.body);
                    }
                }
            }
        }
    }

    /// Reasons of the Events published so far.
    pub fn event_reasons(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// A store holding `objects`, as a synced watch would have filled it.
pub fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// The objects in the caches.
#[derive(Default)]
pub struct Fleet {
    pub clusters: Vec<VirtualCluster>,
    pub nodes: Vec<VirtualNode>,
    pub hosts: Vec<Host>,
    pub sites: Vec<Site>,
    pub groups: Vec<NetworkGroup>,
    pub volumes: Vec<Volume>,
    pub quotas: Vec<k8s_openapi::api::core::v1::ResourceQuota>,
}

/// A reconcile context on `client` whose caches hold `fleet`.
pub fn ctx(client: Client, fleet: Fleet) -> Arc<Ctx> {
    let mut registry = Registry::default();
    let stores = Stores {
        clusters: store(fleet.clusters),
        nodes: store(fleet.nodes),
        hosts: store(fleet.hosts),
        sites: store(fleet.sites),
        network_groups: store(fleet.groups),
        volumes: store(fleet.volumes),
        quotas: store(fleet.quotas),
    };
    Ctx::new(
        client,
        "test",
        Metrics::register(&mut registry),
        Health::default(),
        stores,
    )
}

/// Parse a JSON fixture into a `K`.
pub fn obj<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("a valid fixture")
}
