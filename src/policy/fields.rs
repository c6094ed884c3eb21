//! How a method's policy fields are described once. `policy/mod.rs` lists
//! them (name, type, doc) in one `method_policy!`, which makes of the list
//! the fields as written (`PolicyFields`: a contract's `(protomesh.v1.method)`
//! or `(protomesh.v1.service)` option, `policy.defaults`, an override in
//! `policy.methods`), the fields merged with the source of each
//! (`MethodPolicy`), their validation and their rendering. Each field's type
//! says how it is read, checked and shown ([`PolicyValue`], implemented beside
//! the policy that owns the type), so the YAML and the contract share one
//! parser, one set of defaults and one set of error messages.

use std::fmt::Debug;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::source::{Source, Sourced};
use crate::duration;
use crate::grpc::Code;

/// The type of a per-method policy field.
pub trait PolicyValue: Clone + Debug + PartialEq + Sized {
    /// Reads the value as the config's YAML and the contract's options write it.
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;

    /// Checks what reading cannot; errors are `field: problem`.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// As `/config` shows it (JSON) and as `protomesh check` prints it (text).
    fn show(&self) -> (Value, String);
}

/// `deserialize_with` for every field of `PolicyFields`.
pub fn read<'de, D: Deserializer<'de>, T: PolicyValue>(d: D) -> Result<Option<T>, D::Error> {
    T::read(d).map(Some)
}

/// The first layer, in order of precedence, that sets a field.
pub fn first<F, T: Clone>(layers: &[(&F, Source)], field: impl Fn(&F) -> Option<&T>) -> Option<Sourced<T>> {
    layers.iter().find_map(|(fields, source)| {
        field(fields).map(|value| Sourced { value: value.clone(), source: source.clone() })
    })
}

/// One field of a method's effective policy, as `check` prints it and
/// `/config` shows it.
pub struct FieldView {
    pub name: &'static str,
    /// `(json, text, source)`; `None` when no source sets it.
    pub value: Option<(Value, String, String)>,
}

impl FieldView {
    pub fn of<T: PolicyValue>(name: &'static str, value: Option<&Sourced<T>>) -> FieldView {
        let value = value.map(|v| {
            let (json, text) = v.value.show();
            (json, text, v.source.to_string())
        });
        FieldView { name, value }
    }
}

/// Declares the per-method policy fields: each is `Option<T>` as written and
/// `Option<Sourced<T>>` once merged, `T` a [`PolicyValue`].
macro_rules! method_policy {
    ($( $(#[doc = $doc:literal])* $name:ident: $value:ty, )*) => {
        /// A method's policy fields as one source writes them.
        #[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct PolicyFields {
            $(
                $(#[doc = $doc])*
                #[serde(default, deserialize_with = "crate::policy::fields::read")]
                pub $name: Option<$value>,
            )*
        }

        /// A method's policy merged from its sources, each field with the one it came from.
        #[derive(Clone, Debug, Default, PartialEq)]
        pub struct MethodPolicy {
            $(
                $(#[doc = $doc])*
                pub $name: Option<$crate::policy::source::Sourced<$value>>,
            )*
        }

        impl PolicyFields {
            /// Each field's own checks; errors are `field.problem`.
            fn validate_each(&self) -> Result<(), String> {
                $(
                    if let Some(value) = &self.$name {
                        $crate::policy::fields::PolicyValue::validate(value)
                            .map_err(|e| format!("{}.{e}", stringify!($name)))?;
                    }
                )*
                Ok(())
            }
        }

        impl MethodPolicy {
            /// Each field from the first of `layers` that sets it.
            pub fn merge(layers: &[(&PolicyFields, $crate::policy::source::Source)]) -> MethodPolicy {
                MethodPolicy { $( $name: $crate::policy::fields::first(layers, |f| f.$name.as_ref()), )* }
            }

            /// Every field, in the order of the list, set or not.
            pub fn views(&self) -> Vec<$crate::policy::fields::FieldView> {
                vec![ $( $crate::policy::fields::FieldView::of(stringify!($name), self.$name.as_ref()), )* ]
            }
        }
    };
}
pub(crate) use method_policy;

impl PolicyValue for Duration {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration::deserialize(d)
    }

    fn show(&self) -> (Value, String) {
        (json!(format!("{self:?}")), format!("{self:?}"))
    }
}

impl PolicyValue for ByteSize {
    /// A number of bytes, or a size with its unit ("4MiB").
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Bytes(bytes) => Ok(ByteSize::b(bytes)),
            Written::Text(text) => text.parse().map_err(|e| {
                serde::de::Error::custom(format!("`{text}` is not a size such as \"4MiB\" or \"65536\": {e}"))
            }),
        }
    }

    fn show(&self) -> (Value, String) {
        (json!(self.as_u64()), self.display().iec().to_string())
    }
}

impl PolicyValue for bool {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        bool::deserialize(d)
    }

    fn show(&self) -> (Value, String) {
        (json!(self), self.to_string())
    }
}

impl PolicyValue for Vec<Code> {
    fn read<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d)
    }

    fn show(&self) -> (Value, String) {
        let names = code_names(self);
        (json!(names), names.join(", "))
    }
}

/// Status codes by their canonical names, as policies show them.
pub fn code_names(codes: &[Code]) -> Vec<&'static str> {
    codes.iter().map(|c| c.name()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyFields;
    use crate::policy::bulkhead::ConcurrencyPolicy;
    use crate::policy::retry::RetryPolicy;

    #[test]
    fn validation_names_the_field() {
        let retry = PolicyFields { retry: Some(RetryPolicy::new(0, vec![])), ..Default::default() };
        assert!(retry.validate().unwrap_err().starts_with("retry.max_attempts"));
        let fields = PolicyFields {
            concurrency: Some(ConcurrencyPolicy { max_in_flight: 0, max_queue: 0, queue_timeout: Duration::ZERO }),
            ..Default::default()
        };
        assert!(fields.validate().unwrap_err().starts_with("concurrency.max_in_flight"));
    }

    #[test]
    fn sizes_are_bytes_or_written_with_units() {
        let read = |yaml: &str| -> Result<PolicyFields, String> {
            serde_saphyr::from_str(&format!("max_message_size: {yaml}")).map_err(|e| e.to_string())
        };
        assert_eq!(read("65536").unwrap().max_message_size, Some(ByteSize::b(65536)));
        assert_eq!(read("4MiB").unwrap().max_message_size, Some(ByteSize::mib(4)));
        let err = read("4 lots").unwrap_err();
        assert!(err.contains("`4 lots` is not a size such as \"4MiB\""), "{err}");
    }

    #[test]
    fn merged_fields_keep_the_source_of_each() {
        let method = PolicyFields { timeout: Some(Duration::from_millis(250)), ..Default::default() };
        let defaults = PolicyFields {
            timeout: Some(Duration::from_secs(5)),
            max_message_size: Some(ByteSize::kib(64)),
            ..Default::default()
        };
        let merged =
            crate::policy::MethodPolicy::merge(&[(&method, Source::MethodOption), (&defaults, Source::ConfigDefault)]);
        let timeout = merged.timeout.as_ref().unwrap();
        assert_eq!((timeout.value, &timeout.source), (Duration::from_millis(250), &Source::MethodOption));
        assert_eq!(merged.max_message_size.as_ref().unwrap().source, Source::ConfigDefault);
        let views = merged.views();
        let size = views.iter().find(|v| v.name == "max_message_size").unwrap().value.as_ref().unwrap();
        assert_eq!(size, &(json!(65536), "64.0 KiB".to_string(), "config policy.defaults".to_string()));
        assert!(views.iter().find(|v| v.name == "retry").unwrap().value.is_none());
    }
}
