use std::io::Write;

use bytes::Bytes;
use http_body_util::BodyExt;
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};
use tower::ServiceExt;

use super::*;
use crate::call::ResponseBody;
use crate::call::testing::{answered, received};
use crate::policy::source::Source;

const CONTRACT: &str = r#"
syntax = "proto3";
package shop.v1;
import "buf/validate/validate.proto";

message AddRequest {
  string sku = 1 [(buf.validate.field).string.pattern = "^[A-Z][0-9]+$"];
  int32 count = 2 [(buf.validate.field).int32 = {gt: 0, lte: 100}];
  Note note = 3;
  option (buf.validate.message).cel = {
    id: "sku_or_note", message: "a gift needs a note", expression: "!this.sku.startsWith('G') || this.note.text != ''"
  };
}
message Note { string text = 1 [(buf.validate.field).string.max_len = 10]; }
message Plain { string text = 1; Plain next = 2; }
message BadCel { string name = 1 [(buf.validate.field).cel = { id: "broken", expression: "this.size(" }]; }
message BadType { int32 age = 1 [(buf.validate.field).string.min_len = 1]; }
"#;

/// Resolves `buf/validate/validate.proto` as the contracts do.
pub(super) struct BuiltInRules;

impl FileResolver for BuiltInRules {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        let pool = &prost_protovalidate::types::DESCRIPTOR_POOL;
        match pool.get_file_by_name(name) {
            Some(file) => Ok(File::decode_file_descriptor_proto(file.encode_to_vec().as_slice()).unwrap()),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

struct Contract(&'static str);

impl FileResolver for Contract {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == "shop.proto" { File::from_source(name, self.0) } else { Err(protox::Error::file_not_found(name)) }
    }
}

fn pool() -> DescriptorPool {
    let mut chain = ChainFileResolver::new();
    chain.add(Contract(CONTRACT));
    chain.add(BuiltInRules);
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true);
    compiler.open_file("shop.proto").unwrap();
    compiler.descriptor_pool()
}

fn turned_on() -> Sourced<bool> {
    Sourced { value: true, source: Source::MethodOption }
}

fn rules_of(pool: &DescriptorPool, message: &str, max: u32) -> Result<Option<Arc<RequestRules>>, String> {
    let families = ValidationFamilies::default();
    let message = pool.get_message_by_name(message).unwrap();
    Validators::new(pool).rules("/shop.v1.Cart/Add", &message, &turned_on(), max, &families)
}

fn framed(message: &DynamicMessage) -> Vec<u8> {
    let bytes = message.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    framed.extend_from_slice(&bytes);
    framed
}

fn add(pool: &DescriptorPool, text: &str) -> DynamicMessage {
    let descriptor = pool.get_message_by_name("shop.v1.AddRequest").unwrap();
    DynamicMessage::parse_text_format(descriptor, text).unwrap()
}

/// An app that reads the whole request and keeps what it read, then
/// answers OK; it fails as a reset stream would when its request does.
fn app(read: Arc<std::sync::Mutex<Option<Vec<u8>>>>) -> impl CallService<RecvBody> + Clone {
    tower::service_fn(move |request: Request<RecvBody>| -> CallFuture {
        let read = read.clone();
        Box::pin(async move {
            let mut body = request.into_body();
            let mut bytes = Vec::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => bytes.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
                    Err(_) => {
                        *read.lock().unwrap() = Some(bytes);
                        return Err(ProxyError::NoApp);
                    }
                }
            }
            *read.lock().unwrap() = Some(bytes);
            Ok(Response::new(answered(Bytes::new()).await))
        })
    })
}

async fn call(
    rules: Option<Arc<RequestRules>>,
    one_request: bool,
    body: Vec<u8>,
    encoding: Option<&str>,
) -> (Result<Response<ResponseBody>, ProxyError>, Option<Vec<u8>>) {
    let (mut request, _peer) = received("/shop.v1.Cart/Add", Bytes::from(body)).await;
    if let Some(encoding) = encoding {
        request.headers_mut().insert(GRPC_ENCODING, encoding.parse().unwrap());
    }
    let read = Arc::default();
    let result = Validate::new(rules, one_request, app(Arc::clone(&read))).oneshot(request).await;
    let read = read.lock().unwrap().take();
    (result, read)
}

#[tokio::test]
async fn a_request_that_breaks_its_rules_is_refused_before_the_app_sees_it_with_every_violation() {
    let pool = pool();
    let rules = rules_of(&pool, "shop.v1.AddRequest", DEFAULT_HOLD).unwrap().expect("rules");
    let bad = add(&pool, r#"sku: "G1" count: 0 note: { text: "" }"#);
    let (result, read) = call(Some(rules.clone()), true, framed(&bad), None).await;
    assert!(read.is_none(), "the app was never called");
    let error = result.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let invalid = error.policy::<InvalidRequest>().expect("validation acted");
    assert_eq!(
        invalid.violations(),
        [
            "a gift needs a note [sku_or_note]",
            "count: value must be greater than 0 and less than or equal to 100 [int32.gt_lte]",
        ]
    );
    assert_eq!(
        error.to_string(),
        "request message 1 to /shop.v1.Cart/Add breaks the buf.validate rules of shop.v1.AddRequest: a gift \
         needs a note [sku_or_note]; count: value must be greater than 0 and less than or equal to 100 \
         [int32.gt_lte] (validate: true, (protomesh.v1.method))"
    );

    // The details: google.rpc.BadRequest and buf.validate.Violations.
    let headers = error.status_headers(crate::call::Direction::Inbound);
    use base64::Engine;
    let details = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(headers[crate::grpc::GRPC_STATUS_DETAILS_BIN].as_bytes())
        .unwrap();
    let status = crate::grpc::RpcStatus::decode(&details[..]).unwrap();
    assert_eq!(status.code, Code::InvalidArgument as i32);
    assert_eq!(status.details[0].type_url, "type.googleapis.com/google.rpc.BadRequest");
    let bad_request = BadRequest::decode(&status.details[0].value[..]).unwrap();
    let fields: Vec<_> = bad_request.field_violations.iter().map(|v| (v.field.as_str(), v.reason.as_str())).collect();
    assert_eq!(fields, [("", "sku_or_note"), ("count", "int32.gt_lte")]);
    assert_eq!(status.details[1].type_url, "type.googleapis.com/buf.validate.Violations");
    let violations = prost_protovalidate::types::Violations::decode(&status.details[1].value[..]).unwrap();
    assert_eq!(violations.violations.len(), 2);

    // Counted by method and rule.
    let count = |rule: &str| {
        let labels = RuleLabels { service: "shop.v1.Cart".into(), method: "Add".into(), rule: rule.into() };
        rules.failures.failures.get_or_create(&labels).get()
    };
    assert_eq!((count("int32.gt_lte"), count("sku_or_note"), count("string.pattern")), (1, 1, 0));
}

#[tokio::test]
async fn a_valid_request_reaches_the_app_as_it_was_sent() {
    let pool = pool();
    let rules = rules_of(&pool, "shop.v1.AddRequest", DEFAULT_HOLD).unwrap().expect("rules");
    let good = framed(&add(&pool, r#"sku: "G1" count: 3 note: { text: "for Ann" }"#));
    let (result, read) = call(Some(rules), true, good.clone(), None).await;
    assert!(result.is_ok());
    assert_eq!(read.unwrap(), good);
}

#[tokio::test]
async fn a_stream_is_checked_message_by_message_and_cut_at_the_first_that_breaks_a_rule() {
    let pool = pool();
    let rules = rules_of(&pool, "shop.v1.AddRequest", DEFAULT_HOLD).unwrap().expect("rules");
    let first = framed(&add(&pool, r#"sku: "A1" count: 1"#));
    let second = framed(&add(&pool, r#"sku: "A2" count: 2"#));
    let third = framed(&add(&pool, r#"sku: "nope" count: 3"#));
    let (result, read) = call(Some(rules), false, [first.clone(), second.clone(), third].concat(), None).await;
    assert_eq!(read.unwrap(), [first, second].concat(), "the app got the two valid messages and no more");
    let error = result.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.to_string().starts_with("request message 3 to /shop.v1.Cart/Add breaks"), "{error}");
    assert!(error.to_string().contains("sku: does not match regex pattern"), "{error}");
}

#[tokio::test]
async fn compressed_requests_are_read_and_what_cannot_be_read_is_refused_with_its_reason() {
    let pool = pool();
    let rules = rules_of(&pool, "shop.v1.AddRequest", 64).unwrap().expect("rules");
    let good = add(&pool, r#"sku: "A1" count: 1"#).encode_to_vec();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&good).unwrap();
    let gzip = gzip.finish().unwrap();
    let mut framed_gzip = vec![1];
    framed_gzip.extend_from_slice(&(gzip.len() as u32).to_be_bytes());
    framed_gzip.extend_from_slice(&gzip);
    let (result, read) = call(Some(rules.clone()), true, framed_gzip.clone(), Some("gzip")).await;
    assert!(result.is_ok(), "gzip is read");
    assert_eq!(read.unwrap(), framed_gzip);

    let refused = |result: Result<Response<ResponseBody>, ProxyError>| {
        let error = result.unwrap_err();
        (error.code(), error.to_string())
    };
    let (result, read) = call(Some(rules.clone()), true, framed_gzip, Some("snappy")).await;
    let (code, message) = refused(result);
    assert_eq!(code, Code::Unimplemented);
    assert!(message.contains("compressed with snappy, which validation cannot read"), "{message}");
    assert!(read.is_none());

    let mut not_the_type = vec![0, 0, 0, 0, 2];
    not_the_type.extend_from_slice(&[0x0a, 0x05]);
    let (code, message) = refused(call(Some(rules.clone()), true, not_the_type, None).await.0);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("does not decode as shop.v1.AddRequest"), "{message}");

    let mut large = vec![0, 0, 0, 0, 65];
    large.extend_from_slice(&[0; 65]);
    let (code, message) = refused(call(Some(rules), true, large, None).await.0);
    assert_eq!(code, Code::ResourceExhausted);
    assert!(message.contains("is 65 bytes, over the 64 validation holds"), "{message}");
}

#[tokio::test]
async fn a_method_without_rules_is_not_decoded() {
    let pool = pool();
    assert!(rules_of(&pool, "shop.v1.Plain", DEFAULT_HOLD).unwrap().is_none(), "no rule at any depth");
    assert!(rules_of(&pool, "shop.v1.Note", DEFAULT_HOLD).unwrap().is_some());
    // Not a message of the type, but no rules: it passes untouched.
    let (result, read) = call(None, true, vec![0, 0, 0, 0, 1, 0xff], None).await;
    assert!(result.is_ok());
    assert_eq!(read.unwrap(), [0, 0, 0, 0, 1, 0xff]);
}

#[test]
fn a_rule_that_does_not_compile_names_its_file_message_and_field() {
    let pool = pool();
    let error = rules_of(&pool, "shop.v1.BadCel", DEFAULT_HOLD).err().expect("refused");
    assert!(
        error.starts_with("shop.proto: message shop.v1.BadCel, field name: its buf.validate rules do not compile: "),
        "{error}"
    );
    let error = rules_of(&pool, "shop.v1.BadType", DEFAULT_HOLD).err().expect("refused");
    assert!(error.starts_with("shop.proto: message shop.v1.BadType, field age: "), "{error}");
    assert!(error.contains("expected rule `int32`, got `string`"), "{error}");
}
