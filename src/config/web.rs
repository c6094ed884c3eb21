//! `inbound.web`: a listener for browsers and HTTP clients, speaking
//! gRPC-Web and JSON. Their calls come without a client certificate, so they
//! reach only the methods listed here, and from the origins listed here;
//! each becomes an ordinary gRPC call through the inbound stack, held to
//! every other inbound policy.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::duration;
use crate::policy::authz::MethodPattern;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// A listener of its own: plaintext HTTP/1.1 (TLS is the ingress's, in
    /// front of it).
    #[serde(default, deserialize_with = "super::address::deserialize_option")]
    pub listen: Option<SocketAddr>,
    /// Captured app ports whose plaintext HTTP/1.1 connections are served
    /// here too, for the app at that port; other connections to them are
    /// taken as the port's mode says.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// The methods a caller without a certificate may call, as
    /// `pkg.Service/Method`, `pkg.Service/*` or `*`; none by default.
    #[serde(default)]
    pub methods: Vec<MethodPattern>,
    /// Origins a browser may call from (CORS): exact, as
    /// `https://shop.example.com`, or `*`; none by default (same origin only).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// How long a browser keeps a preflight's answer.
    #[serde(default = "default_max_age", deserialize_with = "duration::deserialize")]
    pub max_age: Duration,
    /// Which of the listed methods take JSON over HTTP.
    #[serde(default)]
    pub json: JsonRouting,
}

/// JSON routes to the listed methods, transcoded to gRPC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JsonRouting {
    /// None: the listener speaks gRPC-Web only.
    Off,
    /// The routes the contracts' `google.api.http` options give.
    #[default]
    Annotated,
    /// Those, and `POST /pkg.Service/Method` with the request as the body
    /// for every listed method.
    All,
}

impl JsonRouting {
    pub fn as_str(self) -> &'static str {
        match self {
            JsonRouting::Off => "off",
            JsonRouting::Annotated => "annotated",
            JsonRouting::All => "all",
        }
    }
}

fn default_max_age() -> Duration {
    Duration::from_secs(600)
}

impl WebConfig {
    /// Whether a caller without a certificate may call `service/method`.
    pub fn opens(&self, service: &str, method: &str) -> bool {
        self.methods.iter().any(|pattern| pattern.matches(service, method))
    }

    /// Errors are `field: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.is_none() && self.ports.is_empty() {
            return Err("listen: set a listener of its own (listen), captured app ports (ports), or both".into());
        }
        if self.ports.contains(&0) {
            return Err("ports: 0 is not a port".into());
        }
        for origin in &self.allowed_origins {
            let valid = origin == "*" || (origin.contains("://") && !origin.ends_with('/'));
            if !valid {
                return Err(format!(
                    "allowed_origins: `{origin}` is not an origin: write scheme://host[:port] with no path, or *"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(yaml: &str) -> Result<WebConfig, String> {
        let config: WebConfig = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn methods_and_origins_are_listed_and_checked() {
        let config = read(
            "{listen: '127.0.0.1:8080', methods: ['shop.v1.Catalog/*'], allowed_origins: ['https://shop.example.com']}",
        )
        .unwrap();
        assert!(config.opens("shop.v1.Catalog", "List"));
        assert!(!config.opens("shop.v1.Cart", "Add"), "only what is listed");
        assert_eq!(config.max_age, Duration::from_secs(600));
        assert_eq!(config.json, JsonRouting::Annotated);
        let all = read("{listen: '127.0.0.1:8080', json: all}").unwrap();
        assert_eq!(all.json, JsonRouting::All);
        let error = read("{listen: '127.0.0.1:8080', json: every}").unwrap_err();
        assert!(error.contains("off") && error.contains("annotated") && error.contains("all"), "{error}");
        let captured = read("{ports: [8080], methods: ['*']}").unwrap();
        assert_eq!((captured.listen, captured.ports), (None, vec![8080]));
        let error = read("{methods: ['*']}").unwrap_err();
        assert!(error.starts_with("listen: set a listener of its own (listen), captured app ports (ports)"), "{error}");
        let error = read("{listen: '127.0.0.1:8080', allowed_origins: ['https://shop.example.com/']}").unwrap_err();
        assert!(error.starts_with("allowed_origins: `https://shop.example.com/` is not an origin"), "{error}");
    }
}
