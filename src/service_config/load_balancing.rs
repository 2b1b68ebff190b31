//! `loadBalancingConfig`: the first policy healthlb runs wins, as in gRPC.
//! Each policy's own JSON is read beside its type: `picker/policy.rs`
//! and `outlier/config.rs`.

use super::json::{Field, invalid, single};
use crate::Error;
use crate::outlier::OutlierDetection;
use crate::picker::{Policy, SlowStart};

/// The names of the policies healthlb runs.
pub(crate) const SUPPORTED: &str = "round_robin, least_request_experimental, peak_ewma, \
    outlier_detection_experimental, random_subsetting (or random_subsetting_experimental)";

/// What a `loadBalancingConfig` list chose.
pub(crate) struct Chosen {
    pub(crate) policy: Policy,
    pub(crate) slow_start: Option<SlowStart>,
    pub(crate) outlier_detection: Option<OutlierDetection>,
    pub(crate) subset_size: Option<u32>,
}

/// The first supported entry of a `loadBalancingConfig` list. Every entry
/// up to it is checked for shape; entries after it are not read, as in
/// gRPC. A list with no supported entry is invalid.
pub(crate) fn load_balancing(list: &Field<'_>) -> Result<Option<Chosen>, Error> {
    let entries = list.array()?;
    if entries.is_empty() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for entry in &entries {
        let (name, config) = single(entry)?;
        if name == "outlier_detection_experimental" {
            let outlier = OutlierDetection::from_json(&config)?;
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
        if let Some((policy, slow_start)) = Policy::from_json(entry)? {
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
