//! `protomesh await`: the app's side of a classic sidecar, which starts and
//! stops with the app rather than around it. It waits until the sidecar is
//! ready (a postStart hook, or the app's entrypoint), and, given the app's
//! command, runs it, passing on the signals the kubelet sends, and with
//! `--shutdown` tells the sidecar to exit once the app has (`POST
//! /shutdown`), so that a Job's pod completes, as `linkerd-await --shutdown`
//! does. Native sidecars need none of this: the kubelet orders them.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.0 request to the admin server: the status line's code.
async fn ask(addr: SocketAddr, request: &[u8]) -> std::io::Result<[u8; 3]> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request).await?;
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await?;
    Ok([head[9], head[10], head[11]])
}

/// Waits until the admin server at `addr` answers `/ready` with 200, for at
/// most `timeout`: what `protomesh await` does for a classic sidecar's
/// postStart hook, so that the app starts after its sidecar is ready.
pub async fn wait_until_ready(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let ready = async {
        while !ask(addr, b"GET /ready HTTP/1.0\r\n\r\n").await.is_ok_and(|code| &code == b"200") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(timeout, ready)
        .await
        .map_err(|_| format!("{addr}/ready did not answer 200 within {timeout:?}"))
}

/// Runs the app's `command` once the sidecar is ready, passing SIGTERM and
/// SIGINT on to it; with `shutdown`, tells the sidecar to exit once the app
/// has. The app's exit code, or the signal that ended it as a shell tells it.
pub async fn run_app(admin: SocketAddr, timeout: Duration, command: &[String], shutdown: bool) -> Result<u8, String> {
    use rustix::process::{Pid, Signal};
    use tokio::signal::unix::{SignalKind, signal};
    wait_until_ready(admin, timeout).await?;
    let (program, args) = command.split_first().ok_or("no command to run")?;
    let mut app = tokio::process::Command::new(program)
        .args(args)
        .spawn()
        .map_err(|e| format!("{program}: cannot run it: {e}"))?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    let exited = loop {
        let passed = tokio::select! {
            exited = app.wait() => break exited.map_err(|e| format!("{program}: {e}"))?,
            _ = terminate.recv() => Signal::TERM,
            _ = interrupt.recv() => Signal::INT,
        };
        // The app has not been reaped (`wait` has not returned), so its pid is its own.
        if let Some(pid) = app.id().and_then(|id| Pid::from_raw(id as i32)) {
            let _ = rustix::process::kill_process(pid, passed);
        }
    };
    if shutdown {
        match ask(admin, b"POST /shutdown HTTP/1.0\r\ncontent-length: 0\r\n\r\n").await {
            Ok(code) if &code == b"202" => {}
            Ok(code) => eprintln!("the sidecar at {admin} refused POST /shutdown: {}", String::from_utf8_lossy(&code)),
            Err(error) => eprintln!("the sidecar at {admin} was not told to exit: {error}"),
        }
    }
    use std::os::unix::process::ExitStatusExt;
    let code = exited.code().or_else(|| exited.signal().map(|signal| 128 + signal)).unwrap_or(1);
    Ok(u8::try_from(code).unwrap_or(1))
}
