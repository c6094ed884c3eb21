//! `protomesh tap`: asks a sidecar's admin server for its live calls
//! (`GET /tap`) and prints each as it ends, as JSON or as lines for people.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// What to tap, as `GET /tap` takes it.
#[derive(Debug, Default)]
pub struct TapRequest {
    pub methods: Vec<String>,
    pub callers: Vec<String>,
    pub statuses: Vec<String>,
    pub direction: Option<String>,
    pub max_bytes: Option<usize>,
    pub messages: Option<usize>,
    pub rate: Option<u32>,
}

impl TapRequest {
    fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, values) in [("method", &self.methods), ("caller", &self.callers), ("status", &self.statuses)] {
            for value in values {
                query.append_pair(name, value);
            }
        }
        let numbers = [
            ("max_bytes", self.max_bytes.map(|n| n.to_string())),
            ("messages", self.messages.map(|n| n.to_string())),
            ("rate", self.rate.map(|n| n.to_string())),
            ("direction", self.direction.clone()),
        ];
        for (name, value) in numbers {
            if let Some(value) = value {
                query.append_pair(name, &value);
            }
        }
        query.finish()
    }
}

/// Prints the events of a tap on the admin server at `admin`; with `count`,
/// stops after that many. `json`: each event as the admin server sends it.
pub async fn run(admin: SocketAddr, request: &TapRequest, json: bool, count: Option<usize>) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(admin).await.map_err(|e| format!("{admin}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("{admin}: {e}"))?;
    tokio::spawn(connection);
    let uri = format!("/tap?{}", request.query());
    let get = http::Request::get(uri).header(http::header::HOST, admin.to_string()).body(Empty::<Bytes>::new());
    let response = sender.send_request(get.expect("a valid request")).await.map_err(|e| format!("{admin}: {e}"))?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let said = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("{admin} answered {status}: {}", String::from_utf8_lossy(&said).trim()));
    }
    eprintln!("tapping {admin}: each call shows as it ends (Ctrl-C stops)");
    let (mut pending, mut printed) = (Vec::new(), 0);
    while count.is_none_or(|count| printed < count) {
        let Some(frame) = body.frame().await else { return Ok(()) };
        let frame = frame.map_err(|e| format!("{admin}: {e}"))?;
        let Ok(data) = frame.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            // Empty lines keep an idle tap's connection alive.
            if line.trim().is_empty() {
                continue;
            }
            if json {
                println!("{line}");
            } else {
                let event: Value = serde_json::from_str(&line).map_err(|e| format!("{admin}: not an event: {e}"))?;
                print!("{}", readable(&event));
            }
            printed += 1;
            if count.is_some_and(|count| printed >= count) {
                break;
            }
        }
    }
    Ok(())
}

/// One event for people: a line for the call, then its messages, `>` sent
/// by the caller and `<` answered.
fn readable(event: &Value) -> String {
    let text = |key: &str| event[key].as_str().unwrap_or_default().to_string();
    let mut out = format!("{} {} {} {}", text("started"), text("direction"), text("method"), text("status"));
    if !text("status_message").is_empty() {
        out.push_str(&format!(" \"{}\"", text("status_message")));
    }
    out.push_str(&format!(" from {}", event["caller"].as_str().unwrap_or("an unknown caller")));
    if let Some(peer) = event["peer"].as_str() {
        out.push_str(&format!(" ({peer})"));
    }
    out.push_str(&format!(" in {:.2} ms", event["duration_ms"].as_f64().unwrap_or_default()));
    out.push('\n');
    for (arrow, key, skipped) in [(">", "requests", "requests_skipped"), ("<", "responses", "responses_skipped")] {
        for message in event[key].as_array().into_iter().flatten() {
            let shown = match (&message["json"], message["size"].as_u64().unwrap_or_default()) {
                (Value::Null, size) if message["truncated"] == true => format!("({size} bytes, past --max-bytes)"),
                (Value::Null, size) if message["compressed"] == true => format!("({size} bytes, compressed)"),
                (Value::Null, size) => format!(
                    "({size} bytes: {})",
                    message["undecoded"].as_str().or(message["error"].as_str()).unwrap_or("")
                ),
                (json, _) => json.to_string(),
            };
            out.push_str(&format!("  {arrow} {shown}\n"));
        }
        if let Some(n) = event[skipped].as_u64().filter(|n| *n > 0) {
            out.push_str(&format!("  {arrow} ({n} more, past --messages)\n"));
        }
    }
    let lost = (event["lost"]["rate"].as_u64().unwrap_or(0), event["lost"]["slow_reader"].as_u64().unwrap_or(0));
    if lost != (0, 0) {
        out.push_str(&format!(
            "  ({} events lost before this one to --rate, {} while reading fell behind)\n",
            lost.0, lost.1
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_as_a_line_for_the_call_and_one_per_message() {
        let event = serde_json::json!({
            "started": "2026-12-06T18:25:03.028Z", "direction": "inbound", "method": "/shop.v1.Cart/Add",
            "status": "NOT_FOUND", "status_message": "no such cart", "caller": "spiffe://td/ns/shop/sa/web",
            "peer": "10.0.3.7:51320", "duration_ms": 1.704,
            "requests": [{"size": 9, "json": {"sku": "A1"}}, {"size": 70000, "truncated": true}],
            "requests_skipped": 2,
            "responses": [{"size": 5, "compressed": true}, {"size": 3, "undecoded": "no contract declares the method"}],
            "responses_skipped": 0,
            "lost": {"rate": 4, "slow_reader": 0},
        });
        assert_eq!(
            readable(&event),
            "2026-12-06T18:25:03.028Z inbound /shop.v1.Cart/Add NOT_FOUND \"no such cart\" from spiffe://td/ns/shop/sa/web \
             (10.0.3.7:51320) in 1.70 ms\n  \
             > {\"sku\":\"A1\"}\n  \
             > (70000 bytes, past --max-bytes)\n  \
             > (2 more, past --messages)\n  \
             < (5 bytes, compressed)\n  \
             < (3 bytes: no contract declares the method)\n  \
             (4 events lost before this one to --rate, 0 while reading fell behind)\n"
        );
    }

    #[test]
    fn the_query_carries_every_filter_and_cap() {
        let request = TapRequest {
            methods: vec!["shop.v1.Cart/*".into()],
            statuses: vec!["UNAVAILABLE".into(), "14".into()],
            direction: Some("inbound".into()),
            rate: Some(5),
            ..TapRequest::default()
        };
        assert_eq!(request.query(), "method=shop.v1.Cart%2F*&status=UNAVAILABLE&status=14&rate=5&direction=inbound");
    }
}
