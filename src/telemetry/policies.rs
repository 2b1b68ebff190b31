//! The policies' own instruments: gRFC A78's of weighted round robin,
//! recorded each time the balancer works the weights out
//! (`grpc.lb.wrr.rr_fallback`, `grpc.lb.wrr.endpoint_weight_not_yet_usable`,
//! `grpc.lb.wrr.endpoint_weight_stale` and `grpc.lb.wrr.endpoint_weights`,
//! labelled with the target and the endpoint's locality, its zone), and
//! ring hash's `grpc.lb.ring_hash.walked`.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider};

use super::otel::SCOPE;
use crate::load::WeightState;

pub(crate) struct Instruments {
    target: KeyValue,
    /// Ring hash's, beside weighted round robin's: the other policy with
    /// instruments of its own.
    walked: Counter<u64>,
    fallback: Counter<u64>,
    not_yet_usable: Counter<u64>,
    stale: Counter<u64>,
    weights: Histogram<f64>,
}

impl Instruments {
    pub(crate) fn new(provider: &dyn MeterProvider, target: &str) -> Self {
        let meter = provider.meter(SCOPE);
        let counter = |name, unit, what| super::otel::counter(&meter, name, unit, what);
        Self {
            target: KeyValue::new("grpc.target", target.to_owned()),
            walked: counter(
                "grpc.lb.ring_hash.walked",
                "{call}",
                "healthlb: calls that went past their key's first endpoint on the ring, by reason (not_in_rotation, overloaded).",
            ),
            fallback: counter(
                "grpc.lb.wrr.rr_fallback",
                "{update}",
                "Number of scheduler updates in which there were not enough endpoints with valid weight, which caused the WRR policy to fall back to RR behavior.",
            ),
            not_yet_usable: counter(
                "grpc.lb.wrr.endpoint_weight_not_yet_usable",
                "{endpoint}",
                "Number of endpoints from each scheduler update that don't yet have usable weight information (i.e., either the load report has not yet been received, or it is within the blackout period).",
            ),
            stale: counter(
                "grpc.lb.wrr.endpoint_weight_stale",
                "{endpoint}",
                "Number of endpoints from each scheduler update whose latest weight is older than the expiration period.",
            ),
            weights: meter
                .f64_histogram("grpc.lb.wrr.endpoint_weights")
                .with_unit("{weight}")
                .with_description("Weight of each endpoint, recorded on every scheduler update. Endpoints without usable weights will be recorded as weight 0.")
                .build(),
        }
    }

    fn labels(&self, locality: Option<&str>) -> [KeyValue; 2] {
        [
            self.target.clone(),
            KeyValue::new("grpc.lb.locality", locality.unwrap_or_default().to_owned()),
        ]
    }

    pub(crate) fn walked(&self, reason: &'static str) {
        let labels = [
            self.target.clone(),
            KeyValue::new("grpc.lb.ring_hash.reason", reason),
        ];
        self.walked.add(1, &labels);
    }

    pub(crate) fn fell_back(&self) {
        self.fallback.add(1, &self.labels(None));
    }

    pub(crate) fn endpoint(&self, locality: Option<&str>, state: WeightState, weight: f64) {
        let labels = self.labels(locality);
        match state {
            WeightState::NotYetUsable => self.not_yet_usable.add(1, &labels),
            WeightState::Stale => self.stale.add(1, &labels),
            WeightState::Usable => {}
        }
        self.weights.record(weight, &labels);
    }
}
