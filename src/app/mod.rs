//! A running sidecar, wired: its identity, metrics, worker threads, tracing,
//! listeners, admin server and reloads, and the drain that stops it. The
//! stacks themselves are composed in `proxy`.

pub mod admin;
pub mod awaiting;
mod probe;
pub mod reload;
pub mod tapping;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::call::Direction;
use crate::discovery::kubernetes::Cluster;
use crate::identity::{Identity, SpiffeId};
use crate::proxy::edge::{EdgeState, InboundEdge, OutboundEdge};
use crate::proxy::registry::Registries;
use crate::proxy::routes::Routes;
use crate::proxy::server::{self, PeerInfo, Serving};
use crate::proxy::shed::MemoryBudget;
use crate::proxy::web;
use crate::telemetry::{LogThrottle, Metrics, Tracing};
use crate::workers::Workers;
use admin::{Admin, SetLogLevel};
use reload::Reloader;
pub use reload::{ConfigSource, Inputs, ReloadOutcome};

/// What the process around the sidecar lends it.
#[derive(Default)]
pub struct Options {
    /// Lets the admin server change the log filter.
    pub set_log_level: Option<SetLogLevel>,
}

/// A running sidecar. Dropping it stops accepting and ends the added
/// workers' threads without a drain; call [`Sidecar::shutdown`] to drain and stop.
pub struct Sidecar {
    pub outbound_addr: SocketAddr,
    pub inbound_addr: Option<SocketAddr>,
    /// `inbound.web.listen`, bound.
    pub web_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub identity: SpiffeId,
    admin: Arc<Admin>,
    reloader: Arc<Reloader>,
    tracing: Option<Arc<Tracing>>,
    drain: drain::Signal,
    /// The admin server and the reload triggers, stopped with the sidecar.
    background: JoinSet<()>,
    /// Serve the connections; their threads end when the sidecar is dropped.
    _workers: Arc<Workers>,
}

impl Sidecar {
    /// Reads the config, contracts and identity, and binds every listener
    /// before serving anything: a sidecar either starts whole or not at all.
    pub async fn start(source: ConfigSource, options: Options) -> Result<Sidecar, String> {
        let inputs = Inputs::read(&source)?;
        let versions = inputs.versions();
        let Inputs { config, contracts, credentials, .. } = inputs;
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let workers = Arc::new(Workers::start(config.worker_threads)?);
        let tracing = Tracing::start(&config.tracing, config.service_name.as_deref())?.map(Arc::new);
        if let Some(tracing) = &tracing {
            metrics.register_collector(Box::new(tracing.counts()));
        }
        let identity = Arc::new(Identity::new(credentials)?);
        let cluster = Cluster::find(&config.kubernetes, metrics.discovery.clone()).await?;
        let mut registries = Registries::new(identity.clone(), metrics.clone(), workers.count(), cluster);
        let routes = Routes::build(config.clone(), Arc::new(contracts), &mut registries, tracing.clone()).await?;
        registries.commit();
        let routes = Arc::new(ArcSwap::from_pointee(routes));

        let outbound_listener = bind("outbound.listen", config.outbound.listen).await?;
        let outbound_v6 = ipv6_companion(config.outbound.listen);
        let inbound = match &config.inbound {
            Some(inbound) => Some((bind("inbound.listen", inbound.listen).await?, identity.server_config()?)),
            None => None,
        };
        let inbound_v6 = config.inbound.as_ref().and_then(|inbound| ipv6_companion(inbound.listen));
        let web = match config.inbound.as_ref().and_then(|inbound| inbound.web.as_ref()?.listen) {
            Some(listen) => Some(bind("inbound.web.listen", listen).await?),
            None => None,
        };
        let admin_listener = bind("admin.listen", config.admin.listen).await?;
        let taps = registries.taps.clone();
        let reloader =
            Arc::new(Reloader::new(source, routes.clone(), versions, identity.clone(), registries, tracing.clone()));

        let (drain, watch) = drain::channel();
        let memory = Arc::new(MemoryBudget::default());
        let serving = Serving {
            workers: workers.clone(),
            metrics: metrics.clone(),
            routes: routes.clone(),
            drain: watch,
            memory: memory.clone(),
            warnings: Arc::new(LogThrottle::default()),
        };
        let outbound_addr = local_addr(&outbound_listener)?;
        let edges = EdgeState { routes: routes.clone(), metrics: metrics.clone(), memory: memory.clone() };
        for listener in std::iter::once(outbound_listener).chain(outbound_v6) {
            let edges = edges.clone();
            let new_edge = move |peer: PeerInfo| OutboundEdge::new(edges.clone(), &peer);
            tokio::spawn(server::serve(listener, Direction::Outbound, None, new_edge, serving.clone()));
        }
        let inbound_addr = match inbound {
            None => None,
            Some((listener, tls)) => {
                let addr = local_addr(&listener)?;
                for listener in std::iter::once(listener).chain(inbound_v6) {
                    let edges = edges.clone();
                    let web_ports = web::for_captured_ports(edges.clone(), serving.clone());
                    let new_edge = move |peer: PeerInfo| InboundEdge::new(edges.clone(), peer);
                    let inbound = Some((tls.clone(), web_ports));
                    tokio::spawn(server::serve(listener, Direction::Inbound, inbound, new_edge, serving.clone()));
                }
                Some(addr)
            }
        };
        let web_addr = match web {
            None => None,
            Some(listener) => {
                let addr = local_addr(&listener)?;
                tokio::spawn(web::serve(listener, edges.clone(), serving.clone()));
                Some(addr)
            }
        };
        let admin_addr = local_addr(&admin_listener)?;
        let admin = Arc::new(Admin::new(metrics, reloader.clone(), options.set_log_level, taps));
        let mut background = JoinSet::new();
        background.spawn(admin::serve(admin_listener, admin.clone()));
        background.spawn(watch::reload_on_change(reloader.clone()));
        let sampled = routes.clone();
        background.spawn(async move { memory.sample(sampled).await });
        admin.ready.store(true, Ordering::Release);
        tracing::info!(identity = %identity.id, %outbound_addr, ?inbound_addr, ?web_addr, %admin_addr, "sidecar started");
        Ok(Sidecar {
            outbound_addr,
            inbound_addr,
            web_addr,
            admin_addr,
            identity: identity.id.clone(),
            admin,
            reloader,
            tracing,
            drain,
            background,
            _workers: workers,
        })
    }

    /// Reads the config, contracts and identity files again now, as the
    /// watch, the interval, SIGHUP and `POST /reload` do.
    pub async fn reload(&self) -> ReloadOutcome {
        self.reloader.reload().await
    }

    /// Turns not ready, stops accepting, sends GOAWAY, and waits for calls in
    /// flight up to the drain period; then flushes the spans.
    pub async fn shutdown(mut self) {
        self.admin.ready.store(false, Ordering::Release);
        let period = self.reloader.routes().config.drain_timeout;
        if tokio::time::timeout(period, self.drain.drain()).await.is_err() {
            tracing::warn!(?period, "drain period over; closing the remaining connections");
        }
        if let Some(tracing) = &self.tracing {
            tracing.flush(period).await;
        }
        self.background.shutdown().await;
    }
}

/// `protomesh run`: a sidecar until SIGTERM (or Ctrl-C), reloading on SIGHUP.
pub async fn run(source: ConfigSource, options: Options) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut hangup = signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    let sidecar = Sidecar::start(source, options).await?;
    raise_open_files_limit(&sidecar.reloader.routes().config.limits);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = sidecar.admin.shutdown.notified() => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading");
                sidecar.reload().await;
            }
        }
    }
    tracing::info!(drain = ?sidecar.reloader.routes().config.drain_timeout, "shutting down");
    sidecar.shutdown().await;
    Ok(())
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does
/// for every Go program: a container's soft limit is often 1024, and each
/// forwarded connection takes two descriptors. Warns when even the hard limit
/// is below what `limits` let both listeners hold.
fn raise_open_files_limit(limits: &crate::config::LimitsConfig) {
    let open_files = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(open_files) => open_files,
        Err(error) => return tracing::warn!(%error, "cannot read or raise the limit on open files"),
    };
    let needed = 2 * (limits.max_connections + limits.max_opaque_connections) as u64;
    if open_files < needed {
        tracing::warn!(
            open_files,
            needed,
            "the process may open fewer files than limits.max_connections and limits.max_opaque_connections \
             allow both listeners; past it, connections fail to be accepted"
        );
    }
}

async fn bind(field: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| format!("{field}: cannot listen on {addr}: {e}"))
}

/// A listener on the IPv6 twin of `addr` (`[::1]` for `127.0.0.1`, `[::]`
/// for `0.0.0.0`), same port, IPv6 only: the capture rules send IPv6
/// connections there. `None` where the pod has no IPv6 or `addr` has no twin.
fn ipv6_companion(addr: SocketAddr) -> Option<TcpListener> {
    use socket2::{Domain, Socket, Type};
    if addr.port() == 0 {
        return None;
    }
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_loopback() => std::net::Ipv6Addr::LOCALHOST,
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    let twin = SocketAddr::from((ip, addr.port()));
    let listen = || -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&twin.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    };
    listen().map_err(|error| tracing::debug!(%twin, %error, "no IPv6 listener")).ok()
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, String> {
    listener.local_addr().map_err(|e| e.to_string())
}
