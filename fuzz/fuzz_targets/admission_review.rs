//! The admission webhook's request body: anything the API server (or
//! whoever reaches the webhook) sends is answered with a review or a 4xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protomesh::kube::settings::Defaults;

fuzz_target!(|data: &[u8]| {
    for enabled in [false, true] {
        if let Ok(review) = protomesh::kube::webhook::review(data, enabled, &Defaults::default()) {
            assert_eq!(review["kind"], "AdmissionReview");
        }
    }
});
