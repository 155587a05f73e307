//! One product's state, folded from its stream. The publisher decides from it; the
//! publish read model keeps one per product. Same fold, so the two never disagree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::RecordedEvent;
use crate::events::catalogue::{
    DomainEvent, ProductFinalized, ProductRegistered, PublishFailed, PublishStarted,
    PublishSucceeded, RetryRequested,
};
use crate::events::record::RecordRef;

/// Longest error text kept, in characters.
pub const MAX_ERROR_CHARS: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProductStatus {
    Staging,
    Publishing,
    Published,
}

impl ProductStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProductStatus::Staging => "staging",
            ProductStatus::Publishing => "publishing",
            ProductStatus::Published => "published",
        }
    }
}

/// A product fact, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum ProductEvent {
    Registered(ProductRegistered),
    Finalized(ProductFinalized),
    PublishStarted(PublishStarted),
    PublishSucceeded(PublishSucceeded),
    PublishFailed(PublishFailed),
    RetryRequested(RetryRequested),
}

fn decode<T: DomainEvent>(r: &RecordRef<'_>) -> Result<T, String> {
    serde_json::from_slice(r.data)
        .map_err(|e| format!("{} v{} does not decode: {e}", r.event_type, r.event_version))
}

impl ProductEvent {
    /// `Ok(None)` for events that are not product facts; `Err` for a product fact whose
    /// payload does not decode (a poison event, parked by the projection).
    pub fn decode(r: &RecordedEvent) -> Result<Option<ProductEvent>, String> {
        Self::decode_view(&r.view())
    }

    /// The stored type name of this fact.
    pub fn type_name(&self) -> &'static str {
        match self {
            ProductEvent::Registered(_) => ProductRegistered::TYPE,
            ProductEvent::Finalized(_) => ProductFinalized::TYPE,
            ProductEvent::PublishStarted(_) => PublishStarted::TYPE,
            ProductEvent::PublishSucceeded(_) => PublishSucceeded::TYPE,
            ProductEvent::PublishFailed(_) => PublishFailed::TYPE,
            ProductEvent::RetryRequested(_) => RetryRequested::TYPE,
        }
    }

    /// [`ProductEvent::decode`] of a record read in place.
    pub fn decode_view(r: &RecordRef<'_>) -> Result<Option<ProductEvent>, String> {
        if r.category() != ProductRegistered::CATEGORY {
            return Ok(None);
        }
        Ok(Some(match r.event_type {
            ProductRegistered::TYPE => ProductEvent::Registered(decode(r)?),
            ProductFinalized::TYPE => ProductEvent::Finalized(decode(r)?),
            PublishStarted::TYPE => ProductEvent::PublishStarted(decode(r)?),
            PublishSucceeded::TYPE => ProductEvent::PublishSucceeded(decode(r)?),
            PublishFailed::TYPE => ProductEvent::PublishFailed(decode(r)?),
            RetryRequested::TYPE => ProductEvent::RetryRequested(decode(r)?),
            other => return Err(format!("unknown product event type {other}")),
        }))
    }
}

/// Everything known about one product. Times are the commit times of the events
/// (microseconds since the epoch), so a replay gives the same state every time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductState {
    pub data_id: String,
    pub data_type: String,
    pub stage_path: String,
    pub checksum: Option<String>,
    pub size_bytes: Option<u64>,
    pub qa_status: Option<String>,
    pub validation_status: Option<String>,
    pub auto_publish: bool,
    pub metadata: BTreeMap<String, String>,
    pub status: ProductStatus,
    /// Automatic attempts since the last operator retry.
    pub publish_attempts: u32,
    /// Every attempt ever; never decreases.
    pub total_attempts: u32,
    pub last_error: Option<String>,
    pub last_error_retryable: bool,
    pub next_retry_at: Option<i64>,
    pub created_at: i64,
    pub staged_at: i64,
    pub last_failure_at: Option<i64>,
    pub publishing_since: Option<i64>,
    pub published_at: Option<i64>,
    pub published_path: Option<String>,
    /// Where the running or last publish was headed.
    pub destination: Option<String>,
    /// Revision of the stream's last event.
    pub revision: u64,
}

/// Data types whose QA must have passed before an automatic publish.
pub const QA_GATED: &[&str] = &[
    "image",
    "images",
    "mosaic",
    "mosaics",
    "calib_ms",
    "caltable",
    "caltables",
];

pub fn truncate_error(e: &str) -> String {
    e.chars().take(MAX_ERROR_CHARS).collect()
}

fn parse_time(s: &Option<String>) -> Option<i64> {
    s.as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros())
}

impl ProductState {
    /// State after the first event of the stream; `None` unless it is a registration.
    pub fn start(e: ProductEvent, at: i64, revision: u64) -> Option<ProductState> {
        let ProductEvent::Registered(r) = e else {
            return None;
        };
        Some(ProductState {
            data_id: r.data_id,
            data_type: r.data_type,
            stage_path: r.stage_path,
            checksum: r.checksum,
            size_bytes: r.size_bytes,
            qa_status: r.qa_status,
            validation_status: r.validation_status,
            auto_publish: r.auto_publish,
            metadata: r.metadata,
            status: ProductStatus::Staging,
            publish_attempts: 0,
            total_attempts: 0,
            last_error: None,
            last_error_retryable: false,
            next_retry_at: None,
            created_at: at,
            staged_at: at,
            last_failure_at: None,
            publishing_since: None,
            published_at: None,
            published_path: None,
            destination: None,
            revision,
        })
    }

    /// Folds one later event in (its strings are moved, not copied). Cannot fail:
    /// decoding already happened.
    pub fn apply(&mut self, e: ProductEvent, at: i64, revision: u64) {
        self.revision = revision;
        match e {
            ProductEvent::Registered(_) => {}
            ProductEvent::Finalized(f) => {
                if f.qa_status.is_some() {
                    self.qa_status = f.qa_status;
                }
                if f.validation_status.is_some() {
                    self.validation_status = f.validation_status;
                }
            }
            ProductEvent::PublishStarted(s) => {
                self.status = ProductStatus::Publishing;
                self.publishing_since = Some(at);
                self.total_attempts += 1;
                self.destination = Some(s.destination);
                self.next_retry_at = None;
            }
            ProductEvent::PublishSucceeded(s) => {
                self.status = ProductStatus::Published;
                self.publishing_since = None;
                self.published_at = Some(at);
                self.published_path = Some(s.published_path);
                self.next_retry_at = None;
            }
            ProductEvent::PublishFailed(f) => {
                self.status = ProductStatus::Staging;
                self.publishing_since = None;
                self.publish_attempts = self.publish_attempts.max(f.attempt);
                self.last_error = Some(truncate_error(&f.error));
                self.last_error_retryable = f.retryable;
                self.last_failure_at = Some(at);
                self.next_retry_at = parse_time(&f.next_retry_at);
            }
            ProductEvent::RetryRequested(_) => {
                self.publish_attempts = 0;
                self.next_retry_at = None;
            }
        }
    }

    /// Folds a whole stream read from the ledger.
    pub fn from_events(events: &[RecordedEvent]) -> Result<Option<ProductState>, String> {
        let mut state: Option<ProductState> = None;
        for r in events {
            let Some(e) = ProductEvent::decode(r)? else {
                continue;
            };
            match &mut state {
                None => state = ProductState::start(e, r.created_micros, r.revision),
                Some(s) => s.apply(e, r.created_micros, r.revision),
            }
        }
        Ok(state)
    }

    /// Validated, QA passed where the type needs it, and automatic publishing on.
    pub fn eligible_for_auto_publish(&self) -> bool {
        self.auto_publish
            && self.validation_status.as_deref() == Some("validated")
            && (!QA_GATED.contains(&self.data_type.as_str())
                || self.qa_status.as_deref() == Some("passed"))
    }

    /// Failed at least once and back in staging.
    pub fn is_failed(&self) -> bool {
        self.status == ProductStatus::Staging && self.publish_attempts > 0
    }

    pub fn attempts_exhausted(&self, max_attempts: u32) -> bool {
        self.is_failed() && self.publish_attempts >= max_attempts
    }

    /// When the automatic publisher should next try this product, if ever.
    pub fn auto_due_at(&self, max_attempts: u32) -> Option<i64> {
        if self.status != ProductStatus::Staging || !self.eligible_for_auto_publish() {
            return None;
        }
        if self.publish_attempts == 0 {
            // Never tried since registration or since an operator's retry.
            return Some(self.last_failure_at.unwrap_or(self.staged_at));
        }
        if self.last_error_retryable && self.publish_attempts < max_attempts {
            return self.next_retry_at;
        }
        None
    }
}
