//! The Vitals collector: ingest over mutual-TLS gRPC, SQLite storage, query API.
//!
//! `run` is the whole daemon; `vitals dev` calls it in-process.

pub mod alert;
pub mod chunk;
pub mod config;
pub mod http;
pub mod ingest;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod promql;
pub mod push;
pub mod query;
pub mod reload;
pub mod remote_write;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use tokio::sync::watch;
use vitals_proto::v1::{
    alerts_server::AlertsServer, ingest_server::IngestServer, push_server::PushServer,
    query_server::QueryServer,
};

pub use config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Alerts(#[from] alert::db::DbError),
    #[error(transparent)]
    Outbox(#[from] notify::OutboxError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot handle SIGHUP: {0}")]
    Signal(#[source] std::io::Error),
    #[error("server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// Runs the collector until `shutdown` resolves, then drains in-flight
/// batches under the configured grace period. `on_listen` receives the bound
/// address (useful with port 0).
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(SocketAddr) + Send,
) -> Result<(), RunError> {
    run_reloadable(settings, shutdown, on_listen, None).await
}

/// `run`, and on every hangup of `reload` re-reads the config file and its
/// TLS files (see the `reload` module for what changes live).
pub async fn run_reloadable(
    mut settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(SocketAddr) + Send,
    mut reload: Option<reload::Reload>,
) -> Result<(), RunError> {
    let conn = store::open(&settings.db_path)?;
    let (writer, reader, writer_thread) =
        store::spawn_writer(conn, &settings.db_path, settings.store.clone())?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: settings.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RunError::Bind {
        addr: settings.listen,
        source,
    })?;
    // Bound before anything starts, so a taken port fails the start.
    let http_listener = match settings.http {
        Some(h) => {
            let l = tokio::net::TcpListener::bind(h.listen)
                .await
                .map_err(|source| RunError::Bind {
                    addr: h.listen,
                    source,
                })?;
            let local = l.local_addr().map_err(|source| RunError::Bind {
                addr: h.listen,
                source,
            })?;
            Some((l, local, h.tls))
        }
        None => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = ingest::Connected::default();
    let counters = std::sync::Arc::new(metrics::Counters::default());
    let push = push::PushService::new(writer.clone(), counters.clone());
    let ingest = ingest::IngestService {
        writer: writer.clone(),
        connected: connected.clone(),
        shutdown: stop_rx.clone(),
        counters: counters.clone(),
    };
    let alerting = alert::open(&settings.alerting)?;
    // Receivers configured: route into the outbox and deliver from it.
    let mut metrics_outbox = None;
    let (sink, dispatcher): (Box<dyn alert::Sink>, _) =
        if settings.alerting.routing.targets.is_empty() {
            (Box::new(alert::LogSink::default()), None)
        } else {
            let outbox = notify::Outbox::open_with(
                &settings.alerting.outbox_path,
                settings.alerting.outbox.clone(),
            )?;
            metrics_outbox = Some(outbox.clone());
            let mut stop = stop_rx.clone();
            let dispatcher = tokio::spawn(notify::run(
                outbox.clone(),
                settings.alerting.routing.targets.clone(),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            ));
            (
                Box::new(alert::route::Router::new(
                    settings.alerting.routing.clone(),
                    outbox,
                )) as Box<dyn alert::Sink>,
                Some(dispatcher),
            )
        };
    let alert_task = settings.alerting.enabled.then(|| {
        tracing::info!(
            rules = settings.alerting.rules.rules.len(),
            every = ?settings.alerting.eval_interval,
            state = %settings.alerting.state_path.display(),
            "alert rules loaded"
        );
        tokio::spawn(alert::run(
            alerting.clone(),
            reader.clone(),
            settings.alerting.eval_interval,
            sink,
            stop_rx.clone(),
            Some(writer.clone()),
        ))
    });
    let mut senders = Vec::new();
    let mut rw_stats = Vec::new();
    for rw in &settings.remote_write {
        let stats = std::sync::Arc::new(remote_write::Stats::new(&rw.name));
        rw_stats.push(stats.clone());
        senders.push(tokio::spawn(remote_write::run(
            rw.clone(),
            reader.clone(),
            writer.clone(),
            stats,
            stop_rx.clone(),
            settings.shutdown_grace,
        )));
    }
    let (limits_tx, limits_rx) = watch::channel(settings.query_limits());
    let tls = listen::TlsConfig::new(settings.server_tls.clone());
    if let Some((listener, local, with_tls)) = http_listener {
        let state = std::sync::Arc::new(http::State {
            store: reader.clone(),
            limits: limits_rx.clone(),
            metrics: metrics::Sources {
                counters,
                store: reader.clone(),
                connected: connected.clone(),
                outbox: metrics_outbox,
                detect_enabled: settings.store.detect.is_some(),
                alerting_enabled: settings.alerting.enabled,
                alerting: Some(alerting.clone()),
                remote_write: rw_stats,
            },
        });
        tokio::spawn(http::serve(
            listener,
            with_tls.then(|| tls.clone()),
            state,
            stop_rx.clone(),
        ));
        if with_tls {
            tracing::info!(addr = %local, "HTTP API listening (TLS, client certificates, operator role)");
        } else {
            tracing::warn!(addr = %local, "HTTP API listening in plaintext on loopback: no identity is checked");
        }
    }
    let query = query::QueryService {
        store: reader,
        connected,
        limits: limits_rx,
    };
    drop(writer);

    let mut server_stop = stop_rx.clone();
    let incoming = listen::incoming(listener, tls.clone(), stop_rx.clone());
    // Standard health checking and reflection (grpcurl), behind the same
    // mutual TLS as everything else.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<IngestServer<ingest::IngestService>>()
        .await;
    health
        .set_serving::<QueryServer<query::QueryService>>()
        .await;
    health
        .set_serving::<AlertsServer<alert::api::AlertsService>>()
        .await;
    health.set_serving::<PushServer<push::PushService>>().await;
    // Only the services served here: the proto file also holds the
    // agents' NetTest.
    let reflection = |itself: &str| {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(vitals_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in [
            "vitals.v1.Ingest",
            "vitals.v1.Query",
            "vitals.v1.Alerts",
            "vitals.v1.Push",
            "grpc.health.v1.Health",
            itself,
        ] {
            b = b.with_service_name(name);
        }
        b
    };
    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .map_err(RunError::Reflection)?;
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .map_err(RunError::Reflection)?;
    // h2's default windows here: they bound what each agent stream may
    // have in flight towards the collector (memory per connected agent);
    // a query answer's pace is set by the client's receive window.
    let server = tonic::transport::Server::builder()
        .add_service(IngestServer::new(ingest).max_decoding_message_size(64 << 20))
        .add_service(QueryServer::new(query).max_encoding_message_size(256 << 20))
        .add_service(AlertsServer::new(alert::api::AlertsService {
            shared: alerting,
            stop: stop_rx.clone(),
        }))
        .add_service(PushServer::new(push).max_decoding_message_size(16 << 20))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = server_stop.wait_for(|s| *s).await;
        });
    tracing::info!(addr = %local, db = %settings.db_path.display(), version = vitals_common::VERSION, "collector listening (mutual TLS)");
    on_listen(local);
    vitals_common::notify::ready(&format!("listening on {local}"));

    let mut server = Box::pin(server);
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        tokio::select! {
            r = &mut server => break r,
            Some(()) = hangup(&mut reload) => {
                if let Some(r) = &reload {
                    let live = reload::Live { tls: &tls, limits: &limits_tx };
                    reload::reload(&r.path, &mut settings, live);
                }
            }
            _ = &mut shutdown => break drain(&settings, &stop_tx, &mut server).await,
        }
    };
    drop(server);
    let _ = stop_tx.send(true);
    // Senders finish the rows in flight within the grace, then record
    // their cursors through the writer.
    for s in senders {
        let wait = settings.shutdown_grace + std::time::Duration::from_secs(5);
        if tokio::time::timeout(wait, s).await.is_err() {
            tracing::warn!(
                "a remote-write sender did not stop in time; what it had not recorded is sent again after the restart"
            );
        }
    }
    if let Some(t) = alert_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    if let Some(d) = dispatcher {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(15), d).await;
    }
    // Once the streams are gone so are the writer's senders: it commits what
    // is queued and stops. Each queued batch is either committed (and was or
    // will be acked) or never acked, so a bounded wait loses nothing acked.
    let join = tokio::task::spawn_blocking(move || writer_thread.join());
    if tokio::time::timeout(std::time::Duration::from_secs(10), join)
        .await
        .is_err()
    {
        tracing::warn!(
            "store writer still busy after 10 s; exiting without waiting (unacked batches will be resent)"
        );
    }
    tracing::info!("collector stopped");
    result.map_err(RunError::Serve)
}

/// The next reload request; never, without a reload source.
async fn hangup(reload: &mut Option<reload::Reload>) -> Option<()> {
    match reload.as_mut() {
        Some(r) => r.hangups.recv().await,
        None => std::future::pending().await,
    }
}

/// SIGTERM: stop reading new batches; in-flight ones commit and are acked
/// within `shutdown_grace`.
async fn drain<F>(
    settings: &Settings,
    stop_tx: &watch::Sender<bool>,
    server: &mut Pin<Box<F>>,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    vitals_common::notify::stopping();
    tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight batches");
    let _ = stop_tx.send(true);
    match tokio::time::timeout(settings.shutdown_grace, server.as_mut()).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period ran out; closing the remaining connections (unacked batches will be resent by their agents)");
            Ok(())
        }
    }
}

pub use vitals_common::signal::termination as termination_signal;
