//! The service config from DNS: the `_grpc_config.<host>` TXT record's
//! choices, in gRPC's DNS format.

use std::cell::RefCell;

use serde_json::Value;

use super::ServiceConfig;
use super::json::{Field, invalid};
use crate::Error;

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
