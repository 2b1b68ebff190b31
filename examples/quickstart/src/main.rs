//! healthlb in a crate of its own, to copy as a starting point:
//!
//! ```sh
//! cargo run -p healthlb-quickstart
//! ```
//!
//! It starts three greeter servers with tonic-health on 127.0.0.2–4, then
//! balances calls over them through one `LbChannel`: the spread, a server
//! flipped to NOT_SERVING, and a flaky server whose failures the service
//! config's retry policy hides. `client` is the part to copy into a client;
//! `serve` stands in for your servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use healthlb::LbChannel;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

mod pb {
    tonic::include_proto!("greeter");
}

use pb::greeter_client::GreeterClient;
use pb::greeter_server::{Greeter, GreeterServer};
use pb::{HelloReply, HelloRequest};

/// Retry UNAVAILABLE up to 3 attempts in all, as grpc-go reads it (gRFC A6).
const SERVICE_CONFIG: &str = r#"{
  "methodConfig": [{
    "name": [{"service": "greeter.Greeter"}],
    "retryPolicy": {
      "maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}"#;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let servers = [serve(2).await?, serve(3).await?, serve(4).await?];
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();

    // The client: swap tonic's Channel for an LbChannel.
    let channel = LbChannel::builder(format!("ipv4:{}", addrs.join(",")))
        .default_service_config(SERVICE_CONFIG)?
        .connect() // waits until a server is SERVING
        .await?;
    let mut client = GreeterClient::new(channel.clone());
    // connect() returns once one server is SERVING; the others follow.
    wait(|| servers.iter().all(|s| in_rotation(&channel, s.addr))).await?;

    println!("30 calls over three SERVING servers:");
    spread(&mut client, 30).await?;

    println!("\n127.0.0.2 says NOT_SERVING; 30 calls:");
    servers[0].set_serving(false).await;
    wait(|| !in_rotation(&channel, servers[0].addr)).await?;
    spread(&mut client, 30).await?;

    println!("\nIt is back, and 127.0.0.3 fails every second call; 30 calls:");
    servers[0].set_serving(true).await;
    wait(|| in_rotation(&channel, servers[0].addr)).await?;
    servers[1].flaky.store(true, Ordering::SeqCst);
    let failed = spread(&mut client, 30).await?;
    println!("failed calls: {failed} (the retry policy sent them elsewhere)");

    println!("\nWhat the channel thinks of each server:");
    for endpoint in channel.endpoints() {
        println!("  {endpoint}");
    }
    Ok(())
}

/// Makes `n` calls; prints how many each server answered, and returns how
/// many failed.
async fn spread(client: &mut GreeterClient<LbChannel>, n: usize) -> Result<usize, Error> {
    let mut by_server = std::collections::BTreeMap::<String, usize>::new();
    let mut failed = 0;
    for _ in 0..n {
        let request = HelloRequest {
            name: "healthlb".into(),
        };
        match client.say_hello(request).await {
            Ok(reply) => *by_server.entry(reply.into_inner().server).or_default() += 1,
            Err(status) => {
                println!("  failed: {status}");
                failed += 1;
            }
        }
    }
    println!("  {by_server:?}");
    Ok(failed)
}

fn in_rotation(channel: &LbChannel, addr: SocketAddr) -> bool {
    channel
        .endpoints()
        .iter()
        .any(|e| e.addr == addr && e.in_rotation)
}

/// Waits up to 5 s for `done`.
async fn wait(done: impl Fn() -> bool) -> Result<(), Error> {
    for _ in 0..500 {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the channel did not see the change within 5 s".into())
}

// === The servers: yours would run elsewhere ===

struct Server {
    addr: SocketAddr,
    health: HealthReporter,
    flaky: Arc<AtomicBool>,
}

impl Server {
    async fn set_serving(&self, serving: bool) {
        let status = match serving {
            true => ServingStatus::Serving,
            false => ServingStatus::NotServing,
        };
        self.health.set_service_status("", status).await;
    }
}

struct Hello {
    name: String,
    flaky: Arc<AtomicBool>,
    calls: AtomicU64,
}

#[tonic::async_trait]
impl Greeter for Hello {
    async fn say_hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if self.flaky.load(Ordering::Relaxed) && n.is_multiple_of(2) {
            return Err(Status::unavailable(format!("{} is flaky", self.name)));
        }
        Ok(Response::new(HelloReply {
            message: format!("hello, {}", req.into_inner().name),
            server: self.name.clone(),
        }))
    }
}

/// A greeter with tonic-health on 127.0.0.`n`, SERVING.
async fn serve(n: u8) -> Result<Server, Error> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, n], 0))).await?;
    let addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    let flaky = Arc::new(AtomicBool::new(false));
    let greeter = Hello {
        name: addr.ip().to_string(),
        flaky: flaky.clone(),
        calls: AtomicU64::new(0),
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(GreeterServer::new(greeter))
            .serve_with_incoming(incoming),
    );
    Ok(Server {
        addr,
        health,
        flaky,
    })
}
