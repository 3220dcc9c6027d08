//! The feature off: the same calls as `enabled.rs`, on zero-sized types,
//! each empty and inlined, so that the callers need no `cfg` of their own
//! and compile to what they were before the instrumentation.

use std::future::Future;

use super::{Received, Settled};
use crate::config::Config;
use crate::error::Error;
use crate::events::Confirmation;
use crate::protocol::methods::basic;
use crate::protocol::{BasicProperties, ReceivedProperties};

/// A connection's telemetry: nothing. (Not `Copy`, as the enabled one
/// is not, so that the callers' `clone`s are right for both.)
#[derive(Debug, Clone)]
pub(crate) struct Telemetry;

/// When a timed operation started: not measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started;

impl Started {
    #[inline(always)]
    pub(crate) fn now() -> Self {
        Self
    }
}

impl Telemetry {
    #[inline(always)]
    pub(crate) fn new(_config: &Config, _address_index: usize) -> Self {
        Self
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn unobserved() -> Self {
        Self
    }

    #[inline(always)]
    pub(crate) fn instrument<F: Future>(&self, task: F) -> F {
        task
    }

    #[inline(always)]
    pub(crate) fn channel(&self, _id: u16) -> ChannelTelemetry {
        ChannelTelemetry
    }

    #[inline(always)]
    pub(crate) fn connection_started(&self) {}

    #[inline(always)]
    pub(crate) fn connection_ended(&self) {}

    #[inline(always)]
    pub(crate) fn reconnected(&self) {}

    #[inline(always)]
    pub(crate) fn bytes_sent(&self, _n: usize) {}

    #[inline(always)]
    pub(crate) fn bytes_received(&self, _n: usize) {}

    #[inline(always)]
    pub(crate) fn call_done(
        &self,
        _method: &'static str,
        _started: Started,
        _error: Option<&Error>,
    ) {
    }
}

/// What the I/O task reports: nothing.
#[derive(Debug)]
pub(crate) struct IoTelemetry(Telemetry);

impl IoTelemetry {
    #[inline(always)]
    pub(crate) fn new(telemetry: Telemetry) -> Self {
        Self(telemetry)
    }

    #[inline(always)]
    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.0
    }

    #[inline(always)]
    pub(crate) fn channels(&self, _now: usize) {}

    #[inline(always)]
    pub(crate) fn blocked(&self, _blocked: bool) {}

    #[inline(always)]
    pub(crate) fn confirmed(&self, _outcome: &Result<Confirmation, Error>) {}

    #[inline(always)]
    pub(crate) fn returned(&self) {}
}

/// A channel handle's telemetry: nothing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelTelemetry;

/// No span.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OperationSpan;

impl ChannelTelemetry {
    #[inline(always)]
    pub(crate) fn publish(
        &self,
        _publish: &basic::Publish,
        _properties: &BasicProperties,
        _body_size: usize,
    ) -> OperationSpan {
        OperationSpan
    }

    #[inline(always)]
    pub(crate) fn published(&self) {}

    #[inline(always)]
    pub(crate) fn received(
        &self,
        _envelope: Received<'_>,
        _properties: &ReceivedProperties,
        _body_size: usize,
    ) -> OperationSpan {
        OperationSpan
    }

    #[inline(always)]
    pub(crate) fn settled(&self, _settled: Settled, _delivery_tag: u64) {}
}
