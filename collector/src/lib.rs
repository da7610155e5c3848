//! The Vitals collector: ingest over mutual-TLS gRPC, SQLite storage, query API.
//!
//! `run` is the whole daemon; `vitals dev` calls it in-process.

pub mod alert;
pub mod chunk;
pub mod config;
pub mod ingest;
pub mod notify;
pub mod query;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::watch;
use vitals_proto::v1::{
    alerts_server::AlertsServer, ingest_server::IngestServer, query_server::QueryServer,
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
    #[error("TLS setup failed: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Runs the collector until `shutdown` resolves, then drains in-flight
/// batches under the configured grace period. `on_listen` receives the bound
/// address (useful with port 0).
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listen: impl FnOnce(SocketAddr) + Send,
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
    let (stop_tx, stop_rx) = watch::channel(false);
    let connected = ingest::Connected::default();
    let ingest = ingest::IngestService {
        writer: writer.clone(),
        connected: connected.clone(),
        shutdown: stop_rx.clone(),
    };
    let alerting = alert::open(&settings.alerting)?;
    // Receivers configured: route into the outbox and deliver from it.
    let (sink, dispatcher): (Box<dyn alert::Sink>, _) =
        if settings.alerting.routing.targets.is_empty() {
            (Box::new(alert::LogSink), None)
        } else {
            let outbox = notify::Outbox::open_with(
                &settings.alerting.outbox_path,
                settings.alerting.outbox.clone(),
            )?;
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
        ))
    });
    let query = query::QueryService {
        store: reader,
        connected,
        limits: store::QueryLimits {
            max_series: settings.max_series,
            max_points: settings.max_points,
        },
    };
    drop(writer);

    let mut server_stop = stop_rx.clone();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .tls_config(settings.tls.server_config())
        .map_err(RunError::Tls)?
        .add_service(IngestServer::new(ingest).max_decoding_message_size(64 << 20))
        .add_service(QueryServer::new(query).max_encoding_message_size(256 << 20))
        .add_service(AlertsServer::new(alert::api::AlertsService {
            shared: alerting,
        }))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = server_stop.wait_for(|s| *s).await;
        });
    tracing::info!(addr = %local, db = %settings.db_path.display(), version = vitals_common::VERSION, "collector listening (mutual TLS)");
    on_listen(local);

    let mut server = Box::pin(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = shutdown => {
            tracing::info!(grace = ?settings.shutdown_grace, "shutting down: draining in-flight batches");
            let _ = stop_tx.send(true);
            match tokio::time::timeout(settings.shutdown_grace, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(grace = ?settings.shutdown_grace, "shutdown grace period ran out; closing the remaining connections (unacked batches will be resent by their agents)");
                    Ok(())
                }
            }
        }
    };
    drop(server);
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

pub use vitals_common::signal::termination as termination_signal;
