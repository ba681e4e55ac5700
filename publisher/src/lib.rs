//! The vendor's side of tally: bundle specs, and the import of FlexLM and RLM license files.
//!
//! - [`spec`]: the readable TOML a vendor writes to describe what a customer bought.
//! - [`flexlm`]: turns a FlexLM license file into such a spec, for review.
//! - [`rlm`]: the same for an RLM license file.
//! - [`reconcile`]: verifies usage report chains and reconciles them against a bundle.
//! - [`inspect`]: what a tally file is and says (`tally-publisher inspect`).
//! - [`receive`]: the HTTPS receiver for the reports tallyd uploads.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod flexlm;
pub mod inspect;
pub mod receive;
pub mod reconcile;
pub mod rlm;
pub mod spec;
