//! The gRPC service config (gRFC A2): the JSON document grpc-go takes in
//! `WithDefaultServiceConfig`, parsed with serde_json and validated whole.
//!
//! - `loadBalancingConfig` picks the policy: the first entry healthlb
//!   supports wins, as in gRPC. Supported: `round_robin`,
//!   `least_request_experimental` (A48), `peak_ewma` (Linkerd's),
//!   `outlier_detection_experimental` (A50) and `random_subsetting` (A68,
//!   `subsetSize`), each of the last two wrapping the others in its
//!   `childPolicy`.
//! - `methodConfig` sets each method's timeout, wait for ready, and retry
//!   or hedging policy (`retry.rs` runs them).
//! - `retryThrottling` sets the channel's token bucket.
//! - DNS can publish one too, opt-in: the TXT record `_grpc_config.<host>`
//!   holds `grpc_config=` and a list of choices ([`ServiceConfig::from_txt`]).
//!
//! Unknown fields are ignored, as the spec says, and each is named in
//! [`ServiceConfig::warnings`], which is logged when the config is applied:
//! a typo such as `retrypolicy` would otherwise turn retries off without a
//! word. A field of the wrong type or out of range is an error naming its
//! path, such as `loadBalancingConfig[0].least_request_experimental.choiceCount`.
//!
//! healthlb's additions, which other gRPC clients ignore as unknown fields:
//! `slowStart` (`window`, `aggression`, `minWeightPercent`) in the
//! `round_robin`, `least_request_experimental` and `peak_ewma` entries;
//! `decay` and `defaultRtt` in `peak_ewma`; and `consecutiveFailures`
//! (`threshold`, `enforcementPercentage`) and `failureCodes` in
//! `outlier_detection_experimental`.
//!
//! Each section is read in its own file: `load_balancing.rs`,
//! `method.rs` and `dns_txt.rs`, with `json.rs` the walker they share; the
//! policies' own entries are read beside their types (`Policy` in
//! `picker/policy.rs`, `OutlierDetection` in `outlier/config.rs`).

mod dns_txt;
pub(crate) mod json;
mod load_balancing;
mod method;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

use serde_json::{Map, Value};

pub(crate) use self::dns_txt::Chooser;
use self::json::{Field, invalid};
use self::load_balancing::{SUPPORTED, load_balancing};
use self::method::method_config;
pub use self::method::{HedgingPolicy, MethodConfig, MethodName, RetryPolicy};
use crate::Error;
use crate::outlier::OutlierDetection;
use crate::picker::{Policy, SlowStart};

/// A parsed, validated service config.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The policy `loadBalancingConfig` chose; `None` if it has none.
    pub policy: Option<Policy>,
    /// Slow start, from the chosen policy's `slowStart`.
    pub slow_start: Option<SlowStart>,
    /// Outlier detection, when the chosen entry is
    /// `outlier_detection_experimental`.
    pub outlier_detection: Option<OutlierDetection>,
    /// The subset size, when the chosen entry is `random_subsetting`
    /// (gRFC A68).
    pub subset_size: Option<u32>,
    /// `methodConfig`, in order.
    pub method_config: Vec<MethodConfig>,
    /// `retryThrottling`.
    pub retry_throttling: Option<RetryThrottling>,
    /// What was read but not applied, one line each: fields healthlb
    /// doesn't know (ignored, as gRFC A2 says, but most often a typo such
    /// as `retrypolicy`), deprecated ones, and values taken as a gRFC's
    /// limit. Each is logged as a warning when the config is applied.
    pub warnings: Vec<String>,
}

/// gRFC A6's `retryThrottling`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryThrottling {
    /// The bucket's size, 1 to 1000.
    pub max_tokens: u32,
    /// Tokens a success refunds, above 0.
    pub token_ratio: f64,
}

impl ServiceConfig {
    /// Parses and validates a service config. The error names the field
    /// and what is wrong with it.
    pub fn parse(json: &str) -> Result<Self, Error> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| invalid("the service config", format!("is not JSON: {e}")))?;
        let notes = RefCell::new(Vec::new());
        let mut config = Self::from_value(Field::root(&value, &notes))?;
        config.warnings = notes.into_inner();
        Ok(config)
    }

    /// Logs each of [`warnings`](Self::warnings), naming `source`.
    pub(crate) fn log_warnings(&self, source: &str) {
        for warning in &self.warnings {
            tracing::warn!(source, "service config: {warning}");
        }
    }

    fn from_value(root: Field<'_>) -> Result<Self, Error> {
        let object = root.object()?;
        root.known(
            object,
            &[
                "loadBalancingConfig",
                "loadBalancingPolicy",
                "methodConfig",
                "retryThrottling",
                "healthCheckConfig",
            ],
        );
        if root.get(object, "healthCheckConfig").is_some() {
            root.note(
                "healthCheckConfig is not applied: healthlb's health checking is set with Builder::health_service",
            );
        }
        let mut config = ServiceConfig::default();
        if let Some(list) = root.get(object, "loadBalancingConfig") {
            if root.get(object, "loadBalancingPolicy").is_some() {
                root.note("loadBalancingPolicy is ignored: loadBalancingConfig is set, and wins");
            }
            if let Some(chosen) = load_balancing(&list)? {
                config.policy = Some(chosen.policy);
                config.slow_start = chosen.slow_start;
                config.outlier_detection = chosen.outlier_detection;
                config.subset_size = chosen.subset_size;
            }
        } else if let Some(name) = root.get(object, "loadBalancingPolicy") {
            // The deprecated form: a policy name with its defaults.
            let name_str = name.string()?;
            root.note(format!(
                "loadBalancingPolicy is deprecated (gRFC A24): write \"loadBalancingConfig\": [{{\"{}\": {{}}}}]",
                name_str.to_ascii_lowercase()
            ));
            let entry = Value::Object(Map::from_iter([(
                name_str.to_ascii_lowercase(),
                Value::Object(Map::new()),
            )]));
            let (policy, slow_start) = Policy::from_json(&Field {
                path: name.path.clone(),
                value: &entry,
                notes: name.notes,
            })?
            .ok_or_else(|| {
                invalid(
                    &name.path,
                    format!("{name_str:?} is not supported; healthlb supports {SUPPORTED}"),
                )
            })?;
            config.policy = Some(policy);
            config.slow_start = slow_start;
        }
        if let Some(list) = root.get(object, "methodConfig") {
            config.method_config = list
                .array()?
                .into_iter()
                .map(|entry| method_config(&entry))
                .collect::<Result<_, _>>()?;
            let mut seen = std::collections::HashSet::new();
            for (i, m) in config.method_config.iter().enumerate() {
                for name in &m.name {
                    if !seen.insert(name.clone()) {
                        return Err(invalid(
                            &format!("methodConfig[{i}].name"),
                            format!("names {}/{} a second time", name.service, name.method),
                        ));
                    }
                }
            }
        }
        if let Some(t) = root.get(object, "retryThrottling") {
            let o = t.object()?;
            t.known(o, &["maxTokens", "tokenRatio"]);
            let max_tokens = t.require(o, "maxTokens")?.number()?;
            let token_ratio = t.require(o, "tokenRatio")?.number()?;
            if !(max_tokens > 0.0 && max_tokens <= 1000.0 && max_tokens.fract() == 0.0) {
                return Err(invalid(
                    &format!("{}.maxTokens", t.path),
                    format!("must be a whole number from 1 to 1000, got {max_tokens}"),
                ));
            }
            if token_ratio <= 0.0 {
                return Err(invalid(
                    &format!("{}.tokenRatio", t.path),
                    format!("must be above 0, got {token_ratio}"),
                ));
            }
            config.retry_throttling = Some(RetryThrottling {
                max_tokens: max_tokens as u32,
                token_ratio,
            });
        }
        Ok(config)
    }

    /// The `methodConfig` entry for `/service/method`: an exact name first,
    /// then the service's, then the default one (gRFC A2's order).
    pub fn method(&self, service: &str, method: &str) -> Option<&MethodConfig> {
        self.method_index(service, method)
            .map(|i| &self.method_config[i])
    }

    /// Where in `method_config` the entry [`method`](Self::method) finds is.
    pub(crate) fn method_index(&self, service: &str, method: &str) -> Option<usize> {
        let find = |s: &str, m: &str| {
            self.method_config
                .iter()
                .position(|c| c.name.iter().any(|n| n.service == s && n.method == m))
        };
        find(service, method)
            .or_else(|| find(service, ""))
            .or_else(|| find("", ""))
    }
}
