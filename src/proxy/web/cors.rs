//! CORS for the web listener: a browser on another origin asks first (a preflight
//! `OPTIONS` naming the method and headers it will send), and reads an
//! answer only if it names the origin. Origins are allowed by config,
//! exactly or all (`*`); a call from an origin not allowed is refused before
//! it goes anywhere, since a browser would send it all the same.

use std::time::Duration;

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue};

/// The methods calls use: gRPC-Web's POST, and the JSON routes'.
const METHODS: &str = "GET, POST, PUT, PATCH, DELETE";

/// The response headers a gRPC-Web client reads.
const EXPOSED: &str = "grpc-status, grpc-message, grpc-status-details-bin, grpc-encoding";

#[derive(Clone, Debug, PartialEq)]
pub struct Cors {
    /// Exact origins (`https://shop.example.com`), or `*` for any.
    pub allowed_origins: Vec<String>,
    /// How long a browser may keep a preflight's answer.
    pub max_age: Duration,
}

/// What the origin of a request is allowed.
#[derive(Debug, PartialEq, Eq)]
pub enum Origin {
    /// No `Origin`: not a cross-origin browser request.
    None,
    Allowed(HeaderValue),
    Refused(String),
}

impl Cors {
    pub fn origin(&self, headers: &HeaderMap) -> Origin {
        let Some(origin) = headers.get(ORIGIN) else { return Origin::None };
        let text = origin.to_str().unwrap_or_default();
        if self.allowed_origins.iter().any(|allowed| allowed == "*" || allowed == text) {
            Origin::Allowed(origin.clone())
        } else {
            Origin::Refused(text.to_string())
        }
    }

    /// The headers of a preflight's answer for an allowed `origin`: the
    /// headers it asked to send, the methods calls use (whether a route
    /// takes the method is the call's to say).
    pub fn preflight(&self, origin: HeaderValue, request: &HeaderMap) -> HeaderMap {
        let mut headers = self.response(origin);
        headers.insert(ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(METHODS));
        if let Some(asked) = request.get(ACCESS_CONTROL_REQUEST_HEADERS) {
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(self.max_age.as_secs()));
        headers
    }

    /// The headers every answer to an allowed `origin` carries.
    pub fn response(&self, origin: HeaderValue) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
        headers.insert(VARY, HeaderValue::from_static("origin"));
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str]) -> Cors {
        Cors { allowed_origins: origins.iter().map(|o| o.to_string()).collect(), max_age: Duration::from_secs(600) }
    }

    fn from(origin: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(ORIGIN, origin.parse().unwrap());
        headers
    }

    #[test]
    fn origins_are_allowed_exactly_or_all() {
        let shop = cors(&["https://shop.example.com"]);
        assert_eq!(shop.origin(&HeaderMap::new()), Origin::None);
        assert!(matches!(shop.origin(&from("https://shop.example.com")), Origin::Allowed(_)));
        assert_eq!(shop.origin(&from("https://evil.example.com")), Origin::Refused("https://evil.example.com".into()));
        assert!(matches!(cors(&["*"]).origin(&from("http://localhost:5173")), Origin::Allowed(_)));
        assert_eq!(cors(&[]).origin(&from("http://localhost")), Origin::Refused("http://localhost".into()));
    }

    #[test]
    fn a_preflight_names_the_origin_the_asked_headers_and_how_long_to_keep_it() {
        let shop = cors(&["*"]);
        let mut request = from("https://shop.example.com");
        request.insert(ACCESS_CONTROL_REQUEST_HEADERS, "content-type, x-grpc-web, x-user-agent".parse().unwrap());
        let Origin::Allowed(origin) = shop.origin(&request) else { panic!("allowed") };
        let answer = shop.preflight(origin, &request);
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example.com", "the origin itself, not *");
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_METHODS], "GET, POST, PUT, PATCH, DELETE");
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_HEADERS], "content-type, x-grpc-web, x-user-agent");
        assert_eq!(answer[ACCESS_CONTROL_MAX_AGE], "600");
        assert!(answer[ACCESS_CONTROL_EXPOSE_HEADERS].to_str().unwrap().contains("grpc-status"));
        assert_eq!(answer[VARY], "origin");
    }
}
