//! Request validation: a method with `validate: true` has each request
//! message checked against the `buf.validate` rules of its contract
//! (protovalidate: standard and predefined rules, CEL expressions) before the
//! app sees it. A message that breaks a rule cuts the call with
//! INVALID_ARGUMENT, its field violations in `grpc-status-details-bin` as
//! `google.rpc.BadRequest` and `buf.validate.Violations`. A call with one
//! request message is refused before it goes anywhere; a stream's messages
//! are checked one by one as they come, each held until whole. Only methods
//! that validate decode their requests, and only methods whose request type
//! carries rules get the layer.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;
use prost_protovalidate::{Error as RuleError, Validator, ValidatorOption, Violation};
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor};
use tower::Service;

use super::kept::Families;
use super::source::Sourced;
use crate::call::{CallFuture, CallService, Checking, Cut, MessageCheck, PolicyError, ProxyError, RecvBody};
use crate::grpc::{Code, GRPC_ENCODING};

/// The largest request message held for validation when the method sets no
/// `max_message_size`: gRPC's default limit on a received message.
pub const DEFAULT_HOLD: u32 = 4 * 1024 * 1024;

/// One validator per version of the contracts (kept by `Contracts`): it
/// compiles each message's rules once, on first use, and keeps them. It is
/// made only once a method with rules validates, since making it decodes
/// every contract again.
#[derive(Default)]
pub struct Validators {
    validator: std::sync::OnceLock<Arc<Validator>>,
    pool: DescriptorPool,
}

impl fmt::Debug for Validators {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validators").field("made", &self.validator.get().is_some()).finish()
    }
}

impl Validators {
    pub fn new(pool: &DescriptorPool) -> Validators {
        Validators { validator: std::sync::OnceLock::new(), pool: pool.clone() }
    }

    fn validator(&self) -> &Arc<Validator> {
        self.validator.get_or_init(|| {
            // The contracts' own files, so that the predefined rules they
            // declare (extensions of buf.validate's rule messages) are known.
            let contracts = ValidatorOption::AdditionalDescriptorSetBytes(self.pool.encode_to_vec());
            Arc::new(Validator::with_options(&[contracts]))
        })
    }

    /// The rules of `method`'s request type `message`, compiled now so that
    /// one that does not compile fails the load, naming the file, message
    /// and field. `None` when the type carries no rule: validating it would
    /// decode every request for nothing.
    pub fn rules(
        &self,
        method: &str,
        message: &MessageDescriptor,
        validate: &Sourced<bool>,
        max: u32,
        failures: &ValidationFamilies,
    ) -> Result<Option<Arc<RequestRules>>, String> {
        let Some(cel_messages) = survey(&self.pool, message) else { return Ok(None) };
        let validator = self.validator();
        if let Err(RuleError::Compilation(error)) = validator.validate(&DynamicMessage::new(message.clone())) {
            return Err(compile_error(&self.pool, message, &error.cause));
        }
        Ok(Some(Arc::new(RequestRules {
            validator: validator.clone(),
            message: message.clone(),
            method: method.into(),
            source: validate.source.to_string(),
            max,
            failures: failures.clone(),
            cel_messages,
        })))
    }
}

/// Whether `message`, or a message it holds at any depth, carries
/// `buf.validate` rules: `None` if not, else the message of each
/// message-level CEL rule by its id, which the validator leaves out of its
/// violations and a caller reads best.
fn survey(pool: &DescriptorPool, message: &MessageDescriptor) -> Option<HashMap<String, String>> {
    let extensions: Vec<_> = ["buf.validate.message", "buf.validate.field", "buf.validate.oneof"]
        .into_iter()
        .filter_map(|name| pool.get_extension_by_name(name))
        .collect();
    let message_rules = extensions.first().filter(|ext| ext.full_name() == "buf.validate.message")?;
    let mut any = false;
    let mut cel_messages = HashMap::new();
    let mut seen = HashSet::new();
    let mut pending = vec![message.clone()];
    while let Some(message) = pending.pop() {
        if !seen.insert(message.full_name().to_string()) {
            continue;
        }
        let options = std::iter::once(message.options())
            .chain(message.oneofs().map(|oneof| oneof.options()))
            .chain(message.fields().map(|field| field.options()));
        any |= options.into_iter().any(|options| extensions.iter().any(|ext| options.has_extension(ext)));
        let rules = message.options().get_extension(message_rules).into_owned();
        let cel = rules.as_message().and_then(|rules| rules.get_field_by_name("cel"));
        for rule in cel.as_ref().and_then(|cel| cel.as_list()).unwrap_or_default() {
            let text = |name| rule.as_message()?.get_field_by_name(name)?.as_str().map(str::to_string);
            if let (Some(id), Some(text)) = (text("id"), text("message")) {
                cel_messages.entry(id).or_insert(text);
            }
        }
        for field in message.fields() {
            match field.kind() {
                Kind::Message(held) if held.is_map_entry() => {
                    pending.extend(held.map_entry_value_field().kind().as_message().cloned());
                }
                Kind::Message(held) => pending.push(held),
                _ => {}
            }
        }
    }
    any.then_some(cel_messages)
}

/// Names the field whose rule does not compile, when the error quotes its
/// expression or names it.
fn compile_error(pool: &DescriptorPool, message: &MessageDescriptor, cause: &str) -> String {
    let file = message.parent_file().name().to_string();
    let rule = pool.get_extension_by_name("buf.validate.field");
    let field = message.fields().find(|field| {
        cause.contains(field.full_name())
            || rule.as_ref().is_some_and(|rule| {
                let options = field.options();
                options.has_extension(rule)
                    && quoted(cause).is_some_and(|quoted| {
                        options.get_extension(rule).to_string().contains(&quoted.replace('"', "\\\""))
                    })
            })
    });
    let at = match field {
        Some(field) => format!("message {}, field {}", message.full_name(), field.name()),
        None => format!("message {}", message.full_name()),
    };
    let cause = cause.replace('\n', " ");
    format!(
        "{file}: {at}: its buf.validate rules do not compile: {cause}; fix the rule, or turn validate off for the methods that take it"
    )
}

/// The text between the first pair of backquotes, as errors quote a rule.
fn quoted(text: &str) -> Option<&str> {
    let start = text.find('`')? + 1;
    let end = text[start..].find('`')?;
    Some(&text[start..start + end])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    service: String,
    method: String,
    rule: String,
}

/// Requests refused by validation, by method and by the rule they broke.
#[derive(Clone, Default)]
pub struct ValidationFamilies {
    failures: Family<RuleLabels, Counter>,
}

impl Families for ValidationFamilies {
    fn register(&self, registry: &mut Registry) {
        let help = "Request messages the sidecar refused by their buf.validate rules, by rule broken";
        registry.register("request_validation_failures", help, self.failures.clone());
    }
}

/// A method's request rules, ready to check its messages.
pub struct RequestRules {
    validator: Arc<Validator>,
    message: MessageDescriptor,
    /// `/pkg.Service/Method`.
    method: Box<str>,
    /// Where `validate: true` came from.
    source: String,
    /// The largest message held to be checked.
    max: u32,
    failures: ValidationFamilies,
    /// Message-level CEL rules' messages, by rule id.
    cel_messages: HashMap<String, String>,
}

impl RequestRules {
    fn count(&self, rule: &str) {
        let (service, method) = crate::grpc::split_path(&self.method).unwrap_or((&self.method, ""));
        let labels = RuleLabels { service: service.into(), method: method.into(), rule: rule.into() };
        self.failures.failures.get_or_create(&labels).inc();
    }

    /// The check of one call's request messages, sent with `grpc-encoding`
    /// `encoding`; refused when they cannot be read.
    pub fn checking(self: &Arc<Self>, encoding: Option<&[u8]>) -> Result<Checking, Arc<dyn PolicyError>> {
        let compression = match encoding {
            None | Some(b"identity") => None,
            Some(b"gzip") => Some(Compression::Gzip),
            Some(b"deflate") => Some(Compression::Deflate),
            // The app would refuse it as well; what it holds cannot be checked.
            Some(other) => {
                let why = format!(
                    "is compressed with {}, which validation cannot read (it reads gzip and deflate)",
                    String::from_utf8_lossy(other)
                );
                return Err(self.refuse(1, Why::Unreadable { rule: "compression", why, code: Code::Unimplemented }));
            }
        };
        Ok(Checking::new(Box::new(CheckRequest { rules: self.clone(), compression, number: 0 })))
    }

    fn refuse(&self, number: usize, why: Why) -> Arc<dyn PolicyError> {
        match &why {
            Why::Broken(violations) => violations.iter().for_each(|v| self.count(&v.rule)),
            Why::Unreadable { rule, .. } => self.count(rule),
        }
        Arc::new(InvalidRequest {
            method: self.method.clone(),
            message_type: self.message.full_name().into(),
            source: self.source.clone(),
            number,
            why,
        })
    }
}

/// The request messages of one call as they are checked.
struct CheckRequest {
    rules: Arc<RequestRules>,
    /// The call's `grpc-encoding`, unless identity.
    compression: Option<Compression>,
    /// Messages checked so far.
    number: usize,
}

impl fmt::Debug for CheckRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckRequest").field("method", &self.rules.method).field("number", &self.number).finish()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Compression {
    Gzip,
    Deflate,
}

impl MessageCheck for CheckRequest {
    fn admit(&mut self, size: u32) -> Result<(), Arc<dyn PolicyError>> {
        if size > self.rules.max {
            let why = format!(
                "is {size} bytes, over the {} validation holds (max_message_size, or 4 MiB); raise max_message_size",
                self.rules.max
            );
            return Err(self
                .rules
                .refuse(self.number + 1, Why::Unreadable { rule: "size", why, code: Code::ResourceExhausted }));
        }
        Ok(())
    }

    fn check(&mut self, compressed: bool, message: &[u8]) -> Result<(), Arc<dyn PolicyError>> {
        self.number += 1;
        let rules = &self.rules;
        let unreadable = |rule, why: String, code| rules.refuse(self.number, Why::Unreadable { rule, why, code });
        let decompressed;
        let bytes = match (compressed, self.compression) {
            (false, _) => message,
            (true, None) => {
                let why = "is flagged compressed, but the call's grpc-encoding names no compression".to_string();
                return Err(unreadable("compression", why, Code::Internal));
            }
            (true, Some(compression)) => {
                decompressed = decompress(compression, message, rules.max)
                    .map_err(|why| unreadable("compression", why, Code::Internal))?;
                &decompressed[..]
            }
        };
        let request = DynamicMessage::decode(rules.message.clone(), bytes).map_err(|e| {
            unreadable(
                "decode",
                format!("does not decode as {}: {e}", rules.message.full_name()),
                Code::InvalidArgument,
            )
        })?;
        match rules.validator.validate(&request) {
            Ok(()) => Ok(()),
            Err(RuleError::Validation(error)) => {
                let broken = error.violations().iter().map(|violation| Broken::of(violation, rules)).collect();
                Err(rules.refuse(self.number, Why::Broken(broken)))
            }
            Err(error) => Err(unreadable("runtime", format!("could not be checked: {error}"), Code::Internal)),
        }
    }
}

/// `message` decompressed, no larger than `max`.
fn decompress(compression: Compression, message: &[u8], max: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let limit = u64::from(max) + 1;
    let read = match compression {
        Compression::Gzip => flate2::read::GzDecoder::new(message).take(limit).read_to_end(&mut out),
        Compression::Deflate => flate2::read::ZlibDecoder::new(message).take(limit).read_to_end(&mut out),
    };
    read.map_err(|e| format!("does not decompress: {e}"))?;
    if out.len() > max as usize {
        return Err(format!("decompresses to more than the {max} bytes validation holds"));
    }
    Ok(out)
}

/// Why a request message was refused.
#[derive(Debug)]
enum Why {
    Broken(Vec<Broken>),
    Unreadable { rule: &'static str, why: String, code: Code },
}

/// A request message that breaks its rules, or that could not be checked.
#[derive(Debug)]
pub struct InvalidRequest {
    method: Box<str>,
    message_type: Box<str>,
    source: String,
    /// Which request message of the call, from 1.
    number: usize,
    why: Why,
}

/// One rule a message broke.
#[derive(Debug)]
struct Broken {
    /// The field's path, `items[0].sku`; empty for a rule of the whole message.
    field: String,
    rule: String,
    message: String,
    violation: Violation,
}

impl Broken {
    fn of(violation: &Violation, rules: &RequestRules) -> Broken {
        let rule = violation.rule_id().to_string();
        let message = Some(violation.message().to_string())
            .filter(|m| !m.is_empty())
            .or_else(|| rules.cel_messages.get(&rule).cloned())
            .unwrap_or_else(|| format!("breaks the rule {rule}"));
        Broken { field: violation.field_path(), rule, message, violation: violation.clone() }
    }
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{} [{}]", self.message, self.rule)
    }
}

impl InvalidRequest {
    /// Each broken rule as `field: message [rule id]`.
    pub fn violations(&self) -> Vec<String> {
        let Why::Broken(broken) = &self.why else { return Vec::new() };
        broken.iter().map(ToString::to_string).collect()
    }
}

/// The violations shown in `grpc-message`; all of them are in the details.
const SHOWN: usize = 3;

impl fmt::Display for InvalidRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request message {} to {} ", self.number, self.method)?;
        match &self.why {
            Why::Broken(violations) => {
                let shown: Vec<String> = violations.iter().take(SHOWN).map(ToString::to_string).collect();
                write!(f, "breaks the buf.validate rules of {}: {}", self.message_type, shown.join("; "))?;
                if violations.len() > SHOWN {
                    write!(f, "; and {} more", violations.len() - SHOWN)?;
                }
            }
            Why::Unreadable { why, .. } => write!(f, "{why}")?,
        }
        write!(f, " (validate: true, {})", self.source)
    }
}

impl std::error::Error for InvalidRequest {}

/// `google.rpc.BadRequest`.
#[derive(Clone, PartialEq, Message)]
struct BadRequest {
    #[prost(message, repeated, tag = "1")]
    field_violations: Vec<FieldViolation>,
}

#[derive(Clone, PartialEq, Message)]
struct FieldViolation {
    #[prost(string, tag = "1")]
    field: String,
    #[prost(string, tag = "2")]
    description: String,
    #[prost(string, tag = "3")]
    reason: String,
}

impl PolicyError for InvalidRequest {
    fn code(&self) -> Code {
        match &self.why {
            Why::Broken(_) => Code::InvalidArgument,
            Why::Unreadable { code, .. } => *code,
        }
    }

    fn reason(&self) -> &'static str {
        match &self.why {
            Why::Broken(_) => "invalid_request",
            Why::Unreadable { .. } => "unreadable_request",
        }
    }

    fn details(&self) -> Vec<prost_types::Any> {
        let Why::Broken(broken) = &self.why else { return Vec::new() };
        let field_violations = broken
            .iter()
            .map(|b| FieldViolation { field: b.field.clone(), description: b.message.clone(), reason: b.rule.clone() })
            .collect();
        let protovalidate = prost_protovalidate::types::Violations {
            violations: broken.iter().map(|b| b.violation.to_proto()).collect(),
        };
        vec![
            prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.BadRequest".into(),
                value: BadRequest { field_violations }.encode_to_vec(),
            },
            prost_types::Any {
                type_url: "type.googleapis.com/buf.validate.Violations".into(),
                value: protovalidate.encode_to_vec(),
            },
        ]
    }
}

/// The layer: with no rules for the method, calls pass as they are.
#[derive(Clone)]
pub struct Validate<S> {
    inner: S,
    rules: Option<Arc<RequestRules>>,
    /// The method takes one request message: it is checked before the call goes on.
    one_request: bool,
}

impl<S> Validate<S> {
    pub fn new(rules: Option<Arc<RequestRules>>, one_request: bool, inner: S) -> Self {
        Validate { inner, rules, one_request }
    }
}

impl<S> Service<Request<RecvBody>> for Validate<S>
where
    S: CallService<RecvBody> + Clone + Send + 'static,
{
    type Response = Response<crate::call::ResponseBody>;
    type Error = ProxyError;
    type Future = Either<S::Future, CallFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<RecvBody>) -> Self::Future {
        let Some(rules) = &self.rules else { return Either::Left(self.inner.call(request)) };
        let cut = Cut::of(&mut request);
        let checking = match rules.checking(request.headers().get(GRPC_ENCODING).map(|v| v.as_bytes())) {
            Ok(checking) => checking,
            Err(error) => return Either::Right(Box::pin(async move { Err(ProxyError::Policy(error)) })),
        };
        request.body_mut().check_messages(checking, cut.clone());
        // The next layer is ready (`poll_ready` said so); a clone waits for the message.
        let inner = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, inner);
        let one_request = self.one_request;
        Either::Right(Box::pin(async move {
            if one_request {
                futures_util::future::poll_fn(|cx| request.body_mut().poll_first_checked(cx)).await;
                if let Some(error) = cut.error() {
                    return Err(error);
                }
            }
            cut.answer(inner.call(request).await)
        }))
    }
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
