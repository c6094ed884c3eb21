//! `grpc.health.v1.Health/Check` bodies from peers: a request the inbound
//! side answers, and an answer the active checks read. Neither panics, and a
//! request or answer the sidecar writes reads back the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use protomesh::grpc::{Code, status_headers};
use protomesh::grpc_health::{ServingStatus, check_answer, check_request, read_answer, service_asked};

fuzz_target!(|data: &[u8]| {
    let body = Bytes::copy_from_slice(data);
    if let Ok(service) = service_asked(body.clone()) {
        assert_eq!(service_asked(check_request(&service)).as_deref(), Ok(service.as_str()));
    }
    let ok = status_headers(Code::Ok, "");
    if let Ok(status) = read_answer(&http::HeaderMap::new(), Some(&ok), body) {
        let status: ServingStatus = status;
        assert_eq!(read_answer(&http::HeaderMap::new(), Some(&ok), check_answer(status)), Ok(status));
    }
});
