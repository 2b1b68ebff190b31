//! An in-process Kubernetes API server for EndpointSlices, speaking the
//! real protocol: `list` with `resourceVersion`, `limit` and `continue`
//! (chunked responses), and `watch` streams of ADDED, MODIFIED, DELETED,
//! BOOKMARK and ERROR events from a `resourceVersion`, with `410 Gone` for
//! one too old, over HTTP/1.1 as the API server serves them. Objects are
//! JSON values, so tests hand it k8s-openapi's types serialised.
//!
//! Only what a Service's EndpointSlices need: one resource, namespaced,
//! filtered by `labelSelector=key=value`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::channel::mpsc;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// One open watch.
struct Watch {
    namespace: String,
    selector: Option<(String, String)>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion given out.
    rv: u64,
    /// Objects by (namespace, name).
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted: u64,
    watches: Vec<Watch>,
}

/// What the server was asked.
#[derive(Debug, Default)]
pub struct Asked {
    pub lists: AtomicU64,
    /// List pages beyond the first (with a `continue` token).
    pub continued: AtomicU64,
    pub watches: AtomicU64,
    /// Watches answered with 410 Gone.
    pub gone: AtomicU64,
}

/// The server.
pub struct KubeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    pub asked: Arc<Asked>,
    /// The largest page a list answers, whatever `limit` asks.
    page: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeApi {
    /// Starts on 127.0.0.1, on a port of its own.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let asked = Arc::new(Asked::default());
        let page = Arc::new(AtomicU64::new(u64::MAX));
        let task = tokio::spawn({
            let (state, asked, page) = (state.clone(), asked.clone(), page.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let (state, asked, page) = (state.clone(), asked.clone(), page.clone());
                    let service = hyper::service::service_fn(move |req| {
                        let reply = answer(&state, &asked, &page, &req);
                        async move { Ok::<_, Infallible>(reply) }
                    });
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            }
        });
        Self {
            addr,
            state,
            asked,
            page,
            task,
        }
    }

    /// The server's URL, for kube's `Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lists answer at most `n` objects a page, with a `continue` token.
    pub fn page_size(&self, n: u64) {
        self.page.store(n, Ordering::SeqCst);
    }

    /// Creates or replaces `object` (its `metadata.namespace` and `name`
    /// say which): ADDED or MODIFIED to the watches. Returns its new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> u64 {
        let mut state = self.state.lock().unwrap();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key(&object);
        let kind = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        state.history.push((rv, kind, object.clone()));
        broadcast(&mut state, kind, &object);
        rv
    }

    /// Deletes the object `namespace/name`: DELETED to the watches.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let Some(mut object) = state
            .objects
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.history.push((rv, "DELETED", object.clone()));
        broadcast(&mut state, "DELETED", &object);
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch.
    pub fn bookmark(&self) {
        let mut state = self.state.lock().unwrap();
        let rv = state.rv.to_string();
        let mark = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"resourceVersion": rv},
        });
        let line = event_line("BOOKMARK", &mark);
        state
            .watches
            .retain(|w| w.tx.unbounded_send(line.clone()).is_ok());
    }

    /// Forgets the history: every open watch gets an ERROR event with
    /// `410 Gone` and ends, and a watch from an older resourceVersion gets
    /// the same, as after etcd compaction.
    pub fn expire(&self) {
        let mut state = self.state.lock().unwrap();
        state.compacted = state.rv + 1;
        state.history.clear();
        let gone = event_line("ERROR", &gone_status());
        for watch in state.watches.drain(..) {
            let _ = watch.tx.unbounded_send(gone.clone());
        }
    }

    /// Ends every open watch mid-stream, as a dropped connection or an
    /// API server restart does.
    pub fn drop_watches(&self) {
        self.state.lock().unwrap().watches.clear();
    }

    /// Open watches now.
    pub fn open_watches(&self) -> usize {
        let mut state = self.state.lock().unwrap();
        state.watches.retain(|w| !w.tx.is_closed());
        state.watches.len()
    }
}

fn key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (s(&meta["namespace"]), s(&meta["name"]))
}

fn matches(object: &Value, namespace: &str, selector: &Option<(String, String)>) -> bool {
    let meta = &object["metadata"];
    meta["namespace"].as_str() == Some(namespace)
        && selector
            .as_ref()
            .is_none_or(|(k, v)| meta["labels"][k].as_str() == Some(v))
}

fn broadcast(state: &mut State, kind: &str, object: &Value) {
    let line = event_line(kind, object);
    state.watches.retain(|w| {
        !matches(object, &w.namespace, &w.selector) || w.tx.unbounded_send(line.clone()).is_ok()
    });
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn gone_status() -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version",
        "reason": "Expired",
        "code": 410,
    })
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn answer(
    state: &Mutex<State>,
    asked: &Asked,
    page: &AtomicU64,
    req: &Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let [
        "apis",
        "discovery.k8s.io",
        "v1",
        "namespaces",
        namespace,
        "endpointslices",
    ] = parts[..]
    else {
        return full(
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": format!("the server could not find {path}"), "reason": "NotFound", "code": 404}),
        );
    };
    let selector = query
        .get("labelSelector")
        .and_then(|s| s.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let mut state = state.lock().unwrap();
    if query.get("watch").map(String::as_str) == Some("true") {
        asked.watches.fetch_add(1, Ordering::SeqCst);
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded();
        if from < state.compacted {
            asked.gone.fetch_add(1, Ordering::SeqCst);
            let _ = tx.unbounded_send(event_line("ERROR", &gone_status()));
        } else {
            for (rv, kind, object) in &state.history {
                if *rv > from && matches(object, namespace, &selector) {
                    let _ = tx.unbounded_send(event_line(kind, object));
                }
            }
            state.watches.push(Watch {
                namespace: namespace.to_owned(),
                selector,
                tx,
            });
        }
        let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
        return Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .unwrap();
    }
    asked.lists.fetch_add(1, Ordering::SeqCst);
    let items: Vec<&Value> = state
        .objects
        .values()
        .filter(|o| matches(o, namespace, &selector))
        .collect();
    let start: usize = match query.get("continue") {
        Some(token) => {
            asked.continued.fetch_add(1, Ordering::SeqCst);
            token.parse().unwrap_or(0)
        }
        None => 0,
    };
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<u64>().ok())
        .unwrap_or(u64::MAX)
        .min(page.load(Ordering::SeqCst)) as usize;
    let end = start.saturating_add(limit).min(items.len());
    let token = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    full(
        StatusCode::OK,
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": state.rv.to_string(), "continue": token},
            "items": items[start.min(end)..end],
        }),
    )
}

/// Percent-decoding, enough for label selectors.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A pod as an EndpointSlice lists it.
#[derive(Clone, Copy, Debug)]
pub enum Pod<'a> {
    /// Ready.
    Ready(SocketAddr),
    /// Shutting down: not ready, still serving, terminating.
    Terminating(SocketAddr),
    /// Ready, in a zone, with `hints.forZones`.
    Zoned(SocketAddr, &'a str, &'a [&'a str]),
}

/// The JSON of a `discovery.k8s.io/v1` EndpointSlice named `name` in
/// namespace `default`, for Service `service`, listing `pods` on a port
/// named `grpc` (the first pod's port). It has the fields and names of
/// k8s-openapi's `EndpointSlice`; the tests parse it with k8s-openapi to
/// hold it to that.
pub fn slice(service: &str, name: &str, pods: &[Pod<'_>]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|pod| {
            let (addr, ready) = match *pod {
                Pod::Ready(a) | Pod::Zoned(a, ..) => (a, true),
                Pod::Terminating(a) => (a, false),
            };
            let mut endpoint = json!({
                "addresses": [addr.ip().to_string()],
                "conditions": {"ready": ready, "serving": true, "terminating": !ready},
                "targetRef": {"kind": "Pod", "namespace": "default", "name": format!("{service}-{}", addr.ip())},
            });
            if let Pod::Zoned(_, zone, hints) = *pod {
                endpoint["zone"] = json!(zone);
                let for_zones: Vec<Value> = hints.iter().map(|z| json!({"name": z})).collect();
                endpoint["hints"] = json!({"forZones": for_zones});
            }
            endpoint
        })
        .collect();
    let port = match pods.first() {
        Some(Pod::Ready(a) | Pod::Terminating(a) | Pod::Zoned(a, ..)) => a.port(),
        None => 1,
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
    })
}
