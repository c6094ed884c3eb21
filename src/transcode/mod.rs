//! JSON over HTTP to gRPC, from the contracts' `google.api.http` options:
//! the routes of one version of the contracts (`routes.rs`), their path
//! templates (`template.rs`), the request message a JSON call makes
//! (`request.rs`) and the JSON its answer becomes (`response.rs`). Pure
//! functions of descriptors and bytes; the listener is `proxy/web`.

pub mod request;
pub mod response;
pub mod routes;
pub mod template;

pub use request::{BadRequest, request_message};
pub use response::{http_status, response_json, status_json};
pub use routes::{Body, Found, JsonRoutes, Route};
pub use template::{Binding, PathTemplate};

#[cfg(test)]
mod tests;
