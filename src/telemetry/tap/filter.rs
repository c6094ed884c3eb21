//! What a tap asks for: which calls (methods, callers, statuses, direction),
//! and how much of each (message bytes, messages, events a second), read
//! from `GET /tap`'s query, each value checked with a message that names it.

use crate::call::Direction;
use crate::grpc::{self, Code};
use crate::identity::SpiffeId;
use crate::policy::authz::{CallerPattern, MethodPattern};

/// The most any tap may copy of one message, and show of it.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The most messages a tap keeps of one call, each way.
pub const MAX_MESSAGES: usize = 100;
/// The most events a tap may take each second.
pub const MAX_RATE: u32 = 1000;

#[derive(Clone, Debug, PartialEq)]
pub struct TapFilter {
    /// Any of these (none: every method).
    pub methods: Vec<MethodPattern>,
    /// The identity that made the call: inbound, the peer; outbound, this workload.
    pub callers: Vec<CallerPattern>,
    pub statuses: Vec<Code>,
    pub direction: Option<Direction>,
    /// Bytes of each message copied and shown; a longer one is shown by its size.
    pub max_bytes: usize,
    /// Messages shown of each call, each way; the rest are counted.
    pub max_messages: usize,
    /// Events a second; more are dropped and counted.
    pub rate: u32,
}

impl Default for TapFilter {
    fn default() -> TapFilter {
        TapFilter {
            methods: Vec::new(),
            callers: Vec::new(),
            statuses: Vec::new(),
            direction: None,
            max_bytes: 4096,
            max_messages: 16,
            rate: 100,
        }
    }
}

impl TapFilter {
    /// Reads a query string such as `method=shop.v1.Cart/*&status=UNAVAILABLE&rate=10`.
    /// Errors name the parameter, the value and what would be valid.
    pub fn parse(query: &str) -> Result<TapFilter, String> {
        let mut filter = TapFilter::default();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            let bad = |why: String| format!("tap: {name}={value}: {why}");
            match name.as_ref() {
                "method" => {
                    let pattern = value.strip_prefix('/').unwrap_or(&value).to_string();
                    filter.methods.push(MethodPattern::try_from(pattern).map_err(bad)?);
                }
                "caller" => filter.callers.push(CallerPattern::try_from(value.clone()).map_err(bad)?),
                "status" => {
                    let code = match value.parse::<u8>() {
                        Ok(number) => {
                            Code::from_number(number).ok_or_else(|| "no gRPC status has that number".to_string())
                        }
                        Err(_) => Code::parse(&value),
                    };
                    filter.statuses.push(code.map_err(bad)?);
                }
                "direction" => {
                    filter.direction = Some(match value.as_str() {
                        "inbound" => Direction::Inbound,
                        "outbound" => Direction::Outbound,
                        _ => return Err(bad("write inbound or outbound".into())),
                    });
                }
                "max_bytes" => filter.max_bytes = number(&value, 0, MAX_MESSAGE_BYTES).map_err(bad)?,
                "messages" => filter.max_messages = number(&value, 0, MAX_MESSAGES).map_err(bad)?,
                "rate" => filter.rate = number(&value, 1, MAX_RATE as usize).map_err(bad)? as u32,
                _ => {
                    return Err(format!(
                        "tap: unknown parameter {name}; use method, caller, status, direction, max_bytes, messages or rate"
                    ));
                }
            }
        }
        Ok(filter)
    }

    /// Whether a call of `direction` to `path` made by `caller` is one to copy;
    /// its status is known only at its end ([`TapFilter::wants_status`]).
    pub fn wants(&self, direction: Direction, path: &str, caller: Option<&SpiffeId>) -> bool {
        let (service, method) = grpc::split_path(path).unwrap_or(("", ""));
        self.direction.is_none_or(|d| d == direction)
            && (self.methods.is_empty() || self.methods.iter().any(|p| p.matches(service, method)))
            && (self.callers.is_empty() || caller.is_some_and(|id| self.callers.iter().any(|p| p.matches(id))))
    }

    pub fn wants_status(&self, status: Code) -> bool {
        self.statuses.is_empty() || self.statuses.contains(&status)
    }
}

fn number(value: &str, min: usize, max: usize) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("write a number from {min} to {max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_reads_into_a_filter_and_bad_values_are_named() {
        let filter = TapFilter::parse(
            "method=/shop.v1.Cart/*&method=echo.v1.Echo/Unary&status=UNAVAILABLE&status=0&direction=inbound&rate=5",
        )
        .unwrap();
        assert_eq!(filter.methods.len(), 2);
        assert_eq!(filter.statuses, [Code::Unavailable, Code::Ok]);
        let caller = SpiffeId::parse("spiffe://td/ns/shop/sa/web").unwrap();
        assert!(filter.wants(Direction::Inbound, "/shop.v1.Cart/Add", Some(&caller)));
        assert!(!filter.wants(Direction::Outbound, "/shop.v1.Cart/Add", Some(&caller)));
        assert!(!filter.wants(Direction::Inbound, "/shop.v1.Orders/Add", Some(&caller)));
        assert!(filter.wants_status(Code::Ok) && !filter.wants_status(Code::NotFound));

        let callers = TapFilter::parse("caller=spiffe://td/ns/shop/*").unwrap();
        assert!(callers.wants(Direction::Outbound, "/a.B/C", Some(&caller)));
        assert!(!callers.wants(Direction::Outbound, "/a.B/C", None));

        for (query, error) in [
            ("method=shop.v1.Cart", "tap: method=shop.v1.Cart: `shop.v1.Cart` is not a method pattern"),
            ("status=SLOW", "tap: status=SLOW: `SLOW` is not a gRPC status code"),
            ("status=17", "tap: status=17: no gRPC status has that number"),
            ("direction=up", "tap: direction=up: write inbound or outbound"),
            ("max_bytes=1000000", "tap: max_bytes=1000000: write a number from 0 to 65536"),
            ("rate=0", "tap: rate=0: write a number from 1 to 1000"),
            ("caller=web", "tap: caller=web:"),
            ("verbose=1", "tap: unknown parameter verbose"),
        ] {
            let got = TapFilter::parse(query).unwrap_err();
            assert!(got.starts_with(error), "{query}: {got}");
        }
    }
}
