//! The service config as calls use it: parsed, with its token bucket.

use std::sync::Arc;

use super::throttle::Throttle;
use crate::service_config::ServiceConfig;

/// A service config as calls use it, with its token bucket.
#[derive(Debug)]
pub(crate) struct AppliedConfig {
    pub(crate) config: Arc<ServiceConfig>,
    pub(crate) throttle: Option<Arc<Throttle>>,
}

impl AppliedConfig {
    pub(crate) fn new(config: Arc<ServiceConfig>) -> Arc<Self> {
        let throttle = config
            .retry_throttling
            .as_ref()
            .map(|t| Arc::new(Throttle::new(t)));
        Arc::new(Self { config, throttle })
    }
}
