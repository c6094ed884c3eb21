//! Active health checks of an upstream's endpoints: every interval, each
//! endpoint is asked `grpc.health.v1.Health/Check` on its worker connection,
//! over the same mTLS as its calls (so the check also proves its identity).
//! Failed checks in a row take it out of balancing, SERVING answers bring it
//! back. The checks are not calls: outlier detection never sees them. One
//! task per upstream, ending with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tokio::sync::watch;

use super::balance::Member;
use crate::call::RequestBody;
use crate::config::health_checks::HealthCheckConfig;
use crate::grpc;
use crate::grpc_health::{self, ServingStatus};
use crate::policy::outlier::Outliers;

/// The upstream's endpoints now, or `None` once it is gone.
pub type Members = Box<dyn Fn() -> Option<(Arc<Vec<Arc<Member>>>, Arc<Outliers>)> + Send + Sync>;

/// Checks in a row with the same result.
#[derive(Default)]
struct Streak {
    failed: u32,
    serving: u32,
}

/// Checks the endpoints `members` gives while `config` says so; when it
/// says nothing, every endpoint counts as serving.
pub async fn run(name: Arc<str>, members: Members, mut config: watch::Receiver<Option<HealthCheckConfig>>) {
    let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
    loop {
        let check = config.borrow_and_update().clone();
        let Some((endpoints, outliers)) = members() else { return };
        let Some(check) = check else {
            streaks.clear();
            endpoints.iter().for_each(|member| member.set_serving(true));
            outliers.set_not_serving(0);
            drop(endpoints);
            if config.changed().await.is_err() {
                return;
            }
            continue;
        };
        let answers = futures_util::future::join_all(endpoints.iter().map(|member| check_one(member, &check))).await;
        for (member, answer) in endpoints.iter().zip(answers) {
            let streak = streaks.entry(member.addr()).or_default();
            match answer {
                Ok(ServingStatus::Serving) => {
                    (streak.failed, streak.serving) = (0, streak.serving + 1);
                    if !member.serving() && streak.serving >= check.healthy_threshold {
                        tracing::info!(upstream = %name, endpoint = %member.addr(), "health check: serving again");
                        member.set_serving(true);
                    }
                }
                Ok(status) => fail(member, streak, &check, &name, status.as_str_name()),
                Err(why) => fail(member, streak, &check, &name, &why),
            }
        }
        streaks.retain(|addr, _| endpoints.iter().any(|member| member.addr() == *addr));
        outliers.set_not_serving(endpoints.iter().filter(|member| !member.serving()).count());
        drop(endpoints);
        tokio::select! {
            () = tokio::time::sleep(check.interval) => {}
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

fn fail(member: &Member, streak: &mut Streak, check: &HealthCheckConfig, upstream: &str, why: &str) {
    (streak.failed, streak.serving) = (streak.failed + 1, 0);
    if member.serving() && streak.failed >= check.unhealthy_threshold {
        tracing::warn!(%upstream, endpoint = %member.addr(), why, "health check: out of balancing");
        member.set_serving(false);
    }
}

/// One Check call, within the check's timeout.
async fn check_one(member: &Member, check: &HealthCheckConfig) -> Result<ServingStatus, String> {
    let endpoint = &member.endpoint;
    let call = async {
        let mut sender = endpoint.ready().await.map_err(|e| e.to_string())?;
        let mut request = grpc_health::check_head(&endpoint.addr.to_string())
            .map(|()| RequestBody::Replayed(Some(grpc_health::check_request(&check.service))));
        request.headers_mut().insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(check.timeout));
        let response =
            endpoint.start(&mut sender, request).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let (head, body) = response.into_parts();
        let answer = Limited::new(body, grpc_health::MAX_MESSAGE).collect().await.map_err(|e| e.to_string())?;
        let trailers = answer.trailers().cloned();
        let message: Bytes = answer.to_bytes();
        grpc_health::read_answer(&head.headers, trailers.as_ref(), message)
    };
    tokio::time::timeout(check.timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", check.timeout)))
}
