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

use std::cell::RefCell;
use std::time::Duration;

use serde_json::{Map, Value};
use tonic::Code;

use crate::Error;
use crate::outlier::{
    ConsecutiveFailures, FailurePercentageEjection, OutlierDetection, SuccessRateEjection,
};
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

/// One `methodConfig` entry.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The methods it applies to.
    pub name: Vec<MethodName>,
    /// `timeout`: the deadline of a call that carries none.
    pub timeout: Option<Duration>,
    /// `waitForReady`.
    pub wait_for_ready: Option<bool>,
    /// `retryPolicy`.
    pub retry_policy: Option<RetryPolicy>,
    /// `hedgingPolicy`.
    pub hedging_policy: Option<HedgingPolicy>,
    /// `maxRequestMessageBytes`.
    pub max_request_message_bytes: Option<u64>,
    /// `maxResponseMessageBytes`.
    pub max_response_message_bytes: Option<u64>,
}

/// A `methodConfig` name: a service and a method, a whole service, or
/// (both empty) every method.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct MethodName {
    /// `service`, such as `echo.Echo`; empty for all.
    pub service: String,
    /// `method`, such as `Unary`; empty for all of the service's.
    pub method: String,
}

/// gRFC A6's `retryPolicy`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 2 or more, taken as at most 5.
    pub max_attempts: u32,
    /// The first backoff's upper bound.
    pub initial_backoff: Duration,
    /// The largest backoff.
    pub max_backoff: Duration,
    /// The backoff's growth per attempt.
    pub backoff_multiplier: f64,
    /// The codes worth another attempt.
    pub retryable_status_codes: Vec<Code>,
}

/// gRFC A6's `hedgingPolicy`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct HedgingPolicy {
    /// Copies in all: 2 or more, taken as at most 5.
    pub max_attempts: u32,
    /// The time between copies. Default: 0.
    pub hedging_delay: Duration,
    /// Codes that don't end the hedged call.
    pub non_fatal_status_codes: Vec<Code>,
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

/// The names of the policies healthlb runs.
const SUPPORTED: &str = "round_robin, least_request_experimental, peak_ewma, \
    outlier_detection_experimental, random_subsetting (or random_subsetting_experimental)";

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
            let (policy, slow_start) = child_policy(&Field {
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

/// What a `_grpc_config` TXT record's choices are matched against.
#[derive(Debug, Clone)]
pub(crate) struct Chooser {
    /// This client's draw in 0..100, for `percentage`.
    pub(crate) percentile: u32,
    /// This machine's host name, for `clientHostname`.
    pub(crate) hostname: Option<String>,
}

/// `clientLanguage` names this client matches.
const LANGUAGE: &str = "rust";

impl ServiceConfig {
    /// The service config that TXT records of `_grpc_config.<host>` choose
    /// for this client, in gRPC's DNS format: one record of
    /// `grpc_config=` and a JSON list of choices, each with an optional
    /// `clientLanguage` (this client is `rust`), `percentage` (0 to 100)
    /// and `clientHostname`, and a `serviceConfig`. The first choice that
    /// matches wins. `Ok(None)` when there is no such record or no choice
    /// matches.
    pub(crate) fn from_txt(records: &[String], chooser: &Chooser) -> Result<Option<Self>, Error> {
        let mut found = records
            .iter()
            .filter_map(|r| r.strip_prefix("grpc_config="));
        let Some(json) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            return Err(invalid(
                "_grpc_config",
                "has more than one grpc_config= record",
            ));
        }
        let value: Value = serde_json::from_str(json)
            .map_err(|e| invalid("_grpc_config", format!("is not JSON: {e}")))?;
        let notes = RefCell::new(Vec::new());
        let root = Field {
            path: "_grpc_config".to_owned(),
            value: &value,
            notes: &notes,
        };
        for (i, choice) in root.array()?.into_iter().enumerate() {
            let object = choice.object()?;
            choice.known(
                object,
                &[
                    "clientLanguage",
                    "percentage",
                    "clientHostname",
                    "serviceConfig",
                ],
            );
            let path = format!("_grpc_config[{i}]");
            let strings = |key: &str| -> Result<Option<Vec<String>>, Error> {
                let Some(list) = choice.get(object, key) else {
                    return Ok(None);
                };
                list.array()?
                    .into_iter()
                    .map(|s| s.string().map(str::to_owned))
                    .collect::<Result<_, _>>()
                    .map(Some)
            };
            let language = strings("clientLanguage")?;
            let hostnames = strings("clientHostname")?;
            let percentage = match choice.get(object, "percentage") {
                Some(p) => Some(p.whole(0, 100)?),
                None => None,
            };
            let config = choice.require(object, "serviceConfig")?;
            config.object()?;
            let matches = language
                .is_none_or(|l| l.iter().any(|l| l.eq_ignore_ascii_case(LANGUAGE)))
                && percentage.is_none_or(|p| u64::from(chooser.percentile) < p)
                && hostnames
                    .is_none_or(|h| chooser.hostname.as_ref().is_some_and(|me| h.contains(me)));
            if matches {
                let mut chosen = Self::from_value(Field {
                    path: format!("{path}.serviceConfig"),
                    value: config.value,
                    notes: &notes,
                })?;
                chosen.warnings = notes.into_inner();
                return Ok(Some(chosen));
            }
        }
        Ok(None)
    }
}

fn invalid(path: &str, what: impl std::fmt::Display) -> Error {
    Error::invalid_config(format!("service config: {path} {what}"))
}

/// A JSON value with its path, for errors, and where notes about what
/// is not applied go.
struct Field<'a> {
    path: String,
    value: &'a Value,
    notes: &'a RefCell<Vec<String>>,
}

impl<'a> Field<'a> {
    fn root(value: &'a Value, notes: &'a RefCell<Vec<String>>) -> Self {
        Self {
            path: "the service config".to_owned(),
            value,
            notes,
        }
    }

    fn child(&self, key: &str, value: &'a Value) -> Self {
        let path = if self.path == "the service config" {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        };
        Self {
            path,
            value,
            notes: self.notes,
        }
    }

    /// Notes each key of `object` that is not one of `keys`: ignored, as
    /// gRFC A2 says, but named.
    fn known(&self, object: &Map<String, Value>, keys: &[&str]) {
        for key in object.keys().filter(|k| !keys.contains(&k.as_str())) {
            let path = self.child(key, &Value::Null).path;
            self.note(format!(
                "{path} is not a field healthlb knows, and is ignored (known here: {})",
                keys.join(", ")
            ));
        }
    }

    fn note(&self, note: impl Into<String>) {
        self.notes.borrow_mut().push(note.into());
    }

    fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        }
    }

    fn wrong(&self, wanted: &str) -> Error {
        invalid(&self.path, format!("must be {wanted}, not {}", self.kind()))
    }

    fn object(&self) -> Result<&'a Map<String, Value>, Error> {
        self.value
            .as_object()
            .ok_or_else(|| self.wrong("an object"))
    }

    fn array(&self) -> Result<Vec<Field<'a>>, Error> {
        let list = self.value.as_array().ok_or_else(|| self.wrong("a list"))?;
        Ok(list
            .iter()
            .enumerate()
            .map(|(i, value)| Field {
                path: format!("{}[{i}]", self.path),
                value,
                notes: self.notes,
            })
            .collect())
    }

    fn string(&self) -> Result<&'a str, Error> {
        self.value.as_str().ok_or_else(|| self.wrong("a string"))
    }

    fn boolean(&self) -> Result<bool, Error> {
        self.value
            .as_bool()
            .ok_or_else(|| self.wrong("true or false"))
    }

    fn number(&self) -> Result<f64, Error> {
        self.value.as_f64().ok_or_else(|| self.wrong("a number"))
    }

    /// A whole number from `min` to `max`.
    fn whole(&self, min: u64, max: u64) -> Result<u64, Error> {
        let n = self.number()?;
        if n.fract() != 0.0 || n < min as f64 || n > max as f64 {
            return Err(invalid(
                &self.path,
                format!("must be a whole number from {min} to {max}, got {n}"),
            ));
        }
        Ok(n as u64)
    }

    /// A whole number from `min` to `u32::MAX`.
    fn count(&self, min: u32) -> Result<u32, Error> {
        self.whole(u64::from(min), u64::from(u32::MAX))
            .map(|n| n as u32)
    }

    fn percent(&self) -> Result<u32, Error> {
        self.whole(0, 100).map(|n| n as u32)
    }

    /// A proto3 JSON duration: `"1.5s"`, at most 9 fractional digits.
    fn duration(&self) -> Result<Duration, Error> {
        let s = self.string()?;
        parse_duration(s).ok_or_else(|| {
            invalid(
                &self.path,
                format!("must be a duration such as \"1.5s\", got {s:?}"),
            )
        })
    }

    fn code(&self) -> Result<Code, Error> {
        match self.value {
            Value::Number(_) => self.whole(0, 16).map(|n| Code::from_i32(n as i32)),
            Value::String(s) => code_named(s).ok_or_else(|| {
                invalid(&self.path, format!("{s:?} is not a gRPC status code name"))
            }),
            _ => Err(self.wrong("a status code name")),
        }
    }

    fn codes(&self) -> Result<Vec<Code>, Error> {
        self.array()?.iter().map(Field::code).collect()
    }

    fn get(&self, object: &'a Map<String, Value>, key: &str) -> Option<Field<'a>> {
        object
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| self.child(key, v))
    }

    fn require(&self, object: &'a Map<String, Value>, key: &str) -> Result<Field<'a>, Error> {
        self.get(object, key)
            .ok_or_else(|| invalid(&format!("{}.{key}", self.path), "is required"))
    }
}

pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let number = s.strip_suffix('s')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = whole.parse().ok()?;
    // proto3's Duration: at most 315,576,000,000 s.
    if secs > 315_576_000_000 {
        return None;
    }
    let nanos = format!("{fraction:0<9}").parse::<u32>().ok()?;
    Some(Duration::new(secs, nanos))
}

fn code_named(name: &str) -> Option<Code> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| Code::from_i32(i as i32))
}

/// What a `loadBalancingConfig` list chose.
struct Chosen {
    policy: Policy,
    slow_start: Option<SlowStart>,
    outlier_detection: Option<OutlierDetection>,
    subset_size: Option<u32>,
}

/// The first supported entry of a `loadBalancingConfig` list. Every entry
/// up to it is checked for shape; entries after it are not read, as in
/// gRPC. A list with no supported entry is invalid.
fn load_balancing(list: &Field<'_>) -> Result<Option<Chosen>, Error> {
    let entries = list.array()?;
    if entries.is_empty() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for entry in &entries {
        let (name, config) = single(entry)?;
        if name == "outlier_detection_experimental" {
            let outlier = outlier_detection(&config)?;
            let mut chosen = wrapped(&config)?;
            chosen.outlier_detection = Some(outlier);
            return Ok(Some(chosen));
        }
        if name == "random_subsetting" || name == "random_subsetting_experimental" {
            let o = config.object()?;
            config.known(
                o,
                &["subsetSize", "subset_size", "childPolicy", "child_policy"],
            );
            let size = config
                .get(o, "subsetSize")
                .or_else(|| config.get(o, "subset_size"))
                .ok_or_else(|| invalid(&format!("{}.subsetSize", config.path), "is required"))?;
            let n = size.whole(0, u64::from(u32::MAX))?;
            if n == 0 {
                return Err(invalid(&size.path, "must be at least 1"));
            }
            let mut chosen = wrapped(&config)?;
            chosen.subset_size = Some(n as u32);
            return Ok(Some(chosen));
        }
        if let Some((policy, slow_start)) = child_policy(entry)? {
            return Ok(Some(Chosen {
                policy,
                slow_start,
                outlier_detection: None,
                subset_size: None,
            }));
        }
        names.push(name);
    }
    Err(invalid(
        &list.path,
        format!(
            "names no policy healthlb supports ({}); it supports {SUPPORTED}",
            names.join(", ")
        ),
    ))
}

/// What the `childPolicy` of a wrapping policy (outlier detection,
/// subsetting) chose.
fn wrapped(config: &Field<'_>) -> Result<Chosen, Error> {
    let o = config.object()?;
    let child = config
        .get(o, "childPolicy")
        .or_else(|| config.get(o, "child_policy"))
        .ok_or_else(|| invalid(&format!("{}.childPolicy", config.path), "is required"))?;
    load_balancing(&child)?.ok_or_else(|| invalid(&child.path, "must name a policy"))
}

/// An entry's one key and its value.
fn single<'a>(entry: &Field<'a>) -> Result<(String, Field<'a>), Error> {
    let o = entry.object()?;
    if o.len() != 1 {
        return Err(invalid(
            &entry.path,
            format!("must hold exactly one policy, not {}", o.len()),
        ));
    }
    let (name, value) = o.iter().next().expect("one key");
    Ok((name.clone(), entry.child(name, value)))
}

/// A policy other than outlier detection, or `None` for one healthlb
/// doesn't run.
fn child_policy(entry: &Field<'_>) -> Result<Option<(Policy, Option<SlowStart>)>, Error> {
    let (name, config) = single(entry)?;
    let o = config.object()?;
    let policy = match name.as_str() {
        "round_robin" => {
            config.known(o, &["slowStart"]);
            Policy::RoundRobin
        }
        "least_request_experimental" => {
            config.known(o, &["choiceCount", "slowStart"]);
            let choice_count = match config.get(o, "choiceCount") {
                Some(c) => {
                    let n = c.whole(0, u64::from(u32::MAX))?;
                    if n < 2 {
                        return Err(invalid(
                            &c.path,
                            format!("must be at least 2 (above 10 is taken as 10), got {n}"),
                        ));
                    }
                    if n > 10 {
                        c.note(format!("{} {n} is taken as 10 (gRFC A48)", c.path));
                    }
                    n.min(10) as usize
                }
                None => 2,
            };
            Policy::LeastRequest { choice_count }
        }
        "peak_ewma" => {
            config.known(o, &["decay", "defaultRtt", "slowStart"]);
            let Policy::PeakEwma {
                mut decay,
                mut default_rtt,
            } = Policy::peak_ewma()
            else {
                unreachable!("peak_ewma() is PeakEwma")
            };
            if let Some(d) = config.get(o, "decay") {
                decay = d.duration()?;
                if decay.is_zero() {
                    return Err(invalid(&d.path, "must be above zero"));
                }
            }
            if let Some(d) = config.get(o, "defaultRtt") {
                default_rtt = d.duration()?;
            }
            Policy::PeakEwma { decay, default_rtt }
        }
        _ => return Ok(None),
    };
    let slow_start = match config.get(o, "slowStart") {
        Some(s) => Some(slow_start(&s)?),
        None => None,
    };
    Ok(Some((policy, slow_start)))
}

fn slow_start(field: &Field<'_>) -> Result<SlowStart, Error> {
    let o = field.object()?;
    field.known(o, &["window", "aggression", "minWeightPercent"]);
    let mut s = SlowStart::new(field.require(o, "window")?.duration()?);
    if let Some(a) = field.get(o, "aggression") {
        s.aggression = a.number()?;
    }
    if let Some(m) = field.get(o, "minWeightPercent") {
        s.min_weight_percent = m.number()?;
    }
    s.validate()
        .map_err(|e| invalid(&field.path, format!("is not valid: {e}")))?;
    Ok(s)
}

fn outlier_detection(field: &Field<'_>) -> Result<OutlierDetection, Error> {
    let o = field.object()?;
    field.known(
        o,
        &[
            "interval",
            "baseEjectionTime",
            "maxEjectionTime",
            "maxEjectionPercent",
            "successRateEjection",
            "failurePercentageEjection",
            "consecutiveFailures",
            "failureCodes",
            "childPolicy",
            "child_policy",
        ],
    );
    let mut od = OutlierDetection::a50();
    if let Some(d) = field.get(o, "interval") {
        od.interval = positive(&d)?;
    }
    if let Some(d) = field.get(o, "baseEjectionTime") {
        od.base_ejection_time = positive(&d)?;
    }
    match field.get(o, "maxEjectionTime") {
        Some(d) => od.max_ejection_time = d.duration()?,
        // A50: 300 s, or the base ejection time if that is longer.
        None => od.max_ejection_time = od.max_ejection_time.max(od.base_ejection_time),
    }
    if let Some(p) = field.get(o, "maxEjectionPercent") {
        od.max_ejection_percent = p.percent()?;
    }
    if let Some(s) = field.get(o, "successRateEjection") {
        let so = s.object()?;
        s.known(
            so,
            &[
                "stdevFactor",
                "enforcementPercentage",
                "minimumHosts",
                "requestVolume",
            ],
        );
        let mut rule = SuccessRateEjection::default();
        if let Some(v) = s.get(so, "stdevFactor") {
            rule.stdev_factor = v.count(0)?;
        }
        if let Some(v) = s.get(so, "enforcementPercentage") {
            rule.enforcement_percentage = v.percent()?;
        }
        if let Some(v) = s.get(so, "minimumHosts") {
            rule.minimum_hosts = v.count(0)?;
        }
        if let Some(v) = s.get(so, "requestVolume") {
            rule.request_volume = v.count(0)?;
        }
        od.success_rate = Some(rule);
    }
    if let Some(f) = field.get(o, "failurePercentageEjection") {
        let fo = f.object()?;
        f.known(
            fo,
            &[
                "threshold",
                "enforcementPercentage",
                "minimumHosts",
                "requestVolume",
            ],
        );
        let mut rule = FailurePercentageEjection::default();
        if let Some(v) = f.get(fo, "threshold") {
            rule.threshold = v.percent()?;
        }
        if let Some(v) = f.get(fo, "enforcementPercentage") {
            rule.enforcement_percentage = v.percent()?;
        }
        if let Some(v) = f.get(fo, "minimumHosts") {
            rule.minimum_hosts = v.count(0)?;
        }
        if let Some(v) = f.get(fo, "requestVolume") {
            rule.request_volume = v.count(0)?;
        }
        od.failure_percentage = Some(rule);
    }
    if let Some(c) = field.get(o, "consecutiveFailures") {
        let co = c.object()?;
        c.known(co, &["threshold", "enforcementPercentage"]);
        let mut rule = ConsecutiveFailures::default();
        if let Some(v) = c.get(co, "threshold") {
            rule.threshold = v.count(1)?;
        }
        if let Some(v) = c.get(co, "enforcementPercentage") {
            rule.enforcement_percentage = v.percent()?;
        }
        od.consecutive_failures = Some(rule);
    }
    if let Some(codes) = field.get(o, "failureCodes") {
        od.failure_codes = codes.codes()?;
    }
    Ok(od)
}

/// A6's `maxAttempts`: at least 2, and above 5 taken as 5.
fn max_attempts(field: &Field<'_>) -> Result<u32, Error> {
    let n = field.whole(0, u64::from(u32::MAX))?;
    if n < 2 {
        return Err(invalid(
            &field.path,
            format!(
                "must be at least 2, the first attempt included (above 5 is taken as 5, as gRFC A6 says), got {n}"
            ),
        ));
    }
    if n > 5 {
        field.note(format!("{} {n} is taken as 5 (gRFC A6)", field.path));
    }
    Ok(n.min(5) as u32)
}

fn positive(field: &Field<'_>) -> Result<Duration, Error> {
    let d = field.duration()?;
    if d.is_zero() {
        return Err(invalid(&field.path, "must be above zero"));
    }
    Ok(d)
}

fn method_config(entry: &Field<'_>) -> Result<MethodConfig, Error> {
    let o = entry.object()?;
    entry.known(
        o,
        &[
            "name",
            "timeout",
            "waitForReady",
            "maxRequestMessageBytes",
            "maxResponseMessageBytes",
            "retryPolicy",
            "hedgingPolicy",
        ],
    );
    let mut m = MethodConfig::default();
    if let Some(names) = entry.get(o, "name") {
        for name in names.array()? {
            let no = name.object()?;
            name.known(no, &["service", "method"]);
            let service = match name.get(no, "service") {
                Some(s) => s.string()?.to_owned(),
                None => String::new(),
            };
            let method = match name.get(no, "method") {
                Some(s) => s.string()?.to_owned(),
                None => String::new(),
            };
            if service.is_empty() && !method.is_empty() {
                return Err(invalid(&name.path, "names a method without its service"));
            }
            m.name.push(MethodName { service, method });
        }
    }
    if let Some(t) = entry.get(o, "timeout") {
        m.timeout = Some(t.duration()?);
    }
    if let Some(w) = entry.get(o, "waitForReady") {
        m.wait_for_ready = Some(w.boolean()?);
    }
    if let Some(n) = entry.get(o, "maxRequestMessageBytes") {
        m.max_request_message_bytes = Some(n.whole(0, u64::MAX >> 11)?);
    }
    if let Some(n) = entry.get(o, "maxResponseMessageBytes") {
        m.max_response_message_bytes = Some(n.whole(0, u64::MAX >> 11)?);
    }
    let retry = entry.get(o, "retryPolicy");
    let hedging = entry.get(o, "hedgingPolicy");
    if retry.is_some() && hedging.is_some() {
        return Err(invalid(
            &entry.path,
            "has both retryPolicy and hedgingPolicy; gRFC A6 allows one",
        ));
    }
    if let Some(r) = retry {
        let ro = r.object()?;
        r.known(
            ro,
            &[
                "maxAttempts",
                "initialBackoff",
                "maxBackoff",
                "backoffMultiplier",
                "retryableStatusCodes",
            ],
        );
        let max_attempts = max_attempts(&r.require(ro, "maxAttempts")?)?;
        let initial_backoff = positive(&r.require(ro, "initialBackoff")?)?;
        let max_backoff = positive(&r.require(ro, "maxBackoff")?)?;
        let multiplier = r.require(ro, "backoffMultiplier")?;
        let backoff_multiplier = multiplier.number()?;
        if backoff_multiplier <= 0.0 {
            return Err(invalid(
                &multiplier.path,
                format!("must be above 0, got {backoff_multiplier}"),
            ));
        }
        let codes = r.require(ro, "retryableStatusCodes")?;
        let retryable_status_codes = codes.codes()?;
        if retryable_status_codes.is_empty() {
            return Err(invalid(&codes.path, "must name at least one code"));
        }
        m.retry_policy = Some(RetryPolicy {
            max_attempts,
            initial_backoff,
            max_backoff,
            backoff_multiplier,
            retryable_status_codes,
        });
    }
    if let Some(h) = hedging {
        let ho = h.object()?;
        h.known(ho, &["maxAttempts", "hedgingDelay", "nonFatalStatusCodes"]);
        let max_attempts = max_attempts(&h.require(ho, "maxAttempts")?)?;
        let hedging_delay = match h.get(ho, "hedgingDelay") {
            Some(d) => d.duration()?,
            None => Duration::ZERO,
        };
        let non_fatal_status_codes = match h.get(ho, "nonFatalStatusCodes") {
            Some(c) => c.codes()?,
            None => Vec::new(),
        };
        m.hedging_policy = Some(HedgingPolicy {
            max_attempts,
            hedging_delay,
            non_fatal_status_codes,
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_proto3_json() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(
            parse_duration("0.000000001s"),
            Some(Duration::from_nanos(1))
        );
        for bad in ["1.5", "s", "-1s", "1.0000000001s", "1e3s", " 1s", "1.s5"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_first_supported_policy_wins() {
        let config = ServiceConfig::parse(
            r#"{"loadBalancingConfig": [{"pick_first": {}}, {"least_request_experimental": {"choiceCount": 3}}, {"round_robin": {}}]}"#,
        )
        .unwrap();
        assert_eq!(config.policy, Some(Policy::least_request(3)));
        assert_eq!(config.outlier_detection, None);
    }

    #[test]
    fn outlier_detection_wraps_a_child_policy() {
        let config = ServiceConfig::parse(
            r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
                "interval": "5s", "baseEjectionTime": "10s", "maxEjectionPercent": 50,
                "failurePercentageEjection": {"threshold": 60, "minimumHosts": 2},
                "consecutiveFailures": {"threshold": 3},
                "failureCodes": ["UNAVAILABLE", 13],
                "childPolicy": [{"peak_ewma": {"decay": "2s", "slowStart": {"window": "20s"}}}]
            }}], "unknownField": {"ignored": true}}"#,
        )
        .unwrap();
        let od = config.outlier_detection.unwrap();
        assert_eq!(od.interval, Duration::from_secs(5));
        assert_eq!(od.max_ejection_percent, 50);
        assert_eq!(od.failure_percentage.unwrap().threshold, 60);
        assert_eq!(od.failure_percentage.unwrap().minimum_hosts, 2);
        assert_eq!(od.consecutive_failures.unwrap().threshold, 3);
        assert_eq!(od.success_rate, None);
        assert_eq!(od.failure_codes, vec![Code::Unavailable, Code::Internal]);
        assert!(matches!(
            config.policy,
            Some(Policy::PeakEwma { decay, .. }) if decay == Duration::from_secs(2)
        ));
        assert_eq!(config.slow_start.unwrap().window, Duration::from_secs(20));
    }

    #[test]
    fn random_subsetting_wraps_a_child_policy_either_way_round() {
        let config = ServiceConfig::parse(
            r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 20,
                "childPolicy": [{"outlier_detection_experimental": {"interval": "5s",
                    "childPolicy": [{"least_request_experimental": {}}]}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(config.subset_size, Some(20));
        assert_eq!(config.policy, Some(Policy::least_request(2)));
        assert_eq!(
            config.outlier_detection.unwrap().interval,
            Duration::from_secs(5)
        );
        // Inside outlier detection, with A68's proto field names.
        let config = ServiceConfig::parse(
            r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {
                "childPolicy": [{"random_subsetting": {"subset_size": 3,
                    "child_policy": [{"round_robin": {}}]}}]}}]}"#,
        )
        .unwrap();
        assert_eq!(config.subset_size, Some(3));
        assert_eq!(config.policy, Some(Policy::RoundRobin));
        assert!(config.outlier_detection.is_some());
    }

    #[test]
    fn method_config_is_kept_and_found_by_name() {
        let config = ServiceConfig::parse(
            r#"{"methodConfig": [
                {"name": [{"service": "echo.Echo", "method": "Unary"}], "timeout": "0.25s",
                 "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.1s", "maxBackoff": "1s",
                                 "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}},
                {"name": [{"service": "echo.Echo"}], "waitForReady": true,
                 "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s"}},
                {"name": [{}], "timeout": "10s"}
            ], "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}"#,
        )
        .unwrap();
        let unary = config.method("echo.Echo", "Unary").unwrap();
        assert_eq!(unary.timeout, Some(Duration::from_millis(250)));
        assert_eq!(
            unary.retry_policy.as_ref().unwrap().max_attempts,
            5,
            "capped"
        );
        let stream = config.method("echo.Echo", "Bidi").unwrap();
        assert_eq!(stream.wait_for_ready, Some(true));
        assert_eq!(stream.hedging_policy.as_ref().unwrap().max_attempts, 3);
        let other = config.method("other.Service", "Call").unwrap();
        assert_eq!(other.timeout, Some(Duration::from_secs(10)));
        assert_eq!(config.retry_throttling.unwrap().max_tokens, 10);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases = [
            ("[]", "the service config must be an object"),
            ("{", "is not JSON"),
            (
                r#"{"loadBalancingConfig": [{"least_request_experimental": {"choiceCount": 1}}]}"#,
                "loadBalancingConfig[0].least_request_experimental.choiceCount must be at least 2",
            ),
            (
                r#"{"loadBalancingConfig": [{"pick_first": {}}, {"grpclb": {}}]}"#,
                "loadBalancingConfig names no policy healthlb supports (pick_first, grpclb)",
            ),
            (
                r#"{"loadBalancingConfig": [{"round_robin": {}, "pick_first": {}}]}"#,
                "loadBalancingConfig[0] must hold exactly one policy",
            ),
            (
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {"interval": "10", "childPolicy": [{"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].outlier_detection_experimental.interval must be a duration",
            ),
            (
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {"maxEjectionPercent": 101, "childPolicy": [{"round_robin": {}}]}}]}"#,
                "maxEjectionPercent must be a whole number from 0 to 100",
            ),
            (
                r#"{"loadBalancingConfig": [{"outlier_detection_experimental": {}}]}"#,
                "outlier_detection_experimental.childPolicy is required",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 0, "childPolicy": [{"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].random_subsetting.subsetSize must be at least 1",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"childPolicy": [{"round_robin": {}}]}}]}"#,
                "loadBalancingConfig[0].random_subsetting.subsetSize is required",
            ),
            (
                r#"{"loadBalancingConfig": [{"random_subsetting": {"subsetSize": 2}}]}"#,
                "loadBalancingConfig[0].random_subsetting.childPolicy is required",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}], "retryPolicy": {"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
                "methodConfig[0].retryPolicy.maxAttempts must be at least 2",
            ),
            (
                r#"{"methodConfig": [{"retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["NOPE"]}}]}"#,
                "methodConfig[0].retryPolicy.retryableStatusCodes[0] \"NOPE\" is not a gRPC status code name",
            ),
            (
                r#"{"methodConfig": [{"name": [{"method": "Unary"}]}]}"#,
                "methodConfig[0].name[0] names a method without its service",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a"}]}, {"name": [{"service": "a"}]}]}"#,
                "methodConfig[1].name names a/ a second time",
            ),
            (
                r#"{"retryThrottling": {"maxTokens": 1001, "tokenRatio": 1}}"#,
                "retryThrottling.maxTokens must be a whole number from 1 to 1000",
            ),
            (
                r#"{"methodConfig": [{"timeout": 5}]}"#,
                "methodConfig[0].timeout must be a string, not a number",
            ),
        ];
        for (json, message) in cases {
            let err = ServiceConfig::parse(json).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidConfig);
            assert!(err.to_string().contains(message), "{json}: {err}");
        }
    }

    #[test]
    fn txt_choices_match_language_percentage_and_hostname() {
        let chooser = Chooser {
            percentile: 40,
            hostname: Some("pod-a".into()),
        };
        let record = |choices: &str| vec!["v=spf1".to_owned(), format!("grpc_config={choices}")];
        let timeout =
            |s: &str| format!(r#"{{"methodConfig": [{{"name": [{{}}], "timeout": "{s}"}}]}}"#);
        let chosen = |choices: String| {
            ServiceConfig::from_txt(&record(&choices), &chooser)
                .unwrap()
                .and_then(|c| c.method_config[0].timeout)
        };
        let one = timeout("1s");
        let two = timeout("2s");
        assert_eq!(
            chosen(format!(
                r#"[{{"clientLanguage": ["go"], "serviceConfig": {one}}}, {{"serviceConfig": {two}}}]"#
            )),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            chosen(format!(
                r#"[{{"clientLanguage": ["RUST"], "serviceConfig": {one}}}]"#
            )),
            Some(Duration::from_secs(1))
        );
        // Percentile 40 is in a 41 % choice, not in a 40 % one.
        assert_eq!(
            chosen(format!(
                r#"[{{"percentage": 40, "serviceConfig": {one}}}, {{"percentage": 41, "serviceConfig": {two}}}]"#
            )),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            chosen(format!(
                r#"[{{"clientHostname": ["pod-b"], "serviceConfig": {one}}}, {{"clientHostname": ["pod-a"], "serviceConfig": {two}}}]"#
            )),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            ServiceConfig::from_txt(&["v=spf1".to_owned()], &chooser).unwrap(),
            None
        );
    }

    #[test]
    fn bad_txt_records_name_what_is_wrong() {
        let chooser = Chooser {
            percentile: 0,
            hostname: None,
        };
        for (records, message) in [
            (vec!["grpc_config=[", "x"], "is not JSON"),
            (vec!["grpc_config=[]", "grpc_config=[]"], "more than one"),
            (
                vec![r#"grpc_config={"serviceConfig": {}}"#],
                "must be a list",
            ),
            (
                vec![r#"grpc_config=[{"percentage": 101, "serviceConfig": {}}]"#],
                "0 to 100",
            ),
            (
                vec![r#"grpc_config=[{"clientLanguage": "rust", "serviceConfig": {}}]"#],
                "must be a list",
            ),
            (vec![r#"grpc_config=[{}]"#], "serviceConfig is required"),
            (
                vec![r#"grpc_config=[{"serviceConfig": {"methodConfig": 1}}]"#],
                "_grpc_config[0].serviceConfig",
            ),
        ] {
            let records: Vec<String> = records.into_iter().map(str::to_owned).collect();
            let err = ServiceConfig::from_txt(&records, &chooser).unwrap_err();
            assert!(err.to_string().contains(message), "{records:?}: {err}");
        }
    }
}
