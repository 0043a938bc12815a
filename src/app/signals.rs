//! `cxgate run`'s signals: SIGTERM and SIGINT stop, SIGHUP reloads, SIGUSR1 reopens the
//! access log, as logrotate and service managers expect.

use std::path::Path;

use super::{reload, Running};

/// Returns on SIGTERM or SIGINT; reloads on SIGHUP; reopens the access log on SIGUSR1.
pub async fn wait_for_signals(running: &Running, config_path: Option<&Path>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup), Ok(mut usr1)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
                // logrotate renamed the file: write on to a new one by the configured name.
                _ = usr1.recv() => running.gateway.access_log().reopen(),
                _ = hup.recv() => match reload::reload(&running.gateway, &running.live, config_path).await {
                    Ok(notes) => tracing::info!(?notes, "SIGHUP: reloaded"),
                    Err(problems) => tracing::error!(?problems, "SIGHUP: config invalid; the running configuration stays"),
                },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (running, config_path);
        let _ = tokio::signal::ctrl_c().await;
    }
}
